"""Helpers shared by the service tests: databases (SQLite, and PostgreSQL when
TRTFORGE_TEST_POSTGRES_URL is set), real tiny models and datasets, leftover-file checks."""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import os
import re
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from service.api.auth import create_token
from service.db import Database
from service.db.models import BuildRow, DatasetRow, ModelRow
from service.queue.base import JobQueue
from service.queue.database import DatabaseQueue
from service.schemas import BuildCreate, BuildStatus, Scope
from service.settings import Settings
from service.store.storage import Storage
from service.worker.pipeline import run_build
from tests import zoo

POSTGRES_ENV = "TRTFORGE_TEST_POSTGRES_URL"

DATABASES = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param(
        "postgres",
        id="postgres",
        marks=[
            pytest.mark.postgres,
            pytest.mark.skipif(
                not os.environ.get(POSTGRES_ENV),
                reason=f"{POSTGRES_ENV} is not set (scripts/postgres.sh starts a server)",
            ),
        ],
    ),
]
"""Parametrize persistence and API tests with these."""


@functools.cache
def _sqlite_template() -> Path:
    """A migrated SQLite file, copied for each test (migrating anew costs ~0.5 s a test)."""
    folder = Path(tempfile.mkdtemp(prefix="trtforge-template-"))
    atexit.register(shutil.rmtree, folder, True)
    db = Database(f"sqlite:///{folder / 'template.db'}")
    db.migrate()
    db.dispose()
    return folder / "template.db"


@functools.cache
def _postgres_template() -> str:
    """A migrated PostgreSQL database that test databases are created from."""
    name = f"trtforge_template_{uuid.uuid4().hex[:12]}"
    server = make_url(os.environ[POSTGRES_ENV])
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    db = Database(server.set(database=name).render_as_string(hide_password=False))
    db.migrate()
    from service.queue.procrastinate_schema import ensure_schema

    ensure_schema(db)  # what opening the queue does (TRTFORGE_QUEUE=auto) is done once here
    db.dispose()
    atexit.register(_drop_database, name)
    return name


