"""Run an FP32 ONNX model over a dataset with ONNX Runtime and stream its activations to observers.

Every float activation (float graph inputs and every float node output that depends on a graph
input) is exposed as an extra graph output of a private copy of the model; each run's values are
handed to the observer and dropped before the next run, so memory does not grow with the number of
samples. It is bounded by a byte budget (``memory_limit_bytes``, :mod:`calibrators.memory`), not
by the batch: ONNX Runtime runs micro-batches that fit it, and where one sample's activations do
not, the tensors are observed in groups, one pass over the data per group.

Aliases (tensors holding another's values rearranged, :mod:`calibrators.activations`) are announced
to the observer and neither exposed nor observed.

Observers (:class:`Observer`) see one call per run. Those that need more than one look at the
data (exact histograms: the range first, then the counts) or the batch boundaries implement
:class:`MultiPassObserver` too; :func:`collect` then runs every group's passes in order and says
when each batch ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import onnx

from calibrators.activations import ALIAS_OPS, ActivationPlan, observable_tensors
from calibrators.data import CalibrationDataset
from calibrators.memory import (
    DEFAULT_MEMORY_LIMIT_BYTES,
    CollectionPlan,
    estimate_unknown,
    plan_collection,
)
from core.errors import ModelError
from core.onnxio import load_onnx, with_graph
from core.tensors import TensorSpec, model_input_specs

__all__ = [
    "ALIAS_OPS",
    "COLLECTOR_VERSION",
    "ActivationPlan",
    "MultiPassObserver",
    "Observer",
    "ProgressFn",
    "auto_batch_size",
    "collect",
    "collection_plan",
    "observable_tensors",
    "session_providers",
]

log = logging.getLogger(__name__)

COLLECTOR_VERSION = "4"
"""Part of the calibration-table cache key: bump when collection changes what a table holds.
4: exact histograms are numpy's two-pass histograms (integer counts), not re-binned fine ones."""

ProgressFn = Callable[[int, int], None]
"""Called with (samples run, samples to run) after every run; a run of several passes or groups
counts each sample once per pass."""

_DEFAULT_ACTIVATION_BUDGET_BYTES = 384 * 1024 * 1024
_ORT_CPU_ARENA = True
"""ONNX Runtime's CPU arena: the outputs are allocated once per input shape and rebound, so the
arena only ever holds the working tensors of one run (bench/collect_memory.py measures both)."""


class Observer(Protocol):
    """Receives the activations of a calibration run, batch by batch."""

    def begin(self, tensors: Sequence[str], aliases: Mapping[str, str]) -> None:
        """Called once before the first batch: every tensor of the run in graph order, and the
        aliases among them (alias -> the observed tensor whose statistics it shares). Aliases are
        never passed to :meth:`observe_batch`."""

    def observe_batch(self, tensors: Sequence[tuple[str, np.ndarray]]) -> None:
        """``(name, values)`` per observed tensor of one run (a micro-batch), in graph order; when
        the memory limit splits the tensors into groups, each call holds one group's tensors and
        every group sees the whole dataset. The arrays are reused for the next run: they are
        valid during the call only."""


@runtime_checkable
class MultiPassObserver(Observer, Protocol):
    """An :class:`Observer` that passes over the data more than once, or cares where batches end.

    :func:`collect` calls :meth:`passes` once after :meth:`Observer.begin`, then for every group
    of tensors and every pass ``index`` in ``range(passes)``: :meth:`begin_pass`, the runs of the
    whole dataset (:meth:`Observer.observe_batch`), and :meth:`end_batch` after the last run of
    each batch. A tensor thus sees all of its passes in order, each over every sample.
    """

    def passes(self, split_batches: bool) -> int:
        """How many passes over the data the observer needs; ``split_batches`` says whether a
        batch (``batch_size`` samples) reaches it in several runs."""

    def begin_pass(self, index: int, tensors: Sequence[str]) -> None:
        """Pass ``index`` over the whole dataset starts, for the observed ``tensors``."""

    def end_batch(self) -> None:
        """The runs of one batch are over (the last batch may be short)."""


