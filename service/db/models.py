"""The database schema (SQLAlchemy 2 declarative). Changes need an Alembic migration beside it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from service.projects import DEFAULT_PROJECT

__all__ = [
    "Base",
    "BlobRow",
    "BuildLogRow",
    "BuildRow",
    "DatasetRow",
    "JobRow",
    "ModelRow",
    "SweepRow",
    "TableRow",
    "TokenRow",
    "UTCDateTime",
    "WorkerRow",
    "utcnow",
]

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Now, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC (SQLite keeps no zone), always returned timezone-aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use utcnow()")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON,
        list[Any]: JSON,
    }


class ModelRow(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    filename: Mapped[str] = mapped_column(String(255))
    onnx_filename: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    external_data: Mapped[bool] = mapped_column(Boolean)
    info: Mapped[dict[str, Any]]
    """opset, ir_version, inputs, outputs, dynamic_dims, op_census, num_nodes."""
    tensor_names: Mapped[list[Any]]
    """Float activations a calibration table may give ranges for."""
    name: Mapped[str | None] = mapped_column(String(200))
    """A name its user gave it (none: null)."""
    tags: Mapped[str] = mapped_column(Text, server_default="")
    """Its tags as ``,a,b,`` (sorted; none: ``""``): a tag filter is a plain LIKE."""
    project: Mapped[str] = mapped_column(String(64), server_default=DEFAULT_PROJECT, index=True)
    """The project it belongs to (:mod:`service.projects`)."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DatasetRow(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    data_filename: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(32))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    num_samples: Mapped[int] = mapped_column(Integer)
    inputs: Mapped[list[Any]]
    digest: Mapped[str] = mapped_column(String(64))
    preprocess: Mapped[dict[str, Any] | None]
    input_name: Mapped[str | None] = mapped_column(String(255))
    name: Mapped[str | None] = mapped_column(String(200))
    """A name its user gave it (none: null)."""
    tags: Mapped[str] = mapped_column(Text, server_default="")
    """Its tags as ``,a,b,`` (sorted; none: ``""``): a tag filter is a plain LIKE."""
    model_id: Mapped[str | None] = mapped_column(
        ForeignKey("models.id", ondelete="SET NULL"), index=True
    )
    project: Mapped[str] = mapped_column(String(64), server_default=DEFAULT_PROJECT, index=True)
    """The project it belongs to (:mod:`service.projects`)."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TableRow(Base):
    __tablename__ = "calibration_tables"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    """The table cache key (computed tables) or a digest of model + table (imports)."""
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    dataset_id: Mapped[str | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL"), index=True
    )
    source: Mapped[str] = mapped_column(String(16))
    method: Mapped[str | None] = mapped_column(String(32))
    algorithm: Mapped[str] = mapped_column(String(64))
    parameters: Mapped[dict[str, Any]]
    samples: Mapped[int] = mapped_column(Integer)
    num_tensors: Mapped[int] = mapped_column(Integer)
    digest: Mapped[str] = mapped_column(String(64))
    blob_sha256: Mapped[str] = mapped_column(String(64), index=True)
    missing_tensors: Mapped[list[Any]]
    project: Mapped[str] = mapped_column(String(64), server_default=DEFAULT_PROJECT, index=True)
    """The project it belongs to (:mod:`service.projects`)."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class BlobRow(Base):
    """A stored blob (``blobs/<aa>/<sha256>``): the row that linking a row to it and deleting it
    lock, so that a blob is deleted only when no row references it (:mod:`service.store.blobs`)."""

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class BuildRow(Base):
    __tablename__ = "builds"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    cache_key: Mapped[str] = mapped_column(String(64), unique=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), index=True)
    eval_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"), index=True)
    """Separate evaluation samples (``BuildCreate.eval_dataset_id``)."""
    sensitivity_build_id: Mapped[str | None] = mapped_column(String(32))
    """The build that computes this build's node sensitivity (``POST
    /v1/builds/{id}/sensitivity``); null: none asked for (or this build's own request did)."""
    table_id: Mapped[str | None] = mapped_column(
        ForeignKey("calibration_tables.id", ondelete="SET NULL")
    )
    request: Mapped[dict[str, Any]]
    """The BuildCreate body (spec and options), as JSON."""
    spec_digest: Mapped[str] = mapped_column(String(64))
    requested_backend: Mapped[str] = mapped_column(String(32), server_default="auto")
    """What the request asked for (``auto``, ``tensorrt``, ...): which workers may claim it."""
    requested_target: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    """The :class:`service.schemas.TargetRequest` it waits for (GPU, TensorRT, labels); None:
    any worker that builds ``requested_backend``."""
    worker_id: Mapped[str | None] = mapped_column(String(64))
    """The worker that claimed it last."""
    backend: Mapped[str] = mapped_column(String(32))
    """The target it was built for (written by the worker that claims it; ``""`` until then)."""
    backend_version: Mapped[str] = mapped_column(String(64))
    compute_capability: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    stage: Mapped[str | None] = mapped_column(String(16))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    table_from_cache: Mapped[bool | None] = mapped_column(Boolean)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    stage_seconds: Mapped[dict[str, Any]]
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_hint: Mapped[str | None] = mapped_column(Text)
    artifact_sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    artifact_filename: Mapped[str | None] = mapped_column(String(255))
    artifact_size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    artifact_metadata: Mapped[dict[str, Any] | None]
    report_sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    project: Mapped[str] = mapped_column(String(64), server_default=DEFAULT_PROJECT, index=True)
    """The project it belongs to (:mod:`service.projects`)."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    job: Mapped[JobRow | None] = relationship(back_populates="build", uselist=False)


class SweepRow(Base):
    """A sweep: one build per variant (``variants``: ``[{"name", "build_id"}]``), aggregated when
    read. No foreign keys: its builds may be deleted (the sweep then shows them as gone)."""

    __tablename__ = "sweeps"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    model_id: Mapped[str] = mapped_column(String(64), index=True)
    dataset_id: Mapped[str] = mapped_column(String(64))
    eval_dataset_id: Mapped[str | None] = mapped_column(String(64))
    request: Mapped[dict[str, Any]]
    """The SweepCreate body, as JSON."""
    variants: Mapped[list[Any]]
    project: Mapped[str] = mapped_column(String(64), server_default=DEFAULT_PROJECT, index=True)
    """Its model's project (:mod:`service.projects`)."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class BuildLogRow(Base):
    __tablename__ = "build_logs"
    __table_args__ = (Index("ix_build_logs_build_id_id", "build_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    build_id: Mapped[str] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(8))
    stage: Mapped[str | None] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    build_id: Mapped[str] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"), unique=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    """queued | running | finished"""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(64))
    claimed_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    build: Mapped[BuildRow] = relationship(back_populates="job")


class WorkerRow(Base):
    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    process_tag: Mapped[str] = mapped_column(String(64))
    slots: Mapped[int] = mapped_column(Integer)
    targets: Mapped[list[Any]] = mapped_column(server_default="[]")
    """What it can build for: :class:`engines.backends.base.BuildTarget` dumps."""
    labels: Mapped[list[Any]] = mapped_column(server_default="[]")
    """Labels from its configuration; a build asking for labels needs a worker with all of them."""
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    stopped_at: Mapped[datetime | None]
    problem: Mapped[str | None] = mapped_column(String(500))
    """Why it takes no builds now, as it reported with its last heartbeat (None: none)."""


class TokenRow(Base):
    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    scope: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    project: Mapped[str] = mapped_column(String(64), server_default=DEFAULT_PROJECT)
    """The project whose data it reads and writes (admin tokens: every project's)."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
