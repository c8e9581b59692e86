"""Running TensorRT engines: :class:`TensorRTRunner`. ``tensorrt`` and cuda-python are imported
inside functions.

Runner timing (``timed_run``): four CUDA events on the runner's one stream bracket the
host-to-device copies, the inference and the device-to-host copies, so ``h2d_ms``,
``gpu_compute_ms`` and ``d2h_ms`` are device-side times and ``latency_ms`` is their sum as the
device saw it (first event to last), trtexec's definition. ``enqueue_ms`` is the host time spent
launching the inference. Host arrays are ordinary (pageable) numpy memory.

Timing modes (:class:`engines.backends.base.TimingMode`, trtexec's flags):

- ``cuda_graph``: per input shape, one plain ``execute_async_v3`` (TensorRT may allocate on its
  first enqueue), then the enqueue is captured on the stream (``cudaStreamBeginCapture`` in
  thread-local mode ... ``cudaStreamEndCapture``), instantiated and from then on launched with
  ``cudaGraphLaunch``. Graphs are dropped when a device buffer moves. When capture fails (some
  engines enqueue work that cannot be captured) the runner falls back to plain enqueues and
  :attr:`TensorRTRunner.timing_mode` says so, as trtexec does.
- ``spin_wait``: each query waits by polling its last event (``cudaEventQuery``) instead of a
  blocking ``cudaStreamSynchronize``.
- ``use_transfers=False``: timed queries leave out both copies (their events are back to back);
  the inputs are copied once, untimed, when their shapes change. :meth:`TensorRTRunner.run`
  always copies.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.cuda import cuda_call, import_cudart
from core.errors import TensorRTUnavailableError
from core.tensorrt import require_tensorrt, tensorrt_module
from core.tensors import TensorSpec
from engines.backends.base import QueryTiming, TimingMode
from engines.backends.runner import BaseRunner
from engines.errors import BackendUnavailableError, EngineError, RunError

__all__ = ["TensorRTRunner"]


def _unavailable(exc: TensorRTUnavailableError) -> BackendUnavailableError:
    return BackendUnavailableError(exc.message, hint=exc.hint)


def _version_compatible(engine_path: Path) -> bool:
    """Whether the sidecar says the engine was built version compatible (it embeds host code)."""
    from engines.artifacts import read_metadata

    try:
        return bool(read_metadata(engine_path).spec.tensorrt.version_compatible)
    except EngineError:
        return False


class TensorRTRunner(BaseRunner):
    """A deserialized engine with device buffers, one execution context and one CUDA stream.

    Use it in a ``with`` block: :meth:`close` frees the device memory. See the module docstring
    for what :meth:`timed_run` measures. Outputs with data-dependent shapes are not supported.
    Feeds of another dtype of the same kind (float64 for a float32 input) are cast.
    """

    input_casting = "same_kind"

    def __init__(self, engine_path: Path, *, device: int = 0) -> None:
        self.engine_path = Path(engine_path)
        self.device = device
        try:
            self._version = require_tensorrt()
            self._cudart = import_cudart()
        except TensorRTUnavailableError as exc:
            raise _unavailable(exc) from exc
        trt = tensorrt_module()

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
        self._mode = TimingMode()
        self._graph_failed = False
        self._graphs: dict[tuple[tuple[str, tuple[int, ...]], ...], tuple[Any, Any]] = {}
        """Input shapes -> (graph, executable graph) captured for them."""
        self._uploaded: tuple[tuple[str, tuple[int, ...]], ...] | None = None
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
        trt = tensorrt_module()

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

    @property
    def label(self) -> str:
        return self.engine_path.name

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, capacity = self._buffers.get(name, (0, -1))
        if capacity < nbytes:
            self._drop_graphs()  # captured graphs hold the old addresses
            self._uploaded = None
            if ptr:
                self._cuda(self._cudart.cudaFree(ptr), "cudaFree")
            ptr = int(self._cuda(self._cudart.cudaMalloc(max(nbytes, 1)), f"cudaMalloc {name!r}"))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def _stage(
        self, feeds: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Host arrays for the validated inputs (shapes set on the context) and for the outputs."""
        hosts: dict[str, np.ndarray] = {}
        for spec in self._inputs:
            array = np.ascontiguousarray(feeds[spec.name])
            if not self._context.set_input_shape(spec.name, array.shape):
                raise RunError(
                    f"Input {spec.name!r} has shape {array.shape}, outside what the engine accepts "
                    f"({spec.shape}, within its optimization profile).",
                    hint="Feed a shape between the profile's min and max (the artifact's sidecar "
                    "lists them), or rebuild with a profile that covers it.",
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

    def set_timing_mode(self, mode: TimingMode) -> None:
        """Use ``mode`` for later :meth:`timed_run` calls (module docstring)."""
        self._mode = mode
        self._graph_failed = False

    @property
    def timing_mode(self) -> TimingMode:
        """The mode in effect: ``cuda_graph`` is False once a capture has failed."""
        if self._graph_failed:
            return TimingMode(
                cuda_graph=False,
                spin_wait=self._mode.spin_wait,
                use_transfers=self._mode.use_transfers,
            )
        return self._mode

    def _execute(
        self,
        hosts: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
        mode: TimingMode,
    ) -> float:
        """Copy in, run, copy out on the stream as ``mode`` says; returns the enqueue time in ms."""
        cudart, stream, events = self._cudart, self._stream, self._events
        cuda = self._cuda
        if not mode.use_transfers:
            self._upload_once(hosts)
        graph = self._graph_for(hosts) if mode.cuda_graph else None  # captured before timing
        cuda(cudart.cudaEventRecord(events[0], stream), "cudaEventRecord")
        if mode.use_transfers:
            self._copy(hosts, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice)
        cuda(cudart.cudaEventRecord(events[1], stream), "cudaEventRecord")
        start = time.perf_counter()
        if graph is not None:
            cuda(cudart.cudaGraphLaunch(graph, stream), "cudaGraphLaunch")
        elif not self._context.execute_async_v3(int(stream)):
            raise RunError(f"TensorRT failed to enqueue {self.engine_path.name}; see its log.")
        enqueue_ms = (time.perf_counter() - start) * 1000.0
        cuda(cudart.cudaEventRecord(events[2], stream), "cudaEventRecord")
        if mode.use_transfers:
            self._copy(outputs, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost)
        cuda(cudart.cudaEventRecord(events[3], stream), "cudaEventRecord")
        self._wait(events[3], spin=mode.spin_wait)
        return enqueue_ms

    def _copy(self, arrays: dict[str, np.ndarray], kind: Any) -> None:
        """Queue one copy per array between it and its device buffer, direction ``kind``."""
        h2d = kind == self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        for name, array in arrays.items():
            ptr = self._buffers[name][0]
            dst, src = (ptr, array.ctypes.data) if h2d else (array.ctypes.data, ptr)
            self._cuda(
                self._cudart.cudaMemcpyAsync(dst, src, array.nbytes, kind, self._stream),
                f"cudaMemcpyAsync {name!r}",
            )

    def _upload_once(self, hosts: dict[str, np.ndarray]) -> None:
        """Without timed transfers: copy the inputs (untimed) when their shapes change."""
        key = _shape_key(hosts)
        if key != self._uploaded:
            self._copy(hosts, self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice)
            self._wait(None, spin=False)
            self._uploaded = key

    def _wait(self, event: Any, *, spin: bool) -> None:
        cudart = self._cudart
        if not spin or event is None:
            self._cuda(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
            return
        not_ready = cudart.cudaError_t.cudaErrorNotReady
        while True:
            (err,) = cudart.cudaEventQuery(event)
            if err != not_ready:
                self._cuda((err,), "cudaEventQuery")
                return

    def _graph_for(self, hosts: dict[str, np.ndarray]) -> Any:
        """The executable graph for these input shapes, captured on first use; None when capture
        failed (then plain enqueues are used from now on, see :attr:`timing_mode`)."""
        if self._graph_failed:
            return None
        key = _shape_key(hosts)
        if key not in self._graphs:
            captured = self._capture()
            if captured is None:
                self._graph_failed = True
                return None
            self._graphs[key] = captured
        return self._graphs[key][1]

    def _capture(self) -> tuple[Any, Any] | None:
        cudart, stream = self._cudart, self._stream
        # a first, plain enqueue lets TensorRT allocate what it defers, outside the capture
        if not self._context.execute_async_v3(int(stream)):
            raise RunError(f"TensorRT failed to enqueue {self.engine_path.name}; see its log.")
        self._cuda(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        (err,) = cudart.cudaStreamBeginCapture(stream, mode)
        if int(err) != 0:
            return None
        enqueued = self._context.execute_async_v3(int(stream))
        err, graph = cudart.cudaStreamEndCapture(stream)
        if not enqueued or int(err) != 0:
            cudart.cudaGetLastError()  # clear the capture's error so later calls start clean
            if graph is not None and int(err) == 0:
                cudart.cudaGraphDestroy(graph)
            return None
        err, executable = cudart.cudaGraphInstantiate(graph, 0)
        if int(err) != 0:
            cudart.cudaGetLastError()
            cudart.cudaGraphDestroy(graph)
            return None
        return graph, executable

    def _drop_graphs(self) -> None:
        for graph, executable in self._graphs.values():
            self._cudart.cudaGraphExecDestroy(executable)
            self._cudart.cudaGraphDestroy(graph)
        self._graphs = {}

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one query; returns every output by name (always with both copies)."""
        hosts, outputs = self._stage(feeds)
        self._execute(hosts, outputs, TimingMode())
        return outputs

    def _timed_run(self, feeds: dict[str, np.ndarray]) -> QueryTiming:
        """Run once in the current timing mode; CUDA-event times per stage plus host enqueue
        time (module docstring)."""
        hosts, outputs = self._stage(feeds)
        enqueue_ms = self._execute(hosts, outputs, self.timing_mode)
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

    def _describe(self) -> dict[str, str]:
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
            "cuda_graph": "yes" if self.timing_mode.cuda_graph else "no",
            "spin_wait": "yes" if self.timing_mode.spin_wait else "no",
            "data_transfers": "timed" if self.timing_mode.use_transfers else "left out",
        }

    def _close(self) -> None:
        """Free device buffers, events and the stream (once: :meth:`close` is idempotent)."""
        if self._stream is None:
            return
        cudart = self._cudart
        self._drop_graphs()
        for ptr, _ in self._buffers.values():
            cudart.cudaFree(ptr)
        for event in self._events:
            cudart.cudaEventDestroy(event)
        cudart.cudaStreamDestroy(self._stream)
        self._buffers, self._events, self._stream = {}, [], None
        self._context = self._engine = self._runtime = None


def _shape_key(arrays: Mapping[str, np.ndarray]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple(sorted((name, tuple(a.shape)) for name, a in arrays.items()))
