"""The ONNX Runtime backend: the artifact is the transformed ONNX model (Q/DQ and/or FP16).

It works everywhere (CPU execution provider), and uses CUDA first when this onnxruntime build
has the CUDA execution provider. It is what ``auto`` picks where TensorRT or a GPU is missing.

Timing: ONNX Runtime's ``InferenceSession.run`` is synchronous on the host, copies included, so
a query's only measurable interval is its host wall-clock time. ``timed_run`` (the default of
:class:`engines.backends.runner.BaseRunner`) reports it as ``latency_ms`` and also as
``gpu_compute_ms`` and ``enqueue_ms`` (the run is its own enqueue and compute), with
``h2d_ms = d2h_ms = 0``: transfers, when any, are inside it. Feeds are validated before the
clock starts.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.hashing import sha256_file
from core.tensors import TensorSpec
from engines.artifacts import write_artifact
from engines.backends.base import (
    Artifact,
    ArtifactMetadata,
    Availability,
    ProgressFn,
    report_progress,
)
from engines.backends.runner import BaseRunner
from engines.errors import BuildError, RunError
from engines.spec import BuildSpec

if TYPE_CHECKING:
    import onnx

    from calibrators.table import CalibrationTable

__all__ = [
    "MAX_PROTOBUF_BYTES",
    "OnnxRuntimeBackend",
    "OnnxRuntimeRunner",
    "SessionRunner",
    "cpu_name",
    "create_session_options",
    "default_providers",
    "int8_weight_levels",
    "tensor_specs",
]

MAX_PROTOBUF_BYTES = 2**31 - 1
"""Protobuf cannot serialize a message of 2 GiB or more: such models need external data."""

_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(bfloat16)": "bfloat16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "str",
}


def cpu_name() -> str:
    """The CPU model name from /proc/cpuinfo, else what :mod:`platform` knows."""
    try:
        with Path("/proc/cpuinfo").open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _ort_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)


def create_session_options(threads: int, *, optimize: bool = True) -> Any:
    """``onnxruntime.SessionOptions``: errors-only log, ``threads`` intra-op threads, sequential
    execution, and every graph optimization, or none with ``optimize=False`` (Q/DQ nodes are
    then computed as written, in float, instead of fused into integer kernels)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    level = ort.GraphOptimizationLevel
    options.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


def _describe_options(options: Any, providers: Sequence[str]) -> dict[str, Any]:
    return {
        "providers": list(providers),
        "intra_op_num_threads": int(options.intra_op_num_threads),
        "inter_op_num_threads": int(options.inter_op_num_threads),
        "graph_optimization_level": options.graph_optimization_level.name,
        "execution_mode": options.execution_mode.name,
    }


def int8_weight_levels(providers: Sequence[str]) -> tuple[int, str]:
    """Weight levels for INT8 Q/DQ on these providers, and why.

    ONNX Runtime's x86 INT8 kernels without VNNI multiply u8 activations by s8 weights with
    VPMADDUBSW, which adds pairs of products in 16 bits and saturates when both are near full
    range; ONNX Runtime's own advice is 7-bit weights ("reduce_range") there. GPUs, ARM and
    VNNI CPUs take full 8-bit weights.
    """
    if providers and providers[0] != "CPUExecutionProvider":
        return 127, f"full 8-bit weights ({providers[0]})"
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return 127, f"full 8-bit weights ({platform.machine()} CPU)"
    flags = _cpu_flags()
    if {"avx512_vnni", "avx_vnni", "amx_int8"} & flags:
        return 127, "full 8-bit weights (x86 CPU with VNNI)"
    return 63, "7-bit weights: x86 CPU without VNNI, whose u8s8 kernels saturate 8-bit weights"


def _cpu_flags() -> set[str]:
    try:
        with Path("/proc/cpuinfo").open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _device_name(providers: Sequence[str]) -> str:
    if providers and providers[0] == "CUDAExecutionProvider":
        from engines.gpu import discover_gpus

        gpus = discover_gpus()
        if gpus:
            return str(gpus[0].name)
    return cpu_name()


