"""Per-channel statistics of the inputs of weight layers, for smoothing and bias correction.

A *linear layer* is a Conv, Gemm or MatMul with a constant float32 weight (what the Q/DQ pass
quantizes per output channel). For each, :class:`LayerStatsObserver` (an
:class:`calibrators.collect.Observer`) streams the calibration batches and keeps, per input channel
``j`` of the layer's activation ``x``: ``max|x_j|`` and the mean ``E[x_j]``, plus a bounded uniform
sample of the layer's *rows*: the vectors one output position reads, ``[C, P]`` with ``P`` the
kernel window (1 for Gemm and MatMul), zero padding included. ``y[r] = sum_{c,p} W[k, c, p] *
rows[r, c, p]`` then reproduces the layer's output at that position, which is how the passes
measure a layer's INT8 error without running the model again. Rows are kept by reservoir sampling
(a random key per position, the smallest keys kept), so memory is bounded whatever the dataset
size: at most ``max_rows`` rows and about ``row_budget_bytes`` per distinct (tensor, geometry).

The collector does not hand over tensors that merely rearrange another (the outputs of Reshape,
Transpose, ...: *aliases*); a layer reading one gets its values by replaying those ops on the
observed source. A layer whose input cannot be replayed is listed in ``missing`` with the reason.
The observer needs one pass over the data and works with tensors handed over in groups (each
group over the whole dataset) or in micro-batches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from calibrators.collect import ALIAS_OPS, collect
from engines.graph._layers import LinearLayer, linear_layers
from engines.graph._onnx import GraphIndex
from engines.graph.inspect import normalize

if TYPE_CHECKING:
    from calibrators.collect import ProgressFn
    from calibrators.data import CalibrationDataset

__all__ = ["LayerInput", "LayerStats", "LayerStatsObserver", "collect_layer_stats"]

_DEFAULT_MAX_ROWS = 256
_DEFAULT_ROW_BUDGET_BYTES = 4 << 20


@dataclass(frozen=True)
class LayerInput:
    """What the calibration data showed of one layer's activation input."""

    layer: LinearLayer
    absmax: np.ndarray
    """``[C]`` float64: max|x_j| over every sample."""
    mean: np.ndarray
    """``[C]`` float64: E[x_j] over every sample and position."""
    rows: np.ndarray
    """``[R, C, P]`` float32: a uniform sample of the rows the layer reads (module docstring)."""
    rank: int = 0
    """The activation's number of dimensions, as observed (3 for ``[N, T, C]`` sequences)."""

    def divided(self, scales: np.ndarray, activation: str | None = None) -> LayerInput:
        """These statistics after input channel ``j`` was divided by ``scales[j]`` (smoothing);
        ``activation`` renames the layer's input when a Mul now produces it."""
        layer = self.layer if activation is None else replace(self.layer, activation=activation)
        s = np.asarray(scales, dtype=np.float64)
        return LayerInput(
            layer=layer,
            absmax=self.absmax / s,
            mean=self.mean / s,
            rows=(self.rows / s.astype(np.float32)[None, :, None]).astype(np.float32),
            rank=self.rank,
        )


@dataclass(frozen=True)
class LayerStats:
    """Statistics of every linear layer's input, by node name."""

    inputs: Mapping[str, LayerInput] = field(default_factory=dict)
    missing: Mapping[str, str] = field(default_factory=dict)
    """Layer -> why it has no statistics."""
    samples: int = 0

    def replaced(self, updates: Mapping[str, LayerInput]) -> LayerStats:
        return LayerStats({**self.inputs, **updates}, self.missing, self.samples)


@dataclass
class _Channels:
    axis: int
    absmax: np.ndarray | None = None
    total: np.ndarray | None = None
    count: int = 0
    rank: int = 0

    def update(self, values: np.ndarray) -> None:
        self.rank = values.ndim
        axis = self.axis % values.ndim
        others = tuple(a for a in range(values.ndim) if a != axis)
        peak = np.abs(values).max(axis=others).astype(np.float64)
        total = values.sum(axis=others, dtype=np.float64)
        self.absmax = peak if self.absmax is None else np.maximum(self.absmax, peak)
        self.total = total if self.total is None else self.total + total
        self.count += values.size // values.shape[axis]


