"""What the service keeps: blobs on disk (:mod:`.storage`), models, datasets and tables
(:mod:`.catalog`, :mod:`.ingest`), build rows and the build cache (:mod:`.builds`), and the
cleanup of what is no longer referenced (:mod:`.cleanup`)."""
