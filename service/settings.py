"""The one settings object of the service: built once (from ``TRTFORGE_*`` variables) and injected.

Unsafe combinations are refused when the object is built, so a server never starts with them:
a non-loopback bind with authentication switched off, a database URL of an unknown kind, limits
that are not positive.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engines.backends.base import BuildTarget
from service.errors import SettingsError
from service.schemas import MAX_LABELS, Label

__all__ = [
    "QueueEngine",
    "Settings",
    "default_data_dir",
    "hostname",
    "is_loopback",
    "load_settings",
]

_GiB = 1 << 30


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/trtforge``, else ``~/.local/share/trtforge``."""
    import os

    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "trtforge"


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


PositiveSeconds = Annotated[float, Field(gt=0)]


class QueueEngine(StrEnum):
    """Where builds wait for a worker (``TRTFORGE_QUEUE``)."""

    AUTO = "auto"
    """``procrastinate`` on PostgreSQL, ``database`` on SQLite."""
    DATABASE = "database"
    """Job rows in the service database (:mod:`service.queue.database`)."""
    PROCRASTINATE = "procrastinate"
    """Procrastinate's PostgreSQL queue (:mod:`service.queue.procrastinate_queue`)."""


class Settings(BaseSettings):
    """Service settings; every field reads ``TRTFORGE_<FIELD>`` from the environment."""

    model_config = SettingsConfigDict(env_prefix="TRTFORGE_", frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str | None = None
    """SQLAlchemy URL; ``None``: SQLite at ``<data_dir>/trtforge.db``."""
    queue: QueueEngine = QueueEngine.AUTO
    """The queue engine; ``procrastinate`` needs a PostgreSQL ``database_url``."""
    auth: bool | None = None
    """Require bearer tokens. ``None``: required exactly when ``host`` is not loopback."""
    worker_targets: list[BuildTarget] | None = None
    """What this machine's workers build for (JSON list of ``{"backend", "backend_version",
    "compute_capability", "device"}``). ``None``: discovered (each backend that can run here, on
    the first GPU). A deployment sets it where discovery cannot see the hardware."""
    worker_labels: list[Label] = Field(default_factory=list, max_length=MAX_LABELS)
    """Labels this machine's workers carry (JSON list, ``["a100", "team-vision"]``; ``trtforge
    worker --label`` adds more): a build asking for labels (``"target": {"labels": [...]}``)
    runs only on a worker that carries all of them."""

    max_upload_bytes: int = Field(default=4 * _GiB, gt=0)
    max_archive_members: int = Field(default=100_000, gt=0)
    max_archive_bytes: int = Field(default=16 * _GiB, gt=0)
    """Largest total uncompressed size of a zip upload (zip bombs are refused before expanding)."""
    max_archive_member_bytes: int = Field(default=4 * _GiB, gt=0)

    workers: int | None = Field(default=None, ge=0)
    """In-process build slots. ``None``: one per GPU, else ``cpu_concurrency``; 0: none (run
    ``trtforge worker`` processes instead)."""
    cpu_concurrency: int = Field(default=1, ge=1)
    build_timeout_s: PositiveSeconds = 4 * 3600.0
    cancel_grace_s: PositiveSeconds = 3.0
    """How long a cancelled build may run to its next stage boundary before it is killed."""
    max_attempts: int = Field(default=2, ge=1)
    """Runs a build gets when workers die under it: 2 = re-queued once, then failed."""
    heartbeat_s: PositiveSeconds = 2.0
    stale_after_s: PositiveSeconds = 30.0
    """A worker silent for this long is dead and its builds are recovered."""
    poll_interval_s: PositiveSeconds = 0.5
    orphan_grace_s: PositiveSeconds = 3600.0
    """Stored files with no database row are removed at startup once older than this."""

    # HTTP edges (issue 11, defects 5 and 10): request bodies, Host, CSRF/CORS, sessions, headers
    max_json_body_bytes: int = Field(default=1 << 20, gt=0)
    """Largest request body outside the upload routes (JSON, forms): larger answers 413 before
    the body is read."""
    allowed_hosts: Annotated[list[str], NoDecode] | None = None
    """``Host`` header names answered (comma-separated; ``*``: any). ``None``: the loopback names
    (and ``host``) when bound to a loopback address (DNS rebinding), else any (tokens are
    required then)."""
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Origins (``https://app.example.com``, comma-separated) whose pages may call the API;
    empty: CORS off, and cross-origin requests that change state are refused."""
    session_ttl_s: PositiveSeconds = 12 * 3600.0
    """Lifetime of a dashboard sign-in (a signed session value, never the token)."""
    cookie_secure: bool | None = None
    """Mark the session cookie ``Secure``. ``None``: when the request came over HTTPS (directly,
    or per ``X-Forwarded-Proto`` from a proxy in ``forwarded_allow_ips``)."""
    forwarded_allow_ips: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1"]
    )
    """Proxies whose ``X-Forwarded-Proto``/``-For`` headers are trusted (``*``: any)."""
    header_timeout_s: PositiveSeconds = 10.0
    """A connection must send a request's complete headers within this (slow-header clients)."""

    # API under load (issue 11, defect 3): database pool and request threads
    db_pool_size: int = Field(default=20, ge=1, le=1000)
    """Database connections a process keeps open."""
    db_max_overflow: int = Field(default=20, ge=0, le=1000)
    """Connections opened beyond ``db_pool_size`` under load (closed when handed back)."""
    db_pool_timeout_s: PositiveSeconds = 10.0
    """How long a request waits for a free connection before it is answered 503 ``unavailable``."""
    api_threads: int = Field(default=40, ge=1, le=1000)
    """Threads that run the API's blocking work (database queries, files, rendering)."""

    # Size-amplifying inputs (issue 11, defect 6): request sizes, images, build child memory
    max_benchmark_batch_size: int = Field(default=256, ge=1)
    max_benchmark_iterations: int = Field(default=100_000, ge=1)
    max_benchmark_duration_s: PositiveSeconds = 600.0
    max_benchmark_warmup_ms: PositiveSeconds = 60_000.0
    max_calibration_batch_size: int = Field(default=1024, ge=1)
    max_calibration_samples: int = Field(default=100_000, ge=1)
    max_accuracy_samples: int = Field(default=100_000, ge=1)
    """Bounds on the size parameters of a build request: larger values answer 422."""
    max_preprocessed_pixels: int = Field(default=4096 * 4096, gt=0)
    """Pixels of one image after preprocessing (resize_shorter, center_crop)."""
    worker_cache_bytes: int = Field(default=50 * _GiB, ge=0)
    """Disk a remote worker (``trtforge worker --api``) keeps for downloaded models and datasets;
    least recently used inputs no running build needs go first. 0: no bound."""
    build_memory_bytes: int | None = Field(default=None, ge=0)
    """Data memory a build process may take (``RLIMIT_DATA``): a build over it fails with
    ``resource_limit``, not the worker. ``None``: three quarters of this machine's memory;
    0: no limit."""

    @field_validator("allowed_hosts", "cors_origins", "forwarded_allow_ips", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and (
                "://" not in origin or origin.endswith("/") or origin.count("/") != 2
            ):
                raise ValueError(
                    f"cors_origins entry {origin!r} is not an origin like https://host[:port]"
                )
        return [origin.lower() for origin in origins]

    @field_validator("host")
    @classmethod
    def _host_not_empty(cls, host: str) -> str:
        if not host.strip():
            raise ValueError("host must not be empty")
        return host.strip()

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, path: Path) -> Path:
        return path.expanduser().absolute()

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, url: str | None) -> str | None:
        if url is None or not url.strip():
            return None
        scheme = url.split(":", 1)[0].split("+", 1)[0]
        if scheme not in ("sqlite", "postgresql"):
            raise ValueError(
                f"database_url must be a sqlite:// or postgresql+psycopg:// URL, got {scheme!r}"
            )
        return url.strip()

    @model_validator(mode="after")
    def _safe(self) -> Settings:
        if self.auth is False and not is_loopback(self.host):
            raise ValueError(
                f"auth cannot be off when binding to {self.host!r}, which is not a loopback "
                "address: anyone on the network could build and download engines"
            )
        if self.stale_after_s <= 2 * self.heartbeat_s:
            raise ValueError("stale_after_s must be more than twice heartbeat_s")
        if self.queue is QueueEngine.PROCRASTINATE and not self._on_postgres:
            raise ValueError(
                "queue procrastinate needs a PostgreSQL database_url (postgresql+psycopg://...); "
                "SQLite uses queue database"
            )
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise ValueError(f"data_dir {str(self.data_dir)!r} exists and is not a directory")
        return self

    @property
    def auth_required(self) -> bool:
        """Whether requests need a bearer token."""
        return self.auth if self.auth is not None else not is_loopback(self.host)

    @property
    def _on_postgres(self) -> bool:
        return self.database_url is not None and self.database_url.startswith("postgresql")

    @property
    def resolved_queue(self) -> QueueEngine:
        """The queue engine in use: ``queue``, with ``auto`` decided by the database."""
        if self.queue is not QueueEngine.AUTO:
            return self.queue
        return QueueEngine.PROCRASTINATE if self._on_postgres else QueueEngine.DATABASE

    @property
    def resolved_database_url(self) -> str:
        """The database URL, SQLite in the data directory by default."""
        if self.database_url is not None:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'trtforge.db').resolve()}"

    @property
    def base_url(self) -> str:
        """``http://host:port`` as a client on this machine reaches the server."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 - naming the wildcard, not binding it
            host = "127.0.0.1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


def load_settings(**overrides: object) -> Settings:
    """Build :class:`Settings` from the environment plus ``overrides`` (``None`` values ignored).

    Raises :class:`SettingsError` naming the offending setting.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(p) for p in first["loc"]) or "settings"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise SettingsError(
            f"Setting {name}: {message}.",
            hint=f"Fix TRTFORGE_{name.upper()} or the matching command-line option."
            if name != "settings"
            else None,
            field=name,
        ) from exc


def hostname() -> str:
    """This machine's name (recorded with workers, to tell dead local processes apart)."""
    return socket.gethostname()
