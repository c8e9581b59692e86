"""Run an FP32 ONNX model over a dataset with ONNX Runtime and stream its activations to observers.

Every float activation (float graph inputs and every float node output that depends on a graph
input) is exposed as an extra graph output of a private copy of the model; each batch's values are
handed to the observer and dropped before the next batch, so memory is bounded by one batch of
activations plus the observer's state, whatever the number of samples.

A tensor whose values are exactly another's, rearranged (the output of Reshape, Flatten, Squeeze,
Unsqueeze, Transpose or Identity), has the same histogram and range as its source: it is announced
to the observer as an *alias* of that source and neither exposed nor observed. A BERT encoder has
about a fifth of its activations of that kind (the attention heads' reshapes and transposes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
from onnx import TensorProto

from calibrators.data import CalibrationDataset, TensorSpec, model_input_specs
from calibrators.errors import ModelError
from calibrators.onnxio import load_onnx

__all__ = [
    "ALIAS_OPS",
    "COLLECTOR_VERSION",
    "ActivationPlan",
    "Observer",
    "ProgressFn",
    "auto_batch_size",
    "collect",
    "observable_tensors",
    "session_providers",
]

log = logging.getLogger(__name__)

COLLECTOR_VERSION = "3"
"""Part of the calibration-table cache key: bump when collection changes what a table holds."""

ProgressFn = Callable[[int, int], None]
"""Called with (samples done, samples in total) after every batch."""

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
_DEFAULT_ACTIVATION_BUDGET_BYTES = 384 * 1024 * 1024


ALIAS_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity"})
"""Ops whose first output holds exactly the values of their first input, rearranged."""


class Observer(Protocol):
    """Receives the activations of a calibration run, batch by batch."""

    def begin(self, tensors: Sequence[str], aliases: Mapping[str, str]) -> None:
        """Called once before the first batch: every tensor of the run in graph order, and the
        aliases among them (alias -> the observed tensor whose statistics it shares). Aliases are
        never passed to :meth:`observe_batch`."""

    def observe_batch(self, tensors: Sequence[tuple[str, np.ndarray]]) -> None:
        """``(name, values)`` per observed tensor, in graph order. The arrays are reused for the
        next batch: they are valid during the call only."""


@dataclass(frozen=True)
class ActivationPlan:
    """Which tensors a calibration run covers, and how many bytes one sample of them takes."""

    tensors: tuple[str, ...]
    """Every float activation, in graph order (what a table lists)."""
    bytes_per_sample: int | None
    """Sum over observed tensors of their per-sample size, when shape inference knows it."""
    aliases: Mapping[str, str] = field(default_factory=dict)
    """Tensor -> the tensor whose values it holds rearranged (see the module docstring)."""

    @property
    def observed(self) -> tuple[str, ...]:
        """The tensors whose values are collected: all but the aliases."""
        return tuple(name for name in self.tensors if name not in self.aliases)


def _dependent_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors computed (directly or not) from a graph input; the rest are constants."""
    initializers = {t.name for t in model.graph.initializer}
    live = {i.name for i in model.graph.input if i.name not in initializers}
    for node in model.graph.node:  # nodes are topologically sorted in a valid model
        if any(name in live for name in node.input if name):
            live.update(o for o in node.output if o)
    return live


