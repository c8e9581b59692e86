"""Per-node INT8 sensitivity, reported by ONNX node name.

For each node the Q/DQ pass quantizes (the ``quantized_nodes`` of a full-INT8
:func:`engines.graph.prepare_model`), two variants of the model are built in memory and compared
with the FP32 reference (ONNX Runtime on the original model) on held-out samples with
:func:`engines.accuracy.compare`:

- *only this*: only that node quantized (every other quantizable node kept out of INT8);
- *all but this*: every quantizable node quantized except that one.

Nodes are ranked most sensitive first: worst *only this* metric, ties broken by the best *all but
this* metric. Nothing touches the disk: variants are serialized to bytes and loaded into ONNX
Runtime sessions; the reference runs once per batch and is memoized (:class:`MemoizedRunner`).

**Cheap first.** Before any variant is built, one FP32 pass measures each node's *local*
quantization error: the SQNR between every tensor the Q/DQ model quantizes on that node's inputs
(activations with the table's per-tensor scale, weights with their per-channel scales, both read
from the Q/DQ model itself) and its fake-quantized copy ``clip(round(x / s), -128, 127) * s``.
The worst input's SQNR is the node's *proxy*. Nodes are evaluated in proxy order and
``max_nodes`` stops after that many; the rest are ranked after the evaluated ones, by proxy. So
a model with ~60 quantizable nodes (EfficientNet-Lite0) gets a useful ranking from a dozen or two
evaluations.

**Execution.** Variants run in ONNX Runtime on the CPU in one of two ways
(:class:`QdqExecution`): ``onnxruntime`` lets ONNX Runtime fuse Q/DQ into its integer kernels,
exactly what an artifact of the onnxruntime backend runs; ``reference`` disables graph
optimizations so that every QuantizeLinear/DequantizeLinear is computed as written, in float:
the exact ONNX semantics, which TensorRT's INT8 kernels (int32 accumulation) follow closely. The
two differ on x86 CPUs without VNNI, where ONNX Runtime's u8 x s8 kernels saturate 16-bit
intermediate sums (its quantizer's ``reduce_range`` option exists for this): there
``onnxruntime`` shows a much larger INT8 error than the model has under TensorRT. So
``onnxruntime`` execution builds variants exactly as the onnxruntime backend builds artifacts: on
its providers, with its INT8 weight levels (:func:`engines.backends.onnxruntime.int8_weight_levels`:
7-bit weights on x86 CPUs without VNNI); ``reference`` runs on the CPU with full 8-bit weights.
By default the execution follows the backend that ``spec.backend`` selects
(:func:`default_execution`).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from calibrators.data import CalibrationDataset, TensorSpec, model_input_specs
from engines.accuracy import AccuracyMetric, AccuracyReport, MetricBudget, compare
from engines.backends.base import ProgressFn, QueryTiming, Runner
from engines.errors import RunError, SpecError
from engines.spec import BuildSpec, KeepRules, Precision

if TYPE_CHECKING:
    from pathlib import Path

    import onnx

    from calibrators.table import CalibrationTable
    from engines.graph import PreparedModel

__all__ = [
    "MemoizedRunner",
    "NodeSensitivity",
    "QdqExecution",
    "SensitivityReport",
    "VariantEvaluator",
    "default_execution",
    "keep_patterns",
    "node_sensitivity",
    "rank_sensitivity",
]

_PROXY_SAMPLES = 4
_CPU = ("CPUExecutionProvider",)
_FULL_INT8 = 127
_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


class QdqExecution(StrEnum):
    """How ONNX Runtime executes Q/DQ variants (module docstring)."""

    ONNXRUNTIME = "onnxruntime"
    """Q/DQ fused into ONNX Runtime's integer kernels: what an onnxruntime artifact runs."""
    REFERENCE = "reference"
    """Q/DQ computed as written, in float (no graph optimizations): what TensorRT follows."""


def default_execution(spec: BuildSpec) -> QdqExecution:
    """``onnxruntime`` when ``spec.backend`` resolves to the onnxruntime backend, else ``reference``."""
    from engines.build import select_backend

    backend, _ = select_backend(spec.backend)
    return QdqExecution.ONNXRUNTIME if backend.name == "onnxruntime" else QdqExecution.REFERENCE


def _execution_setup(execution: QdqExecution) -> tuple[tuple[str, ...], int]:
    """(providers, INT8 weight levels) for running variants as ``execution`` says."""
    if execution is QdqExecution.REFERENCE:
        return _CPU, _FULL_INT8
    from engines.backends.onnxruntime import default_providers, int8_weight_levels

    providers = tuple(default_providers())
    return providers, int8_weight_levels(providers)[0]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="strings")


