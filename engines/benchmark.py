"""Latency and throughput with trtexec's procedure and vocabulary (ARCHITECTURE.md §4).

Procedure, as ``trtexec`` runs it:

1. **Warm-up.** Queries run for ``warmup_ms`` and are discarded.
2. **Measurement.** Queries run until *both* ``iterations`` queries have been timed *and*
   ``duration_s`` seconds of host wall time have passed.
3. **Statistics** per timing (``latency``, ``enqueue``, ``h2d``, ``gpu_compute``, ``d2h``):
   min, max, mean, median and the 90/95/99th percentiles, in milliseconds.

Definitions (trtexec's ``sampleReporting.cpp``):

- *percentile p* of N timings: sort ascending, exclude ``floor((1 - p/100) * N)`` values from
  the top, and take the largest remaining one, i.e. ``sorted[max(N - 1 - exclude, 0)]``. The
  exclusion count is computed exactly in rational arithmetic (trtexec computes it in float32,
  which can differ by one sample when ``(1 - p/100) * N`` is an exact integer).
- *median*: the middle value, or the mean of the two middle values when N is even.
- *throughput* (``throughput_qps``) = timed queries x batch size / total host wall time, where
  the wall time runs from the start of the first timed query to the end of the last.
- *coefficient of variation* of GPU compute time = population standard deviation / mean, in
  percent; above 2.5 % a warning says the measurement is unstable.
- *enqueue-bound*: median enqueue time > 0.8 x median GPU compute time (trtexec's threshold);
  skipped when a backend reports the same number for both (a synchronous host backend such as
  ONNX Runtime, whose run is its own enqueue). *Transfer-bound*: median H2D or D2H time >=
  median GPU compute time.

What was measured (``PerfReport.timing``) is decided from the timings the runner reports: a
host-side runner reports every query as :func:`engines.backends.runner.host_timing` does (one
wall-clock time as latency, enqueue and compute; no transfers), so a run whose every query has
that shape is *host-timed*. Its report has one measurement, latency: the text table shows only
"Host latency", its CV is the latency's, and none of the GPU warnings (enqueue-, transfer-bound,
GPU compute unstable) apply.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from statistics import fmean, pstdev

import numpy as np

from calibrators.data import CalibrationDataset
from core.tensors import TensorSpec
from engines.backends.base import ConfigurableTiming, ProgressFn, QueryTiming, Runner, TimingMode
from engines.errors import RunError, SpecError
from engines.perf_report import (
    BenchmarkOptions,
    InputSource,
    PerfReport,
    TimingSource,
    TimingStats,
)

__all__ = [
    "CV_WARNING_PERCENT",
    "benchmark",
    "random_feeds",
    "render_perf_table",
    "sweep_batch_sizes",
]

CV_WARNING_PERCENT = 2.5
"""Above this coefficient of variation of GPU compute time, the report warns."""
_ENQUEUE_BOUND_RATIO = 0.8
_PROGRESS_EVERY_S = 0.1


def benchmark(
    runner: Runner,
    inputs: CalibrationDataset | Iterable[Mapping[str, np.ndarray]] | None = None,
    options: BenchmarkOptions | None = None,
    *,
    progress: ProgressFn | None = None,
) -> PerfReport:
    """Measure ``runner`` on ``inputs`` (a dataset, batched feeds, or ``None`` for random data).

    Dataset batches of ``options.batch_size`` (or given feeds, up to ``max_input_batches`` of
    them) are loaded before timing and rotated. Random inputs follow :func:`random_feeds`.
    """
    options = options or BenchmarkOptions()
    requested = _apply_timing_mode(runner, options)
    feeds, source, batch = _prepare_inputs(runner, inputs, options)
    rotation = _Rotation(feeds)
    warmup_queries = _warm_up(runner, rotation, options.warmup_ms / 1000.0, progress)
    timings, wall_s = _measure(runner, rotation, options, progress)
    used = runner.timing_mode if isinstance(runner, ConfigurableTiming) else requested
    notes = []
    if requested.cuda_graph and not used.cuda_graph:
        notes.append(
            "CUDA graph capture failed for this engine; it was measured with plain enqueues."
        )
    return _report(timings, wall_s, warmup_queries, batch, source, runner, options, used, notes)


def _apply_timing_mode(runner: Runner, options: BenchmarkOptions) -> TimingMode:
    """Hand the options' timing mode to a runner that takes one; refuse what a runner cannot do."""
    if options.streams != 1:
        raise SpecError(
            f"streams={options.streams}: trtforge measures one stream (one query at a time).",
            hint="Leave streams at 1.",
            field="streams",
        )
    mode = TimingMode(
        cuda_graph=options.cuda_graph,
        spin_wait=options.spin_wait,
        use_transfers=options.use_transfers,
    )
    if isinstance(runner, ConfigurableTiming):
        runner.set_timing_mode(mode)
    elif mode != TimingMode():
        field = next(
            name
            for name, asked in (
                ("cuda_graph", mode.cuda_graph),
                ("spin_wait", mode.spin_wait),
                ("use_transfers", not mode.use_transfers),
            )
            if asked
        )
        backend = runner.describe().get("backend", "this")
        raise SpecError(
            f"The {backend} runner times each query's host wall-clock; CUDA graphs, spin-wait "
            "and leaving out data transfers apply to TensorRT engines only.",
            hint="Drop --cuda-graph, --spin-wait and --no-transfers for this artifact.",
            field=field,
        )
    return mode


