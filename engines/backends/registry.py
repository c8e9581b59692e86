"""The backends trtforge builds with: name -> how to make one, whether it can run here, what its
artifacts are called, and how to open an artifact again.

A new backend is one module implementing :class:`engines.backends.base.Backend` plus one entry in
:data:`BACKENDS`. ``auto`` takes the first entry of :data:`AUTO_PREFERENCE` that can run here.
Nothing here imports a backend's libraries: availability is checked with
``importlib.util.find_spec`` and NVML (TensorRT), and each backend module is imported only when
it is chosen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engines.backends.base import BuildTarget
from engines.errors import BackendUnavailableError
from engines.names import QdqExecution
from engines.spec import BackendName

if TYPE_CHECKING:
    from engines.backends.base import Backend, Runner

__all__ = [
    "AUTO_PREFERENCE",
    "BACKENDS",
    "BackendEntry",
    "backend_for_artifact",
    "builds_versioned_by_target",
    "candidates",
    "choose_target",
    "local_targets",
    "open_artifact",
    "select_backend",
    "version_requestable",
]


@dataclass(frozen=True)
class BackendEntry:
    """One backend, as the registry knows it."""

    name: BackendName
    artifact_suffix: str
    make: Callable[[str], Backend]
    """Build the backend object; the argument is why it was chosen (recorded in sidecars)."""
    missing: Callable[[], str | None]
    """Why it cannot run here, or None when it can (cheap: no heavy import)."""
    targets_gpu: bool
    """Whether its artifacts are tied to a GPU's compute capability."""
    qdq_execution: QdqExecution = QdqExecution.REFERENCE
    """How ONNX Runtime runs Q/DQ variants measured for it (sweeps, sensitivity): its integer
    kernels where the artifact is ONNX Runtime's own, else Q/DQ as written (TensorRT's math)."""
    versioned_by_target: bool = False
    """Whether ``target.tensorrt`` (a version prefix a build may ask for) names its version."""


def _make_tensorrt(reason: str) -> Backend:
    from engines.backends.tensorrt import TensorRTBackend

    return TensorRTBackend(reason=reason)


def _tensorrt_missing() -> str | None:
    from core.tensorrt import tensorrt_installed

    if not tensorrt_installed():
        return "tensorrt not installed"
    from engines.gpu import discover_gpus

    if not discover_gpus():
        return "no NVIDIA GPU found"
    return None


def _make_onnxruntime(reason: str) -> Backend:
    from engines.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(reason=reason)


def _onnxruntime_missing() -> str | None:
    import importlib.util

    return None if importlib.util.find_spec("onnxruntime") else "onnxruntime not installed"


BACKENDS: dict[BackendName, BackendEntry] = {
    BackendName.TENSORRT: BackendEntry(
        BackendName.TENSORRT,
        ".engine",
        _make_tensorrt,
        _tensorrt_missing,
        targets_gpu=True,
        versioned_by_target=True,
    ),
    BackendName.ONNXRUNTIME: BackendEntry(
        BackendName.ONNXRUNTIME,
        ".onnx",
        _make_onnxruntime,
        _onnxruntime_missing,
        targets_gpu=False,
        qdq_execution=QdqExecution.ONNXRUNTIME,
    ),
}
"""Every backend, by name."""

AUTO_PREFERENCE: tuple[BackendName, ...] = (BackendName.TENSORRT, BackendName.ONNXRUNTIME)
"""What ``auto`` tries, best first: TensorRT where it can run, else ONNX Runtime."""


