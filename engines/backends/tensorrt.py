"""The TensorRT backend: the one door to ``tensorrt`` for builds (imported inside functions).

A build runs in a child process (``python -m engines.backends.tensorrt JOB.json``) with a
timeout, so a TensorRT crash, hang or leak cannot take the service down: a crash or timeout
becomes a :class:`BuildError` carrying the log. The parent needs no TensorRT: it prepares the
inputs, supervises the child, and publishes the results beside the artifact ``<name>``:

- ``<name>`` and ``<name>.json``: the serialized engine and its metadata (engines.artifacts);
- ``<name>.layers.json``: the engine inspector's layer information (``LayerInformationFormat.JSON``);
- ``<name>.reproduce.py``: rebuilds the engine with plain TensorRT Python, no trtforge;
- ``<name>.build.log``: TensorRT's log of the build;
- explicit mode: ``<name>.prepared.onnx``, the Q/DQ + FP16 ONNX that TensorRT parsed;
- implicit INT8: ``<name>.calibration.cache``, the table served to TensorRT's calibrator.

Modes (ARCHITECTURE.md §1). ``explicit``: the model goes through ``engines.graph.prepare_model``
and is parsed into a strongly typed network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` on
10.x; every network is strongly typed on 11.x), no precision flags. ``implicit`` (10.x only):
``BuilderFlag.FP16``/``INT8``, trtforge's table served as the native calibrator's cache, and the
layers of kept ONNX nodes pinned with ``layer.precision`` under ``OBEY_PRECISION_CONSTRAINTS``.

The timing cache is one file per GPU model + compute capability + TensorRT version, loaded before
the build and merged back after it under a file lock, so concurrent builds share what they timed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from calibrators.errors import TensorRTUnavailableError, TrtforgeError
from calibrators.table import TensorRTAlgorithm, trt_version_number
from calibrators.tensorrt import native_calibrator, require_tensorrt, tensorrt_installed
from engines.artifacts import sha256_file, write_artifact
from engines.backends.base import Artifact, ArtifactMetadata, Availability, ProgressFn
from engines.backends.tensorrt_runner import TensorRTRunner
from engines.errors import BackendUnavailableError, BuildError, EngineError, SpecError
from engines.spec import BuildSpec, Precision, ShapeProfile, TensorRTMode, TensorRTOptions

if TYPE_CHECKING:
    from calibrators.table import CalibrationTable
    from engines.gpu import GpuInfo

__all__ = [
    "BuildJob",
    "ParserProblem",
    "TensorRTBackend",
    "TensorRTRunner",
    "check_mode_supported",
    "onnx_node_of_layer",
    "parser_error_message",
    "run_build_process",
    "side_files",
    "timing_cache_file",
]

PROGRESS_PREFIX = "TRTFORGE-PROGRESS "
DEFAULT_BUILD_TIMEOUT_S = 3600.0
_LOG_TAIL_LINES = 400
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class BuildJob(BaseModel):
    """Everything the build child needs, as JSON (never pickled). Paths are absolute."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    onnx_path: str
    mode: TensorRTMode
    precision: Precision
    profiles: dict[str, ShapeProfile]
    options: TensorRTOptions
    calibration_cache: str | None = None
    calibrator: TensorRTAlgorithm | None = None
    layer_precisions: dict[str, Literal["float32", "float16"]] = {}
    """Implicit mode: ONNX node name -> the precision its layers are pinned to."""
    engine_path: str
    layers_path: str
    result_path: str
    timing_cache_folder: str | None = None
    gpu_key: str | None = None
    device: int = 0


class ParserProblem(BaseModel):
    """One ``trt.OnnxParser`` error, copied out of TensorRT."""

    model_config = ConfigDict(frozen=True)

    node: int
    node_name: str
    operator: str
    code: str
    description: str


