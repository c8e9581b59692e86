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
Names of functions used only by the implicit path contain ``implicit``: the API-surface test
checks everything else against the TensorRT 11 bindings too. The helpers that need no TensorRT
(parser messages, the mode check, side-file names, layer pins) are in
:mod:`engines.backends.tensorrt_support`.

The timing cache is one file per GPU model + compute capability + TensorRT version, loaded before
the build and merged back after it under a file lock, so concurrent builds share what they timed.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calibrators.table import CalibrationTable, trt_version_number
from calibrators.tensorrt import native_calibrator
from core.errors import TensorRTUnavailableError, TrtforgeError
from core.files import write_atomically
from core.hashing import sha256_file
from core.tensorrt import require_tensorrt, tensorrt_installed
from engines.artifacts import write_artifact
from engines.backends.base import Artifact, ArtifactMetadata, Availability, ProgressFn
from engines.backends.tensorrt_job import (
    PROGRESS_PREFIX,
    BuildJob,
    render_reproduce_script,
    run_build_process,
)
from engines.backends.tensorrt_runner import TensorRTRunner
from engines.backends.tensorrt_support import (
    TRT11_VERSION,
    NodeReports,
    ParserProblem,
    check_mode_supported,
    layer_pins_implicit,
    onnx_node_of_layer,
    parser_error_message,
    publish_build_inputs,
    save_prepared_onnx,
    side_files,
    timing_cache_file,
)
from engines.errors import BackendUnavailableError, BuildError, EngineError, SpecError
from engines.graph.prequantized import file_is_prequantized
from engines.spec import BuildSpec, ShapeProfile, TensorRTMode

if TYPE_CHECKING:
    from engines.gpu import GpuInfo

__all__ = ["DEFAULT_BUILD_TIMEOUT_S", "TensorRTBackend", "TensorRTRunner", "main"]

log = logging.getLogger(__name__)

DEFAULT_BUILD_TIMEOUT_S = 3600.0


# -- the parent: prepare, supervise, publish ------------------------------------------------------