class OnnxRuntimeBackend:
    """Builds ``.onnx`` artifacts (Q/DQ and/or FP16 per the spec) and runs them with ONNX Runtime.

    ``intra_op_threads`` defaults to ``os.cpu_count()``; ``providers`` to :func:`default_providers`.
    ``reason`` is why this backend was chosen; it is recorded in the artifact metadata.
    """

    name = "onnxruntime"
    artifact_suffix = ".onnx"

    def __init__(
        self,
        *,
        intra_op_threads: int | None = None,
        providers: Sequence[str] | None = None,
        reason: str = "",
    ) -> None:
        self.intra_op_threads = intra_op_threads or os.cpu_count() or 1
        self._providers = list(providers) if providers is not None else None
        self.reason = reason

    @property
    def providers(self) -> list[str]:
        return self._providers if self._providers is not None else default_providers()

    def availability(self) -> Availability:
        if importlib.util.find_spec("onnxruntime") is None:
            return Availability(False, "onnxruntime is not installed (pip install onnxruntime)")
        return Availability(True, f"onnxruntime {_ort_version()} on {', '.join(self.providers)}")

    def version(self) -> str:
        return _ort_version()

    def int8_weight_levels(self) -> int:
        """127, or 63 on x86 CPUs without VNNI (:func:`int8_weight_levels`)."""
        return int8_weight_levels(self.providers)[0]

    def build(
        self,
        model_path: Path,
        spec: BuildSpec,
        table: CalibrationTable | None,
        out_path: Path,
        *,
        progress: ProgressFn | None = None,
    ) -> Artifact:
        """Transform the model per ``spec.precision``, check it loads in ONNX Runtime, write it."""
        from engines.graph import prepare_model
        from engines.graph.inspect import load_model

        # INT8 without a table: prepare_model refuses it (unless the model carries its own Q/DQ)
        # after the one load below
        start = time.perf_counter()
        report_progress(progress, "loading model", 0.0)
        model_path = Path(model_path)
        model_sha256 = sha256_file(model_path)
        model = load_model(model_path)
        report_progress(progress, "transforming graph", 0.1)
        providers = self.providers
        levels, levels_reason = int8_weight_levels(providers)
        prepared = prepare_model(model, spec, table, weight_levels=levels)
        del model
        report_progress(progress, "checking with ONNX Runtime", 0.6)
        data = _serialize(prepared.model, out_path)
        options = create_session_options(self.intra_op_threads)
        _check_loads(data, options, providers, out_path)
        report_progress(progress, "writing artifact", 0.9)
        metadata = ArtifactMetadata(
            backend=self.name,
            backend_version=self.version(),
            backend_reason=self.reason,
            precision=spec.precision.value,
            device=_device_name(providers),
            profiles={
                name: {"min": list(p.min), "opt": list(p.opt), "max": list(p.max)}
                for name, p in spec.profiles.items()
            },
            table_sha256=table.digest if table is not None else None,
            quantized_nodes=prepared.quantized_nodes,
            kept_nodes=prepared.kept_nodes,
            fp32_nodes=prepared.fp32_nodes,
            spec=spec,
            model_sha256=model_sha256,
            sha256="",
            size_bytes=0,
            build_seconds=round(time.perf_counter() - start, 6),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            options={
                **_describe_options(options, providers),
                **(
                    {"int8_weights": levels_reason, "int8_weight_levels": levels}
                    if spec.precision.uses_int8
                    else {}
                ),
            },
        )
        artifact = write_artifact(data, out_path, metadata)
        report_progress(progress, "done", 1.0)
        return artifact

    def load(self, artifact_path: Path) -> OnnxRuntimeRunner:
        """Open an ``.onnx`` artifact for inference."""
        return OnnxRuntimeRunner(
            artifact_path, intra_op_threads=self.intra_op_threads, providers=self._providers
        )


def _serialize(model: onnx.ModelProto, out_path: Path) -> bytes:
    size = model.ByteSize()
    if size > MAX_PROTOBUF_BYTES:
        raise BuildError(
            f"The transformed model for {Path(out_path).name} is {size / 2**30:.1f} GiB; "
            "ONNX protobuf files are limited to 2 GiB.",
            hint="Models over 2 GiB need external weight files, which the onnxruntime backend does "
            "not write yet; build with --backend tensorrt, or reduce the model size.",
            field="model",
        )
    return bytes(model.SerializeToString())