def parser_error_message(problems: Sequence[ParserProblem]) -> str:
    """One message naming each failing ONNX node (name, op type, index) and TensorRT's reason."""
    if not problems:
        return "TensorRT's ONNX parser failed without reporting an error."
    parts = []
    for p in problems[:5]:
        where = f"node {p.node_name!r}" if p.node_name else f"node #{p.node}"
        op = f" ({p.operator})" if p.operator else ""
        parts.append(f"{where}{op}: {p.description} [{p.code}]")
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return "TensorRT cannot parse the ONNX model: " + "; ".join(parts) + more + "."


def check_mode_supported(mode: TensorRTMode, trt_version: int) -> None:
    """Implicit quantization exists only in TensorRT 10.x (header-style version number)."""
    if mode is TensorRTMode.IMPLICIT and trt_version >= 110000:
        raise EngineError(
            "TensorRT 11 removed implicit quantization (calibrators, INT8/FP16 builder flags).",
            hint="Build with --mode explicit: trtforge writes Q/DQ + FP16 ONNX that TensorRT 11 "
            "builds strongly typed.",
            field="mode",
        )


_ONNX_LAYER_RE = re.compile(r"\[ONNX Layer: (.*)\]")


def onnx_node_of_layer(layer_name: str, metadata: str) -> str:
    """The ONNX node a TensorRT layer came from: the parser's ``[ONNX Layer: NAME]`` metadata,
    else the layer's own name (which the parser takes from the node)."""
    match = _ONNX_LAYER_RE.search(metadata or "")
    return match.group(1) if match else layer_name


def timing_cache_file(folder: Path, gpu_key: str, trt_version: str) -> Path:
    """``<folder>/<gpu>-trt<version>.timing-cache``; the key's odd characters become ``-``."""
    stem = re.sub(r"[^A-Za-z0-9.]+", "-", f"{gpu_key}-trt{trt_version}").strip("-")
    return Path(folder) / f"{stem}.timing-cache"


def side_files(artifact: Path) -> dict[str, Path]:
    """The files written beside an artifact (module docstring)."""
    artifact = Path(artifact)
    names = ("layers.json", "reproduce.py", "build.log", "prepared.onnx", "calibration.cache")
    return {n: artifact.with_name(f"{artifact.name}.{n}") for n in names}


# -- the parent: prepare, supervise, publish -----------------------------------------------------