def sweep_batch_sizes(
    runner: Runner,
    inputs: CalibrationDataset | None,
    options: BenchmarkOptions,
    batch_sizes: Sequence[int],
    *,
    progress: ProgressFn | None = None,
) -> list[PerfReport]:
    """One :func:`benchmark` per batch size (dataset or random inputs), in the order given."""
    if not batch_sizes:
        raise SpecError("No batch sizes to sweep.", hint="Give at least one batch size.")
    reports = []
    for i, size in enumerate(batch_sizes):

        def step(stage: str, fraction: float, i: int = i, size: int = size) -> None:
            if progress is not None:
                progress(f"batch {size}: {stage}", (i + fraction) / len(batch_sizes))

        reports.append(
            benchmark(
                runner, inputs, options.model_copy(update={"batch_size": size}), progress=step
            )
        )
    return reports


def random_feeds(
    inputs: Sequence[TensorSpec],
    *,
    batch_size: int | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Seeded random inputs in the model's shapes.

    Shape per input: ``shapes[name]`` when given, else the model's dims with symbolic ones set
    to 1; then the first axis, when symbolic in the model, becomes ``batch_size`` (if given).
    Floats are standard normal; integers are 0 or 1 (valid indices, masks and type ids for
    any embedding); booleans are fair coin flips.
    """
    rng = np.random.default_rng(seed)
    shapes = shapes or {}
    feeds: dict[str, np.ndarray] = {}
    for spec in inputs:
        shape = _resolve_shape(spec, batch_size, shapes.get(spec.name))
        dtype = np.dtype(spec.dtype) if spec.dtype not in ("str", "bfloat16") else None
        if dtype is None:
            raise SpecError(
                f"Cannot make random data for input {spec.name!r} of type {spec.dtype}.",
                hint="Benchmark with --data instead of random inputs.",
                field="inputs",
            )
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
        else:
            feeds[spec.name] = rng.random(shape) < 0.5
    return feeds


def _resolve_shape(
    spec: TensorSpec, batch_size: int | None, given: Sequence[int] | None
) -> tuple[int, ...]:
    dims = list(spec.shape)
    if given is not None:
        if len(given) != len(dims):
            raise SpecError(
                f"Shape {tuple(given)} for input {spec.name!r} has rank {len(given)}; the input "
                f"has rank {len(dims)}.",
                field="shapes",
            )
        shape = [int(d) for d in given]
    else:
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in dims]
    if batch_size is not None and dims:
        fixed = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
        if fixed is None:
            shape[0] = batch_size
        elif fixed != batch_size:
            raise SpecError(
                f"Input {spec.name!r} has a fixed batch size of {fixed}; cannot benchmark "
                f"batch size {batch_size}.",
                hint=f"Use --batch-size {fixed}, or export the model with a dynamic batch axis.",
                field="batch_size",
            )
    return tuple(shape)


def _prepare_inputs(
    runner: Runner,
    inputs: CalibrationDataset | Iterable[Mapping[str, np.ndarray]] | None,
    options: BenchmarkOptions,
) -> tuple[list[dict[str, np.ndarray]], InputSource, int]:
    source = options.input_source or (InputSource.RANDOM if inputs is None else InputSource.DATASET)
    if source is InputSource.RANDOM:
        random = random_feeds(
            runner.inputs, batch_size=options.batch_size, shapes=options.shapes, seed=options.seed
        )
        return [random], source, options.batch_size or _leading_dim(random)
    if inputs is None:
        raise SpecError(
            "Benchmark inputs from a dataset were asked for, but no dataset was given.",
            hint="Pass --data DATASET, or use random inputs.",
            field="inputs",
        )
    if isinstance(inputs, CalibrationDataset):
        batch = options.batch_size or 1
        return _dataset_batches(runner, inputs, batch, options.max_input_batches), source, batch
    feeds = [dict(f) for f, _ in zip(inputs, range(options.max_input_batches), strict=False)]
    if not feeds:
        raise SpecError("The benchmark inputs are empty.", field="inputs")
    batch = _leading_dim(feeds[0])
    if options.batch_size is not None and options.batch_size != batch:
        raise SpecError(
            f"The given feeds hold batches of {batch}, not {options.batch_size}.",
            hint="Leave batch_size unset for pre-batched feeds, or pass a dataset.",
            field="batch_size",
        )
    return feeds, source, batch


def _dataset_batches(
    runner: Runner, dataset: CalibrationDataset, batch: int, max_batches: int
) -> list[dict[str, np.ndarray]]:
    data = dataset.validate(list(runner.inputs))
    loaded = list(data.batches(batch, max_samples=batch * max_batches))
    full = [b for b in loaded if _leading_dim(b) == batch]
    if full:
        return full
    # Fewer samples than one batch: repeat them to fill it.
    return [{k: np.resize(v, (batch, *v.shape[1:])) for k, v in loaded[0].items()}]


def _leading_dim(feeds: Mapping[str, np.ndarray]) -> int:
    for array in feeds.values():
        if array.ndim:
            return int(array.shape[0])
    return 1


class _Rotation:
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = feeds
        self._i = 0

    def next(self) -> dict[str, np.ndarray]:
        feeds = self._feeds[self._i % len(self._feeds)]
        self._i += 1
        return feeds


def _warm_up(
    runner: Runner, rotation: _Rotation, warmup_s: float, progress: ProgressFn | None
) -> int:
    if progress is not None:
        progress("warming up", 0.0)
    queries = 0
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        runner.timed_run(rotation.next())
        queries += 1
    return queries


def _measure(
    runner: Runner, rotation: _Rotation, options: BenchmarkOptions, progress: ProgressFn | None
) -> tuple[list[QueryTiming], float]:
    timings: list[QueryTiming] = []
    start = last_report = time.perf_counter()
    while True:
        timings.append(runner.timed_run(rotation.next()))
        now = time.perf_counter()
        elapsed = now - start
        if len(timings) >= options.iterations and elapsed >= options.duration_s:
            break
        if progress is not None and now - last_report >= _PROGRESS_EVERY_S:
            last_report = now
            by_time = elapsed / options.duration_s if options.duration_s else 1.0
            progress("measuring", min(1.0, by_time, len(timings) / options.iterations))
    if progress is not None:
        progress("measuring", 1.0)
    return timings, elapsed


def _report(
    timings: list[QueryTiming],
    wall_s: float,
    warmup_queries: int,
    batch: int,
    source: InputSource,
    runner: Runner,
    options: BenchmarkOptions,
    mode: TimingMode,
    notes: list[str],
) -> PerfReport:
    if wall_s <= 0:
        raise RunError("The benchmark measured no time.", hint="Increase --duration.")
    columns = {
        "latency": [t.latency_ms for t in timings],
        "enqueue": [t.enqueue_ms for t in timings],
        "h2d": [t.h2d_ms for t in timings],
        "gpu_compute": [t.gpu_compute_ms for t in timings],
        "d2h": [t.d2h_ms for t in timings],
    }
    stats = {name: TimingStats.from_samples(values) for name, values in columns.items()}
    compute = columns["gpu_compute"]
    mean = fmean(compute)
    cv = pstdev(compute, mu=mean) / mean * 100.0 if mean > 0 else 0.0
    same_enqueue = columns["enqueue"] == compute
    timing = _timing_source(timings)
    return PerfReport(
        throughput_qps=len(timings) * batch / wall_s,
        queries=len(timings),
        batch_size=batch,
        total_host_walltime_s=wall_s,
        total_gpu_compute_s=math.fsum(compute) / 1000.0,
        coefficient_of_variation_percent=cv,
        warmup_ms=options.warmup_ms,
        warmup_queries=warmup_queries,
        duration_s=options.duration_s,
        iterations=options.iterations,
        input_source=source,
        seed=options.seed,
        cuda_graph=mode.cuda_graph,
        spin_wait=mode.spin_wait,
        use_transfers=mode.use_transfers,
        streams=options.streams,
        timing=timing,
        environment=dict(runner.describe()),
        warnings=notes + _warnings(stats, cv, timing=timing, check_enqueue=not same_enqueue),
        **stats,
    )


def _timing_source(timings: Sequence[QueryTiming]) -> TimingSource:
    """Host-timed when every query has a host timing's shape (module docstring)."""
    host = all(
        t.h2d_ms == 0 and t.d2h_ms == 0 and t.latency_ms == t.enqueue_ms == t.gpu_compute_ms
        for t in timings
    )
    return TimingSource.HOST if host else TimingSource.DEVICE


def _warnings(
    stats: Mapping[str, TimingStats], cv: float, *, timing: TimingSource, check_enqueue: bool
) -> list[str]:
    if timing is TimingSource.HOST:
        # One wall-clock time per query: nothing to say about a GPU, only about the spread.
        if cv <= CV_WARNING_PERCENT:
            return []
        return [
            f"Latency is unstable: coefficient of variation {cv:.2f}% > {CV_WARNING_PERCENT}%. "
            "Stop other work on the machine, set --threads, or lengthen --duration-s."
        ]
    out: list[str] = []
    compute = stats["gpu_compute"].median_ms
    if check_enqueue and stats["enqueue"].median_ms > _ENQUEUE_BOUND_RATIO * compute:
        out.append(
            "Throughput may be bound by enqueue time rather than GPU compute, and the GPU may be "
            "under-utilized; CUDA graphs (--cuda-graph) may increase throughput."
        )
    for name, label in (("h2d", "host-to-device"), ("d2h", "device-to-host")):
        if stats[name].median_ms > 0 and stats[name].median_ms >= compute:
            out.append(
                f"Throughput may be bound by {label} transfers rather than GPU compute; "
                "measure without transfers (--no-transfers) to see the compute-bound number."
            )
    if cv > CV_WARNING_PERCENT:
        out.append(
            f"GPU compute time is unstable: coefficient of variation {cv:.2f}% > "
            f"{CV_WARNING_PERCENT}%. Lock clocks, stop other work on the machine, or "
            "lengthen --duration."
        )
    return out


_ROWS = (
    ("Latency", "latency"),
    ("Enqueue", "enqueue"),
    ("H2D", "h2d"),
    ("GPU Compute", "gpu_compute"),
    ("D2H", "d2h"),
)
_HOST_ROWS = (("Host latency", "latency"),)
_COLS = ("min", "mean", "p90", "p95", "p99", "max")


def render_perf_table(report: PerfReport) -> str:
    """A readable text table of ``report`` (ms), with throughput, mode, environment, warnings.

    A host-timed report shows only what was measured, "Host latency", and no GPU timing mode;
    a device-timed one trtexec's full table (module docstring)."""
    host = report.timing is TimingSource.HOST
    lines = [
        f"Throughput: {report.throughput_qps:.2f} qps (batch {report.batch_size}, "
        f"{report.queries} queries in {report.total_host_walltime_s:.3f} s, "
        f"{report.input_source.value} inputs)",
        f"{'(ms)':<14}" + "".join(f"{c:>10}" for c in _COLS),
    ]
    for label, name in _HOST_ROWS if host else _ROWS:
        stats: TimingStats = getattr(report, name)
        values = [getattr(stats, f"{c}_ms") for c in _COLS]
        lines.append(f"{label:<14}" + "".join(f"{v:>10.3f}" for v in values))
    lines.append(
        f"{'Latency' if host else 'GPU compute'} CV: "
        f"{report.coefficient_of_variation_percent:.2f}%  |  warm-up "
        f"{report.warmup_ms:g} ms ({report.warmup_queries} queries), min {report.iterations} "
        f"iterations, min {report.duration_s:g} s"
    )
    if host:
        lines.append("Timing: host wall clock per query (no device times measured)")
    else:
        lines.append(
            f"Mode: cuda_graph={_yn(report.cuda_graph)} spin_wait={_yn(report.spin_wait)} "
            f"transfers={_yn(report.use_transfers)} streams={report.streams}"
        )
    if report.environment:
        lines.append("Environment: " + ", ".join(f"{k}={v}" for k, v in report.environment.items()))
    lines.extend(f"Warning: {w}" for w in report.warnings)
    return "\n".join(lines)


def _yn(flag: bool) -> str:
    return "yes" if flag else "no"
