"""What the API accepts and answers: frozen pydantic models shared by the server and the client."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from engines.accuracy_report import AccuracyMetric, AccuracyReport, MetricBudget
from engines.backends.base import ArtifactMetadata, BuildTarget
from engines.gate import GateResult
from engines.mixed_report import MixedPrecisionResult
from engines.names import QdqExecution
from engines.perf_report import PerfReport
from engines.sensitivity_report import SensitivityReport
from engines.spec import BuildSpec, Precision
from engines.stages import Stage
from engines.techniques import BiasCorrectionReport, SmoothingReport
from service.projects import DEFAULT_PROJECT, PROJECT_PATTERN

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
    "CatalogPatch",
    "CheckResult",
    "DatasetPage",
    "DatasetPublic",
    "ErrorEnvelope",
    "ErrorInfo",
    "InputFile",
    "Label",
    "LogLine",
    "ModelPage",
    "ModelPublic",
    "Readiness",
    "Scope",
    "SensitivityOptions",
    "SensitivityPublic",
    "Stage",
    "SweepChart",
    "SweepCreate",
    "SweepPage",
    "SweepPoint",
    "SweepPreset",
    "SweepPublic",
    "SweepStatus",
    "SweepSummary",
    "SweepVariant",
    "TablePage",
    "TablePublic",
    "Tag",
    "TargetRequest",
    "TensorInfo",
    "TokenCreate",
    "TokenCreated",
    "TokenPublic",
    "WorkerAlive",
    "WorkerArtifact",
    "WorkerBuildFinish",
    "WorkerBuildPlan",
    "WorkerBuildState",
    "WorkerBuildUpdate",
    "WorkerCall",
    "WorkerClaim",
    "WorkerEvalDataset",
    "WorkerJob",
    "WorkerLogLine",
    "WorkerPublic",
    "WorkerRecovered",
    "WorkerRegistration",
    "WorkerState",
    "WorkerTable",
    "WorkerTableStore",
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
    """Token scopes; each includes the ones before it: read < build < admin. ``worker`` is a
    side branch: a build worker on another machine (``trtforge worker --api``) reads and serves
    builds of every project through ``/v1/worker/...``, and nothing else; admin includes it."""

    READ = "read"
    BUILD = "build"
    ADMIN = "admin"
    WORKER = "worker"

    @property
    def rank(self) -> int:
        return list(Scope).index(self)

    def allows(self, needed: Scope) -> bool:
        if Scope.WORKER in (self, needed):
            return self is needed or self is Scope.ADMIN or needed is Scope.READ
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


Tag = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/=+-]*$", max_length=63)
]
"""A model's or dataset's tag: a letter or digit, then letters, digits and ``._:/=+-``, at most
63 characters (``resnet``, ``team:vision``, ``v2.1``)."""
MAX_TAGS = 32
MAX_NAME_CHARS = 200

UserName = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, min_length=1, max_length=MAX_NAME_CHARS, pattern=r"^[^\x00-\x1f\x7f]*$"
    ),
]
"""A name a user gives a model, dataset or sweep: 1 to 200 printable characters."""


class CatalogPatch(_Frozen):
    """``PATCH /v1/models/{id}`` and ``PATCH /v1/datasets/{id}``: a field left out is unchanged;
    ``name: null`` (or ``""``) clears the name, ``tags: []`` clears the tags."""

    name: UserName | Literal[""] | None = None
    tags: list[Tag] | None = Field(default=None, max_length=MAX_TAGS)

    @field_validator("tags")
    @classmethod
    def _sorted_tags(cls, tags: list[str] | None) -> list[str] | None:
        return None if tags is None else sorted(set(tags))


class ModelPublic(_Answer):
    id: str
    """The sha256 of the uploaded bytes (in another project than ``default``: a digest of the
    project's name and that sha256, :func:`service.projects.scoped_id`)."""
    filename: str
    """The uploaded file's name."""
    name: str | None = None
    """The name a user gave it (upload form field ``name``, or ``PATCH``); null: none."""
    tags: list[str] = Field(default_factory=list)
    """Its tags, sorted (upload form field ``tags``, comma-separated, or ``PATCH``)."""
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
    project: str = DEFAULT_PROJECT
    """The project it belongs to (only admin tokens see other projects')."""
    links: dict[str, str] = Field(default_factory=dict)


class DatasetPublic(_Answer):
    id: str
    sha256: str
    """The sha256 of the uploaded bytes (``id`` also covers the preprocessing spec)."""
    filename: str
    """The uploaded file's name."""
    name: str | None = None
    """The name a user gave it (upload form field ``name``, or ``PATCH``); null: none."""
    tags: list[str] = Field(default_factory=list)
    """Its tags, sorted (upload form field ``tags``, comma-separated, or ``PATCH``)."""
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
    project: str = DEFAULT_PROJECT
    """The project it belongs to (only admin tokens see other projects')."""
    links: dict[str, str] = Field(default_factory=dict)


MAX_BATCH_SIZE = 1024
MAX_LABELS_COUNT = 100_000
"""Labels a request carries inline (a million-byte JSON body holds about this many)."""
MAX_LABEL = (1 << 31) - 1
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


class SensitivityOptions(_Frozen):
    """``POST /v1/builds/{id}/sensitivity`` (and ``BuildCreate.sensitivity``): how the
    quantizable nodes are ranked (``trtforge sensitivity``'s options)."""

    metric: AccuracyMetric = AccuracyMetric.SQNR_DB
    """Against FP32 on the held-out samples (``accuracy``/``accuracy_drop`` need labels)."""
    samples: int = Field(default=32, ge=1, le=4096)
    """Held-out samples each variant is measured on."""
    max_nodes: int | None = Field(default=None, ge=0, le=100_000)
    """Evaluate only the N nodes the cheap local-error proxy finds worst (null: all)."""
    only_this: bool = False
    """Skip the 'all but this node' variants (half the work)."""
    execution: QdqExecution = QdqExecution.REFERENCE
    """reference: Q/DQ computed as written (what TensorRT follows); onnxruntime: its integer
    kernels."""


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
    eval_dataset_id: str | None = Field(default=None, min_length=1, max_length=_MAX_ID_CHARS)
    """Separate evaluation samples (``trtforge build --eval-data``): benchmark, accuracy check,
    accuracy budget and sensitivity measure on them, and every sample of ``dataset_id``
    calibrates (``accuracy.eval_fraction`` is then not used)."""
    labels: list[Annotated[int, Field(ge=0, le=MAX_LABEL)]] | None = Field(
        default=None, min_length=1, max_length=MAX_LABELS_COUNT
    )
    """Integer class labels (``--labels``): one per sample of ``eval_dataset_id`` when given,
    else one per sample of ``dataset_id`` (the held-out ones are picked out). They enable the
    ``accuracy`` and ``accuracy_drop`` metrics (budgets and gates)."""
    accuracy_budget: MetricBudget | None = None
    """``METRIC:VALUE`` (``--accuracy-budget``, e.g. ``"cosine:0.999"`` or
    ``{"metric": "cosine", "value": 0.999}``): keep the most sensitive nodes out of INT8 until
    it is met on the held-out samples (INT8 precisions; needs held-out samples)."""
    sensitivity: SensitivityOptions | None = None
    """Also rank the quantizable nodes by their INT8 sensitivity (``trtforge sensitivity``);
    the result: ``GET /v1/builds/{id}/sensitivity`` (INT8 precisions)."""

    @field_validator("accuracy_budget", mode="before")
    @classmethod
    def _budget_from_text(cls, value: Any) -> Any:
        return _budget_from_text(value)

    @property
    def evaluation_options(self) -> dict[str, Any]:
        """The fields added after the first release, when any is set: they join the cache key
        only then, so the keys of requests without them do not change."""
        return self.model_dump(
            mode="json",
            include={"eval_dataset_id", "labels", "accuracy_budget", "sensitivity"},
            exclude_none=True,
        )


def _budget_from_text(value: Any) -> Any:
    """``"METRIC:VALUE"`` -> a :class:`MetricBudget` (other values go to pydantic as they are)."""
    if not isinstance(value, str):
        return value
    from engines.errors import SpecError

    try:
        return MetricBudget.parse(value)
    except SpecError as exc:  # pydantic reports ValueErrors as validation errors
        raise ValueError(f"{exc.message} {exc.hint}".strip()) from exc


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
    eval_dataset_id: str | None = None
    """Separate evaluation samples, when the request named them."""
    table_id: str | None
    table_from_cache: bool | None
    """Whether the calibration table was reused instead of computed (null before calibration)."""
    spec: BuildSpec
    calibration: CalibrationOptions
    benchmark: BenchmarkOptionsIn
    accuracy: AccuracyOptions
    accuracy_budget: MetricBudget | None = None
    labels: int | None = None
    """How many labels the request carried (null: none)."""
    sensitivity: SensitivityOptions | None = None
    """Whether (and how) this build also ranks node sensitivity."""
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
    project: str = DEFAULT_PROJECT
    """The project it belongs to (only admin tokens see other projects')."""
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
    problem: str | None = None
    """Why this live worker takes no builds now, as it reported with its last heartbeat (a worker
    on another machine: its data directory, its slots); None: none."""


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
    project: str = DEFAULT_PROJECT
    """The project it belongs to (only admin tokens see other projects')."""
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
    project: str = Field(default=DEFAULT_PROJECT, pattern=PROJECT_PATTERN)
    """The project whose data it reads and writes (an admin token: every project's; it uploads
    to this one unless a request names another with ``?project=``)."""


class TokenPublic(_Answer):
    id: str
    name: str
    scope: Scope
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    project: str = DEFAULT_PROJECT


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
    mixed_precision: MixedPrecisionResult | None = None
    """The accuracy budget's search (``accuracy_budget``): nodes kept out of INT8, values."""
    sensitivity: SensitivityReport | None = None
    """Per-node INT8 sensitivity (``sensitivity``), most sensitive first."""
    environment: dict[str, str]
    stage_seconds: dict[str, float]


# -- sensitivity -------------------------------------------------------------------------------


class SensitivityPublic(_Answer):
    """``GET /v1/builds/{id}/sensitivity``: the ranking of build ``build_id``'s quantizable nodes,
    computed by build ``run_build_id``: the build itself when its request asked for it, else the
    build ``POST /v1/builds/{id}/sensitivity`` submitted (the same request with ``sensitivity``
    set; its calibration table comes from the table cache)."""

    model_config = ConfigDict(frozen=True, extra="ignore", ser_json_inf_nan="strings")

    build_id: str
    run_build_id: str
    status: BuildStatus
    """The status of ``run_build_id``; ``report`` is there once it has ended with a report
    (``succeeded``, or ``failed`` on its accuracy gate only)."""
    options: SensitivityOptions
    report: SensitivityReport | None
    error: ErrorInfo | None = None
    links: dict[str, str] = Field(default_factory=dict)


# -- sweeps ------------------------------------------------------------------------------------

MAX_SWEEP_VARIANTS = 16


class SweepPreset(StrEnum):
    """Named variant sets of ``POST /v1/sweeps``."""

    PRECISIONS = "precisions"
    """fp32, fp16, int8, int8-fp16 (``trtforge sweep``'s default)."""
    INT8 = "int8"
    """fp32, int8, int8-fp16."""
    FP16 = "fp16"
    """fp32, fp16."""

    @property
    def variants(self) -> list[str]:
        return list(_PRESETS[self])


_PRESETS = {
    SweepPreset.PRECISIONS: ("fp32", "fp16", "int8", "int8-fp16"),
    SweepPreset.INT8: ("fp32", "int8", "int8-fp16"),
    SweepPreset.FP16: ("fp32", "fp16"),
}

VariantText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
"""``fp32``, ``fp16``, ``int8``, ``int8-fp16``, ``auto:METRIC:VALUE`` or
``auto:PRECISION:METRIC:VALUE`` (automatic mixed precision: an accuracy budget)."""


class SweepCreate(_Frozen):
    """``POST /v1/sweeps``: one build per variant, each a normal build through the queue
    (``GET /v1/builds/{id}``), aggregated by the sweep. ``variants`` or ``preset``; neither: the
    ``precisions`` preset."""

    model_id: str = Field(min_length=1, max_length=_MAX_ID_CHARS)
    dataset_id: str = Field(min_length=1, max_length=_MAX_ID_CHARS)
    """Calibration data (and held-out samples without ``eval_dataset_id``)."""
    variants: list[VariantText] | None = Field(
        default=None, min_length=1, max_length=MAX_SWEEP_VARIANTS
    )
    preset: SweepPreset | None = None
    name: UserName | None = None
    eval_dataset_id: str | None = Field(default=None, min_length=1, max_length=_MAX_ID_CHARS)
    """Separate evaluation samples (``--eval-data``); then all of ``dataset_id`` calibrates."""
    labels: list[Annotated[int, Field(ge=0, le=MAX_LABEL)]] | None = Field(
        default=None, min_length=1, max_length=MAX_LABELS_COUNT
    )
    """As ``BuildCreate.labels``; with labels the sweep compares on true accuracy."""
    spec: BuildSpec = Field(default_factory=BuildSpec)
    """Every field but ``precision`` applies to each variant (the variant sets it)."""
    calibration: CalibrationOptions = Field(default_factory=CalibrationOptions)
    benchmark: BenchmarkOptionsIn = Field(default_factory=BenchmarkOptionsIn)
    accuracy: AccuracyOptions = Field(default_factory=AccuracyOptions)
    target: TargetRequest | None = None

    @property
    def variant_texts(self) -> list[str]:
        """The variants asked for (the preset's when ``variants`` is not given)."""
        if self.variants is not None:
            return list(self.variants)
        return (self.preset or SweepPreset.PRECISIONS).variants


class SweepStatus(StrEnum):
    """Where a sweep is, from its builds' statuses."""

    QUEUED = "queued"
    """No build has started."""
    RUNNING = "running"
    """Some build has not ended."""
    SUCCEEDED = "succeeded"
    """Every build ended and every variant was measured (a failed accuracy gate included)."""
    PARTIAL = "partial"
    """Every build ended; some variants were measured, some not."""
    FAILED = "failed"
    """Every build ended and none was measured."""

    @property
    def terminal(self) -> bool:
        return self not in (SweepStatus.QUEUED, SweepStatus.RUNNING)


class SweepVariant(_Answer):
    """One variant of a sweep and its build."""

    name: str
    build_id: str
    status: BuildStatus | None
    """null: the build was deleted."""
    progress: float = 0.0


class SweepPoint(_Answer):
    """One measured variant (from its build's report)."""

    model_config = ConfigDict(frozen=True, extra="ignore", ser_json_inf_nan="strings")

    variant: str
    build_id: str
    precision: Precision
    budget: MetricBudget | None = None
    latency_mean_ms: float
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    throughput_qps: float
    size_bytes: int
    accuracy_value: float | None
    """The sweep's ``accuracy_metric`` (null: the build did not evaluate accuracy)."""
    speedup_vs_fp32: float | None
    """The fp32 variant's p50 over this p50 (null without a measured fp32 variant)."""
    size_vs_fp32: float | None
    gate_passed: bool | None
    """The build's accuracy gate (null: not checked)."""
    kept_nodes: int
    """Nodes kept out of higher precision (keep rules, an ``auto`` variant's search, rules)."""
    pareto: bool
    """No other variant is at least as fast (p50) and as accurate, and better in one."""


class SweepChart(_Answer):
    """What a latency/accuracy chart of the sweep draws: ``x`` against ``y`` per point, the
    front joined fastest first, and p50/p90/p99 latency bars per variant."""

    model_config = ConfigDict(frozen=True, extra="ignore", ser_json_inf_nan="strings")

    x: str = "latency_p50_ms"
    y: str | None
    """The accuracy metric (null: no variant evaluated accuracy)."""
    higher_is_better: bool
    points: list[dict[str, Any]]
    """``{"variant", "build_id", "x", "y", "pareto"}`` per measured variant."""
    front: list[str]
    """Variant names on the Pareto front, fastest first."""
    latency: list[dict[str, Any]]
    """``{"variant", "p50", "p90", "p99"}`` in milliseconds, per measured variant."""


class SweepSummary(_Answer):
    """A sweep in ``GET /v1/sweeps`` (statuses only; measurements: ``GET /v1/sweeps/{id}``)."""

    id: str
    name: str | None
    status: SweepStatus
    model_id: str
    dataset_id: str
    eval_dataset_id: str | None
    variants: list[SweepVariant]
    created_at: datetime
    links: dict[str, str] = Field(default_factory=dict)


class SweepPublic(SweepSummary):
    """``GET /v1/sweeps/{id}``: its builds, measured points, the Pareto front and chart data."""

    model_config = ConfigDict(frozen=True, extra="ignore", ser_json_inf_nan="strings")

    spec: BuildSpec
    """The spec every variant shares (each sets its own precision)."""
    accuracy_metric: AccuracyMetric | None
    """What the variants are compared on: true accuracy with labels, else top-1 agreement
    with FP32 for class scores, else cosine similarity (as ``trtforge sweep``)."""
    accuracy_higher_is_better: bool
    points: list[SweepPoint]
    pareto_front: list[str]
    """Variant names on the front, fastest first."""
    chart: SweepChart
    failed: list[ErrorInfo] = Field(default_factory=list)
    """Errors of the variants that ended unmeasured; ``field`` = the variant's name."""


class SweepPage(_Page):
    items: list[SweepSummary]


# -- workers on other machines (``/v1/worker/...``, the ``worker`` scope) -------------------------


class WorkerRegistration(_Frozen):
    """``POST /v1/worker/register``: a worker on another machine starts."""

    id: str = Field(min_length=1, max_length=64)
    slots: int = Field(ge=1, le=1024)
    targets: list[BuildTarget] = Field(min_length=1, max_length=64)
    labels: list[Label] = Field(default_factory=list, max_length=MAX_LABELS)
    hostname: str = Field(default="", max_length=255)
    """The worker's machine (empty: the API's)."""
    pid: int = Field(default=0, ge=0, le=1 << 31)
    process_tag: str = Field(default="", max_length=64, pattern=r"^(p[0-9]+-[0-9]+)?$")
    """Its process (``p<pid>-<start time>``): on the API's machine, its death is seen at once."""


class WorkerCall(_Frozen):
    """A worker's heartbeat or its goodbye."""

    worker_id: str = Field(min_length=1, max_length=64)
    problem: str | None = Field(default=None, max_length=500)
    """Why it takes no builds now (heartbeats; ``GET /v1/workers`` and ``/readyz`` show it)."""


class WorkerAlive(_Answer):
    alive: bool
    """False: the worker had been declared dead; it drops its builds and registers again."""


class WorkerClaim(_Frozen):
    """``POST /v1/worker/claim``: the oldest queued build one of ``targets`` serves."""

    worker_id: str = Field(min_length=1, max_length=64)
    targets: list[BuildTarget] = Field(min_length=1, max_length=64)


class WorkerJob(_Frozen):
    """A claimed job (the queue's ``Job``)."""

    id: int = Field(ge=0)
    build_id: str = Field(min_length=1, max_length=_MAX_ID_CHARS)
    attempt: int = Field(ge=0)


class WorkerRecovered(_Answer):
    requeued: list[str]
    failed: list[str]


class WorkerBuildState(_Answer):
    """What a worker needs to know of a build it runs."""

    status: BuildStatus
    cancel_requested: bool
    worker_id: str | None


class InputFile(_Answer):
    """One file of a stored model or dataset, as a worker downloads it."""

    path: str
    """Relative to the model's or dataset's folder (``/``-separated)."""
    size_bytes: int
    sha256: str


class WorkerEvalDataset(_Answer):
    """A build's separate evaluation dataset (``eval_dataset_id``), as a worker fetches it."""

    id: str
    data_filename: str
    files: list[InputFile]
    preprocess: dict[str, Any] | None
    input_name: str | None


class WorkerBuildPlan(_Answer):
    """``GET /v1/worker/builds/{id}/plan``: what a worker needs to run a build it claimed."""

    build_id: str
    request: BuildCreate
    backend: str
    """The backend of the target the claim chose."""
    model_id: str
    model_filename: str
    onnx_filename: str
    model_files: list[InputFile]
    dataset_id: str
    dataset_filename: str
    data_filename: str
    dataset_files: list[InputFile]
    preprocess: dict[str, Any] | None
    input_name: str | None
    eval_dataset: WorkerEvalDataset | None = None


class WorkerLogLine(_Frozen):
    level: Literal["debug", "info", "warning", "error"] = "info"
    stage: Stage | None = None
    message: str = Field(max_length=20_000)


class WorkerBuildUpdate(_Frozen):
    """``POST /v1/worker/builds/{id}/update``: a running build's progress (only the fields sent
    are set), and an optional log line; answered with the build's state (a cancel request)."""

    worker_id: str = Field(min_length=1, max_length=64)
    started: bool = False
    """The attempt starts: ``started_at`` is now, the stage timings are cleared."""
    status: BuildStatus | None = None
    """A running status (``calibrating`` ...), never a terminal one (``/finish`` ends builds)."""
    stage: Stage | None = None
    progress: float | None = Field(default=None, ge=0.0, le=1.0)
    stage_seconds: dict[str, float] | None = Field(default=None, max_length=16)
    table_id: str | None = Field(default=None, max_length=_MAX_ID_CHARS)
    table_from_cache: bool | None = None
    log: WorkerLogLine | None = None

    @field_validator("status")
    @classmethod
    def _running(cls, status: BuildStatus | None) -> BuildStatus | None:
        if status is not None and not status.running:
            raise ValueError("an update sets a running status; /finish ends a build")
        return status


class WorkerArtifact(_Frozen):
    """An artifact and report a worker uploaded (``POST /v1/worker/uploads``) for its build."""

    filename: str = Field(min_length=1, max_length=255)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    metadata: ArtifactMetadata
    """The sidecar (``<artifact>.json``)."""
    report_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class WorkerBuildFinish(_Frozen):
    """``POST /v1/worker/builds/{id}/finish``: the build's outcome, its artifact and report
    linked (they were uploaded first) in the same step."""

    worker_id: str = Field(min_length=1, max_length=64)
    status: Literal[BuildStatus.SUCCEEDED, BuildStatus.FAILED, BuildStatus.CANCELLED]
    error: ErrorInfo | None = None
    details: str = Field(default="", max_length=200_000)
    """A failure's details (a traceback, a backend's log) for the build log."""
    artifact: WorkerArtifact | None = None


class WorkerTable(_Answer):
    """A stored calibration table, for a worker: its record and its JSON text."""

    info: TablePublic
    table_json: str


class WorkerTableStore(_Frozen):
    """``PUT /v1/worker/builds/{id}/tables/{key}``: a table a worker calibrated, uploaded first
    (``POST /v1/worker/uploads``: its JSON text, which may be larger than a JSON body)."""

    worker_id: str = Field(min_length=1, max_length=64)
    table_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