class TensorRTBackend:
    """Builds TensorRT engines in a child process and loads them with :class:`TensorRTRunner`.

    ``timing_cache_dir`` defaults to ``~/.cache/trtforge/tensorrt``; ``reason`` is why this
    backend was chosen (recorded in the metadata); ``device`` is the CUDA device index.
    """

    name = "tensorrt"

    def __init__(
        self,
        *,
        timing_cache_dir: Path | None = None,
        build_timeout_s: float = DEFAULT_BUILD_TIMEOUT_S,
        device: int = 0,
        reason: str = "",
    ) -> None:
        self.timing_cache_dir = timing_cache_dir or Path.home() / ".cache" / "trtforge" / "tensorrt"
        self.build_timeout_s = build_timeout_s
        self.device = device
        self.reason = reason

    def availability(self) -> Availability:
        if not tensorrt_installed():
            return Availability(False, "tensorrt is not installed")
        gpu = self._gpu()
        if gpu is None:
            return Availability(False, f"no NVIDIA GPU with index {self.device} found by NVML")
        return Availability(True, f"tensorrt installed; {gpu.name} (sm {gpu.compute_capability})")

    def version(self) -> str:
        try:
            return require_tensorrt()
        except TensorRTUnavailableError as exc:
            raise BackendUnavailableError(exc.message, hint=exc.hint) from exc

    def _gpu(self) -> GpuInfo | None:
        from engines.gpu import discover_gpus

        return next((g for g in discover_gpus() if g.index == self.device), None)

    def build(
        self,
        model_path: Path,
        spec: BuildSpec,
        table: CalibrationTable | None,
        out_path: Path,
        *,
        progress: ProgressFn | None = None,
    ) -> Artifact:
        """Build ``model_path`` per ``spec`` into an engine at ``out_path`` (module docstring)."""
        start = time.perf_counter()
        if spec.precision.uses_int8 and table is None:
            raise SpecError(
                f"Precision {spec.precision.value} needs a calibration table.",
                hint="Pass --data to calibrate or --table.",
                field="table",
            )
        gpu = self._gpu()
        if not tensorrt_installed() or gpu is None:
            raise BackendUnavailableError(f"TensorRT cannot build here: {self.availability().reason}.")
        model_path, out_path = Path(model_path).resolve(), Path(out_path).resolve()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        files = side_files(out_path)
        _report(progress, "preparing model", 0.0)
        with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.", dir=out_path.parent) as tmp:
            work = Path(tmp)
            job, reports = self._prepare(model_path, spec, table, work, gpu)
            job_path = work / "job.json"
            job_path.write_text(job.model_dump_json(indent=2), encoding="utf-8")
            argv = [sys.executable, "-m", "engines.backends.tensorrt", str(job_path)]
            result = run_build_process(
                argv, timeout_s=self.build_timeout_s, log_path=files["build.log"],
                result_path=Path(job.result_path), progress=progress,
            )  # fmt: skip
            Path(job.layers_path).replace(files["layers.json"])
            published = _publish_inputs(job, files)
            _write_text(files["reproduce.py"], render_reproduce_script(job, out_path.name))
            metadata = ArtifactMetadata(
                backend=self.name,
                backend_version=str(result["tensorrt_version"]),
                backend_reason=self.reason,
                mode=spec.mode.value,
                precision=spec.precision.value,
                device=gpu.name,
                compute_capability=gpu.compute_capability,
                cuda_version=gpu.cuda_version,
                driver_version=gpu.driver_version,
                profiles={
                    n: {"min": list(p.min), "opt": list(p.opt), "max": list(p.max)}
                    for n, p in spec.profiles.items()
                },
                table_sha256=table.digest if table is not None else None,
                quantized_nodes=reports[0],
                kept_nodes=reports[1],
                fp32_nodes=reports[2],
                spec=spec,
                model_sha256=sha256_file(model_path),
                sha256="",
                size_bytes=0,
                build_seconds=round(time.perf_counter() - start, 3),
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                options=_options_record(job, result, files, published),
            )
            artifact = write_artifact(Path(job.engine_path), out_path, metadata)
        _report(progress, "done", 1.0)
        return artifact

    def _prepare(
        self,
        model_path: Path,
        spec: BuildSpec,
        table: CalibrationTable | None,
        work: Path,
        gpu: GpuInfo,
    ) -> tuple[BuildJob, tuple[list[str], dict[str, str], list[str]]]:
        from engines.graph.inspect import load_model

        model = load_model(model_path)
        common: dict[str, Any] = {
            "mode": spec.mode,
            "precision": spec.precision,
            "profiles": dict(spec.profiles),
            "options": spec.tensorrt,
            "engine_path": str(work / "engine.plan"),
            "layers_path": str(work / "layers.json"),
            "result_path": str(work / "result.json"),
            "timing_cache_folder": str(self.timing_cache_dir) if spec.tensorrt.timing_cache else None,
            "gpu_key": f"{gpu.name}-sm{gpu.compute_capability}",
            "device": self.device,
        }
        if spec.mode is TensorRTMode.EXPLICIT:
            from engines.graph import prepare_model

            prepared = prepare_model(model, spec, table)
            onnx_path = work / "prepared.onnx"
            _save_onnx(prepared.model, onnx_path)
            job = BuildJob(onnx_path=str(onnx_path), **common)
            return job, _explicit_reports(prepared)
        pins = _layer_precisions(model, spec)
        cache_path = None
        if spec.precision.uses_int8 and table is not None:
            cache_path = work / "calibration.cache"
            table.save(cache_path)
        job = BuildJob(
            onnx_path=str(model_path),
            calibration_cache=str(cache_path) if cache_path else None,
            calibrator=table.algorithm if table is not None else None,
            layer_precisions=pins,
            **common,
        )
        kept = {node: f"pinned to {dtype} (keep rule)" for node, dtype in pins.items()}
        return job, ([], kept, [n for n, d in pins.items() if d == "float32"])

    def load(self, artifact_path: Path) -> TensorRTRunner:
        """Deserialize an engine for inference on this backend's device."""
        return TensorRTRunner(artifact_path, device=self.device)


