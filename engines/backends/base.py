"""What every backend provides: build an artifact from a model, load it, run it, time it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from engines.spec import BuildSpec

if TYPE_CHECKING:
    import numpy as np

    from calibrators.table import CalibrationTable
    from core.tensors import TensorSpec

__all__ = [
    "Artifact",
    "ArtifactMetadata",
    "Availability",
    "Backend",
    "BuildTarget",
    "ConfigurableTiming",
    "ProgressFn",
    "QueryTiming",
    "Runner",
    "TimingMode",
    "report_progress",
]

ProgressFn = Callable[[str, float], None]
"""Called with a short stage message and a fraction in [0, 1]."""


def report_progress(progress: ProgressFn | None, stage: str, fraction: float) -> None:
    """Call ``progress`` (when given) with ``stage`` and ``fraction``."""
    if progress is not None:
        progress(stage, fraction)


@dataclass(frozen=True)
class Availability:
    """Whether a backend can build here, and why (or why not)."""

    available: bool
    reason: str


class BuildTarget(BaseModel):
    """What a worker can build for: a backend, its version and the device its artifacts are tied
    to. A worker discovers its targets (:func:`engines.backends.registry.local_targets`) or is
    told them by its configuration; the build row and the cache record the one it built for."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: str
    """A concrete backend name (``tensorrt``, ``onnxruntime``), never ``auto``."""
    backend_version: str
    compute_capability: str
    """``major.minor`` of the GPU (``"9.0"``) for GPU backends, ``"cpu"`` otherwise."""
    device: str = "cpu"
    """The GPU's name (``NVIDIA H100 80GB HBM3``), or ``cpu``."""

    def __str__(self) -> str:
        where = (
            self.device if self.device == "cpu" else f"{self.device}, sm {self.compute_capability}"
        )
        return f"{self.backend} {self.backend_version} ({where})"


class ArtifactMetadata(BaseModel):
    """The sidecar JSON written beside every artifact (ARCHITECTURE.md §4)."""

    model_config = ConfigDict(frozen=True)

    backend: str
    backend_version: str
    backend_reason: str = ""
    mode: str | None = None
    precision: str
    device: str
    compute_capability: str | None = None
    cuda_version: str | None = None
    driver_version: str | None = None
    profiles: dict[str, dict[str, list[int]]] = Field(default_factory=dict)
    table_sha256: str | None = None
    quantized_nodes: list[str] = Field(default_factory=list)
    kept_nodes: dict[str, str] = Field(default_factory=dict)
    """ONNX node name -> why it stays in higher precision."""
    fp32_nodes: list[str] = Field(default_factory=list)
    spec: BuildSpec
    model_sha256: str
    sha256: str
    size_bytes: int
    build_seconds: float
    created_at: str
    options: dict[str, Any] = Field(default_factory=dict)
    """Backend-specific settings (ONNX Runtime session options, TensorRT builder flags)."""
    preparation: dict[str, Any] = Field(default_factory=dict)
    """What was done to the FP32 model before the backend built it (smoothing, bias
    correction; ``prequantized`` when the model's own Q/DQ scales were kept)."""


@dataclass(frozen=True)
class Artifact:
    path: Path
    metadata_path: Path
    metadata: ArtifactMetadata


@dataclass(frozen=True)
class QueryTiming:
    """One timed query. Host-side backends fill ``latency_ms`` and ``gpu_compute_ms`` alike."""

    latency_ms: float
    enqueue_ms: float
    h2d_ms: float
    gpu_compute_ms: float
    d2h_ms: float


@dataclass(frozen=True)
class TimingMode:
    """How a GPU runner times queries: trtexec's ``--useCudaGraph``, ``--useSpinWait`` and
    ``--noDataTransfers``. Host-side runners (ONNX Runtime) have only the default."""

    cuda_graph: bool = False
    """Capture the enqueue into a CUDA graph once per input shape and launch the graph."""
    spin_wait: bool = False
    """Wait for each query by polling its end event instead of a blocking synchronize."""
    use_transfers: bool = True
    """Copy inputs to and outputs from the device in every timed query."""


@runtime_checkable
class ConfigurableTiming(Protocol):
    """A runner whose timing mode can be chosen (:class:`TimingMode`)."""

    def set_timing_mode(self, mode: TimingMode) -> None:
        """Use ``mode`` for later :meth:`Runner.timed_run` calls (``run`` always transfers)."""
        ...

    @property
    def timing_mode(self) -> TimingMode:
        """The mode in effect: a CUDA graph whose capture failed falls back to plain enqueue, as
        trtexec does, and this then says ``cuda_graph=False``."""
        ...


@runtime_checkable
class Runner(Protocol):
    """A loaded artifact that runs inference. Use it in a ``with`` block.

    trtforge's runners subclass :class:`engines.backends.runner.BaseRunner`, which checks the
    feeds against ``inputs`` once, times queries and closes once; this protocol is what the
    benchmark, the accuracy comparison and the workflow take."""

    @property
    def inputs(self) -> Sequence[TensorSpec]: ...

    @property
    def output_names(self) -> Sequence[str]: ...

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def timed_run(self, feeds: Mapping[str, np.ndarray]) -> QueryTiming:
        """Run once and report where the time went (the benchmark's hook)."""
        ...

    def describe(self) -> dict[str, str]:
        """The measurement environment: backend and version, device, threads, driver."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc: object) -> None: ...


class Backend(Protocol):
    """Builds artifacts and loads them."""

    name: str
    artifact_suffix: str
    """The file suffix of its artifacts, e.g. ``.engine``."""

    def availability(self) -> Availability: ...

    def version(self) -> str: ...

    def int8_weight_levels(self) -> int:
        """Levels of its INT8 weights: 127, or 63 where the hardware saturates 8-bit weights."""
        ...

    def build(
        self,
        model_path: Path,
        spec: BuildSpec,
        table: CalibrationTable | None,
        out_path: Path,
        *,
        progress: ProgressFn | None = None,
    ) -> Artifact: ...

    def load(self, artifact_path: Path) -> Runner: ...
