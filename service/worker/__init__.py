"""The build worker: slots that claim queued builds (:mod:`.slots`), the per-build child process
(:mod:`.runner`, :mod:`.processes`), the pipeline it runs (:mod:`.pipeline`) and the recorder that
writes its progress to the database (:mod:`.recorder`)."""