def _report(progress: ProgressFn | None, stage: str, fraction: float) -> None:
    if progress is not None:
        progress(stage, fraction)


def _save_onnx(model: Any, path: Path) -> None:
    import onnx

    from engines.backends.onnxruntime import MAX_PROTOBUF_BYTES

    large = model.ByteSize() > MAX_PROTOBUF_BYTES
    onnx.save_model(
        model, str(path), save_as_external_data=large, location=f"{path.name}.data" if large else None
    )


def _explicit_reports(prepared: Any) -> tuple[list[str], dict[str, str], list[str]]:
    quantized: list[str] = []
    kept: dict[str, str] = {}
    fp32: list[str] = []
    if prepared.quantization is not None:
        quantized = list(prepared.quantization.quantized_nodes)
        kept.update({n: f"not INT8: {why}" for n, why in prepared.quantization.skipped.items()})
    if prepared.fp16 is not None:
        for name, why in prepared.fp16.fp32_nodes.items():
            fp32.append(name)
            kept[name] = f"{kept[name]}; FP32: {why}" if name in kept else f"FP32: {why}"
    return quantized, kept, fp32


def _layer_precisions(model: Any, spec: BuildSpec) -> dict[str, Literal["float32", "float16"]]:
    """Implicit mode: which ONNX nodes' layers to pin, and to what (keep rules of the spec)."""
    from engines.spec import node_matches

    pins: dict[str, Literal["float32", "float16"]] = {}
    for node in model.graph.node:
        if not node.name:
            continue
        no_fp16 = spec.precision.uses_fp16 and node_matches(spec.keep.fp16, node.name, node.op_type)
        no_int8 = spec.precision.uses_int8 and node_matches(spec.keep.int8, node.name, node.op_type)
        if no_fp16 or (no_int8 and not spec.precision.uses_fp16):
            pins[node.name] = "float32"
        elif no_int8:
            pins[node.name] = "float16"
    return pins


def _publish_inputs(job: BuildJob, files: dict[str, Path]) -> dict[str, str]:
    """Move what TensorRT read (prepared ONNX, calibration cache) beside the artifact."""
    published: dict[str, str] = {}
    if job.mode is TensorRTMode.EXPLICIT:
        source = Path(job.onnx_path)
        data = source.with_name(source.name + ".data")
        if data.exists():  # the external-data file keeps its relative name
            data.replace(files["prepared.onnx"].with_name(files["prepared.onnx"].name + ".data"))
        source.replace(files["prepared.onnx"])
        published["prepared_onnx"] = files["prepared.onnx"].name
    if job.calibration_cache:
        Path(job.calibration_cache).replace(files["calibration.cache"])
        published["calibration_cache"] = files["calibration.cache"].name
    return published


def _options_record(
    job: BuildJob, result: dict[str, Any], files: dict[str, Path], published: dict[str, str]
) -> dict[str, Any]:
    return {
        "builder": job.options.model_dump(mode="json"),
        "strongly_typed": job.mode is TensorRTMode.EXPLICIT,
        "builder_flags": result.get("builder_flags", []),
        "layers_pinned": result.get("layers_pinned", 0),
        "timing_cache": result.get("timing_cache"),
        "layers": files["layers.json"].name,
        "reproduce": files["reproduce.py"].name,
        "log": files["build.log"].name,
        **published,
    }


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# -- the child: TensorRT itself ------------------------------------------------------------------


def _progress(stage: str, fraction: float) -> None:
    print(f"{PROGRESS_PREFIX}{fraction:.2f} {stage}", flush=True)


