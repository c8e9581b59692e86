"""Running TensorRT: the build child (its job, its supervision, its reproduce script) and the
inference :class:`TensorRTRunner`. ``tensorrt`` and cuda-python are imported inside functions.

Runner timing (``timed_run``): four CUDA events on the runner's one stream bracket the
host-to-device copies, ``execute_async_v3`` and the device-to-host copies, so ``h2d_ms``,
``gpu_compute_ms`` and ``d2h_ms`` are device-side times and ``latency_ms`` is their sum as the
device saw it (first event to last), trtexec's definition. ``enqueue_ms`` is the host time spent
in ``execute_async_v3``. Host arrays are ordinary (pageable) numpy memory, no CUDA graph.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from calibrators.data import TensorSpec
from calibrators.errors import TensorRTUnavailableError, TrtforgeError
from calibrators.table import TensorRTAlgorithm
from calibrators.tensorrt import cuda_call, import_cudart, require_tensorrt
from engines.backends.base import ProgressFn, QueryTiming
from engines.errors import BackendUnavailableError, BuildError, EngineError, RunError, SpecError
from engines.spec import Precision, ShapeProfile, TensorRTMode, TensorRTOptions

__all__ = [
    "PROGRESS_PREFIX",
    "BuildJob",
    "TensorRTRunner",
    "render_reproduce_script",
    "run_build_process",
]

PROGRESS_PREFIX = "TRTFORGE-PROGRESS "
"""Lines the build child prints as ``TRTFORGE-PROGRESS <fraction> <stage>``."""

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


# -- the build child, supervised ------------------------------------------------------------------

_ERRORS: dict[str, type[TrtforgeError]] = {
    cls.__name__: cls for cls in (EngineError, SpecError, BuildError, BackendUnavailableError)
}


def run_build_process(
    argv: Sequence[str],
    *,
    timeout_s: float,
    log_path: Path,
    result_path: Path,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Run the build child, stream its output to ``log_path``, enforce ``timeout_s``.

    Returns the child's result JSON. A timeout, a crash or a missing result raises
    :class:`BuildError` with the log's tail; an error the child reported is re-raised as its
    own class (SpecError, EngineError, ...). On timeout the child's whole process group is killed.
    """
    tail: deque[str] = deque(maxlen=_LOG_TAIL_LINES)
    timed_out = threading.Event()
    with (
        Path(log_path).open("w", encoding="utf-8") as log_file,
        subprocess.Popen(
            list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, errors="replace", cwd=_PACKAGE_ROOT, start_new_session=True,
        ) as proc,
    ):  # fmt: skip

        def kill() -> None:
            timed_out.set()
            _kill_group(proc.pid)

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log_file.write(line)
                if not _progress_line(line, progress):
                    tail.append(line)
            returncode = proc.wait()
        except BaseException:
            _kill_group(proc.pid)  # e.g. the progress callback raised: do not leave it running
            raise
        finally:
            timer.cancel()
    log = "".join(tail)
    if timed_out.is_set():
        raise BuildError(
            f"The TensorRT build did not finish within {timeout_s:g} s and was stopped.",
            hint="Raise the build timeout, lower the optimization level, or build a smaller model.",
            log=log,
        )
    return _child_result(Path(result_path), returncode, log)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _progress_line(line: str, progress: ProgressFn | None) -> bool:
    """Report a ``TRTFORGE-PROGRESS <fraction> <stage>`` line; False for any other line."""
    if not line.startswith(PROGRESS_PREFIX):
        return False
    fraction, _, stage = line[len(PROGRESS_PREFIX) :].strip().partition(" ")
    try:
        value = float(fraction)
    except ValueError:
        return False
    if progress is not None:
        progress(stage, value)
    return True


def _child_result(path: Path, returncode: int, log: str) -> dict[str, Any]:
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        result = None
    if isinstance(result, dict) and "error" in result:
        cls = _ERRORS.get(str(result["error"]), BuildError)
        error = cls(str(result["message"]), hint=result.get("hint"), field=result.get("field"))
        if isinstance(error, BuildError):
            error.log = log
        raise error
    if returncode != 0 or not isinstance(result, dict):
        if returncode < 0:
            try:
                how = f"crashed ({signal.Signals(-returncode).name})"
            except ValueError:
                how = f"was killed by signal {-returncode}"
        elif returncode == 0:
            how = "exited without writing its result"
        else:
            how = f"failed with exit code {returncode}"
        raise BuildError(f"The TensorRT build process {how}.", hint="See the build log.", log=log)
    return result


