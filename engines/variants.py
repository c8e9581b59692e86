"""Model variants in memory: a model with chosen nodes kept out of INT8, built without touching
the disk and compared with the FP32 reference (:class:`VariantEvaluator`).

Variants are serialized to bytes and loaded into ONNX Runtime sessions (:class:`InMemoryRunner`);
the reference runs once per batch and is memoized (:class:`MemoizedRunner`).

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
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from calibrators.data import CalibrationDataset
from core.tensors import TensorSpec, model_input_specs
from engines.accuracy import compare
from engines.accuracy_report import AccuracyMetric, AccuracyReport, MetricBudget
from engines.backends.base import QueryTiming, Runner
from engines.backends.onnxruntime import (
    SessionRunner,
    create_session_options,
    default_providers,
    int8_weight_levels,
)
from engines.backends.runner import BaseRunner
from engines.errors import RunError, SpecError
from engines.names import QdqExecution
from engines.spec import BackendName, BuildSpec, KeepRules, Precision

if TYPE_CHECKING:
    import onnx

    from calibrators.table import CalibrationTable
    from engines.graph import PreparedModel

__all__ = [
    "InMemoryRunner",
    "MemoizedRunner",
    "QdqExecution",
    "VariantEvaluator",
    "default_execution",
    "execution_for",
    "keep_patterns",
]

_CPU = ("CPUExecutionProvider",)
_FULL_INT8 = 127


def default_execution(spec: BuildSpec) -> QdqExecution:
    """``onnxruntime`` when ``spec.backend`` resolves to the onnxruntime backend, else ``reference``."""
    from engines.backends.registry import BACKENDS, select_backend

    backend, _ = select_backend(spec.backend)
    return BACKENDS[BackendName(backend.name)].qdq_execution


def execution_for(backend: str, weight_levels: int) -> QdqExecution:
    """How to run Q/DQ variants that stand for ``backend``'s artifacts with INT8 weights of
    ``weight_levels``: the backend's own execution, or Q/DQ as written where that one would
    quantize weights differently (TensorRT's arithmetic measured on a CPU without VNNI)."""
    from engines.backends.registry import BACKENDS

    execution = BACKENDS[BackendName(backend)].qdq_execution
    if _execution_setup(execution)[1] != weight_levels:
        return QdqExecution.REFERENCE
    return execution


def _execution_setup(execution: QdqExecution) -> tuple[tuple[str, ...], int]:
    """(providers, INT8 weight levels) for running variants as ``execution`` says."""
    if execution is QdqExecution.REFERENCE:
        return _CPU, _FULL_INT8
    providers = tuple(default_providers())
    return providers, int8_weight_levels(providers)[0]


def keep_patterns(nodes: Sequence[str], op_types: Iterable[str]) -> tuple[str, ...]:
    """``BuildSpec.keep`` patterns that match exactly ``nodes``: the plain name, or an escaped
    ``re:`` pattern where a name equals an op type (a plain pattern would match every node of
    that type)."""
    ops = set(op_types)
    return tuple(f"re:{re.escape(n)}" if n in ops or n.startswith("re:") else n for n in nodes)


# --- runners ----------------------------------------------------------------------------------


class MemoizedRunner(BaseRunner):
    """Wraps a runner and caches its outputs by the feeds' content, so that a reference runs
    once per distinct batch however many candidates are compared with it. Timed queries are
    the wrapped runner's own (never cached); closing it closes the wrapped runner."""

    def __init__(self, runner: Runner) -> None:
        self._runner = runner
        self._cache: dict[bytes, dict[str, np.ndarray]] = {}
        # the wrapped runner decides which dtypes it takes; feeds are checked here, then again
        # (cheaply) by the wrapped runner
        self.input_casting = runner.input_casting if isinstance(runner, BaseRunner) else "no"

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return self._runner.inputs

    @property
    def output_names(self) -> Sequence[str]:
        return self._runner.output_names

    @property
    def label(self) -> str:
        return self._runner.label if isinstance(self._runner, BaseRunner) else super().label

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = _feeds_key(feeds)
        if key not in self._cache:
            self._cache[key] = self._runner.run(feeds)
        return dict(self._cache[key])

    def _timed_run(self, feeds: dict[str, np.ndarray]) -> QueryTiming:
        return self._runner.timed_run(feeds)

    def _describe(self) -> dict[str, str]:
        return self._runner.describe()

    def _close(self) -> None:
        self._cache.clear()
        self._runner.close()


def _feeds_key(feeds: Mapping[str, np.ndarray]) -> bytes:
    digest = hashlib.blake2b(digest_size=20)
    for name in sorted(feeds):
        array = np.ascontiguousarray(feeds[name])
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array.data)
    return digest.digest()


class InMemoryRunner(SessionRunner):
    """An ONNX Runtime session over an in-memory model (no files), as a :class:`Runner`.

    ``optimize=False`` disables graph optimizations (``reference`` execution).
    """

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

        options = create_session_options(threads, optimize=optimize)
        self._threads, self._optimize = threads, optimize
        self._providers = tuple(providers)
        try:
            session = ort.InferenceSession(
                model.SerializeToString(), options, providers=list(self._providers)
            )
        except Exception as exc:  # onnxruntime's own Fail/InvalidGraph types
            raise RunError(
                f"ONNX Runtime cannot load {what}: {exc}",
                hint="Keep the failing node out of INT8 with --keep NODE, or report the model.",
            ) from exc
        super().__init__(session, what)

    def _describe(self) -> dict[str, str]:
        return {
            "backend": BackendName.ONNXRUNTIME.value,
            "model": self.label,
            "providers": ",".join(self._providers),
            "threads": str(self._threads),
            "graph_optimizations": "all" if self._optimize else "disabled",
        }


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
            InMemoryRunner(model, "the FP32 reference", self.threads, providers=self.providers)
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
        with InMemoryRunner(
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
