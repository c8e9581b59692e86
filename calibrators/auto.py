"""``auto``: per activation, the candidate range with the least error where the error matters.

The single methods each fail somewhere: entropy (KL) clips tensors with many near-zero values far
too hard (a CTC recognizer's 1x1 Conv input: amax 0.045 where the tensor reaches 0.415, output
cosine 0.58), min-max wastes levels on long tails, a percentile or MSE of the tensor itself ignores
that a few wide channels may carry the weights that matter. ``auto`` computes every candidate from
the histogram already collected (entropy, minmax, percentile 99.9 / 99.99 / 99.999, mse; see
:func:`calibrators.candidates.auto_candidates`) and keeps, per tensor, the one whose quantization
hurts least *at the output of the nodes that read it*, in the manner of AIMET's per-layer
SQNR-based range setting:

- A tensor read by Conv, ConvTranspose, Gemm or MatMul with a constant weight (through
  Reshape-like aliases, or a zero Pad that the Q/DQ pass moves its pair above) is judged by each
  such consumer's output error: ``||Q(W) * Q_a(x) - W * x||^2 / ||W * x||^2`` (1 / SQNR), with the
  weights quantized as the Q/DQ pass does (symmetric INT8 per output channel,
  :mod:`calibrators.weights`), ``Q_a`` the per-tensor Q/DQ with candidate range ``a``, and the
  bias left out of the reference energy. Errors are averaged over the consumers; when an Add,
  pooling, Concat or LayerNormalization reads the tensor too, the tensor's own error (below) is
  one more term of that average.
- Any other tensor is judged by its own quantization error, ``||x - Q_a(x)||^2 / ||x||^2``,
  computed from its histogram (:func:`calibrators.candidates.quantization_error`).
- A bounded activation that reaches its bound keeps it (see :func:`calibrators.calibrate.calibrate`)
  and is not measured.

Measuring streams and keeps nothing: a copy of the model gets, after each measured consumer, one
branch per distinct candidate (QuantizeLinear -> DequantizeLinear with that candidate's scale,
the consumer again with fake-quantized weights, Sub from the original output, ReduceSumSquare)
plus the reference energy, and its only outputs are those scalars. Each branch computes only an
even spread of every 8th output channel of its layer (at least 16): the candidates are compared
on the same channels, for an eighth of the layer's cost. ONNX Runtime runs the copy over the
first samples of the dataset, by default an eighth of the calibration samples (4 to 16), in
batches that fit the memory limit; the squared errors add up in float64. So memory stays that of
a forward pass of a small batch, and the cost is a fixed share of the collection's.

If ONNX Runtime cannot run the measuring copy (an opset before 10 has no QuantizeLinear; an
exotic model may fail), every tensor falls back to its own error, with a warning in the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from calibrators.candidates import auto_candidates, choose_by_tensor_error
from calibrators.collect import observable_tensors, session_providers
from calibrators.data import CalibrationDataset
from calibrators.histogram import Histogram
from calibrators.memory import DEFAULT_MEMORY_LIMIT_BYTES
from calibrators.spec import MethodSpec
from calibrators.table import RangeChoice, RangeCriterion
from calibrators.weights import INT8_LEVELS, WEIGHT_OPS, fake_quantize_weight, node_weight_axis
from core.onnxio import load_onnx
from core.tensors import model_input_specs

__all__ = ["AutoRanges", "Consumer", "choose_ranges", "weighted_consumers"]

log = logging.getLogger(__name__)

_MIN_QDQ_OPSET = 10
"""QuantizeLinear/DequantizeLinear exist from opset 10 (per tensor, which is all we need)."""

_DEFAULT_BATCH = 8

_LIVE_SHARE = 0.5
"""Share of a sample's activations budgeted as alive at once in the measuring copy. Measured on
the 640x640 PP-OCRv4 detector (663 MB of activations per sample): 230 MB per sample in the batch,
about a third, with the branches included."""

_SELF_READERS = frozenset(
    {"Add", "Sum", "AveragePool", "GlobalAveragePool", "Concat", "LayerNormalization"}
)
"""Readers through which the Q/DQ pass may quantize a tensor with no weight in between."""

_PREFIX = "trtforge_auto/"

_MIN_CHANNELS = 16
_CHANNEL_FRACTION = 8
"""A layer's error is measured on every 8th output channel (evenly spread, at least 16): the
candidates are compared on the same channels, and the branches cost an eighth of the layer."""


@dataclass(frozen=True)
class Consumer:
    """A node with a constant weight reading a calibrated tensor."""

    node: str
    """The node's name (``<op_type>_<position>`` when unnamed)."""
    position: int
    """Index in the graph's node list."""
    tensor: str
    """The tensor the node reads (its input 0): the root, an alias of it, or a zero-padded root."""
    root: str
    """The observed tensor whose range quantizes ``tensor``."""