_REPRODUCE = '''\
#!/usr/bin/env python3
"""Rebuild {artifact} with plain TensorRT Python, as trtforge built it.

Needs only `tensorrt` (and a GPU). Run it from anywhere: python {artifact}.reproduce.py [OUT]
"""

import sys
from pathlib import Path

import tensorrt as trt

HERE = Path(__file__).resolve().parent
ONNX = {onnx}
MODE = {mode!r}
PRECISION = {precision!r}
PROFILES = {profiles!r}
WORKSPACE_BYTES = {workspace!r}
OPTIMIZATION_LEVEL = {level!r}
HARDWARE_COMPATIBILITY = {hardware!r}
VERSION_COMPATIBLE = {version_compatible!r}
CALIBRATION_CACHE = {cache}
LAYER_PRECISIONS = {pins!r}


def pin_layers_implicit(network, config):
    """TensorRT 10.x: keep the layers of kept ONNX nodes in their precision."""
    dtypes = {{"float32": trt.float32, "float16": trt.float16}}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        node = layer.metadata.removeprefix("[ONNX Layer: ").removesuffix("]") or layer.name
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        pin = LAYER_PRECISIONS.get(node)
        if pin and all(t.dtype in (trt.float32, trt.float16) for t in outputs):
            layer.precision = dtypes[pin]
            for j in range(layer.num_outputs):
                layer.set_output_type(j, dtypes[pin])
    if LAYER_PRECISIONS:
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)


def configure_implicit(network, config):
    """TensorRT 10.x implicit quantization: flags, pinned layers, the cache as calibrator."""
    pin_layers_implicit(network, config)
    if PRECISION in ("fp16", "int8-fp16"):
        config.set_flag(trt.BuilderFlag.FP16)
    if PRECISION in ("int8", "int8-fp16"):
        config.set_flag(trt.BuilderFlag.INT8)
        base = trt.{calibrator_class}

        class CacheCalibrator(base):
            def __init__(self):
                base.__init__(self)

            def get_batch_size(self):
                return 1

            def get_batch(self, names):
                return None

            def read_calibration_cache(self):
                return CALIBRATION_CACHE.read_bytes()

            def write_calibration_cache(self, cache):
                pass

        calibrator = CacheCalibrator()
        config.int8_calibrator = calibrator
        return calibrator  # the caller keeps it alive until the build is done
    return None


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "{artifact}.reproduced"
    logger = trt.Logger(trt.Logger.INFO)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    strongly_typed = MODE == "explicit" and major < 11  # TensorRT 11: always strongly typed
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(ONNX)):
        for i in range(parser.num_errors):
            print(parser.get_error(i), file=sys.stderr)
        sys.exit(1)
    config = builder.create_builder_config()
    if PROFILES:
        profile = builder.create_optimization_profile()
        for name, shapes in PROFILES.items():
            profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)
    if WORKSPACE_BYTES is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if OPTIMIZATION_LEVEL is not None:
        config.builder_optimization_level = OPTIMIZATION_LEVEL
    if HARDWARE_COMPATIBILITY is not None:
        level = HARDWARE_COMPATIBILITY.upper()
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, level)
    if VERSION_COMPATIBLE:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    calibrator = configure_implicit(network, config) if MODE == "implicit" else None
    engine = builder.build_serialized_network(network, config)
    del calibrator
    if engine is None:
        sys.exit("TensorRT could not build the engine; see the log above.")
    out.write_bytes(engine)
    print(f"wrote {{out}}")


if __name__ == "__main__":
    main()
'''

_CALIBRATOR_CLASSES = {
    TensorRTAlgorithm.ENTROPY2: "IInt8EntropyCalibrator2",
    TensorRTAlgorithm.MINMAX: "IInt8MinMaxCalibrator",
    TensorRTAlgorithm.ENTROPY: "IInt8EntropyCalibrator",
}


def render_reproduce_script(
    job: BuildJob, artifact_name: str, *, onnx_name: str | None, cache_name: str | None
) -> str:
    """A standalone script rebuilding the engine with the same settings (no trtforge needed).

    ``onnx_name``/``cache_name`` are the files beside the artifact the script reads (relative,
    so the folder can move); ``onnx_name=None`` points it at the original model's absolute path.
    """
    options = job.options
    return _REPRODUCE.format(
        artifact=artifact_name,
        onnx=f"HERE / {onnx_name!r}" if onnx_name else f"Path({job.onnx_path!r})",
        mode=job.mode.value,
        precision=job.precision.value,
        profiles={n: p.model_dump(mode="json") for n, p in job.profiles.items()},
        workspace=options.workspace_bytes,
        level=options.optimization_level,
        hardware=options.hardware_compatibility,
        version_compatible=options.version_compatible,
        cache=f"HERE / {cache_name!r}" if cache_name else "None",
        pins=dict(job.layer_precisions),
        calibrator_class=_CALIBRATOR_CLASSES.get(
            job.calibrator or TensorRTAlgorithm.ENTROPY2, "IInt8EntropyCalibrator2"
        ),
    )