def _build_engine(job: BuildJob) -> dict[str, Any]:
    version = require_tensorrt()
    check_mode_supported(job.mode, trt_version_number(version))
    import tensorrt as trt

    if job.device:
        from calibrators.tensorrt import cuda_call, import_cudart

        cuda_call(import_cudart().cudaSetDevice(job.device), f"cudaSetDevice({job.device})")
    logger = trt.Logger(trt.Logger.INFO)
    builder = trt.Builder(logger)
    _progress("parsing ONNX", 0.05)
    network = builder.create_network(_network_flags(job, trt_version_number(version)))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(job.onnx_path):
        problems = []
        for i in range(parser.num_errors):
            error = parser.get_error(i)
            problems.append(
                ParserProblem(
                    node=error.node(), node_name=error.node_name(), operator=error.node_operator(),
                    code=str(error.code()), description=error.desc(),
                )
            )  # fmt: skip
        raise BuildError(
            parser_error_message(problems),
            hint="Keep the node out of INT8/FP16 (--keep NODE), or check the op against "
            "TensorRT's ONNX operator support list.",
            field="model",
        )
    _check_inputs(network, job.profiles)
    config = builder.create_builder_config()
    flags = _configure(builder, config, job)
    calibrator, pinned = None, 0
    if job.mode is TensorRTMode.IMPLICIT:
        calibrator, pinned = _configure_implicit(network, config, job)
    cache_path = None
    if job.timing_cache_folder and job.gpu_key:
        cache_path = timing_cache_file(Path(job.timing_cache_folder), job.gpu_key, version)
        _load_timing_cache(config, cache_path)
    _progress("building engine", 0.2)
    serialized = builder.build_serialized_network(network, config)
    if calibrator is not None:
        calibrator.core.raise_error()
        calibrator.close()
    if serialized is None:
        raise BuildError(
            "TensorRT could not build the engine (build_serialized_network returned nothing).",
            hint="See the build log for TensorRT's reason; a workspace limit that is too low is "
            "a common one.",
        )
    if cache_path is not None:
        _save_timing_cache(config, cache_path)
    with Path(job.engine_path).open("wb") as fh:
        fh.write(memoryview(serialized))
    _progress("inspecting layers", 0.9)
    Path(job.layers_path).write_text(_layer_information(logger, serialized, job), encoding="utf-8")
    return {
        "tensorrt_version": version,
        "builder_flags": flags,
        "layers_pinned": pinned,
        "timing_cache": str(cache_path) if cache_path else None,
    }


def _network_flags(job: BuildJob, trt_version: int) -> int:
    import tensorrt as trt

    if job.mode is TensorRTMode.EXPLICIT and trt_version < 110000:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0  # TensorRT 11: every network is strongly typed (the flag is deprecated, ignored)


def _check_inputs(network: Any, profiles: dict[str, ShapeProfile]) -> None:
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    names = [t.name for t in inputs]
    unknown = sorted(set(profiles) - set(names))
    if unknown:
        raise SpecError(
            f"Shape profiles name input(s) {', '.join(unknown)}, which the model lacks.",
            hint=f"The model's inputs are: {', '.join(names)}.",
            field="profiles",
        )
    dynamic = [t.name for t in inputs if any(d < 0 for d in t.shape) and t.name not in profiles]
    if dynamic:
        raise SpecError(
            f"Input(s) {', '.join(dynamic)} have dynamic dimensions but no shape profile.",
            hint="Give one per dynamic input: --shapes NAME:MINxDIMS/OPTxDIMS/MAXxDIMS.",
            field="profiles",
        )


def _configure(builder: Any, config: Any, job: BuildJob) -> list[str]:
    import tensorrt as trt

    flags: list[str] = []
    if job.profiles:
        profile = builder.create_optimization_profile()
        for name, shapes in job.profiles.items():
            profile.set_shape(name, shapes.min, shapes.opt, shapes.max)
        config.add_optimization_profile(profile)
    options = job.options
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    if options.optimization_level is not None:
        config.builder_optimization_level = options.optimization_level
    if options.hardware_compatibility is not None:
        levels = {
            "none": trt.HardwareCompatibilityLevel.NONE,
            "ampere_plus": trt.HardwareCompatibilityLevel.AMPERE_PLUS,
            "same_compute_capability": trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY,
        }
        config.hardware_compatibility_level = levels[options.hardware_compatibility]
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        flags.append("VERSION_COMPATIBLE")
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    return flags