@dataclass(frozen=True)
class AutoRanges:
    """What ``auto`` chose: amax and the record of the choice, per observed tensor."""

    amax: dict[str, float]
    choices: dict[str, RangeChoice]
    measured_samples: int = 0
    """Samples the consumers' errors were measured on (0 when nothing was measured)."""


# ---------------------------------------------------------------------------------------------
# which nodes judge which tensor


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return found


def _is_zero_pad(node: onnx.NodeProto, constants: Mapping[str, np.ndarray]) -> bool:
    """A constant-mode Pad filling with 0: Q/DQ commute with it (0 quantizes to 0)."""
    attrs = {a.name: a for a in node.attribute}
    if "mode" in attrs and attrs["mode"].s != b"constant":
        return False
    if len(node.input) > 2 and node.input[2]:
        value = constants.get(node.input[2])
        return value is not None and not np.any(value)
    return "value" not in attrs or attrs["value"].f == 0.0


def weighted_consumers(
    model: onnx.ModelProto, observed: Collection[str], aliases: Mapping[str, str]
) -> list[Consumer]:
    """Conv/ConvTranspose/Gemm/MatMul nodes with a constant float32 weight (input 1) whose input 0
    is quantized with the range of an ``observed`` tensor, the way the Q/DQ pass places pairs."""
    constants = _constants(model)
    graph = model.graph
    producers = {o: node for node in graph.node for o in node.output if o}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in set(node.input):
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    found: list[Consumer] = []
    for position, node in enumerate(graph.node):
        if node.op_type not in WEIGHT_OPS or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.input) < 2 or not node.input[0]:
            continue
        weight = constants.get(node.input[1])
        if weight is None or weight.dtype != np.float32 or not np.all(np.isfinite(weight)):
            continue
        tensor = source = node.input[0]
        pad = producers.get(tensor)
        if (
            node.op_type in ("Conv", "ConvTranspose")
            and pad is not None
            and pad.op_type == "Pad"
            and _is_zero_pad(pad, constants)
            and readers.get(tensor, 0) == 1
            and tensor not in outputs
        ):
            source = pad.input[0]
        root = aliases.get(source, source)
        if root in observed:
            name = node.name or f"{node.op_type}_{position}"
            found.append(Consumer(name, position, tensor, root))
    return found


def _self_read(model: onnx.ModelProto, aliases: Mapping[str, str]) -> set[str]:
    """Roots read (directly or through an alias) by an Add, pool, Concat or LayerNormalization."""
    roots: set[str] = set()
    for node in model.graph.node:
        if node.op_type in _SELF_READERS:
            roots.update(aliases.get(name, name) for name in node.input if name)
    return roots


# ---------------------------------------------------------------------------------------------
# the measuring copy of the model


@dataclass
class _Probe:
    """Output names of one consumer's branches: squared error per candidate, reference energy."""

    consumer: Consumer
    errors: list[str] = field(default_factory=list)
    energy: str = ""


class _Names:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, what: str) -> str:
        self.count += 1
        return f"{_PREFIX}{self.count}/{what}"


@dataclass(frozen=True)
class _Layer:
    """What a consumer's branches compute with: its quantized weight, possibly on a subset of
    its output channels, and the constant it adds to ``W * x``."""

    weight: np.ndarray
    """Fake-quantized weight (output channels ``channels`` only, when set)."""
    channels: np.ndarray | None
    """Output channels measured (int64), None for all."""
    bias: np.ndarray | None
    """Input 2 of the branch (the subset of the node's constant bias); None keeps the node's."""
    offset: np.ndarray | None
    """The constant added to ``W * x`` on the measured channels (Conv bias, Gemm ``beta * C``),
    shaped to broadcast against the output; None when there is none or it is not constant."""
    out_axis: int
    """The output's channel axis."""