# -- inference ------------------------------------------------------------------------------------


def _unavailable(exc: TensorRTUnavailableError) -> BackendUnavailableError:
    return BackendUnavailableError(exc.message, hint=exc.hint)


def _version_compatible(engine_path: Path) -> bool:
    """Whether the sidecar says the engine was built version compatible (it embeds host code)."""
    from engines.artifacts import read_metadata

    try:
        return bool(read_metadata(engine_path).spec.tensorrt.version_compatible)
    except EngineError:
        return False


class TensorRTRunner:
    """A deserialized engine with device buffers, one execution context and one CUDA stream.

    Use it in a ``with`` block: :meth:`close` frees the device memory. See the module docstring
    for what :meth:`timed_run` measures. Outputs with data-dependent shapes are not supported.
    """

    def __init__(self, engine_path: Path, *, device: int = 0) -> None:
        self.engine_path = Path(engine_path)
        self.device = device
        try:
            self._version = require_tensorrt()
            self._cudart = import_cudart()
        except TensorRTUnavailableError as exc:
            raise _unavailable(exc) from exc
        import tensorrt as trt

        self._cuda(self._cudart.cudaSetDevice(device), f"cudaSetDevice({device})")
        try:
            data = self.engine_path.read_bytes()
        except OSError as exc:
            raise RunError(
                f"Cannot read the engine {str(engine_path)!r}: {exc}", field="artifact"
            ) from exc
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._runtime.engine_host_code_allowed = _version_compatible(self.engine_path)
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise RunError(
                f"TensorRT {self._version} cannot load {self.engine_path.name}.",
                hint="Engines run only with the TensorRT version and GPU model that built them "
                "(unless built version/hardware compatible); rebuild it here.",
                field="artifact",
            )
        self._context = self._engine.create_execution_context()
        self._buffers: dict[str, tuple[int, int]] = {}
        self._events: list[Any] = []
        self._stream = self._cuda(self._cudart.cudaStreamCreate(), "cudaStreamCreate")
        try:
            self._events = [
                self._cuda(self._cudart.cudaEventCreate(), "cudaEventCreate") for _ in range(4)
            ]
            self._io_specs()
        except BaseException:
            self.close()
            raise

    def _cuda(self, result: Any, what: str) -> Any:
        return cuda_call(result, what, RunError)

    def _io_specs(self) -> None:
        import tensorrt as trt

        inputs, outputs = [], []
        self._dtypes: dict[str, np.dtype[Any]] = {}
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            try:
                self._dtypes[name] = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            except TypeError as exc:
                raise RunError(f"Engine I/O tensor {name!r} has a type numpy lacks: {exc}") from exc
            shape = tuple(int(d) for d in self._engine.get_tensor_shape(name))
            spec = TensorSpec(
                name, self._dtypes[name].name, tuple(d if d >= 0 else None for d in shape)
            )
            if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs.append(spec)
            else:
                outputs.append(name)
        self._inputs = tuple(inputs)
        self._outputs = tuple(outputs)

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        """The engine's inputs; dynamic dims are ``None``."""
        return self._inputs

    @property
    def output_names(self) -> Sequence[str]:
        """The engine's outputs, in engine order."""
        return self._outputs

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, capacity = self._buffers.get(name, (0, -1))
        if capacity < nbytes:
            if ptr:
                self._cuda(self._cudart.cudaFree(ptr), "cudaFree")
            ptr = int(self._cuda(self._cudart.cudaMalloc(max(nbytes, 1)), f"cudaMalloc {name!r}"))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def _stage(
        self, feeds: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Host arrays for the inputs (shapes set on the context) and for the outputs."""
        if self._context is None:
            raise RunError("The runner is closed.", hint="Use the runner inside its `with` block.")
        hosts: dict[str, np.ndarray] = {}
        for spec in self._inputs:
            if spec.name not in feeds:
                raise RunError(
                    f"Missing input {spec.name!r} for {self.engine_path.name}.",
                    hint=f"Feed every engine input: {', '.join(s.name for s in self._inputs)}.",
                    field="inputs",
                )
            try:
                array = np.ascontiguousarray(
                    np.asarray(feeds[spec.name]).astype(
                        self._dtypes[spec.name], casting="same_kind"
                    )
                )
            except TypeError as exc:
                raise RunError(f"Input {spec.name!r}: {exc}", field="inputs") from exc
            if not self._context.set_input_shape(spec.name, array.shape):
                raise RunError(
                    f"Input {spec.name!r} has shape {array.shape}, outside what the engine accepts "
                    f"({spec.shape}, within its optimization profile).",
                    field="inputs",
                )
            hosts[spec.name] = array
        outputs: dict[str, np.ndarray] = {}
        for name in self._outputs:
            shape = tuple(int(d) for d in self._context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RunError(
                    f"Output {name!r} has a data-dependent shape, which trtforge cannot run."
                )
            outputs[name] = np.empty(shape, dtype=self._dtypes[name])
        for name, array in (hosts | outputs).items():
            self._context.set_tensor_address(name, self._buffer(name, array.nbytes))
        return hosts, outputs

    def _execute(self, hosts: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> float:
        """Copy in, run, copy out on the stream; returns the host enqueue time in ms."""
        cudart, stream, events = self._cudart, self._stream, self._events
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda = self._cuda
        cuda(cudart.cudaEventRecord(events[0], stream), "cudaEventRecord")
        for name, array in hosts.items():
            ptr = self._buffers[name][0]
            cuda(cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, h2d, stream), "H2D")
        cuda(cudart.cudaEventRecord(events[1], stream), "cudaEventRecord")
        start = time.perf_counter()
        ok = self._context.execute_async_v3(int(stream))
        enqueue_ms = (time.perf_counter() - start) * 1000.0
        if not ok:
            raise RunError(f"TensorRT failed to enqueue {self.engine_path.name}; see its log.")
        cuda(cudart.cudaEventRecord(events[2], stream), "cudaEventRecord")
        for name, array in outputs.items():
            ptr = self._buffers[name][0]
            cuda(cudart.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, d2h, stream), "D2H")
        cuda(cudart.cudaEventRecord(events[3], stream), "cudaEventRecord")
        cuda(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        return enqueue_ms

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one query; returns every output by name."""
        hosts, outputs = self._stage(feeds)
        self._execute(hosts, outputs)
        return outputs

    def timed_run(self, feeds: Mapping[str, np.ndarray]) -> QueryTiming:
        """Run once; CUDA-event times per stage plus host enqueue time (module docstring)."""
        hosts, outputs = self._stage(feeds)
        enqueue_ms = self._execute(hosts, outputs)
        e = self._events

        def elapsed(a: Any, b: Any) -> float:
            return float(
                self._cuda(self._cudart.cudaEventElapsedTime(a, b), "cudaEventElapsedTime")
            )

        return QueryTiming(
            latency_ms=elapsed(e[0], e[3]),
            enqueue_ms=enqueue_ms,
            h2d_ms=elapsed(e[0], e[1]),
            gpu_compute_ms=elapsed(e[1], e[2]),
            d2h_ms=elapsed(e[2], e[3]),
        )

    def describe(self) -> dict[str, str]:
        """The measurement environment: TensorRT version, GPU, driver, how timing is taken."""
        from engines.gpu import discover_gpus

        gpu = next((g for g in discover_gpus() if g.index == self.device), None)
        return {
            "backend": "tensorrt",
            "backend_version": self._version,
            "device": gpu.name if gpu else f"cuda:{self.device}",
            "compute_capability": gpu.compute_capability if gpu else "unknown",
            "driver_version": gpu.driver_version if gpu else "unknown",
            "cuda_version": (gpu.cuda_version or "unknown") if gpu else "unknown",
            "timing": "CUDA events on one stream (h2d, compute, d2h); enqueue = host time",
            "host_memory": "pageable",
            "cuda_graph": "no",
            "platform": platform.platform(),
            "python": platform.python_version(),
        }

    def close(self) -> None:
        """Free device buffers, events and the stream; idempotent."""
        if self._stream is None:
            return
        cudart = self._cudart
        for ptr, _ in self._buffers.values():
            cudart.cudaFree(ptr)
        for event in self._events:
            cudart.cudaEventDestroy(event)
        cudart.cudaStreamDestroy(self._stream)
        self._buffers, self._events, self._stream = {}, [], None
        self._context = self._engine = self._runtime = None

    def __enter__(self) -> TensorRTRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