def _check_loads(data: bytes, options: Any, providers: Sequence[str], out_path: Path) -> None:
    import onnxruntime as ort

    try:
        ort.InferenceSession(data, options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise BuildError(
            f"ONNX Runtime cannot load the transformed model for {Path(out_path).name}: {exc}",
            hint="Keep the failing node out of INT8/FP16 with --keep NODE, or report the model.",
            log=str(exc),
        ) from exc


def tensor_specs(args: Sequence[Any]) -> tuple[TensorSpec, ...]:
    """The :class:`TensorSpec` of ONNX Runtime ``NodeArg`` s (``session.get_inputs()``)."""
    specs = []
    for arg in args:
        shape = tuple(d if isinstance(d, int | str) else None for d in (arg.shape or ()))
        specs.append(
            TensorSpec(name=arg.name, dtype=_ORT_DTYPES.get(arg.type, arg.type), shape=shape)
        )
    return tuple(specs)


class SessionRunner(BaseRunner):
    """A runner over an ONNX Runtime ``InferenceSession`` (from a file or from memory), timed on
    the host (module docstring). ``label`` names it in error messages."""

    def __init__(self, session: Any, label: str) -> None:
        self._session: Any = session
        self._label = label
        self._inputs = tensor_specs(session.get_inputs())
        self._outputs = tuple(o.name for o in session.get_outputs())

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return self._inputs

    @property
    def output_names(self) -> Sequence[str]:
        return self._outputs

    @property
    def label(self) -> str:
        return self._label

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self._session.run(None, feeds)
        except Exception as exc:  # onnxruntime's own error types
            raise RunError(
                f"ONNX Runtime failed running {self._label}: {exc}",
                hint="The feeds match the model's declared inputs; the graph fails on these values "
                "(e.g. named dims whose sizes do not fit together).",
                field="inputs",
            ) from exc
        return {name: np.asarray(v) for name, v in zip(self._outputs, values, strict=True)}

    def _describe(self) -> dict[str, str]:
        return {"backend": "onnxruntime", "backend_version": _ort_version(), "model": self._label}

    def _close(self) -> None:
        self._session = None


class OnnxRuntimeRunner(SessionRunner):
    """An ONNX Runtime session over an ``.onnx`` artifact. Use it in a ``with`` block.

    ``intra_op_threads`` defaults to ``os.cpu_count()``; ``providers`` to :func:`default_providers`
    (CUDA first when available). See the module docstring for what :meth:`timed_run` measures.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        intra_op_threads: int | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        import onnxruntime as ort

        self.model_path = Path(model_path)
        self._threads = intra_op_threads or os.cpu_count() or 1
        self._providers = list(providers) if providers is not None else default_providers()
        options = create_session_options(self._threads)
        if not self.model_path.is_file():
            raise RunError(f"Artifact {str(self.model_path)!r} does not exist.", field="artifact")
        try:
            session = ort.InferenceSession(str(self.model_path), options, providers=self._providers)
        except Exception as exc:  # onnxruntime's own error types
            raise RunError(
                f"ONNX Runtime cannot load {self.model_path.name}: {exc}",
                hint="Check that the file is an .onnx artifact built by trtforge's onnxruntime backend.",
                field="artifact",
            ) from exc
        super().__init__(session, self.model_path.name)
        self._options = _describe_options(options, session.get_providers())

    @property
    def session_options(self) -> dict[str, Any]:
        """The session's settings as recorded in artifact metadata."""
        return dict(self._options)

    def _describe(self) -> dict[str, str]:
        providers = list(self._options["providers"])
        return {
            "backend": "onnxruntime",
            "backend_version": _ort_version(),
            "device": _device_name(providers),
            "providers": ",".join(providers),
            "threads": str(self._threads),
            "graph_optimization_level": str(self._options["graph_optimization_level"]),
            "timing": "host wall clock per synchronous query (transfers included)",
        }