def _drop_database(name: str) -> None:
    admin = create_engine(make_url(os.environ[POSTGRES_ENV]), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@contextlib.contextmanager
def database_url(kind: str, folder: Path, *, migrated: bool = True) -> Iterator[str]:
    """A database of ``kind`` for one test: already migrated (from a template) unless not
    ``migrated``; a PostgreSQL one is dropped afterwards."""
    if kind == "sqlite":
        path = folder / "trtforge-test.db"
        if migrated:
            shutil.copyfile(_sqlite_template(), path)
        yield f"sqlite:///{path}"
        return
    server = make_url(os.environ[POSTGRES_ENV])
    name = f"trtforge_test_{uuid.uuid4().hex[:12]}"
    template = f' TEMPLATE "{_postgres_template()}"' if migrated else ""
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"{template}'))
    admin.dispose()
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        _drop_database(name)


QUEUES = ["database", "procrastinate"]
"""Parametrize queue behaviour tests with these (:func:`make_queue`)."""


def make_queue(kind: str, db: Database, settings: Settings) -> DatabaseQueue:
    """The queue ``kind`` on ``db``; Procrastinate's skips on SQLite (it runs on PostgreSQL)."""
    if kind == "database":
        return DatabaseQueue(db, settings)
    if db.sqlite_path is not None or db.engine.dialect.name != "postgresql":
        pytest.skip("Procrastinate runs on PostgreSQL only")
    from service.queue.procrastinate_queue import ProcrastinateQueue
    from service.queue.procrastinate_schema import ensure_schema

    ensure_schema(db)
    return ProcrastinateQueue(db, settings)


def make_settings(data_dir: Path, url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": data_dir,
        "database_url": url,
        "workers": 0,
        "poll_interval_s": 0.1,
        "heartbeat_s": 0.5,
        "stale_after_s": 5.0,
        "allowed_hosts": ["testserver"],  # Starlette's TestClient's Host
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


FAST = {"benchmark": {"warmup_ms": 0, "iterations": 3, "duration_s": 0}}
"""A build request's benchmark section that measures in milliseconds (3 timed runs)."""


def run_in_process(settings: Settings, build_id: str) -> BuildStatus:
    """Run build ``build_id``'s pipeline here, as a worker's child runs it."""
    db = Database(settings.resolved_database_url)
    try:
        return run_build(build_id, db=db, storage=Storage(settings.data_dir), settings=settings)
    finally:
        db.dispose()


def bearer(db_url: str, scope: Scope, project: str) -> dict[str, str]:
    """The ``Authorization`` header of a new token of ``scope`` in ``project``."""
    db = Database(db_url)
    with db.session() as session:
        _, token = create_token(session, f"{project}-{scope.value}", scope, project)
    db.dispose()
    return {"Authorization": f"Bearer {token}"}


def model_bytes(**kwargs: object) -> bytes:
    """The zoo's tiny CNN (input ``image`` [batch, 3, 16, 16] -> ``logits`` [batch, 10])."""
    return bytes(zoo.tiny_cnn(**kwargs).SerializeToString())  # type: ignore[arg-type]


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def images(count: int = 12, seed: int = 0) -> np.ndarray:
    """Calibration samples for the tiny CNN: smooth, positive-ish images."""
    rng = np.random.default_rng(seed)
    return rng.normal(0.5, 0.25, size=(count, 3, 16, 16)).astype(np.float32)


def dataset_bytes(count: int = 12, seed: int = 0) -> bytes:
    return npz_bytes(image=images(count, seed))


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buf.getvalue()


def external_data_zip(folder: Path) -> bytes:
    """The tiny CNN saved with its weights in ``weights.bin``, zipped with the .onnx."""
    path = zoo.save_with_external_data(zoo.tiny_cnn(), folder / "ext")
    return zip_bytes(
        {"model.onnx": path.read_bytes(), "weights.bin": (path.parent / "weights.bin").read_bytes()}
    )


def stored_files(data_dir: Path) -> list[str]:
    """Every file under the data directory except the database and its lock/WAL files and the
    session secret."""
    return sorted(
        p.relative_to(data_dir).as_posix()
        for p in data_dir.rglob("*")
        if p.is_file()
        and not p.name.startswith("trtforge-test.db")
        and not p.name.startswith("trtforge.db")
        and p.name != "session.key"
    )


def insert_build(
    session: Session, build_id: str, *, status: str = "queued", requested_backend: str = "auto"
) -> BuildRow:
    """A build row (with its model and dataset rows) for queue tests that run no pipeline."""
    model = session.get(ModelRow, "m" * 64) or ModelRow(
        id="m" * 64,
        filename="m.onnx",
        onnx_filename="model.onnx",
        size_bytes=1,
        external_data=False,
        info={},
        tensor_names=[],
    )
    dataset = session.get(DatasetRow, "d" * 64) or DatasetRow(
        id="d" * 64,
        sha256="d" * 64,
        filename="d.npz",
        data_filename="dataset.npz",
        format="npz",
        size_bytes=1,
        num_samples=1,
        inputs=[],
        digest="d" * 64,
    )
    session.add_all([model, dataset])
    session.flush()
    build = BuildRow(
        id=build_id,
        cache_key=uuid.uuid4().hex,
        model_id=model.id,
        dataset_id=dataset.id,
        request=BuildCreate(model_id=model.id, dataset_id=dataset.id).model_dump(mode="json"),
        spec_digest="s",
        requested_backend=requested_backend,
        backend="",  # the claiming worker writes its target
        backend_version="",
        compute_capability="",
        status=status,
        stage_seconds={},
    )
    session.add(build)
    session.flush()
    return build


def enqueue_builds(db: Database, queue: JobQueue, *build_ids: str, **fields: object) -> None:
    """Queue a build row (:func:`insert_build`, with ``fields`` set on it) for each id, in one
    committed transaction."""
    with db.session() as session:
        for build_id in build_ids:
            build = insert_build(session, build_id)
            for name, value in fields.items():
                setattr(build, name, value)
            queue.enqueue(session, build_id)
        session.commit()


def login_form(client: httpx.Client, token: str) -> dict[str, str]:
    """The dashboard's sign-in form as a browser posts it: ``GET /login`` first (its CSRF nonce
    cookie goes into ``client``'s jar, unmarked Secure so plain-http test clients send it back),
    then the token with the form's hidden CSRF token."""
    page = client.get("/login")
    nonce = page.cookies.get("trtforge_csrf")
    if nonce:
        client.cookies.set("trtforge_csrf", nonce)
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert found is not None, "the sign-in form carries no CSRF token"
    return {"token": token, "csrf_token": found.group(1)}
