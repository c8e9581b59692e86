"""The benchmark report in trtexec's vocabulary and the options that produce it: light types the
wire schemas take. Measuring is :func:`engines.benchmark.benchmark`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import StrEnum
from fractions import Fraction
from statistics import fmean
from typing import Any

from pydantic import Field, model_validator

from engines.frozen import FrozenModel

__all__ = [
    "BenchmarkOptions",
    "InputSource",
    "PerfReport",
    "TimingSource",
    "TimingStats",
    "median",
    "percentile",
]


class InputSource(StrEnum):
    """Where benchmark inputs come from."""

    DATASET = "dataset"
    """Real samples (a dataset or given feeds), rotated."""
    RANDOM = "random"
    """Seeded random data in the model's input shapes."""


class TimingSource(StrEnum):
    """What a runner measured per query (decided from the timings it reported,
    :func:`engines.benchmark.benchmark`)."""

    HOST = "host"
    """The host's wall clock around one synchronous query (ONNX Runtime): latency only. The
    report's enqueue and GPU compute columns repeat it and its transfers are zero; they are not
    device measurements."""
    DEVICE = "device"
    """CUDA events around each stage on the GPU (TensorRT): H2D, GPU compute, D2H and latency,
    plus the host's enqueue time."""


class BenchmarkOptions(FrozenModel):
    """How to measure. Defaults are trtexec's (200 ms warm-up, 10 iterations, 3 s)."""

    warmup_ms: float = Field(default=200.0, ge=0)
    iterations: int = Field(default=10, ge=1)
    duration_s: float = Field(default=3.0, ge=0)
    batch_size: int | None = Field(default=None, ge=1)
    """Samples per query; ``None``: 1, or the batch of the given feeds."""
    input_source: InputSource | None = None
    """``None``: the dataset or feeds when given, else random."""
    seed: int = 0
    shapes: dict[str, tuple[int, ...]] = Field(default_factory=dict)
    """Concrete shapes for random inputs (e.g. each profile's opt shape); symbolic dims not given
    here are 1, except the batch axis, which is ``batch_size``."""
    max_input_batches: int = Field(default=16, ge=1)
    """Distinct dataset batches held in memory and rotated through."""
    cuda_graph: bool = False
    """TensorRT: launch a CUDA graph captured from the enqueue (trtexec ``--useCudaGraph``)."""
    spin_wait: bool = False
    """TensorRT: poll for completion instead of a blocking wait (``--useSpinWait``)."""
    use_transfers: bool = True
    """TensorRT: False leaves host/device copies out of timed queries (``--noDataTransfers``)."""
    streams: int = Field(default=1, ge=1)
    """Only 1: queries are measured one at a time on one stream."""


class TimingStats(FrozenModel):
    """Summary of one timing over the timed queries, in milliseconds (module docstring)."""

    min_ms: float
    max_ms: float
    mean_ms: float
    median_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float

    @classmethod
    def from_samples(cls, values_ms: Sequence[float]) -> TimingStats:
        if not values_ms:
            raise ValueError("no timings to summarize")
        ordered = sorted(values_ms)
        return cls(
            min_ms=ordered[0],
            max_ms=ordered[-1],
            mean_ms=fmean(ordered),
            median_ms=median(ordered),
            p90_ms=percentile(ordered, 90),
            p95_ms=percentile(ordered, 95),
            p99_ms=percentile(ordered, 99),
        )


class PerfReport(FrozenModel):
    """One benchmark's numbers, trtexec vocabulary, units in the field names."""

    throughput_qps: float
    """Samples per second: timed queries x batch size / total host wall time."""
    queries: int
    """Timed queries (at least ``iterations``)."""
    batch_size: int
    latency: TimingStats
    enqueue: TimingStats
    h2d: TimingStats
    gpu_compute: TimingStats
    d2h: TimingStats
    total_host_walltime_s: float
    total_gpu_compute_s: float
    coefficient_of_variation_percent: float
    """Of GPU compute time (host-timed: of latency, which it repeats): population std / mean
    x 100."""
    warmup_ms: float
    warmup_queries: int
    duration_s: float
    iterations: int
    input_source: InputSource
    seed: int
    cuda_graph: bool
    """The timing mode in effect (a failed CUDA graph capture falls back to plain enqueues)."""
    spin_wait: bool
    use_transfers: bool
    streams: int
    timing: TimingSource = TimingSource.DEVICE
    """What the runner measured; reports written before it was recorded get it from their
    numbers (:meth:`_infer_timing`)."""
    environment: dict[str, str] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _infer_timing(cls, data: Any) -> Any:
        """A report without ``timing`` is host-timed when its numbers have a host timing's shape:
        no transfers, and enqueue and GPU compute equal to latency."""
        if not isinstance(data, dict) or "timing" in data:
            return data
        stats = [_stats_dict(data.get(name)) for name in ("latency", "enqueue", "gpu_compute")]
        transfers = [_stats_dict(data.get(name)) for name in ("h2d", "d2h")]
        host = (
            all(s is not None for s in stats + transfers)
            and stats[0] == stats[1] == stats[2]
            and all(t is not None and not any(t.values()) for t in transfers)
        )
        return {**data, "timing": TimingSource.HOST if host else TimingSource.DEVICE}


def _stats_dict(value: Any) -> dict[str, Any] | None:
    if isinstance(value, TimingStats):
        return value.model_dump()
    return value if isinstance(value, dict) else None


def percentile(sorted_ms: Sequence[float], p: float) -> float:
    """trtexec's percentile of ascending ``sorted_ms`` (module docstring)."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    n = len(sorted_ms)
    if n == 0:
        raise ValueError("no timings")
    exclude = math.floor((1 - Fraction(repr(float(p))) / 100) * n)
    return float(sorted_ms[max(n - 1 - exclude, 0)])


def median(sorted_ms: Sequence[float]) -> float:
    """Middle value of ascending ``sorted_ms``; mean of the two middle ones when N is even."""
    n = len(sorted_ms)
    if n == 0:
        raise ValueError("no timings")
    m = n // 2
    return float(sorted_ms[m]) if n % 2 else (sorted_ms[m - 1] + sorted_ms[m]) / 2