def auto_batch_size(
    plan: ActivationPlan, budget_bytes: int = _DEFAULT_ACTIVATION_BUDGET_BYTES
) -> int:
    """A batch size that keeps one batch of observed activations within ``budget_bytes``."""
    if not plan.bytes_per_sample:
        return 8
    return int(max(1, min(64, budget_bytes // plan.bytes_per_sample)))


def collection_plan(
    model: onnx.ModelProto,
    plan: ActivationPlan,
    inputs: Sequence[TensorSpec],
    *,
    memory_limit_bytes: int,
    batch_size: int,
) -> CollectionPlan:
    """The micro-batch and tensor groups of a run of ``model`` (see :mod:`calibrators.memory`).

    ``inputs`` are the dataset's per-sample specs (validated against the model).
    """
    graph_inputs = {spec.name for spec in inputs}
    producers = {
        out: tuple(i for i in node.input if i) for node in model.graph.node for out in node.output
    }
    sizes = estimate_unknown(plan.tensor_bytes, producers)
    observed = {name: 0 if name in graph_inputs else sizes[name] for name in plan.observed}
    input_bytes = sum(
        np.dtype(spec.dtype).itemsize * int(np.prod(_sample_shape(spec))) for spec in inputs
    )
    return plan_collection(
        observed,
        input_bytes=input_bytes,
        working_bytes=2 * max(sizes.values(), default=0),
        memory_limit_bytes=memory_limit_bytes,
        batch_size=batch_size,
        max_micro_batch=_fixed_batch(model, graph_inputs),
    )


def _sample_shape(spec: TensorSpec) -> tuple[int, ...]:
    """A dataset spec's per-sample shape (static: a dataset's samples have one)."""
    return tuple(d if isinstance(d, int) else 1 for d in spec.shape)


def _fixed_batch(model: onnx.ModelProto, inputs: set[str]) -> int | None:
    """The static first axis of the model's inputs, when one has it."""
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else []
        if vi.name in inputs and dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
    return None


def session_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are ``names``, without the nodes they do not need."""
    needed = set(names)
    kept: list[onnx.NodeProto] = []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
            needed.update(_outer_names(node))
    graph = model.graph
    initializers = [t for t in graph.initializer if t.name in needed]
    # an input that only names a dropped initializer (IR < 4 lists them) would need a feed
    constants = {t.name for t in graph.initializer}
    return with_graph(
        model,
        node=list(reversed(kept)),
        input=[vi for vi in graph.input if vi.name not in constants or vi.name in needed],
        output=[onnx.ValueInfoProto(name=name) for name in names],
        initializer=initializers,
    )


def _outer_names(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If, Loop, Scan bodies) read from the enclosing graph."""
    names: set[str] = set()
    for attr in node.attribute:
        for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
            for inner in sub.node:
                names.update(i for i in inner.input if i)
                names.update(_outer_names(inner))
    return names


def _open_session(
    model: onnx.ModelProto, providers: Sequence[str] | None, threads: int | None
) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = _ORT_CPU_ARENA
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(
            model.SerializeToString(), options, providers=list(providers or session_providers())
        )
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelError(f"ONNX Runtime cannot load the model: {exc}", field="model") from exc


def collect(
    model_path: Path,
    dataset: CalibrationDataset,
    observer: Observer,
    *,
    batch_size: int | None = None,
    max_samples: int | None = None,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    progress: ProgressFn | None = None,
    memory_limit_bytes: int | None = None,
) -> int:
    """Stream every float activation of ``model_path`` over ``dataset`` to ``observer``.

    The dataset is validated against the model's inputs first. Returns the number of samples seen.
    ``batch_size`` is the batch the observer sees (``None``: one that keeps a batch of activations
    within a few hundred MB); ONNX Runtime runs micro-batches of it, and groups of tensors, that fit
    ``memory_limit_bytes`` (``None``: :data:`calibrators.memory.DEFAULT_MEMORY_LIMIT_BYTES`).
    """
    model = load_onnx(model_path)
    data = dataset.validate(model_input_specs(model))
    inputs = list(data.specs)
    plan = observable_tensors(model, {spec.name: _sample_shape(spec) for spec in inputs})
    if not plan.tensors:
        raise ModelError("The model has no float activations to calibrate.", field="model")
    schedule = collection_plan(
        model,
        plan,
        inputs,
        memory_limit_bytes=memory_limit_bytes or DEFAULT_MEMORY_LIMIT_BYTES,
        batch_size=batch_size or auto_batch_size(plan),
    )
    total = min(len(data), max_samples) if max_samples is not None else len(data)
    observer.begin(plan.tensors, plan.aliases)
    multi = observer if isinstance(observer, MultiPassObserver) else None
    passes = multi.passes(schedule.split_batches) if multi is not None else 1
    graph_inputs = {spec.name for spec in inputs}
    run = _Progress(progress, total * passes * len(schedule.groups))
    for group in schedule.groups:
        computed = [name for name in group if name not in graph_inputs]
        session = (
            _open_session(_with_outputs(model, computed), providers, threads) if computed else None
        )
        runner = _BoundRunner(session, computed)
        for index in range(passes):
            if multi is not None:
                multi.begin_pass(index, group)
            for feeds, last_of_batch in _runs(data, schedule, total, batches=multi is not None):
                values = dict(runner.run(feeds, run.done))
                values.update((name, feeds[name]) for name in group if name in feeds)
                # graph order, so tables list tensors as the model does
                observer.observe_batch([(name, values[name]) for name in group if name in values])
                del values
                if last_of_batch and multi is not None:
                    multi.end_batch()
                run.advance(_batch_len(feeds))
        del runner, session
    return total


class _Progress:
    def __init__(self, callback: ProgressFn | None, total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0

    def advance(self, samples: int) -> None:
        self.done += samples
        if self.callback is not None:
            self.callback(self.done, self.total)


def _runs(
    data: CalibrationDataset, schedule: CollectionPlan, total: int, *, batches: bool
) -> Iterator[tuple[dict[str, np.ndarray], bool]]:
    """(feeds of one run, whether it ends a batch): micro-batches that never straddle a batch."""
    micro = schedule.micro_batch
    if not (batches and schedule.split_batches):
        for feeds in data.batches(micro, max_samples=total):
            yield feeds, True
        return
    for start in range(0, total, schedule.batch_size):
        stop = min(start + schedule.batch_size, total)
        chunk = data.subset(range(start, stop))
        done = start
        for feeds in chunk.batches(micro):
            done += _batch_len(feeds)
            yield feeds, done == stop


class _BoundRunner:
    """Runs one session with its outputs in buffers ONNX Runtime allocated, reused run to run.

    The first run of each input shape lets ONNX Runtime allocate the outputs through an
    :class:`onnxruntime.IOBinding`; their numpy views share that memory, and the same OrtValues are
    bound as the outputs of the next runs, so a run neither allocates (a CNN's ~20 M activation
    values per sample cost more in page faults than in the forward pass) nor copies. A new input
    shape (the last, short batch) releases them first: memory never holds two sets.
    """

    def __init__(self, session: Any, tensors: Sequence[str]) -> None:
        self._session = session
        self._names = list(tensors)
        self._key: tuple[tuple[str, tuple[int, ...]], ...] | None = None
        self._binding: Any = None
        self._values: list[Any] = []
        self._views: list[np.ndarray] = []
        self._shared = False

    def run(self, feeds: dict[str, np.ndarray], done: int) -> list[tuple[str, np.ndarray]]:
        if self._session is None:
            return []
        key = tuple((name, tuple(a.shape)) for name, a in sorted(feeds.items()))
        inputs = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        try:
            if key != self._key:
                self._key, self._values, self._views, self._binding = None, [], [], None
                self._first_run(inputs)
                self._key = key
            else:
                for name, array in inputs.items():
                    self._binding.bind_cpu_input(name, array)
                self._session.run_with_iobinding(self._binding)
                if not self._shared:
                    self._views = [v.numpy() for v in self._binding.get_outputs()]
        except Exception as exc:
            raise ModelError(
                f"ONNX Runtime failed on samples {done}..{done + _batch_len(feeds) - 1}: {exc}",
                field="dataset",
            ) from exc
        return [
            (name, view)
            for name, view in zip(self._names, self._views, strict=True)
            if isinstance(view, np.ndarray) and view.dtype.kind == "f"
        ]

    def _first_run(self, inputs: dict[str, np.ndarray]) -> None:
        binding = self._session.io_binding()
        for name, array in inputs.items():
            binding.bind_cpu_input(name, array)
        for name in self._names:
            binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(binding)
        values = binding.get_outputs()
        views = [v.numpy() for v in values]
        # numpy() shares the OrtValue's memory (onnxruntime >= 1.16); where it copies, the
        # outputs are read again after every run instead
        self._shared = all(
            view.size == 0 or view.ctypes.data == value.data_ptr()
            for view, value in zip(views, values, strict=True)
        )
        if self._shared:
            for name, value in zip(self._names, values, strict=True):
                binding.bind_ortvalue_output(name, value)
        self._binding, self._values, self._views = binding, values, views


def _batch_len(feeds: dict[str, np.ndarray]) -> int:
    return int(next(iter(feeds.values())).shape[0])