def _spread(count: int) -> np.ndarray | None:
    """Evenly spread output channels to measure, or None to measure all ``count``."""
    keep = max(_MIN_CHANNELS, -(-count // _CHANNEL_FRACTION))
    if keep >= count:
        return None
    return np.unique(np.round(np.linspace(0, count - 1, keep))).astype(np.int64)


def _layer(node: onnx.NodeProto, constants: Mapping[str, np.ndarray]) -> _Layer:
    weight = constants[node.input[1]]
    axis = node_weight_axis(node, weight.ndim)
    quantized = fake_quantize_weight(weight, axis)
    attrs = {a.name: a for a in node.attribute}
    has_bias = len(node.input) > 2 and bool(node.input[2])
    bias = constants.get(node.input[2]) if has_bias else None
    grouped = "group" in attrs and attrs["group"].i != 1
    out_axis = -1 if node.op_type == "MatMul" else 1
    channels = None
    count = weight.shape[axis] if axis is not None else 0
    if axis is not None and not grouped and (bias is not None or not has_bias):
        channels = _spread(count)
    replaced = None
    if channels is not None:
        quantized = np.take(quantized, channels, axis=axis)
        if bias is not None and bias.ndim >= 1 and bias.shape[-1] == count:
            replaced = bias = np.take(bias, channels, axis=-1)
    offset = None
    if bias is not None:
        bias = bias.astype(np.float32)
        if node.op_type == "Gemm":
            beta = attrs["beta"].f if "beta" in attrs else 1.0
            offset = (np.float32(beta) * bias).astype(np.float32)
        else:
            offset = bias.reshape([-1] + [1] * max(weight.ndim - 2, 0))
    return _Layer(quantized, channels, replaced, offset, out_axis)


def _branches(
    node: onnx.NodeProto,
    consumer: Consumer,
    amaxes: Sequence[float],
    constants: Mapping[str, np.ndarray],
    names: _Names,
    initializers: list[onnx.TensorProto],
) -> tuple[list[onnx.NodeProto], _Probe]:
    layer = _layer(node, constants)
    nodes: list[onnx.NodeProto] = []

    def constant(what: str, value: np.ndarray) -> str:
        name = names(what)
        initializers.append(numpy_helper.from_array(value, name))
        return name

    weight, zero = constant("weight", layer.weight), constant("zero", np.zeros((), np.int8))
    bias = constant("bias", layer.bias) if layer.bias is not None else None
    reference = node.output[0]
    if layer.channels is not None:  # the original output on the measured channels
        index, reference = constant("channels", layer.channels), names("reference")
        nodes.append(
            helper.make_node(
                "Gather", [node.output[0], index], [reference], names("G"), axis=layer.out_axis
            )
        )
    probe = _Probe(consumer)
    for amax in amaxes:
        scale = constant("scale", np.asarray(np.float32(amax / INT8_LEVELS)))
        q, dq, y, diff, err = (names(w) for w in ("q", "dq", "y", "diff", "sq_error"))
        again = onnx.NodeProto()
        again.CopyFrom(node)
        again.name = names("node")
        again.input[0], again.input[1] = dq, weight
        if bias is not None:
            again.input[2] = bias
        del again.output[:]
        again.output.append(y)
        nodes += [
            helper.make_node("QuantizeLinear", [consumer.tensor, scale, zero], [q], names("Q")),
            helper.make_node("DequantizeLinear", [q, scale, zero], [dq], names("DQ")),
            again,
            helper.make_node("Sub", [y, reference], [diff], names("Sub")),
            helper.make_node("ReduceSumSquare", [diff], [err], names("Sum"), keepdims=0),
        ]
        probe.errors.append(err)
    if layer.offset is not None:
        offset, pure = constant("offset", layer.offset), names("pure")
        nodes.append(helper.make_node("Sub", [reference, offset], [pure], names("Sub")))
        reference = pure
    probe.energy = names("energy")
    nodes.append(
        helper.make_node("ReduceSumSquare", [reference], [probe.energy], names("Sum"), keepdims=0)
    )
    return nodes, probe


def _measuring_model(
    model: onnx.ModelProto,
    consumers: Sequence[Consumer],
    amaxes: Mapping[str, Sequence[float]],
) -> tuple[onnx.ModelProto, list[_Probe]]:
    """A copy of ``model`` whose only outputs are each consumer's squared errors and energy."""
    constants = _constants(model)
    names = _Names()
    initializers: list[onnx.TensorProto] = []
    by_position = {c.position: c for c in consumers}
    nodes: list[onnx.NodeProto] = []
    probes: list[_Probe] = []
    for position, node in enumerate(model.graph.node):
        nodes.append(node)
        consumer = by_position.get(position)
        if consumer is not None:
            added, probe = _branches(
                node, consumer, amaxes[consumer.root], constants, names, initializers
            )
            nodes += added
            probes.append(probe)
    measuring = onnx.ModelProto()
    measuring.CopyFrom(model)
    graph = measuring.graph
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    del graph.output[:]
    for probe in probes:
        for name in (*probe.errors, probe.energy):
            graph.output.append(onnx.ValueInfoProto(name=name))
    return measuring, probes


def _measuring_batch(
    model: onnx.ModelProto,
    data: CalibrationDataset,
    samples: int,
    batch_size: int | None,
    memory_limit_bytes: int | None,
) -> int:
    """Samples per run of the measuring copy: ``batch_size`` (8 by default), fewer where half of
    a batch's activations (at the dataset's shapes) would exceed the memory limit."""
    batch = min(samples, batch_size or _DEFAULT_BATCH)
    shapes = {s.name: tuple(d if isinstance(d, int) else 1 for d in s.shape) for s in data.specs}
    plan = observable_tensors(model, shapes)
    per_sample = sum(plan.tensor_bytes.get(name) or 0 for name in plan.observed)
    if per_sample:
        limit = memory_limit_bytes or DEFAULT_MEMORY_LIMIT_BYTES
        batch = min(batch, int(limit // (_LIVE_SHARE * per_sample)))
    return max(1, batch)


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _measure(
    measuring: onnx.ModelProto,
    probes: Sequence[_Probe],
    data: CalibrationDataset,
    samples: int,
    batch_size: int,
    threads: int | None,
) -> tuple[dict[str, np.ndarray], dict[str, float], int]:
    """Per consumer: summed squared error per candidate, and summed reference energy."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        measuring.SerializeToString(), options, providers=session_providers()
    )
    wanted = [name for probe in probes for name in (*probe.errors, probe.energy)]
    sums = dict.fromkeys(wanted, 0.0)
    done = 0
    for feeds in data.batches(batch_size, max_samples=samples):
        for name, value in zip(wanted, session.run(wanted, feeds), strict=True):
            sums[name] += float(np.asarray(value, dtype=np.float64))
        done += int(next(iter(feeds.values())).shape[0])
    errors = {p.consumer.node: np.array([sums[e] for e in p.errors]) for p in probes}
    energy = {p.consumer.node: sums[p.energy] for p in probes}
    return errors, energy, done


# ---------------------------------------------------------------------------------------------
# the choice


def _distinct(candidates: Mapping[str, float]) -> list[float]:
    return sorted(set(candidates.values()))


def _consumer_choice(
    candidates: dict[str, float],
    own_errors: dict[str, float] | None,
    measured: Iterable[tuple[str, dict[float, float], float]],
) -> RangeChoice | None:
    """The candidate with the least mean relative error over the consumers (and the tensor itself
    when ``own_errors`` is given); None when no consumer had any output energy."""
    terms: list[dict[str, float]] = []
    judged: list[str] = []
    for node, by_amax, energy in measured:
        if energy > 0.0:
            terms.append({label: by_amax[a] / energy for label, a in candidates.items()})
            judged.append(node)
    if not terms:
        return None
    if own_errors is not None:
        terms.append(own_errors)
    errors = {label: float(np.mean([t[label] for t in terms])) for label in candidates}
    best = min(errors, key=errors.__getitem__)
    return RangeChoice(
        method=best,
        criterion=RangeCriterion.CONSUMER_OUTPUT,
        candidates=candidates,
        errors=errors,
        consumers=tuple(judged),
    )


def choose_ranges(
    model_path: Path,
    dataset: CalibrationDataset,
    histograms: Mapping[str, Histogram],
    aliases: Mapping[str, str],
    method: MethodSpec,
    *,
    calibration_samples: int,
    bounds: Mapping[str, float] | None = None,
    batch_size: int | None = None,
    threads: int | None = None,
    memory_limit_bytes: int | None = None,
) -> AutoRanges:
    """``auto``'s range for every tensor of ``histograms`` (the observed ones, aliases excluded).

    ``bounds``: tensor -> the bound of a saturated bounded activation, kept as its range (and
    not measured). ``method`` is an ``auto`` spec (``samples``, ``num_quant_bins``). The error
    of candidates on the consumers is measured on the dataset's first
    ``method.auto_samples(calibration_samples)`` samples, ``batch_size`` (8 by default) at a time,
    fewer where a batch would not fit in ``memory_limit_bytes`` (1 GiB by default).
    """
    started = time.perf_counter()
    levels = method.num_quant_bins
    bounds = bounds or {}
    candidates = {
        name: auto_candidates(hist, levels)
        for name, hist in histograms.items()
        if name not in bounds and hist.max_abs > 0.0
    }
    computed = time.perf_counter()
    model = load_onnx(model_path)
    consumers = weighted_consumers(model, candidates, aliases)
    self_read = _self_read(model, aliases)
    measured: dict[str, list[tuple[str, dict[float, float], float]]] = {}
    done = 0
    opset = _default_opset(model)
    if consumers and opset >= _MIN_QDQ_OPSET:
        amaxes = {c.root: _distinct(candidates[c.root]) for c in consumers}
        samples = method.auto_samples(calibration_samples)
        data = dataset.validate(model_input_specs(model))
        batch = _measuring_batch(model, data, samples, batch_size, memory_limit_bytes)
        measuring, probes = _measuring_model(model, consumers, amaxes)
        del model
        try:
            errors, energy, done = _measure(measuring, probes, data, samples, batch, threads)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/RuntimeException
            log.warning("auto: measuring the consumers failed (%s); ranges by tensor error", exc)
        else:
            for probe in probes:
                c = probe.consumer
                by_amax = dict(zip(amaxes[c.root], errors[c.node].tolist(), strict=True))
                measured.setdefault(c.root, []).append((c.node, by_amax, energy[c.node]))
    elif consumers:
        log.warning("auto: opset %d has no QuantizeLinear; ranges by tensor error", opset)
    ranges = _choose(histograms, candidates, measured, self_read, bounds, levels, done)
    log.info(
        "auto: candidates of %d tensors in %.2f s; %d consumers measured on %d samples in %.2f s",
        len(candidates),
        computed - started,
        len(consumers),
        done,
        time.perf_counter() - computed,
    )
    return ranges


def _choose(
    histograms: Mapping[str, Histogram],
    candidates: Mapping[str, dict[str, float]],
    measured: Mapping[str, list[tuple[str, dict[float, float], float]]],
    self_read: set[str],
    bounds: Mapping[str, float],
    levels: int,
    done: int,
) -> AutoRanges:
    amax: dict[str, float] = {}
    choices: dict[str, RangeChoice] = {}
    for name, hist in histograms.items():
        if name in bounds:
            amax[name] = max(hist.max_abs, bounds[name])
            choices[name] = RangeChoice(
                method="minmax", criterion=RangeCriterion.ACTIVATION_BOUND
            )
            continue
        if name not in candidates:  # all zeros: a zero scale, nothing to choose
            amax[name] = hist.max_abs
            choices[name] = RangeChoice(method="minmax", criterion=RangeCriterion.TENSOR)
            continue
        options = candidates[name]
        label, own = choose_by_tensor_error(hist, options, levels)
        choice: RangeChoice | None = None
        if name in measured:
            choice = _consumer_choice(options, own if name in self_read else None, measured[name])
        if choice is None:
            choice = RangeChoice(
                method=label, criterion=RangeCriterion.TENSOR, candidates=options, errors=own
            )
        amax[name] = options[choice.method]
        choices[name] = choice
    _log_summary(choices)
    return AutoRanges(amax=amax, choices=choices, measured_samples=done)


def _log_summary(choices: Mapping[str, RangeChoice]) -> None:
    counts: dict[tuple[str, str], int] = {}
    for choice in choices.values():
        key = (choice.criterion.value, choice.method)
        counts[key] = counts.get(key, 0) + 1
    log.info(
        "auto: %s",
        ", ".join(f"{n} by {crit} -> {label}" for (crit, label), n in sorted(counts.items())),
    )