class TensorRTBackend:
    """Builds TensorRT engines in a child process and loads them with :class:`TensorRTRunner`.

    ``timing_cache_dir`` defaults to ``~/.cache/trtforge/tensorrt``; ``device`` is the GPU index
    (NVML's; CUDA's too with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``); ``reason`` is why this backend was
    chosen (recorded in the metadata).
    """

    name = "tensorrt"
    artifact_suffix = ".engine"

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
        """Installed (found without importing it) and a GPU at ``device`` (NVML)."""
        if not tensorrt_installed():
            return Availability(False, "tensorrt is not installed")
        gpu = self._gpu()
        if gpu is None:
            return Availability(False, f"NVML finds no NVIDIA GPU with index {self.device}")
        return Availability(True, f"tensorrt installed; {gpu.name} (sm {gpu.compute_capability})")

    def int8_weight_levels(self) -> int:
        """TensorRT's INT8 kernels take full 8-bit weights."""
        return 127

    def version(self) -> str:
        """The installed TensorRT's version (imports it)."""
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
        if table is None and (
            spec.mode is TensorRTMode.IMPLICIT or not file_is_prequantized(model_path)
        ):
            spec.precision.require_table(table)  # a model with its own Q/DQ needs none
        gpu = self._gpu()
        if not tensorrt_installed() or gpu is None:
            raise BackendUnavailableError(
                f"TensorRT cannot build here: {self.availability().reason}."
            )
        model_path, out_path = Path(model_path).resolve(), Path(out_path).resolve()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        files = side_files(out_path)
        if progress is not None:
            progress("preparing model", 0.0)
        with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.", dir=out_path.parent) as tmp:
            job, reports = self._prepare(model_path, spec, table, Path(tmp), gpu, out_path.name)
            job_path = Path(tmp) / "job.json"
            job_path.write_text(job.model_dump_json(indent=2), encoding="utf-8")
            result = run_build_process(
                [sys.executable, "-m", "engines.backends.tensorrt", str(job_path)],
                timeout_s=self.build_timeout_s,
                log_path=files["build.log"],
                result_path=Path(job.result_path),
                progress=progress,
            )
            Path(job.layers_path).replace(files["layers.json"])
            published = publish_build_inputs(job, files)
            script = render_reproduce_script(
                job,
                out_path.name,
                onnx_name=published.get("prepared_onnx"),
                cache_name=published.get("calibration_cache"),
            )
            write_atomically(files["reproduce.py"], script)
            options = {
                "builder": spec.tensorrt.model_dump(mode="json"),
                "strongly_typed": spec.mode is TensorRTMode.EXPLICIT,
                **{k: result.get(k) for k in ("builder_flags", "layers_pinned", "timing_cache")},
                **{
                    k.replace(".", "_"): files[k].name
                    for k in ("layers.json", "reproduce.py", "build.log")
                },
                **published,
            }
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
                profiles={n: p.model_dump(mode="json") for n, p in spec.profiles.items()},
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
                options=options,
            )
            artifact = write_artifact(Path(job.engine_path), out_path, metadata)
        if progress is not None:
            progress("done", 1.0)
        return artifact

    def _prepare(
        self,
        model_path: Path,
        spec: BuildSpec,
        table: CalibrationTable | None,
        work: Path,
        gpu: GpuInfo,
        artifact_name: str = "model.engine",
    ) -> tuple[BuildJob, NodeReports]:
        """The child's job; inputs are written in ``work`` under their final names."""
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
            "timing_cache_folder": str(self.timing_cache_dir)
            if spec.tensorrt.timing_cache
            else None,
            "gpu_key": f"{gpu.name}-sm{gpu.compute_capability}",
            "device": self.device,
        }
        if spec.mode is TensorRTMode.EXPLICIT:
            from engines.graph import prepare_model

            prepared = prepare_model(model, spec, table)
            onnx_path = work / f"{artifact_name}.prepared.onnx"
            save_prepared_onnx(prepared.model, onnx_path)
            reports = (prepared.quantized_nodes, prepared.kept_nodes, prepared.fp32_nodes)
            return BuildJob(onnx_path=str(onnx_path), **common), reports
        pins = layer_pins_implicit(model, spec)
        cache_path = None
        if spec.precision.uses_int8 and table is not None:
            cache_path = table.save(work / f"{artifact_name}.calibration.cache")
        job = BuildJob(
            onnx_path=str(model_path),
            calibration_cache=str(cache_path) if cache_path else None,
            calibrator=table.algorithm if table is not None else None,
            layer_precisions=pins,
            **common,
        )
        kept = {node: f"pinned to {dtype} by a keep rule" for node, dtype in pins.items()}
        return job, ([], kept, [n for n, d in pins.items() if d == "float32"])

    def load(self, artifact_path: Path) -> TensorRTRunner:
        """Deserialize an engine for inference on this backend's device."""
        return TensorRTRunner(artifact_path, device=self.device)




# -- the child: TensorRT itself -------------------------------------------------------------------


def _progress(stage: str, fraction: float) -> None:
    sys.stdout.write(f"{PROGRESS_PREFIX}{fraction:.2f} {stage}\n")
    sys.stdout.flush()