class NodeSensitivity(_Frozen):
    """How much one node's INT8 quantization costs, in the report's metric."""

    node: str
    """ONNX node name."""
    op_type: str
    rank: int
    """1 = most sensitive."""
    metric_only_this: float | None
    """Only this node in INT8; ``None`` when the node was not evaluated (``max_nodes``)."""
    metric_all_but_this: float | None
    """Every quantizable node but this one in INT8; ``None`` when not evaluated."""
    proxy_sqnr_db: float
    """Local quantization SQNR of the node's worst quantized input (the cheap estimate)."""


class SensitivityReport(_Frozen):
    """Quantizable nodes ranked most sensitive first, with how the ranking was measured."""

    metric: AccuracyMetric
    higher_is_better: bool
    execution: QdqExecution
    weight_levels: int
    """INT8 weight levels of the variants (127; 63 for 7-bit weights, see the module docstring)."""
    samples: int
    quantizable_nodes: int
    evaluated_nodes: int
    evaluations: int
    """Model variants built and compared."""
    seconds: float
    nodes: list[NodeSensitivity]

    @property
    def ranked_nodes(self) -> list[str]:
        """Node names, most sensitive first."""
        return [n.node for n in self.nodes]


def keep_patterns(nodes: Sequence[str], op_types: Iterable[str]) -> tuple[str, ...]:
    """``BuildSpec.keep`` patterns that match exactly ``nodes``: the plain name, or an escaped
    ``re:`` pattern where a name equals an op type (a plain pattern would match every node of
    that type)."""
    ops = set(op_types)
    return tuple(f"re:{re.escape(n)}" if n in ops or n.startswith("re:") else n for n in nodes)


# --- runners ----------------------------------------------------------------------------------


class MemoizedRunner:
    """Wraps a runner and caches its outputs by the feeds' content, so that a reference runs
    once per distinct batch however many candidates are compared with it."""

    def __init__(self, runner: Runner) -> None:
        self._runner = runner
        self._cache: dict[bytes, dict[str, np.ndarray]] = {}

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return self._runner.inputs

    @property
    def output_names(self) -> Sequence[str]:
        return self._runner.output_names

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = _feeds_key(feeds)
        if key not in self._cache:
            self._cache[key] = self._runner.run(feeds)
        return dict(self._cache[key])

    def timed_run(self, feeds: Mapping[str, np.ndarray]) -> QueryTiming:
        return self._runner.timed_run(feeds)

    def describe(self) -> dict[str, str]:
        return self._runner.describe()

    def close(self) -> None:
        self._cache.clear()
        self._runner.close()

    def __enter__(self) -> MemoizedRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _feeds_key(feeds: Mapping[str, np.ndarray]) -> bytes:
    digest = hashlib.blake2b(digest_size=20)
    for name in sorted(feeds):
        array = np.ascontiguousarray(feeds[name])
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array.data)
    return digest.digest()