def select_backend(name: BackendName | str) -> tuple[Backend, str]:
    """The backend to build with, and why it was chosen.

    Raises :class:`BackendUnavailableError` (field ``backend``) when a backend asked for by name
    cannot run here.
    """
    name = BackendName(name)
    if name is not BackendName.AUTO:
        entry = BACKENDS[name]
        missing = entry.missing()
        if missing is not None:
            raise BackendUnavailableError(
                f"The {name.value} backend was requested but cannot run here: {missing}.",
                field="backend",
            )
        reason = f"{name.value} requested"
        return entry.make(reason), reason
    skipped: list[str] = []
    for candidate in AUTO_PREFERENCE:
        entry = BACKENDS[candidate]
        missing = entry.missing()
        if missing is None:
            if not skipped:
                reason = f"auto: {_available_words(candidate)}"
            else:
                reason = f"auto: {'; '.join(skipped)}, using {candidate.value}"
            return entry.make(reason), reason
        skipped.append(missing)
    raise BackendUnavailableError(
        f"No backend can run here: {'; '.join(skipped)}.", field="backend"
    )


def local_targets() -> list[BuildTarget]:
    """What this machine can build for: one target per backend that can run here, in
    :data:`AUTO_PREFERENCE` order (a GPU backend on this machine's first GPU)."""
    targets: list[BuildTarget] = []
    for name in AUTO_PREFERENCE:
        entry = BACKENDS[name]
        if entry.missing() is not None:
            continue
        version = entry.make("discovered").version()
        if not entry.targets_gpu:
            targets.append(
                BuildTarget(backend=name.value, backend_version=version, compute_capability="cpu")
            )
            continue
        from engines.gpu import discover_gpus

        gpus = discover_gpus()
        if gpus:
            targets.append(
                BuildTarget(
                    backend=name.value,
                    backend_version=version,
                    compute_capability=gpus[0].compute_capability,
                    device=gpus[0].name,
                )
            )
    return targets


def candidates(requested: BackendName | str) -> tuple[BackendName, ...]:
    """The backends a build asking for ``requested`` may get, best first: that one, or for
    ``auto`` :data:`AUTO_PREFERENCE`."""
    requested = BackendName(requested)
    return AUTO_PREFERENCE if requested is BackendName.AUTO else (requested,)


def version_requestable(requested: BackendName | str) -> bool:
    """Whether a build asking for ``requested`` may ask for a version in ``target.tensorrt``."""
    return any(BACKENDS[name].versioned_by_target for name in candidates(requested))


def builds_versioned_by_target(backend: str) -> bool:
    """Whether a target's ``backend`` is the one ``target.tensorrt`` versions."""
    return BACKENDS[BackendName(backend)].versioned_by_target


def choose_target(
    requested: BackendName | str, targets: Sequence[BuildTarget]
) -> BuildTarget | None:
    """The target among ``targets`` that serves a build asking for ``requested``: that backend,
    or for ``auto`` the first of :data:`AUTO_PREFERENCE` present; None when none serves it."""
    for name in candidates(requested):
        for target in targets:
            if target.backend == name.value:
                return target
    return None


def _available_words(name: BackendName) -> str:
    if name is BackendName.TENSORRT:
        return "tensorrt installed and an NVIDIA GPU found"
    return f"{name.value} available"


def backend_for_artifact(path: Path) -> BackendName:
    """Which backend an artifact belongs to: its sidecar says, else its suffix."""
    from engines.artifacts import read_metadata, sidecar_path

    path = Path(path)
    if sidecar_path(path).exists():
        return BackendName(read_metadata(path).backend)
    for entry in BACKENDS.values():
        if path.suffix == entry.artifact_suffix:
            return entry.name
    return BackendName.ONNXRUNTIME  # a bare model: ONNX Runtime runs it as it is


def open_artifact(path: Path, *, threads: int | None = None) -> Runner:
    """A runner for the artifact at ``path``, with the backend that built it (a bare .onnx opens
    in ONNX Runtime). ``threads`` bounds host-side threads where the backend has them."""
    name = backend_for_artifact(path)
    if name is BackendName.ONNXRUNTIME:
        from engines.backends.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(path, intra_op_threads=threads)
    return BACKENDS[name].make(f"opening {Path(path).name}").load(Path(path))
