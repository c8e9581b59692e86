"""The timing code measures what trtexec measures, checked against runners of known duration."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest

from calibrators.data import CalibrationDataset
from core.tensors import TensorSpec
from engines.backends.base import ConfigurableTiming, QueryTiming, Runner, TimingMode
from engines.backends.onnxruntime import OnnxRuntimeRunner
from engines.benchmark import benchmark, random_feeds, render_perf_table, sweep_batch_sizes
from engines.errors import SpecError
from engines.perf_report import (
    BenchmarkOptions,
    InputSource,
    PerfReport,
    TimingSource,
    TimingStats,
    median,
    percentile,
)
from tests import zoo


class SleepRunner:
    """A stand-in runner: query i sleeps ``sleep_ms[i % n]`` and reports the timings it is given.

    ``report`` maps a query index to the QueryTiming it reports; by default the sleep itself in
    every field that a synchronous host backend fills.
    """

    def __init__(
        self,
        sleep_ms: Sequence[float],
        *,
        reported: Sequence[QueryTiming] | None = None,
        flagged_first: int = 0,
    ) -> None:
        self.sleep_ms = list(sleep_ms)
        self.reported_cycle = list(reported) if reported is not None else None
        self.flagged_first = flagged_first
        self.calls = 0
        self.reported: list[QueryTiming] = []
        self.feeds_seen: list[Mapping[str, np.ndarray]] = []

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return (TensorSpec("x", "float32", ("batch", 4)),)

    @property
    def output_names(self) -> Sequence[str]:
        return ("y",)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": np.asarray(feeds["x"]) * 2}

    def timed_run(self, feeds: Mapping[str, np.ndarray]) -> QueryTiming:
        i = self.calls
        self.calls += 1
        self.feeds_seen.append(feeds)
        ms = self.sleep_ms[i % len(self.sleep_ms)]
        time.sleep(ms / 1000.0)
        if self.reported_cycle is not None:
            timing = self.reported_cycle[i % len(self.reported_cycle)]
        else:
            shown = 500.0 if i < self.flagged_first else ms  # marks warm-up queries
            timing = QueryTiming(shown, shown, 0.0, shown, 0.0)
        self.reported.append(timing)
        return timing

    def describe(self) -> dict[str, str]:
        return {"backend": "sleep", "device": "none"}

    def close(self) -> None:
        pass

    def __enter__(self) -> SleepRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _expected_percentile(values: Sequence[float], p: int) -> float:
    """trtexec: sort ascending, drop floor((100 - p) / 100 * N) from the top, take the max left."""
    ordered = sorted(values)
    n = len(ordered)
    exclude = (100 - p) * n // 100  # exact integer arithmetic
    return ordered[max(n - 1 - exclude, 0)]


def test_sleep_runner_satisfies_the_runner_protocol() -> None:
    assert isinstance(SleepRunner([1.0]), Runner)


@pytest.mark.parametrize(
    ("values", "p", "expected"),
    [
        (list(range(1, 101)), 90, 90),
        (list(range(1, 101)), 95, 95),
        (list(range(1, 101)), 99, 99),
        (list(range(1, 11)), 90, 9),  # exclude floor(0.1 * 10) = 1
        (list(range(1, 11)), 95, 10),  # exclude floor(0.5) = 0
        (list(range(1, 11)), 99, 10),
        (list(range(1, 21)), 95, 19),  # exclude 1
        (list(range(1, 21)), 90, 18),  # exclude 2
        ([7.0], 99, 7.0),
        ([3.0, 1.0, 2.0], 0, 1.0),  # exclude all but one -> the minimum
        ([3.0, 1.0, 2.0], 100, 3.0),
    ],
)
def test_percentile_uses_trtexec_definition(values: list[float], p: float, expected: float) -> None:
    assert percentile(sorted(values), p) == expected


def test_percentile_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_median_odd_and_even() -> None:
    assert median([1.0, 2.0, 9.0]) == 2.0
    assert median([1.0, 2.0, 4.0, 9.0]) == 3.0


def test_timing_stats_from_known_array() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 6.0, 8.0, 7.0, 9.0]
    stats = TimingStats.from_samples(values)
    assert stats == TimingStats(
        min_ms=1.0, max_ms=10.0, mean_ms=5.5, median_ms=5.5, p90_ms=9.0, p95_ms=10.0, p99_ms=10.0
    )


def _fast(**changes: object) -> BenchmarkOptions:
    values: dict[str, object] = {"warmup_ms": 0.0, "iterations": 10, "duration_s": 0.0}
    values.update(changes)
    return BenchmarkOptions.model_validate(values)


def test_warm_up_is_discarded_and_stats_are_exact() -> None:
    # 5 warm-up queries report 500 ms (they sleep 2 ms): none may reach the statistics.
    runner = SleepRunner([2.0, 1.0, 3.0, 1.5, 2.5, 4.0, 0.5], flagged_first=5)
    report = benchmark(runner, None, _fast(warmup_ms=150.0, iterations=40))
    assert report.warmup_queries >= 5
    assert report.warmup_queries + report.queries == runner.calls
    measured = [t.latency_ms for t in runner.reported[report.warmup_queries :]]
    assert len(measured) == report.queries >= 40
    assert max(measured) < 500.0
    assert report.latency.max_ms == max(measured)
    assert report.latency.min_ms == min(measured)
    assert report.latency.mean_ms == pytest.approx(float(np.mean(measured)), rel=1e-12)
    assert report.latency.median_ms == float(np.median(measured))
    for p in (90, 95, 99):
        assert getattr(report.latency, f"p{p}_ms") == _expected_percentile(measured, p)
    assert report.gpu_compute == report.latency == report.enqueue
    assert report.h2d.max_ms == report.d2h.max_ms == 0.0
    assert report.total_gpu_compute_s == pytest.approx(sum(measured) / 1000.0)


def test_stops_at_iterations_when_duration_is_short() -> None:
    runner = SleepRunner([1.0])
    report = benchmark(runner, None, _fast(iterations=37, duration_s=0.001))
    assert report.queries == 37
    assert runner.calls == 37


def test_stops_soon_after_duration_when_iterations_are_few() -> None:
    runner = SleepRunner([5.0])
    report = benchmark(runner, None, _fast(iterations=2, duration_s=0.2))
    assert report.total_host_walltime_s >= 0.2
    # It stops at the first query that ends past the duration: the queries before the last
    # one (which slept at least what they report) fit inside it.
    assert sum(t.latency_ms for t in runner.reported[:-1]) / 1000.0 < 0.2
    assert report.queries > 2


def test_throughput_counts_samples_per_second_of_wall_time() -> None:
    runner = SleepRunner([10.0])
    report = benchmark(runner, None, _fast(iterations=20, duration_s=0.25, batch_size=4))
    assert report.batch_size == 4
    assert report.throughput_qps == pytest.approx(
        report.queries * 4 / report.total_host_walltime_s, rel=1e-12
    )
    # Each query sleeps 10 ms: 400 samples/s at best, less by the sleep overshoot (loaded CI
    # machines oversleep by a few ms at most).
    assert 250.0 < report.throughput_qps <= 400.0
    assert report.total_host_walltime_s >= report.queries * 0.010


def test_coefficient_of_variation_and_its_warning() -> None:
    steady = benchmark(
        SleepRunner([1.0], reported=[QueryTiming(2.0, 2.0, 0.0, 2.0, 0.0)]), None, _fast()
    )
    assert steady.coefficient_of_variation_percent == 0.0
    assert not steady.warnings
    timings = [QueryTiming(v, v, 0.0, v, 0.0) for v in (1.0, 3.0)]
    runner = SleepRunner([0.5], reported=timings)
    report = benchmark(runner, None, _fast(iterations=20))
    measured = [t.gpu_compute_ms for t in runner.reported[report.warmup_queries :]]
    expected = float(np.std(measured) / np.mean(measured) * 100)
    assert report.coefficient_of_variation_percent == pytest.approx(expected)
    assert report.coefficient_of_variation_percent > 40
    assert any("unstable" in w for w in report.warnings)


def test_enqueue_bound_and_transfer_bound_warnings() -> None:
    enqueue_bound = [
        QueryTiming(latency_ms=3.0, enqueue_ms=1.8, h2d_ms=0.1, gpu_compute_ms=2.0, d2h_ms=0.1)
    ]
    report = benchmark(SleepRunner([0.2], reported=enqueue_bound), None, _fast())
    assert [w for w in report.warnings if "enqueue" in w]
    assert not [w for w in report.warnings if "transfer" in w]
    compute_bound = [QueryTiming(3.0, 0.2, 0.1, 2.0, 0.1)]
    report = benchmark(SleepRunner([0.2], reported=compute_bound), None, _fast())
    assert report.warnings == []
    transfer_bound = [QueryTiming(9.0, 0.2, 4.0, 2.0, 3.0)]
    report = benchmark(SleepRunner([0.2], reported=transfer_bound), None, _fast())
    assert len([w for w in report.warnings if "transfers" in w]) == 2


def test_modes_and_environment_are_recorded() -> None:
    options = _fast(cuda_graph=True, spin_wait=True, use_transfers=False, seed=3)
    report = benchmark(GraphRunner(capture_fails=False), None, options)
    assert (report.cuda_graph, report.spin_wait, report.use_transfers) == (True, True, False)
    assert report.environment == {"backend": "sleep", "device": "none"}
    assert report.input_source is InputSource.RANDOM
    assert report.seed == 3
    assert PerfReport.model_validate_json(report.model_dump_json()) == report


def test_progress_reaches_one() -> None:
    seen: list[tuple[str, float]] = []
    benchmark(
        SleepRunner([1.0]),
        None,
        _fast(warmup_ms=5.0, duration_s=0.25),
        progress=lambda s, f: seen.append((s, f)),
    )
    assert seen[0] == ("warming up", 0.0)
    assert seen[-1] == ("measuring", 1.0)
    fractions = [f for s, f in seen if s == "measuring"]
    assert fractions == sorted(fractions)


def test_dataset_samples_are_rotated() -> None:
    data = CalibrationDataset.from_arrays({"x": np.arange(24, dtype=np.float32).reshape(6, 4)})
    runner = SleepRunner([0.1])
    report = benchmark(runner, data, _fast(iterations=7, batch_size=2))
    assert report.input_source is InputSource.DATASET
    firsts = [float(f["x"][0, 0]) for f in runner.feeds_seen]
    assert firsts == [0.0, 8.0, 16.0, 0.0, 8.0, 16.0, 0.0][: len(firsts)]
    assert all(f["x"].shape == (2, 4) for f in runner.feeds_seen)


def test_dataset_smaller_than_batch_is_repeated() -> None:
    data = CalibrationDataset.from_arrays({"x": np.ones((3, 4), np.float32)})
    runner = SleepRunner([0.1])
    report = benchmark(runner, data, _fast(iterations=2, batch_size=8))
    assert report.batch_size == 8
    assert runner.feeds_seen[0]["x"].shape == (8, 4)


def test_dataset_source_without_dataset_is_refused() -> None:
    with pytest.raises(SpecError, match="no dataset"):
        benchmark(SleepRunner([0.1]), None, _fast(input_source="dataset"))


def test_random_feeds_follow_shapes_and_seed() -> None:
    specs = [
        TensorSpec("image", "float32", ("batch", 3, 16, 16)),
        TensorSpec("ids", "int64", ("batch", "sequence")),
        TensorSpec("mask", "bool", (2, None)),
    ]
    feeds = random_feeds(specs, batch_size=None, shapes={"ids": (5, 7)}, seed=1)
    assert feeds["image"].shape == (1, 3, 16, 16) and feeds["image"].dtype == np.float32
    assert feeds["ids"].shape == (5, 7) and feeds["ids"].dtype == np.int64
    assert set(np.unique(feeds["ids"])) <= {0, 1}
    assert feeds["mask"].shape == (2, 1) and feeds["mask"].dtype == np.bool_
    again = random_feeds(specs, shapes={"ids": (5, 7)}, seed=1)
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)
    other = random_feeds(specs, shapes={"ids": (5, 7)}, seed=2)
    assert not np.array_equal(feeds["image"], other["image"])
    batched = random_feeds(specs[:2], batch_size=4, shapes={"ids": (5, 7)})
    assert batched["image"].shape == (4, 3, 16, 16)
    assert batched["ids"].shape == (4, 7)
    with pytest.raises(SpecError, match="fixed batch size of 2"):
        random_feeds(specs, batch_size=4)


def test_given_feeds_are_used_with_their_batch() -> None:
    feeds = [{"x": np.full((3, 4), i, np.float32)} for i in range(2)]
    runner = SleepRunner([0.1])
    report = benchmark(runner, feeds, _fast(iterations=4))
    assert report.batch_size == 3
    assert [float(f["x"][0, 0]) for f in runner.feeds_seen[:4]] == [0.0, 1.0, 0.0, 1.0]
    with pytest.raises(SpecError, match="batches of 3"):
        benchmark(runner, feeds, _fast(batch_size=2))


@pytest.fixture(scope="module")
def tiny_cnn_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "tiny_cnn.onnx"
    onnx.save(zoo.tiny_cnn(), path)
    return path


def test_onnxruntime_runner_benchmark_on_real_model(tiny_cnn_file: Path) -> None:
    images = np.random.default_rng(0).normal(size=(10, 3, 16, 16)).astype(np.float32)
    data = CalibrationDataset.from_arrays({"image": images})
    with OnnxRuntimeRunner(tiny_cnn_file, intra_op_threads=1) as runner:
        report = benchmark(
            runner,
            data,
            BenchmarkOptions(warmup_ms=20, iterations=15, duration_s=0.1, batch_size=4),
        )
    assert report.queries >= 15
    assert report.total_host_walltime_s >= 0.1
    assert report.environment["backend"] == "onnxruntime"
    assert report.environment["threads"] == "1"
    assert report.latency.min_ms > 0
    assert (
        report.latency.min_ms
        <= report.latency.median_ms
        <= report.latency.p99_ms
        <= report.latency.max_ms
    )
    # A synchronous backend is never enqueue-bound, and has no GPU to warn about.
    assert report.timing is TimingSource.HOST
    assert not [w for w in report.warnings if "enqueue" in w or "GPU" in w]
    table = render_perf_table(report)
    for word in ("Throughput", "Host latency", "p99", "batch 4", "onnxruntime"):
        assert word in table
    # Only what ONNX Runtime measured: no device rows, no GPU timing mode.
    for word in ("GPU Compute", "H2D", "D2H", "Enqueue", "GPU compute CV", "cuda_graph"):
        assert word not in table


def test_host_timing_is_told_from_the_timings_the_runner_reports() -> None:
    """A host runner's unstable latency is worded for the host; a device runner keeps trtexec's
    table and GPU warnings. Older reports without ``timing`` get it from their numbers."""
    host_times = [QueryTiming(v, v, 0.0, v, 0.0) for v in (1.0, 3.0)]
    host = benchmark(SleepRunner([0.2], reported=host_times), None, _fast(iterations=20))
    assert host.timing is TimingSource.HOST
    assert [w for w in host.warnings if w.startswith("Latency is unstable")]
    assert not [w for w in host.warnings if "GPU" in w]
    device_times = [QueryTiming(v + 0.4, 0.1, 0.2, v, 0.2) for v in (1.0, 3.0)]
    device = benchmark(SleepRunner([0.2], reported=device_times), None, _fast(iterations=20))
    assert device.timing is TimingSource.DEVICE
    assert [w for w in device.warnings if w.startswith("GPU compute time is unstable")]
    table = render_perf_table(device)
    for row in ("Latency", "Enqueue", "H2D", "GPU Compute", "D2H", "Mode: cuda_graph=no"):
        assert row in table
    assert "Host latency" not in table
    for report, expected in ((host, TimingSource.HOST), (device, TimingSource.DEVICE)):
        older = report.model_dump(mode="json")
        del older["timing"]
        assert PerfReport.model_validate(older).timing is expected


def test_sweep_batch_sizes_random_inputs(tiny_cnn_file: Path) -> None:
    stages: list[str] = []
    with OnnxRuntimeRunner(tiny_cnn_file, intra_op_threads=1) as runner:
        reports = sweep_batch_sizes(
            runner, None, _fast(iterations=3), [1, 8], progress=lambda s, f: stages.append(s)
        )
    assert [r.batch_size for r in reports] == [1, 8]
    assert all(r.input_source is InputSource.RANDOM for r in reports)
    assert any(s.startswith("batch 8:") for s in stages)
    assert all(math.isfinite(r.throughput_qps) and r.throughput_qps > 0 for r in reports)


class GraphRunner(SleepRunner):
    """A SleepRunner that takes a timing mode; its CUDA graph "capture" fails when told to."""

    def __init__(self, *, capture_fails: bool) -> None:
        super().__init__([1.0])
        self.capture_fails = capture_fails
        self.modes: list[TimingMode] = []
        self._mode = TimingMode()

    def set_timing_mode(self, mode: TimingMode) -> None:
        self.modes.append(mode)
        self._mode = mode

    @property
    def timing_mode(self) -> TimingMode:
        if self.capture_fails and self._mode.cuda_graph:
            return TimingMode(cuda_graph=False, spin_wait=self._mode.spin_wait)
        return self._mode


QUICK = BenchmarkOptions(warmup_ms=0, iterations=3, duration_s=0)


@pytest.mark.parametrize("capture_fails", [False, True])
def test_the_timing_mode_reaches_the_runner_and_the_report_says_what_was_used(
    capture_fails: bool,
) -> None:
    runner = GraphRunner(capture_fails=capture_fails)
    assert isinstance(runner, ConfigurableTiming)
    options = QUICK.model_copy(update={"cuda_graph": True, "spin_wait": True})
    report = benchmark(runner, None, options)
    assert runner.modes == [TimingMode(cuda_graph=True, spin_wait=True, use_transfers=True)]
    assert report.spin_wait is True and report.use_transfers is True
    assert report.cuda_graph is (not capture_fails)
    assert any("CUDA graph capture failed" in w for w in report.warnings) is capture_fails


@pytest.mark.parametrize(
    ("update", "field"),
    [
        ({"cuda_graph": True}, "cuda_graph"),
        ({"spin_wait": True}, "spin_wait"),
        ({"use_transfers": False}, "use_transfers"),
        ({"streams": 2}, "streams"),
    ],
)
def test_gpu_timing_modes_are_refused_by_host_runners(
    tiny_cnn_path: Path, update: dict[str, object], field: str
) -> None:
    with OnnxRuntimeRunner(tiny_cnn_path) as runner, pytest.raises(SpecError) as info:
        benchmark(runner, None, QUICK.model_copy(update=update))
    assert info.value.field == field
    report = benchmark(SleepRunner([0.1]), None, QUICK)  # the defaults are fine everywhere
    assert (report.cuda_graph, report.spin_wait, report.use_transfers) == (False, False, True)