class _SessionRunner:
    """An ONNX Runtime session over an in-memory model (no files), as a :class:`Runner`."""

    def __init__(
        self,
        model: onnx.ModelProto,
        what: str,
        threads: int,
        *,
        optimize: bool = True,
        providers: Sequence[str] = _CPU,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        level = ort.GraphOptimizationLevel
        options.graph_optimization_level = (
            level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
        )
        self._what, self._threads, self._optimize = what, threads, optimize
        self._providers = tuple(providers)
        try:
            self._session: Any = ort.InferenceSession(
                model.SerializeToString(), options, providers=list(self._providers)
            )
        except Exception as exc:  # onnxruntime's own Fail/InvalidGraph types
            raise RunError(
                f"ONNX Runtime cannot load {what}: {exc}",
                hint="Keep the failing node out of INT8 with --keep NODE, or report the model.",
            ) from exc
        self._inputs = tuple(
            TensorSpec(i.name, _ORT_DTYPES.get(i.type, "float32"), tuple(i.shape or ()))
            for i in self._session.get_inputs()
        )
        self._outputs = tuple(o.name for o in self._session.get_outputs())

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return self._inputs

    @property
    def output_names(self) -> Sequence[str]:
        return self._outputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise RunError(f"The session of {self._what} is closed.")
        try:
            values = self._session.run(None, {s.name: feeds[s.name] for s in self._inputs})
        except Exception as exc:  # onnxruntime's own error types
            raise RunError(f"ONNX Runtime failed running {self._what}: {exc}") from exc
        return {n: np.asarray(v) for n, v in zip(self._outputs, values, strict=True)}

    def timed_run(self, feeds: Mapping[str, np.ndarray]) -> QueryTiming:
        start = time.perf_counter()
        self.run(feeds)
        ms = (time.perf_counter() - start) * 1000.0
        return QueryTiming(latency_ms=ms, enqueue_ms=ms, h2d_ms=0.0, gpu_compute_ms=ms, d2h_ms=0.0)

    def describe(self) -> dict[str, str]:
        return {
            "backend": "onnxruntime",
            "model": self._what,
            "providers": ",".join(self._providers),
            "threads": str(self._threads),
            "graph_optimizations": "all" if self._optimize else "disabled",
        }

    def close(self) -> None:
        self._session = None

    def __enter__(self) -> _SessionRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- evaluation -------------------------------------------------------------------------------


class VariantEvaluator:
    """Builds variants of one model (nodes kept out of INT8) in memory and compares each with
    the FP32 reference on the first ``max_samples`` samples of ``eval_dataset``."""

    def __init__(
        self,
        model: onnx.ModelProto,
        spec: BuildSpec,
        table: CalibrationTable,
        eval_dataset: CalibrationDataset,
        *,
        labels: np.ndarray | None = None,
        max_samples: int | None = None,
        batch_size: int = 16,
        threads: int | None = None,
        execution: QdqExecution | None = None,
    ) -> None:
        if not spec.precision.uses_int8:
            raise SpecError(
                f"INT8 sensitivity needs an INT8 precision, got {spec.precision.value}.",
                hint="Use precision int8 or int8-fp16.",
                field="precision",
            )
        self.model, self.spec, self.table = model, spec, table
        self.threads = threads or os.cpu_count() or 1
        self.batch_size = batch_size
        self.execution = execution or default_execution(spec)
        self.providers, self.weight_levels = _execution_setup(self.execution)
        data = eval_dataset.validate(model_input_specs(model))
        total = len(data) if max_samples is None else min(len(data), max_samples)
        batches = list(data.batches(batch_size, max_samples=total))
        self.arrays = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
        self.samples = total
        self.labels = None if labels is None else np.asarray(labels)[:total]
        self.reference = MemoizedRunner(
            _SessionRunner(model, "the FP32 reference", self.threads, providers=self.providers)
        )
        self.evaluations = 0
        self._quantizable: list[str] | None = None
        self._op_types = {n.op_type for n in model.graph.node}

    def close(self) -> None:
        """Release the reference session and its cached outputs."""
        self.reference.close()

    def __enter__(self) -> VariantEvaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keep_patterns(self, nodes: Sequence[str]) -> tuple[str, ...]:
        """:func:`keep_patterns` for this model."""
        return keep_patterns(nodes, self._op_types)

    def prepare(self, keep: Sequence[str], precision: Precision | None = None) -> PreparedModel:
        """The model with ``keep`` (and the spec's own keep rules) out of INT8."""
        from engines.graph import prepare_model

        rules = KeepRules(
            int8=(*self.spec.keep.int8, *self.keep_patterns(keep)), fp16=self.spec.keep.fp16
        )
        update: dict[str, Any] = {"keep": rules}
        if precision is not None:
            update["precision"] = precision
        spec = self.spec.model_copy(update=update)
        return prepare_model(self.model, spec, self.table, weight_levels=self.weight_levels)

    def quantizable(self) -> tuple[onnx.ModelProto, list[str]]:
        """The full-INT8 Q/DQ model (no FP16) and the nodes it quantizes, in graph order."""
        full = self.prepare((), Precision.INT8)
        if full.quantization is None:
            raise SpecError("The Q/DQ pass did not run.", hint="Use precision int8 or int8-fp16.")
        self._quantizable = list(full.quantization.quantized_nodes)
        return full.model, self._quantizable

    @property
    def quantizable_count(self) -> int:
        return len(self._quantizable if self._quantizable is not None else self.quantizable()[1])

    def evaluate(
        self, keep: Sequence[str], *, samples: int | None = None, budget: MetricBudget | None = None
    ) -> AccuracyReport:
        """Compare the variant keeping ``keep`` out of INT8, on the first ``samples`` samples."""
        prepared = self.prepare(keep)
        count = self.samples if samples is None else min(samples, self.samples)
        dataset = CalibrationDataset.from_arrays({k: v[:count] for k, v in self.arrays.items()})
        what = f"the variant keeping {len(keep)} node(s) out of INT8"
        optimize = self.execution is QdqExecution.ONNXRUNTIME
        with _SessionRunner(
            prepared.model, what, self.threads, optimize=optimize, providers=self.providers
        ) as candidate:
            report = compare(
                self.reference,
                candidate,
                dataset,
                batch_size=self.batch_size,
                labels=None if self.labels is None else self.labels[:count],
                budget=budget,
            )
        self.evaluations += 1
        return report

    def value(self, keep: Sequence[str], metric: AccuracyMetric, samples: int | None) -> float:
        """``metric`` (worst over outputs) of the variant keeping ``keep`` out of INT8."""
        value = self.evaluate(keep, samples=samples).metric(metric)
        if value is None:
            raise SpecError(
                f"No output of the model reports {metric.value}"
                + (" (labels are needed)" if "accuracy" in metric.value else "")
                + ".",
                hint="Choose a metric the outputs have, e.g. cosine or sqnr_db.",
                field="metric",
            )
        return value

    def feeds(self, count: int, batch: int) -> Iterator[dict[str, np.ndarray]]:
        """The first ``count`` evaluation samples in batches of ``batch``."""
        count = min(count, self.samples)
        for start in range(0, count, batch):
            yield {k: v[start : min(start + batch, count)] for k, v in self.arrays.items()}


# --- the cheap proxy --------------------------------------------------------------------------


def _quantized_inputs(
    qdq: onnx.ModelProto, nodes: Sequence[str]
) -> dict[str, list[tuple[str, np.ndarray, int]]]:
    """Node -> (tensor, scale, axis) of every Q/DQ pair feeding it in the Q/DQ model."""
    from onnx import numpy_helper

    producer = {out: n for n in qdq.graph.node for out in n.output}
    inits = {t.name: t for t in qdq.graph.initializer}
    by_name = {n.name: n for n in qdq.graph.node}
    found: dict[str, list[tuple[str, np.ndarray, int]]] = {}
    for name in nodes:
        pairs = []
        for tensor in by_name[name].input if name in by_name else ():
            dq = producer.get(tensor)
            q = producer.get(dq.input[0]) if dq is not None else None
            if dq is None or dq.op_type != "DequantizeLinear" or q is None:
                continue
            if q.op_type != "QuantizeLinear" or q.input[1] not in inits:
                continue
            axis = next((int(a.i) for a in q.attribute if a.name == "axis"), 1)
            pairs.append((q.input[0], numpy_helper.to_array(inits[q.input[1]]), axis))
        found[name] = pairs
    return found


def _fake_quant_sums(values: np.ndarray, scale: np.ndarray, axis: int) -> tuple[float, float]:
    """(sum x^2, sum (fq(x) - x)^2) for symmetric INT8 fake quantization with ``scale``."""
    x = values.astype(np.float64, copy=False)
    s = scale.astype(np.float64)
    if s.ndim == 1 and s.size > 1:
        shape = [1] * x.ndim
        shape[axis % x.ndim] = s.size
        s = s.reshape(shape)
    fq = np.clip(np.rint(x / s), -128, 127) * s
    return float(np.square(x).sum()), float(np.square(fq - x).sum())


def _sqnr_db(signal: float, noise: float) -> float:
    if noise <= 0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def _proxy_scores(
    ev: VariantEvaluator, qdq: onnx.ModelProto, nodes: Sequence[str]
) -> dict[str, float]:
    """Node -> worst local quantization SQNR (dB) of its quantized inputs (module docstring)."""
    import onnx
    from onnx import numpy_helper

    from engines.graph.inspect import normalize

    inputs = _quantized_inputs(qdq, nodes)
    inits = {t.name: t for t in qdq.graph.initializer}
    keys = {(t, s.tobytes(), a): (t, s, a) for pairs in inputs.values() for t, s, a in pairs}
    sums = dict.fromkeys(keys, (0.0, 0.0))
    for key, (tensor, scale, axis) in keys.items():
        if tensor in inits:
            sums[key] = _fake_quant_sums(numpy_helper.to_array(inits[tensor]), scale, axis)
    probe = normalize(ev.model)
    produced = {out for node in probe.graph.node for out in node.output}
    wanted = {t for t, _, _ in keys.values() if t in produced}
    wanted -= {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in sorted(wanted))
    with _SessionRunner(probe, "the FP32 model (proxy pass)", ev.threads) as runner:
        for feeds in ev.feeds(_PROXY_SAMPLES, 1):
            values = {**runner.run(feeds), **feeds}
            for key, (tensor, scale, axis) in keys.items():
                if tensor not in inits and tensor in values:
                    signal, noise = _fake_quant_sums(values[tensor], scale, axis)
                    sums[key] = (sums[key][0] + signal, sums[key][1] + noise)
    return {
        node: min((_sqnr_db(*sums[(t, s.tobytes(), a)]) for t, s, a in pairs), default=math.inf)
        for node, pairs in inputs.items()
    }


# --- ranking ----------------------------------------------------------------------------------


def _badness(value: float | None, higher_is_better: bool) -> float:
    """Larger = worse; NaN is the worst; ``None`` (not measured) the least bad."""
    if value is None:
        return -math.inf
    if math.isnan(value):
        return math.inf
    return -value if higher_is_better else value


def _ranked(
    ops: Mapping[str, str],
    proxy: Mapping[str, float],
    only: Mapping[str, float],
    all_but: Mapping[str, float],
    higher_is_better: bool,
) -> list[NodeSensitivity]:
    def key(node: str) -> tuple[bool, float, float, float]:
        return (
            node not in only,  # evaluated nodes first
            -_badness(only.get(node), higher_is_better),  # worst "only this" first
            _badness(all_but.get(node), higher_is_better),  # best "all but this" first
            proxy[node],  # worst local SQNR first
        )

    return [
        NodeSensitivity(
            node=node,
            op_type=ops[node],
            rank=i + 1,
            metric_only_this=only.get(node),
            metric_all_but_this=all_but.get(node),
            proxy_sqnr_db=proxy[node],
        )
        for i, node in enumerate(sorted(ops, key=key))
    ]


def rank_sensitivity(
    ev: VariantEvaluator,
    metric: AccuracyMetric,
    *,
    max_nodes: int | None = None,
    all_but_this: bool = True,
    samples: int | None = None,
    progress: ProgressFn | None = None,
) -> SensitivityReport:
    """Rank the quantizable nodes of ``ev``'s model (module docstring)."""
    if max_nodes is not None and max_nodes < 0:
        raise SpecError(
            f"max_nodes must be >= 0, got {max_nodes}.",
            hint="0 ranks by the cheap proxy alone; None evaluates every node.",
            field="max_nodes",
        )
    start = time.perf_counter()
    before = ev.evaluations
    qdq, nodes = ev.quantizable()
    ops = {n.name: n.op_type for n in qdq.graph.node if n.name in set(nodes)}
    proxy = _proxy_scores(ev, qdq, nodes)
    chosen = sorted(nodes, key=lambda n: proxy[n])[: len(nodes) if max_nodes is None else max_nodes]
    only: dict[str, float] = {}
    all_but: dict[str, float] = {}
    for i, node in enumerate(chosen):
        if progress is not None:
            progress(f"sensitivity of {node}", i / len(chosen))
        only[node] = ev.value([n for n in nodes if n != node], metric, samples)
        if all_but_this:
            all_but[node] = ev.value([node], metric, samples)
    return SensitivityReport(
        metric=metric,
        higher_is_better=metric.higher_is_better,
        execution=ev.execution,
        weight_levels=ev.weight_levels,
        samples=ev.samples if samples is None else min(samples, ev.samples),
        quantizable_nodes=len(nodes),
        evaluated_nodes=len(chosen),
        evaluations=ev.evaluations - before,
        seconds=time.perf_counter() - start,
        nodes=_ranked(ops, proxy, only, all_but, metric.higher_is_better),
    )


def node_sensitivity(
    model_path: Path,
    table: CalibrationTable,
    spec: BuildSpec,
    eval_dataset: CalibrationDataset,
    *,
    metric: AccuracyMetric = AccuracyMetric.SQNR_DB,
    labels: np.ndarray | None = None,
    max_nodes: int | None = None,
    all_but_this: bool = True,
    samples: int = 32,
    batch_size: int = 16,
    threads: int | None = None,
    execution: QdqExecution | None = None,
    progress: ProgressFn | None = None,
) -> SensitivityReport:
    """Rank the quantizable nodes of ``model_path`` by INT8 sensitivity, most sensitive first.

    ``metric`` is measured against the FP32 model on the first ``samples`` samples of
    ``eval_dataset`` (``labels`` are needed for ``accuracy``/``accuracy_drop``). ``max_nodes``
    evaluates only that many nodes, those the cheap proxy finds worst; ``all_but_this=False``
    skips the second variant per node (half the evaluations). ``execution``: see
    :class:`QdqExecution`. Raises :class:`SpecError` for a spec without INT8 or a metric the
    model's outputs do not report.
    """
    from engines.graph.inspect import load_model

    with VariantEvaluator(
        load_model(model_path),
        spec,
        table,
        eval_dataset,
        labels=labels,
        max_samples=samples,
        batch_size=batch_size,
        threads=threads,
        execution=execution,
    ) as ev:
        return rank_sensitivity(
            ev, metric, max_nodes=max_nodes, all_but_this=all_but_this, progress=progress
        )