@dataclass
class _Reservoir:
    """A uniform sample of at most ``capacity`` rows: each row seen gets a random key, the
    smallest keys stay."""

    capacity: int
    keys: np.ndarray = field(default_factory=lambda: np.empty(0))
    rows: np.ndarray | None = None

    def offer(self, layer: LinearLayer, values: np.ndarray, rng: np.random.Generator) -> None:
        positions = layer.positions(values.shape)
        keys = rng.random(positions)
        take = min(self.capacity, positions)
        chosen = np.argpartition(keys, take - 1)[:take] if take < positions else np.arange(take)
        rows = layer.rows(values, chosen)
        all_keys = np.concatenate([self.keys, keys[chosen]])
        all_rows = rows if self.rows is None else np.concatenate([self.rows, rows])
        if len(all_keys) > self.capacity:
            keep = np.argpartition(all_keys, self.capacity - 1)[: self.capacity]
            all_keys, all_rows = all_keys[keep], all_rows[keep]
        self.keys, self.rows = all_keys, all_rows


class LayerStatsObserver:
    """Collects :class:`LayerStats` of ``model``'s linear layers from a calibration run.

    Pass it to :func:`calibrators.collect.collect` with the same model (or use
    :func:`collect_layer_stats`), then read :meth:`result`.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        *,
        max_rows: int = _DEFAULT_MAX_ROWS,
        row_budget_bytes: int = _DEFAULT_ROW_BUDGET_BYTES,
        seed: int = 0,
    ) -> None:
        work = normalize(model)
        self._index = GraphIndex.build(work)
        self._layers = linear_layers(work)
        self._max_rows = max_rows
        self._budget = row_budget_bytes
        self._rng = np.random.default_rng(seed)
        self._channels: dict[tuple[str, int], _Channels] = {}
        self._reservoirs: dict[tuple[str, tuple[object, ...]], _Reservoir] = {}
        self._replays: dict[str, tuple[str, list[onnx.NodeProto]]] = {}
        self._missing: dict[str, str] = {}
        self._samples = 0
        self._counter: str | None = None

    def begin(self, tensors: Sequence[str], aliases: Mapping[str, str]) -> None:
        known = set(tensors)
        # Samples are counted on one tensor: the collector may hand the tensors over in groups,
        # each group over the whole dataset.
        self._counter = next((t for t in tensors if t not in aliases), None)
        for layer in self._layers:
            x = layer.activation
            if x not in known:
                self._missing[layer.node] = f"input {x!r} is not a float activation of the run"
                continue
            if x in aliases:
                chain = _alias_chain(self._index, x, aliases[x])
                if chain is None:
                    self._missing[layer.node] = (
                        f"input {x!r} rearranges {aliases[x]!r} with ops that cannot be replayed"
                    )
                    continue
                self._replays[x] = (aliases[x], chain)
            channels = layer.channels(self._index)
            if channels is None:
                self._missing[layer.node] = f"input {x!r} has no known channel count"
                continue
            self._channels.setdefault((x, layer.channel_axis), _Channels(layer.channel_axis))
            per_row = 4 * channels * layer.window
            capacity = max(16, min(self._max_rows, self._budget // max(per_row, 1)))
            self._reservoirs.setdefault(layer.row_key, _Reservoir(capacity))

    def observe_batch(self, tensors: Sequence[tuple[str, np.ndarray]]) -> None:
        values = dict(tensors)
        if self._counter in values:
            self._samples += int(values[self._counter].shape[0])
        for name, (source, chain) in self._replays.items():
            if source in values:
                values[name] = _replay(values[source], chain, self._index)
        for (tensor, _), channels in self._channels.items():
            if tensor in values:
                channels.update(values[tensor])
        offered: set[tuple[str, tuple[object, ...]]] = set()
        for layer in self._layers:  # layers sharing an input and a geometry share one sample
            reservoir = self._reservoirs.get(layer.row_key)
            if reservoir is None or layer.row_key in offered or layer.activation not in values:
                continue
            offered.add(layer.row_key)
            reservoir.offer(layer, values[layer.activation], self._rng)

    def result(self) -> LayerStats:
        inputs: dict[str, LayerInput] = {}
        missing = dict(self._missing)
        for layer in self._layers:
            if layer.node in missing:
                continue
            channels = self._channels.get((layer.activation, layer.channel_axis))
            reservoir = self._reservoirs.get(layer.row_key)
            if channels is None or channels.absmax is None or channels.total is None:
                missing[layer.node] = "no batch reached it"
                continue
            assert reservoir is not None and reservoir.rows is not None
            inputs[layer.node] = LayerInput(
                layer=layer,
                absmax=channels.absmax,
                mean=channels.total / max(channels.count, 1),
                rows=reservoir.rows,
                rank=channels.rank,
            )
        return LayerStats(inputs=inputs, missing=missing, samples=self._samples)


def collect_layer_stats(
    model_path: Path,
    dataset: CalibrationDataset,
    *,
    batch_size: int | None = None,
    max_samples: int | None = None,
    threads: int | None = None,
    max_rows: int = _DEFAULT_MAX_ROWS,
    seed: int = 0,
    progress: ProgressFn | None = None,
    memory_limit_bytes: int | None = None,
) -> LayerStats:
    """One ONNX Runtime pass over ``dataset`` (:func:`calibrators.collect.collect`, within
    ``memory_limit_bytes`` as calibration) collecting :class:`LayerStats` of the FP32 model at
    ``model_path``."""
    from core.onnxio import load_onnx

    # with its weights: they are read here, and external data only from the model's folder
    observer = LayerStatsObserver(load_onnx(Path(model_path)), max_rows=max_rows, seed=seed)
    collect(
        Path(model_path),
        dataset,
        observer,
        batch_size=batch_size,
        max_samples=max_samples,
        threads=threads,
        progress=progress,
        memory_limit_bytes=memory_limit_bytes,
    )
    return observer.result()


# -- aliases ---------------------------------------------------------------------------------


def _alias_chain(index: GraphIndex, tensor: str, source: str) -> list[onnx.NodeProto] | None:
    """The alias ops from ``source`` to ``tensor``, first to last; None when one cannot be
    replayed (a Reshape whose target shape is neither constant nor known but for the batch)."""
    chain: list[onnx.NodeProto] = []
    name = tensor
    while name != source:
        node = index.producer_node(name)
        if node is None or node.op_type not in ALIAS_OPS or not node.input:
            return None
        if node.op_type == "Reshape" and _reshape_target(index, node) is None:
            return None
        if node.op_type == "Unsqueeze" and _axes(node, _attributes(node), index) is None:
            return None
        chain.append(node)
        name = node.input[0]
    return chain[::-1]


def _reshape_target(index: GraphIndex, node: onnx.NodeProto) -> list[int] | None:
    shape = index.array(node.input[1]) if len(node.input) > 1 else None
    if shape is not None:
        return [int(d) for d in shape]
    dims = index.shape.get(node.output[0])
    if dims is None or not all(isinstance(d, int) for d in dims[1:]):
        return None
    return [-1, *(int(d) for d in dims[1:] if isinstance(d, int))]


def _replay(values: np.ndarray, chain: list[onnx.NodeProto], index: GraphIndex) -> np.ndarray:
    out = values
    for node in chain:
        attrs = _attributes(node)
        op = node.op_type
        if op == "Transpose":
            out = np.transpose(out, attrs.get("perm"))
        elif op == "Reshape":
            target = _reshape_target(index, node)
            assert target is not None
            if not attrs.get("allowzero", 0):
                target = [out.shape[i] if d == 0 else d for i, d in enumerate(target)]
            out = out.reshape(target)
        elif op == "Flatten":
            axis = int(attrs.get("axis", 1)) % max(out.ndim, 1)
            out = out.reshape(math.prod(out.shape[:axis]), -1)
        elif op in ("Squeeze", "Unsqueeze"):
            axes = _axes(node, attrs, index)
            if op == "Squeeze":
                out = np.squeeze(out, axis=tuple(axes) if axes is not None else None)
            else:
                assert axes is not None
                out = np.expand_dims(out, tuple(axes))
    return out


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _axes(
    node: onnx.NodeProto, attrs: dict[str, Any], index: GraphIndex
) -> list[int] | None:
    if "axes" in attrs:
        return [int(a) for a in attrs["axes"]]
    if len(node.input) > 1 and node.input[1]:
        values = index.array(node.input[1])
        return None if values is None else [int(a) for a in values]
    return None