def observable_tensors(model: onnx.ModelProto) -> ActivationPlan:
    """Float activations of ``model``: float graph inputs and float node outputs fed by an input.

    Types come from ONNX shape inference; tensors whose type it cannot infer are skipped (logged).
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference errors are ModelErrors, not crashes
        raise ModelError(f"ONNX shape inference failed: {exc}", field="model") from exc
    infos = {
        vi.name: vi
        for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
    }
    live = _dependent_tensors(inferred)
    order: list[str] = []
    for vi in inferred.graph.input:
        if vi.name in live:
            order.append(vi.name)
    for node in inferred.graph.node:
        order.extend(o for o in node.output if o in live)
    chosen: list[str] = []
    sizes: dict[str, onnx.TypeProto.Tensor] = {}
    unknown = 0
    for name in order:
        vi = infos.get(name)
        if vi is None or not vi.type.HasField("tensor_type"):
            unknown += 1
            continue
        ttype = vi.type.tensor_type
        if ttype.elem_type not in _FLOAT_TYPES:
            continue
        chosen.append(name)
        sizes[name] = ttype
    if unknown:
        log.info("skipping %d tensors whose type shape inference could not tell", unknown)
    tensors = tuple(dict.fromkeys(chosen))
    aliases = _aliases(inferred, set(tensors))
    total: int | None = 0
    for name in tensors:
        if name not in aliases:
            total = _add_sample_bytes(total, sizes[name])
    return ActivationPlan(tensors=tensors, bytes_per_sample=total, aliases=aliases)


def _aliases(model: onnx.ModelProto, tensors: set[str]) -> dict[str, str]:
    """Outputs of :data:`ALIAS_OPS` -> the root tensor whose values they rearrange."""
    aliases: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in ALIAS_OPS or node.domain not in ("", "ai.onnx"):
            continue
        if not node.input or not node.output or node.output[0] not in tensors:
            continue
        source = node.input[0]
        if source in tensors and source != node.output[0]:
            aliases[node.output[0]] = aliases.get(source, source)
    return aliases


def _add_sample_bytes(total: int | None, ttype: onnx.TypeProto.Tensor) -> int | None:
    if total is None or not ttype.HasField("shape"):
        return None
    dims = list(ttype.shape.dim)[1:]  # the first axis is the batch
    size = 1
    for d in dims:
        if not d.HasField("dim_value"):
            return None
        size *= d.dim_value
    return total + 4 * size


def auto_batch_size(
    plan: ActivationPlan, budget_bytes: int = _DEFAULT_ACTIVATION_BUDGET_BYTES
) -> int:
    """A batch size that keeps one batch of observed activations within ``budget_bytes``."""
    if not plan.bytes_per_sample:
        return 8
    return int(max(1, min(64, budget_bytes // plan.bytes_per_sample)))


def session_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {o.name for o in augmented.graph.output}
    for name in names:
        if name not in existing:
            augmented.graph.output.append(onnx.ValueInfoProto(name=name))
    return augmented


def _open_session(
    model: onnx.ModelProto, providers: Sequence[str] | None, threads: int | None
) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
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
) -> int:
    """Stream every float activation of ``model_path`` over ``dataset`` to ``observer``.

    The dataset is validated against the model's inputs first. Returns the number of samples seen.
    ``batch_size=None`` picks one that keeps a batch of activations within a few hundred MB.
    """
    model = load_onnx(model_path)
    inputs: list[TensorSpec] = model_input_specs(model)
    data = dataset.validate(inputs)
    plan = observable_tensors(model)
    if not plan.tensors:
        raise ModelError("The model has no float activations to calibrate.", field="model")
    graph_inputs = {spec.name for spec in inputs}
    computed = [name for name in plan.observed if name not in graph_inputs]
    session = _open_session(_with_outputs(model, computed), providers, threads)
    del model
    batch = batch_size or auto_batch_size(plan)
    total = min(len(data), max_samples) if max_samples is not None else len(data)
    observer.begin(plan.tensors, plan.aliases)
    return _run_batches(session, data, plan.observed, observer, batch, total, progress)


def _run_batches(
    session: object,
    data: CalibrationDataset,
    tensors: Sequence[str],
    observer: Observer,
    batch_size: int,
    total: int,
    progress: ProgressFn | None,
) -> int:
    inputs = {i.name for i in session.get_inputs()}  # type: ignore[attr-defined]
    observed_inputs = [name for name in tensors if name in inputs]
    runner = _BoundRunner(session, [name for name in tensors if name not in inputs])
    done = 0
    for feeds in data.batches(batch_size, max_samples=total):
        try:
            outputs = runner.run(feeds)
        except Exception as exc:
            raise ModelError(
                f"ONNX Runtime failed on samples {done}..{done + _batch_len(feeds) - 1}: {exc}",
                field="dataset",
            ) from exc
        values = {name: feeds[name] for name in observed_inputs}
        values.update(outputs)
        # graph order, so tables list tensors as the model does
        observer.observe_batch([(name, values[name]) for name in tensors if name in values])
        del values
        del outputs
        done += _batch_len(feeds)
        if progress is not None:
            progress(done, total)
    return done


class _BoundRunner:
    """Runs the augmented model writing every output into buffers reused from batch to batch.

    With plain ``session.run`` ONNX Runtime allocates fresh output arrays each batch, and for a
    CNN's ~20 M activation values per sample the page faults cost more than the forward pass.
    The first batch of each input shape runs normally and its outputs become the bound buffers.
    """

    def __init__(self, session: object, tensors: Sequence[str]) -> None:
        self._session = session
        self._wanted = set(tensors)
        self._names = [o.name for o in session.get_outputs()]  # type: ignore[attr-defined]
        self._key: tuple[tuple[str, tuple[int, ...]], ...] | None = None
        self._buffers: list[np.ndarray] = []
        self._binding: object | None = None

    def run(self, feeds: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
        key = tuple((name, tuple(a.shape)) for name, a in sorted(feeds.items()))
        if key != self._key:
            values = self._session.run(self._names, feeds)  # type: ignore[attr-defined]
            self._key, self._buffers, self._binding = key, list(values), None
            if all(isinstance(v, np.ndarray) and v.flags.c_contiguous for v in values):
                self._binding = self._bind()
        else:
            self._run_bound(feeds)
        return [
            (name, array)
            for name, array in zip(self._names, self._buffers, strict=True)
            if name in self._wanted and isinstance(array, np.ndarray) and array.dtype.kind == "f"
        ]

    def _bind(self) -> object:
        binding = self._session.io_binding()  # type: ignore[attr-defined]
        for name, array in zip(self._names, self._buffers, strict=True):
            binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        return binding

    def _run_bound(self, feeds: dict[str, np.ndarray]) -> None:
        if self._binding is None:
            self._buffers = list(self._session.run(self._names, feeds))  # type: ignore[attr-defined]
            return
        inputs = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        for name, array in inputs.items():
            self._binding.bind_cpu_input(name, array)  # type: ignore[attr-defined]
        self._session.run_with_iobinding(self._binding)  # type: ignore[attr-defined]


def _batch_len(feeds: dict[str, np.ndarray]) -> int:
    return int(next(iter(feeds.values())).shape[0])