def _build_engine(job: BuildJob) -> dict[str, Any]:
    version = require_tensorrt()
    check_mode_supported(job.mode, trt_version_number(version))
    import tensorrt as trt

    if job.device:
        from core.cuda import cuda_call, import_cudart

        cuda_call(import_cudart().cudaSetDevice(job.device), f"cudaSetDevice({job.device})")
    logger = trt.Logger(trt.Logger.INFO)
    builder = trt.Builder(logger)
    _progress("parsing ONNX", 0.05)
    network = builder.create_network(_network_flags(job.mode, trt_version_number(version)))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(job.onnx_path):
        raise BuildError(
            parser_error_message(
                [_parser_problem(parser.get_error(i)) for i in range(parser.num_errors)]
            ),
            hint="Keep the node out of INT8/FP16 (--keep NODE), or check its op against "
            "TensorRT's ONNX operator support.",
            field="model",
        )
    _check_inputs(network, job.profiles)
    config = builder.create_builder_config()
    flags = _configure(builder, config, job)
    calibrator, pinned = None, 0
    if job.mode is TensorRTMode.IMPLICIT:
        calibrator, pinned = _configure_implicit(network, config, job)
        flags += [
            f
            for f, on in (("FP16", job.precision.uses_fp16), ("INT8", job.precision.uses_int8))
            if on
        ]
    cache_path = None
    if job.timing_cache_folder and job.gpu_key:
        cache_path = timing_cache_file(Path(job.timing_cache_folder), job.gpu_key, version)
        _load_timing_cache(config, cache_path)
    _progress("building engine", 0.2)
    serialized = builder.build_serialized_network(network, config)
    if calibrator is not None:
        calibrator.close()
        calibrator.core.raise_error()
    if serialized is None:
        raise BuildError(
            "TensorRT could not build the engine (build_serialized_network returned nothing).",
            hint="The build log has TensorRT's reason; a too small workspace limit is a common one.",
        )
    if cache_path is not None:
        _save_timing_cache(config, cache_path)
    Path(job.engine_path).write_bytes(memoryview(serialized))
    _progress("inspecting layers", 0.9)
    Path(job.layers_path).write_text(_layer_information(logger, serialized, job), encoding="utf-8")
    return {
        "tensorrt_version": version,
        "builder_flags": flags,
        "layers_pinned": pinned,
        "timing_cache": str(cache_path) if cache_path else None,
    }


def _parser_problem(error: Any) -> ParserProblem:
    return ParserProblem(
        node=int(error.node()),
        node_name=str(error.node_name()),
        operator=str(error.node_operator()),
        code=str(error.code()),
        description=str(error.desc()),
    )


def _network_flags(mode: TensorRTMode, trt_version: int) -> int:
    import tensorrt as trt

    if mode is TensorRTMode.EXPLICIT and trt_version < TRT11_VERSION:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0  # TensorRT 11: every network is strongly typed (the flag is deprecated and ignored)


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
            hint="Give one per dynamic input: --shapes NAME:MIN/OPT/MAX, e.g. 1x3x224x224/...",
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
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # full inspector output
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
                continue  # shape and index layers keep their types
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
    if not config.set_timing_cache(config.create_timing_cache(data), False):
        log.warning("Ignoring timing cache %s: written for another GPU or TensorRT.", path)
        config.set_timing_cache(config.create_timing_cache(b""), False)


def _save_timing_cache(config: Any, path: Path) -> None:
    """Merge this build's timings into the file (it may have grown meanwhile) and replace it."""
    from filelock import FileLock

    built = config.get_timing_cache()
    with FileLock(f"{path}.lock"):
        merged = config.create_timing_cache(path.read_bytes() if path.exists() else b"")
        if not merged.combine(built, False):
            merged = built
        write_atomically(path, bytes(memoryview(merged.serialize())))


def _layer_information(logger: Any, serialized: Any, job: BuildJob) -> str:
    import tensorrt as trt

    runtime = trt.Runtime(logger)
    if job.options.version_compatible:  # such engines embed the lean runtime: host code
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        return json.dumps({"error": "the built engine could not be deserialized for inspection"})
    inspector = engine.create_engine_inspector()
    return str(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def main(argv: Sequence[str] | None = None) -> int:
    """The build child: ``python -m engines.backends.tensorrt JOB.json``; writes the result JSON."""
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="trtforge: %(message)s")
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
    known = (EngineError, SpecError, BuildError, BackendUnavailableError)
    name = type(exc).__name__ if type(exc) in known else "BuildError"
    log.error("%s", exc)
    return {"error": name, "message": exc.message, "hint": exc.hint, "field": exc.field}


if __name__ == "__main__":
    raise SystemExit(main())