def _configure_implicit(network: Any, config: Any, job: BuildJob) -> tuple[Any, int]:
    """TensorRT 10.x only (checked before): precision flags, calibrator, layer pins."""
    import tensorrt as trt

    if job.precision.uses_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    calibrator = None
    if job.precision.uses_int8:
        config.set_flag(trt.BuilderFlag.INT8)
        if job.calibration_cache is not None:
            from calibrators.table import CalibrationTable

            table = CalibrationTable.load(Path(job.calibration_cache))
            calibrator = native_calibrator(None, job.calibrator or table.algorithm, table=table)
            config.int8_calibrator = calibrator
    pinned = 0
    if job.layer_precisions:
        dtypes = {"float32": trt.float32, "float16": trt.float16}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            pin = job.layer_precisions.get(onnx_node_of_layer(layer.name, layer.metadata))
            outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
            if pin is None or any(t.dtype not in (trt.float32, trt.float16) for t in outputs):
                continue  # shape/index layers keep their types
            layer.precision = dtypes[pin]
            for j in range(layer.num_outputs):
                layer.set_output_type(j, dtypes[pin])
            pinned += 1
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    return calibrator, pinned


def _load_timing_cache(config: Any, path: Path) -> None:
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        data = path.read_bytes() if path.exists() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):  # written by another GPU/TensorRT: start afresh
        print(f"Ignoring the mismatched timing cache {path}", flush=True)
        config.set_timing_cache(config.create_timing_cache(b""), False)


def _save_timing_cache(config: Any, path: Path) -> None:
    """Merge this build's timings into the file (it may have grown meanwhile) and replace it."""
    from filelock import FileLock

    built = config.get_timing_cache()
    with FileLock(f"{path}.lock"):
        merged = config.create_timing_cache(path.read_bytes() if path.exists() else b"")
        if not merged.combine(built, False):
            merged = built
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(memoryview(merged.serialize()))
        tmp.replace(path)


def _layer_information(logger: Any, serialized: Any, job: BuildJob) -> str:
    import tensorrt as trt

    runtime = trt.Runtime(logger)
    if job.options.version_compatible:
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        return json.dumps({"error": "the built engine could not be deserialized for inspection"})
    inspector = engine.create_engine_inspector()
    return str(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def main(argv: Sequence[str] | None = None) -> int:
    """The build child's entry point: ``python -m engines.backends.tensorrt JOB.json``."""
    args = list(sys.argv[1:] if argv is None else argv)
    job = BuildJob.model_validate_json(Path(args[0]).read_text(encoding="utf-8"))
    try:
        result = _build_engine(job)
    except TensorRTUnavailableError as exc:
        result = _error_record(BackendUnavailableError(exc.message, hint=exc.hint))
    except TrtforgeError as exc:
        result = _error_record(exc)
    Path(job.result_path).write_text(json.dumps(result), encoding="utf-8")
    return 2 if "error" in result else 0


def _error_record(exc: TrtforgeError) -> dict[str, Any]:
    name = type(exc).__name__ if type(exc).__name__ in _ERRORS else "BuildError"
    print(f"trtforge: {exc}", file=sys.stderr, flush=True)
    return {"error": name, "message": exc.message, "hint": exc.hint, "field": exc.field}


def render_reproduce_script(job: BuildJob, artifact_name: str) -> str:
    """A standalone script that rebuilds the engine with plain TensorRT Python."""
    from engines.backends.tensorrt_reproduce import reproduce_script

    return reproduce_script(job, artifact_name)


if __name__ == "__main__":
    raise SystemExit(main())

