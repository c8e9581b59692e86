"""What a build records is read by users through the API: no server paths in it."""

from __future__ import annotations

from pathlib import Path

from service.db import Database
from service.db.models import BuildLogRow, BuildRow
from service.worker.recorder import BuildRecorder
from tests.unit.service.support import insert_build


def test_recorded_failures_and_log_lines_carry_no_server_paths(
    tmp_path: Path, sqlite_url: str
) -> None:
    db = Database(sqlite_url)
    db.migrate()
    data = tmp_path / "srv" / "data"
    try:
        with db.session() as session:
            insert_build(session, "b1")
            session.commit()
        recorder = BuildRecorder(db, "b1", data_dir=data)
        recorder.fail(
            "build_failed",
            f"Artifact '{data}/work/b1/model-int8.onnx' does not exist",
            f"Free space in {data}/blobs.",
            details=f'Traceback:\n  File "{data}/work/b1/x.py", line 1',
        )
        with db.session() as session:
            row = session.get_one(BuildRow, "b1")
            lines = [r.message for r in session.query(BuildLogRow).filter_by(build_id="b1")]
        assert row.error_message == "Artifact 'model-int8.onnx' does not exist"
        assert row.error_hint == "Free space in blobs."
        assert lines and not any(str(data) in line for line in lines)
        assert any('File "x.py"' in line for line in lines)
    finally:
        db.dispose()
