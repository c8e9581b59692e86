"""What the API accepts and answers: frozen pydantic models shared by the server and the client."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from engines.accuracy_report import AccuracyReport
from engines.backends.base import ArtifactMetadata, BuildTarget
from engines.gate import GateResult
from engines.perf_report import PerfReport
from engines.spec import BuildSpec
from engines.stages import Stage
from engines.techniques import BiasCorrectionReport, SmoothingReport

__all__ = [
    "AccuracyOptions",
    "ArtifactInfo",
    "BenchmarkOptionsIn",
    "BuildCreate",
    "BuildPage",
    "BuildPublic",
    "BuildReport",
    "BuildStatus",
    "CalibrationOptions",
    "CalibrationSummary",
    "CheckResult",
    "DatasetPage",
    "DatasetPublic",
    "ErrorEnvelope",
    "ErrorInfo",
    "Label",
    "LogLine",
    "ModelPage",
    "ModelPublic",
    "Readiness",
    "Scope",
    "Stage",
    "TablePage",
    "TablePublic",
    "TargetRequest",
    "TensorInfo",
    "TokenCreate",
    "TokenCreated",
    "TokenPublic",
    "WorkerPublic",
    "WorkerState",
    "stage_status",
]


class _Frozen(BaseModel):
    """Requests: unknown fields are errors (a typo must not be ignored silently)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class _Answer(BaseModel):
    """Responses: unknown fields are ignored, so older clients read newer servers."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class BuildStatus(StrEnum):
    """Where a build is. The four running statuses are the pipeline's stages."""

    QUEUED = "queued"
    CALIBRATING = "calibrating"
    BUILDING = "building"
    BENCHMARKING = "benchmarking"
    EVALUATING = "evaluating"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """Whether the build has ended (it never changes again)."""
        return self in (BuildStatus.SUCCEEDED, BuildStatus.FAILED, BuildStatus.CANCELLED)

    @property
    def running(self) -> bool:
        """Whether a worker is executing a stage of it."""
        return not self.terminal and self is not BuildStatus.QUEUED


def stage_status(stage: Stage) -> BuildStatus:
    """The running status a build has while ``stage`` runs."""
    return _STAGE_STATUS[stage]


_STAGE_STATUS = {
    Stage.CALIBRATE: BuildStatus.CALIBRATING,
    Stage.BUILD: BuildStatus.BUILDING,
    Stage.BENCHMARK: BuildStatus.BENCHMARKING,
    Stage.EVALUATE: BuildStatus.EVALUATING,
}


class Scope(StrEnum):
    """Token scopes; each includes the ones before it: read < build < admin."""

    READ = "read"
    BUILD = "build"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return list(Scope).index(self)

    def allows(self, needed: Scope) -> bool:
        return self.rank >= needed.rank


class ErrorInfo(_Answer):
    code: str
    message: str
    hint: str = ""
    field: str | None = None


class ErrorEnvelope(_Answer):
    """Every error response: ``{"error": {"code", "message", "hint"}}``."""

    error: ErrorInfo


class TensorInfo(_Answer):
    name: str
    dtype: str
    shape: list[int | str | None] | None
    """Dims: int = static, str = symbolic name, null = unknown; the whole list is null when
    even the rank is unknown."""


class ModelPublic(_Answer):
    id: str
    """The sha256 of the uploaded bytes."""
    filename: str
    size_bytes: int
    external_data: bool
    opset: int | None
    ir_version: int | None
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    dynamic_dims: dict[str, list[str]]
    """Input name -> its symbolic or unknown dims."""
    op_census: dict[str, int]
    num_nodes: int
    created_at: datetime
    links: dict[str, str] = Field(default_factory=dict)


class DatasetPublic(_Answer):
    id: str
    sha256: str
    """The sha256 of the uploaded bytes (``id`` also covers the preprocessing spec)."""
    filename: str
    format: str
    size_bytes: int
    num_samples: int
    inputs: list[TensorInfo]
    """Per-sample specs (without the sample axis)."""
    digest: str
    """sha256 of the canonical content: the same samples in another container give the same."""
    preprocess: dict[str, Any] | None
    model_id: str | None
    """The model this dataset was validated against at upload, if one was named."""
    created_at: datetime
    links: dict[str, str] = Field(default_factory=dict)


