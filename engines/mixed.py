"""Per-node INT8 sensitivity, and the smallest set of nodes to keep out of INT8 for a budget.

**Sensitivity.** For each node the Q/DQ pass quantizes (the ``quantized_nodes`` of a full-INT8
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
(activations with the table's per-tensor scale, weights with their per-channel scales, read from
the Q/DQ model itself) and its fake-quantized copy ``clip(round(x / s), -128, 127) * s``. The
worst input's SQNR is the node's *proxy*. Nodes are evaluated in proxy order, and ``max_nodes``
stops after that many: the rest are ranked after the evaluated ones, by proxy. So a model with
~50 quantizable nodes (EfficientNet-Lite0) gets a useful ranking from a dozen or two evaluations.

**Search.** :func:`search_mixed_precision` starts from full INT8. If it meets the budget, done.
Otherwise, with ``R`` the ranked list and ``keep(k)`` = the top ``k`` of ``R`` kept out of INT8,
it bisects for the smallest ``k`` whose model meets the budget, assuming that keeping more nodes
never hurts (``keep(0)`` is known to fail; ``keep(len(R))``, no INT8 at all, is evaluated only if
no smaller ``k`` passes, and when it fails too the budget is out of reach:
:class:`AccuracyBudgetError`). The returned choice is always one that was evaluated and met the
budget, monotonic or not. Feed :attr:`MixedPrecisionResult.kept_nodes` to ``BuildSpec.keep.int8``
(:meth:`MixedPrecisionResult.apply_to`): TensorRT's explicit mode then gets no Q/DQ on those
nodes, the implicit mode gets layer precision constraints.

The ranking metric is the budget's metric when it is continuous; for class-count metrics (top-1/
top-5 agreement, accuracy, accuracy drop), which tie on most single-node changes, nodes are
ranked by output SQNR instead and the budget is still judged in its own metric.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from calibrators.data import CalibrationDataset, TensorSpec, model_input_specs
from engines.accuracy import AccuracyMetric, AccuracyReport, MetricBudget, compare
from engines.backends.base import ProgressFn, QueryTiming, Runner
from engines.errors import AccuracyBudgetError, RunError, SpecError
from engines.spec import BuildSpec, KeepRules, Precision

if TYPE_CHECKING:
    from pathlib import Path

    import onnx

    from calibrators.table import CalibrationTable
    from engines.graph import PreparedModel

__all__ = [
    "MemoizedRunner",
    "MixedPrecisionResult",
    "NodeSensitivity",
    "SensitivityReport",
    "node_sensitivity",
    "ranking_metric",
    "search_mixed_precision",
]

_CLASS_COUNT_METRICS = frozenset(
    {
        AccuracyMetric.TOP1_AGREEMENT,
        AccuracyMetric.TOP5_AGREEMENT,
        AccuracyMetric.ACCURACY,
        AccuracyMetric.ACCURACY_DROP,
    }
)
_PROXY_SAMPLES = 4
_PROVIDERS = ("CPUExecutionProvider",)


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
    samples: int
    quantizable_nodes: int
    evaluated_nodes: int
    evaluations: int
    """Model variants built and compared."""
    seconds: float
    nodes: list[NodeSensitivity]

    @property
    def ranked_nodes(self) -> list[str]:
        return [n.node for n in self.nodes]


class MixedPrecisionResult(_Frozen):
    """The nodes to keep out of INT8 so that the budget is met, and what that reaches."""

    budget: MetricBudget
    kept_nodes: list[str]
    """Kept out of INT8, most sensitive first (beyond the spec's own ``keep.int8`` patterns)."""
    quantizable_nodes: int
    int8_nodes: int
    int8_share: float
    """``int8_nodes / quantizable_nodes`` (1.0 when nothing is quantizable)."""
    value_full_int8: float
    """The budget's metric with every quantizable node in INT8."""
    value_reached: float
    """The budget's metric of the chosen mix (meets the budget)."""
    accuracy: AccuracyReport
    """The chosen mix against the FP32 reference."""
    sensitivity: SensitivityReport | None
    """``None`` when full INT8 already met the budget."""
    evaluations: int
    """Model variants built and compared, sensitivity included."""
    samples: int
    seconds: float

    def apply_to(self, spec: BuildSpec) -> BuildSpec:
        """``spec`` with the kept nodes added to ``keep.int8``."""
        extra = tuple(n for n in self.kept_nodes if n not in spec.keep.int8)
        keep = KeepRules(int8=(*spec.keep.int8, *extra), fp16=spec.keep.fp16)
        return spec.model_copy(update={"keep": keep})


def ranking_metric(metric: AccuracyMetric) -> AccuracyMetric:
    """The metric nodes are ranked by for a budget in ``metric`` (module docstring)."""
    return AccuracyMetric.SQNR_DB if metric in _CLASS_COUNT_METRICS else metric


# --- runners ----------------------------------------------------------------------------------


class MemoizedRunner:
    """Wraps a runner; outputs are cached by the feeds' content, so a reference runs once per
    distinct batch however many candidates are compared with it."""

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

    def __init__(self, model: onnx.ModelProto, what: str, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._what = what
        try:
            self._session: Any = ort.InferenceSession(
                model.SerializeToString(), options, providers=list(_PROVIDERS)
            )
        except Exception as exc:  # onnxruntime's own Fail/InvalidGraph types
            raise RunError(
                f"ONNX Runtime cannot load {what}: {exc}",
                hint="Keep the failing node out of INT8 with --keep NODE, or report the model.",
            ) from exc
        self._inputs = tuple(
            TensorSpec(i.name, _ORT_FLOAT.get(i.type, "float32"), tuple(i.shape or ()))
            for i in self._session.get_inputs()
        )
        self._outputs = tuple(o.name for o in self._session.get_outputs())
        self._threads = threads

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return self._inputs

    @property
    def output_names(self) -> Sequence[str]:
        return self._outputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self._session.run(None, {s.name: feeds[s.name] for s in self._inputs})
        except Exception as exc:
            raise RunError(f"ONNX Runtime failed running {self._what}: {exc}") from exc
        return {n: np.asarray(v) for n, v in zip(self._outputs, values, strict=True)}

    def timed_run(self, feeds: Mapping[str, np.ndarray]) -> QueryTiming:
        start = time.perf_counter()
        self.run(feeds)
        ms = (time.perf_counter() - start) * 1000.0
        return QueryTiming(latency_ms=ms, enqueue_ms=ms, h2d_ms=0.0, gpu_compute_ms=ms, d2h_ms=0.0)

    def describe(self) -> dict[str, str]:
        return {"backend": "onnxruntime (in memory)", "model": self._what, "threads": str(self._threads)}

    def close(self) -> None:
        self._session = None

    def __enter__(self) -> _SessionRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_ORT_FLOAT = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


# --- evaluation -------------------------------------------------------------------------------


class _Evaluator:
    """Builds variants (keep lists) in memory and compares them with the memoized reference."""

    def __init__(
        self,
        model: onnx.ModelProto,
        spec: BuildSpec,
        table: CalibrationTable,
        eval_dataset: CalibrationDataset,
        *,
        labels: np.ndarray | None,
        max_samples: int | None,
        batch_size: int,
        threads: int | None,
    ) -> None:
        if not spec.precision.uses_int8:
            raise SpecError(
                f"Mixed precision needs an INT8 precision, got {spec.precision.value}.",
                hint="Use precision int8 or int8-fp16.",
                field="precision",
            )
        self.model, self.spec, self.table = model, spec, table
        self.threads = threads or os.cpu_count() or 1
        self.batch_size = batch_size
        data = eval_dataset.validate(model_input_specs(model))
        total = len(data) if max_samples is None else min(len(data), max_samples)
        batches = list(data.batches(batch_size, max_samples=total))
        self.arrays = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
        self.samples = total
        self.labels = None if labels is None else np.asarray(labels)[:total]
        self.reference = MemoizedRunner(_SessionRunner(model, "the FP32 reference", self.threads))
        self.evaluations = 0

    def prepare(self, keep: Sequence[str], precision: Precision | None = None) -> PreparedModel:
        from engines.graph import prepare_model

        rules = KeepRules(int8=(*self.spec.keep.int8, *keep), fp16=self.spec.keep.fp16)
        update: dict[str, Any] = {"keep": rules}
        if precision is not None:
            update["precision"] = precision
        return prepare_model(self.model, self.spec.model_copy(update=update), self.table)

    def evaluate(
        self,
        keep: Sequence[str],
        *,
        samples: int | None = None,
        budget: MetricBudget | None = None,
    ) -> AccuracyReport:
        """Compare the variant keeping ``keep`` out of INT8 on the first ``samples`` samples."""
        prepared = self.prepare(keep)
        count = self.samples if samples is None else min(samples, self.samples)
        dataset = CalibrationDataset.from_arrays({k: v[:count] for k, v in self.arrays.items()})
        what = f"the variant keeping {len(keep)} node(s) out of INT8"
        with _SessionRunner(prepared.model, what, self.threads) as candidate:
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
        value = self.evaluate(keep, samples=samples).metric(metric)
        if value is None:
            raise SpecError(
                f"No output of the model reports {metric.value}"
                + (" (labels are needed)" if "accuracy" in metric.value else "")
                + ".",
                hint="Choose a metric the outputs have, e.g. cosine or sqnr_db.",
                field="budget",
            )
        return value

    def feeds(self, count: int, batch: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, min(count, self.samples), batch):
            stop = min(start + batch, count, self.samples)
            yield {k: v[start:stop] for k, v in self.arrays.items()}


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
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is None or q.op_type != "QuantizeLinear" or q.input[1] not in inits:
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


def _proxy_scores(ev: _Evaluator, qdq: onnx.ModelProto, nodes: Sequence[str]) -> dict[str, float]:
    """Node -> worst local quantization SQNR (dB) of its quantized inputs (module docstring)."""
    from onnx import numpy_helper

    from engines.graph.inspect import normalize

    inputs = _quantized_inputs(qdq, nodes)
    inits = {t.name: t for t in qdq.graph.initializer}
    keys = {(t, s.tobytes(), a): (t, s, a) for pairs in inputs.values() for t, s, a in pairs}
    sums = dict.fromkeys(keys, (0.0, 0.0))
    activations = sorted({t for t, _, _ in keys.values() if t not in inits} - set(ev.arrays))
    for key, (tensor, scale, axis) in keys.items():
        if tensor in inits:
            sums[key] = _fake_quant_sums(numpy_helper.to_array(inits[tensor]), scale, axis)
    probe = normalize(ev.model)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(
        _value_info(name) for name in activations if name not in existing
    )
    with _SessionRunner(probe, "the FP32 model (proxy pass)", ev.threads) as runner:
        for feeds in ev.feeds(_PROXY_SAMPLES, 1):
            values = {**runner.run(feeds), **feeds}
            for key, (tensor, scale, axis) in keys.items():
                if tensor in values:
                    signal, noise = _fake_quant_sums(values[tensor], scale, axis)
                    sums[key] = (sums[key][0] + signal, sums[key][1] + noise)
    scores = {}
    for node, pairs in inputs.items():
        db = [_sqnr_db(*sums[(t, s.tobytes(), a)]) for t, s, a in pairs]
        scores[node] = min(db) if db else math.inf
    return scores


def _value_info(name: str) -> onnx.ValueInfoProto:
    import onnx

    return onnx.ValueInfoProto(name=name)


# --- sensitivity ------------------------------------------------------------------------------


def _badness(value: float | None, higher_is_better: bool) -> float:
    """Larger = worse; NaN is the worst; ``None`` (not measured) sorts after everything."""
    if value is None:
        return -math.inf
    if math.isnan(value):
        return math.inf
    return -value if higher_is_better else value


def _rank(
    ops: Mapping[str, str],
    proxy: Mapping[str, float],
    only: Mapping[str, float],
    all_but: Mapping[str, float],
    higher_is_better: bool,
) -> list[NodeSensitivity]:
    def key(node: str) -> tuple[bool, float, float, float]:
        measured = node in only
        return (
            not measured,
            -_badness(only.get(node), higher_is_better),
            _badness(all_but.get(node), higher_is_better),
            proxy[node],
        )

    ordered = sorted(ops, key=key)
    return [
        NodeSensitivity(
            node=node,
            op_type=ops[node],
            rank=i + 1,
            metric_only_this=only.get(node),
            metric_all_but_this=all_but.get(node),
            proxy_sqnr_db=proxy[node],
        )
        for i, node in enumerate(ordered)
    ]


def _sensitivity(
    ev: _Evaluator,
    metric: AccuracyMetric,
    *,
    max_nodes: int | None,
    all_but_this: bool,
    samples: int,
    progress: ProgressFn | None,
) -> SensitivityReport:
    start = time.perf_counter()
    before = ev.evaluations
    full = ev.prepare((), Precision.INT8)
    if full.quantization is None:
        raise SpecError("The Q/DQ pass did not run.", hint="Use precision int8 or int8-fp16.")
    ops = {n.name: n.op_type for n in full.model.graph.node}
    nodes = list(full.quantization.quantized_nodes)
    proxy = _proxy_scores(ev, full.model, nodes)
    order = sorted(nodes, key=lambda n: proxy[n])
    chosen = order if max_nodes is None else order[: max(max_nodes, 0)]
    only: dict[str, float] = {}
    all_but: dict[str, float] = {}
    steps = max(len(chosen) * (2 if all_but_this else 1), 1)
    for i, node in enumerate(chosen):
        if progress is not None:
            progress(f"sensitivity of {node}", i * (steps / len(chosen)) / steps)
        only[node] = ev.value([n for n in nodes if n != node], metric, samples)
        if all_but_this:
            all_but[node] = ev.value([node], metric, samples)
    ranked = _rank({n: ops.get(n, "") for n in nodes}, proxy, only, all_but, metric.higher_is_better)
    return SensitivityReport(
        metric=metric,
        higher_is_better=metric.higher_is_better,
        samples=min(samples, ev.samples),
        quantizable_nodes=len(nodes),
        evaluated_nodes=len(chosen),
        evaluations=ev.evaluations - before,
        seconds=time.perf_counter() - start,
        nodes=ranked,
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
    progress: ProgressFn | None = None,
) -> SensitivityReport:
    """Rank the quantizable nodes of ``model_path`` by INT8 sensitivity (module docstring).

    ``metric`` is measured on the first ``samples`` samples of ``eval_dataset`` against the FP32
    model; ``labels`` are needed for ``accuracy``/``accuracy_drop``. ``max_nodes`` evaluates only
    that many nodes, those the cheap proxy finds worst; ``all_but_this=False`` skips the second
    variant per node (half the evaluations).
    """
    from engines.graph.inspect import load_model

    ev = _Evaluator(
        load_model(model_path),
        spec,
        table,
        eval_dataset,
        labels=labels,
        max_samples=samples,
        batch_size=batch_size,
        threads=threads,
    )
    return _sensitivity(
        ev, metric, max_nodes=max_nodes, all_but_this=all_but_this, samples=samples,
        progress=progress,
    )


# --- the search -------------------------------------------------------------------------------


def search_mixed_precision(
    model_path: Path,
    table: CalibrationTable,
    spec: BuildSpec,
    eval_dataset: CalibrationDataset,
    budget: MetricBudget | str,
    *,
    labels: np.ndarray | None = None,
    max_nodes: int | None = None,
    all_but_this: bool = True,
    max_samples: int | None = None,
    sensitivity_samples: int = 32,
    batch_size: int = 16,
    threads: int | None = None,
    progress: ProgressFn | None = None,
) -> MixedPrecisionResult:
    """The fewest most-sensitive nodes to keep out of INT8 so that ``budget`` is met.

    ``budget`` is a :class:`MetricBudget` or its text (``cosine:0.999``). It is judged on the
    first ``max_samples`` samples of ``eval_dataset`` (all by default; ``labels`` for accuracy
    metrics); sensitivity is ranked on the first ``sensitivity_samples`` of them, evaluating at
    most ``max_nodes`` nodes (see :func:`node_sensitivity`). Raises :class:`AccuracyBudgetError`
    when even no INT8 at all misses the budget, :class:`SpecError` for a non-INT8 spec or a
    metric the model's outputs do not report.
    """
    from engines.graph.inspect import load_model

    start = time.perf_counter()
    budget = MetricBudget.parse(budget) if isinstance(budget, str) else budget
    ev = _Evaluator(
        load_model(model_path),
        spec,
        table,
        eval_dataset,
        labels=labels,
        max_samples=max_samples,
        batch_size=batch_size,
        threads=threads,
    )
    report = ev.evaluate((), budget=budget)
    full_value = _budget_value(report)
    sensitivity = None
    kept: list[str] = []
    if not report.passed:
        if progress is not None:
            progress("ranking node sensitivity", 0.05)
        sensitivity = _sensitivity(
            ev,
            ranking_metric(budget.metric),
            max_nodes=max_nodes,
            all_but_this=all_but_this,
            samples=sensitivity_samples,
            progress=None if progress is None else _scaled(progress, 0.05, 0.8),
        )
        kept, report = _bisect(ev, sensitivity.ranked_nodes, budget, full_value, progress)
    quantizable = len(ev.prepare((), Precision.INT8).quantization.quantized_nodes)  # type: ignore[union-attr]
    if progress is not None:
        progress("done", 1.0)
    return MixedPrecisionResult(
        budget=budget,
        kept_nodes=kept,
        quantizable_nodes=quantizable,
        int8_nodes=quantizable - len(kept),
        int8_share=(quantizable - len(kept)) / quantizable if quantizable else 1.0,
        value_full_int8=full_value,
        value_reached=_budget_value(report),
        accuracy=report,
        sensitivity=sensitivity,
        evaluations=ev.evaluations,
        samples=ev.samples,
        seconds=time.perf_counter() - start,
    )


def _budget_value(report: AccuracyReport) -> float:
    assert report.budget_value is not None  # compare() raises when no output reports the metric
    return report.budget_value


def _scaled(progress: ProgressFn, low: float, high: float) -> ProgressFn:
    def step(stage: str, fraction: float) -> None:
        progress(stage, low + (high - low) * fraction)

    return step


def _bisect(
    ev: _Evaluator,
    ranked: list[str],
    budget: MetricBudget,
    full_value: float,
    progress: ProgressFn | None,
) -> tuple[list[str], AccuracyReport]:
    """Smallest k whose top-k keep list meets the budget; ``keep(0)`` is known to fail."""
    passing: dict[int, AccuracyReport] = {}
    lo, hi = 0, len(ranked)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if progress is not None:
            progress(f"trying {mid} of {len(ranked)} nodes out of INT8", 0.85)
        report = ev.evaluate(ranked[:mid], budget=budget)
        if report.passed:
            hi, passing[mid] = mid, report
        else:
            lo = mid
    if hi not in passing:
        report = ev.evaluate(ranked[:hi], budget=budget)
        if not report.passed:
            raise AccuracyBudgetError(
                f"Even with all {len(ranked)} quantizable nodes out of INT8, "
                f"{budget.metric.value} is {_budget_value(report):.6g} (full INT8: "
                f"{full_value:.6g}); the budget {budget} cannot be met"
                + (" with FP16 in the rest of the model." if ev.spec.precision.uses_fp16 else "."),
                hint=(
                    "Use precision int8 (FP32 fallback) instead of int8-fp16, or loosen the budget."
                    if ev.spec.precision.uses_fp16
                    else "Loosen the budget; check that the budget's metric and value are reachable "
                    "by the FP32 model on these samples (e.g. accuracy_drop needs the right labels)."
                ),
                field="budget",
            )
        passing[hi] = report
    return ranked[:hi], passing[hi]