MAX_BATCH_SIZE = 1024
MAX_SAMPLES = 1_000_000
MAX_SEED = (1 << 32) - 1
"""Seeds are numpy's: 0 to 2**32 - 1."""
_MAX_ID_CHARS = 128


class CalibrationOptions(_Frozen):
    batch_size: int | None = Field(default=None, ge=1, le=MAX_BATCH_SIZE)
    max_samples: int | None = Field(default=None, ge=1, le=MAX_SAMPLES)
    """Calibrate on at most this many samples (after the evaluation split)."""


class BenchmarkOptionsIn(_Frozen):
    """Benchmark settings; ``None`` means trtexec's defaults (200 ms warm-up, 10 queries, 3 s)."""

    warmup_ms: float | None = Field(default=None, ge=0, le=60_000)
    iterations: int | None = Field(default=None, ge=1, le=100_000)
    duration_s: float | None = Field(default=None, ge=0, le=600)
    batch_size: int | None = Field(default=None, ge=1, le=MAX_BATCH_SIZE)


class AccuracyOptions(_Frozen):
    """How outputs are compared with the FP32 model on held-out samples."""

    enabled: bool = True
    eval_fraction: float = Field(default=0.2, ge=0, lt=1)
    """Share of the dataset held out of calibration for the comparison (0: compare on all)."""
    max_samples: int | None = Field(default=None, ge=1, le=MAX_SAMPLES)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)


Label = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/=+-]*$", max_length=63)
]
"""A worker label (``trtforge worker --label``, ``TRTFORGE_WORKER_LABELS``): a letter or digit,
then letters, digits and ``._:/=+-``, at most 63 characters."""

MAX_LABELS = 32


class TargetRequest(_Frozen):
    """What a build asks of the worker that builds it; every field given must match one of the
    worker's targets (labels: the worker carries them all). Nothing given: any worker."""

    gpu: str | None = Field(
        default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$"
    )
    """``sm_90`` or ``9.0`` (the compute capability), else part of the GPU's name (``H100``,
    case-insensitive)."""
    tensorrt: str | None = Field(default=None, max_length=32, pattern=r"^\d+(\.\d+)*$")
    """A TensorRT version prefix, by components: ``10.13`` matches 10.13.x, not 10.130."""
    labels: list[Label] = Field(default_factory=list, max_length=MAX_LABELS)
    """Labels the worker must carry (all of them)."""

    @field_validator("labels")
    @classmethod
    def _sorted_labels(cls, labels: list[str]) -> list[str]:
        return sorted(set(labels))  # order and repeats mean nothing (and stay out of cache keys)

    @property
    def any_worker(self) -> bool:
        """Whether nothing is asked (every worker serves it)."""
        return self.gpu is None and self.tensorrt is None and not self.labels

    def __str__(self) -> str:
        asked = [f"gpu {self.gpu}"] if self.gpu else []
        asked += [f"TensorRT {self.tensorrt}"] if self.tensorrt else []
        asked += [f"labels {', '.join(self.labels)}"] if self.labels else []
        return "; ".join(asked) or "any worker"


class BuildCreate(_Frozen):
    """``POST /v1/builds``."""

    model_id: str = Field(min_length=1, max_length=_MAX_ID_CHARS)
    dataset_id: str = Field(min_length=1, max_length=_MAX_ID_CHARS)
    """Calibration data (INT8), benchmark inputs and held-out samples for the accuracy check."""
    table_id: str | None = Field(default=None, min_length=1, max_length=_MAX_ID_CHARS)
    """Use this stored calibration table instead of calibrating."""
    spec: BuildSpec = Field(default_factory=BuildSpec)
    calibration: CalibrationOptions = Field(default_factory=CalibrationOptions)
    benchmark: BenchmarkOptionsIn = Field(default_factory=BenchmarkOptionsIn)
    accuracy: AccuracyOptions = Field(default_factory=AccuracyOptions)
    target: TargetRequest | None = None
    """The worker it must run on (GPU, TensorRT version, labels); ``spec.backend`` stays the
    backend asked for. None: any worker that builds ``spec.backend``."""


class ArtifactInfo(_Answer):
    filename: str
    sha256: str
    size_bytes: int
    backend: str


class BuildPublic(_Answer):
    id: str
    status: BuildStatus
    stage: Stage | None
    progress: float
    """0 to 1 over the whole pipeline."""
    model_id: str
    dataset_id: str
    table_id: str | None
    table_from_cache: bool | None
    """Whether the calibration table was reused instead of computed (null before calibration)."""
    spec: BuildSpec
    calibration: CalibrationOptions
    benchmark: BenchmarkOptionsIn
    accuracy: AccuracyOptions
    requested_backend: str = "auto"
    """The backend the request asked for (``auto``, ``tensorrt``, ``onnxruntime``)."""
    requested_target: TargetRequest | None = None
    """The target it waits for (GPU, TensorRT version, labels); null: any worker."""
    worker_id: str | None = None
    """The worker that claimed the build (null while it waits)."""
    backend: str | None
    """The target it is built for, decided by the worker that claims it (null while queued)."""
    backend_version: str | None
    compute_capability: str | None
    """GPU compute capability the build targets, or ``cpu`` (null while queued)."""
    cache_key: str
    attempts: int
    cancel_requested: bool
    stage_seconds: dict[str, float]
    error: ErrorInfo | None
    artifact: ArtifactInfo | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    links: dict[str, str] = Field(default_factory=dict)


class WorkerState(StrEnum):
    LIVE = "live"
    """Heartbeating."""
    STOPPED = "stopped"
    """Shut down, or found dead (no heartbeat, or its process is gone)."""


class WorkerPublic(_Answer):
    """A build worker and what it builds for (``GET /v1/workers``)."""

    id: str
    hostname: str
    slots: int
    targets: list[BuildTarget]
    labels: list[str] = Field(default_factory=list)
    """Labels from its configuration (``--label``, ``TRTFORGE_WORKER_LABELS``)."""
    state: WorkerState
    running_builds: list[str]
    """Builds it is running now."""
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None


class LogLine(_Answer):
    seq: int
    at: datetime
    level: str
    stage: str | None
    message: str


class TablePublic(_Answer):
    id: str
    model_id: str
    dataset_id: str | None
    source: Literal["calibrated", "imported"]
    method: str | None
    algorithm: str
    parameters: dict[str, float | int | str]
    samples: int
    num_tensors: int
    digest: str
    missing_tensors: list[str]
    """Model activations the table has no range for (they stay unquantized)."""
    created_at: datetime
    links: dict[str, str] = Field(default_factory=dict)


class _Page(_Answer):
    total: int
    limit: int
    offset: int


class ModelPage(_Page):
    items: list[ModelPublic]


class DatasetPage(_Page):
    items: list[DatasetPublic]


class BuildPage(_Page):
    items: list[BuildPublic]


class TablePage(_Page):
    items: list[TablePublic]


class TokenCreate(_Frozen):
    name: str = Field(min_length=1, max_length=100)
    scope: Scope = Scope.READ


class TokenPublic(_Answer):
    id: str
    name: str
    scope: Scope
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class TokenCreated(TokenPublic):
    token: str
    """The secret; shown once, only its hash is stored."""


class CheckResult(_Answer):
    ok: bool
    detail: str


class Readiness(_Answer):
    ready: bool
    checks: dict[str, CheckResult]


class CalibrationSummary(_Answer):
    table_id: str
    from_cache: bool
    source: str
    method: str | None
    samples: int
    num_tensors: int


class BuildReport(_Answer):
    """``GET /v1/builds/{id}/report``: everything a build measured, in one document."""

    model_config = ConfigDict(frozen=True, extra="ignore", ser_json_inf_nan="strings")

    build_id: str
    created_at: datetime
    model: dict[str, str]
    """id and filename."""
    dataset: dict[str, str | int]
    """id, filename, num_samples, calibration_samples, evaluation_samples."""
    spec: BuildSpec
    calibration: CalibrationSummary | None
    smoothing: SmoothingReport | None = None
    """SmoothQuant / cross-layer equalization before calibration, tensor by tensor."""
    bias_correction: BiasCorrectionReport | None = None
    """Bias correction of the quantized layers, layer by layer."""
    artifact: ArtifactInfo
    artifact_metadata: ArtifactMetadata
    quantized_nodes: list[str]
    kept_nodes: dict[str, str]
    """ONNX node -> why it stays in higher precision."""
    performance: PerfReport
    accuracy: AccuracyReport | None
    gate: GateResult | None = None
    """The accuracy gate checked against ``accuracy`` (None when evaluation was disabled)."""
    environment: dict[str, str]
    stage_seconds: dict[str, float]
