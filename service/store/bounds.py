"""Bounds on the sizes a build request asks for, from the settings (checked at submission).

The request schema already refuses nonsense (negative sizes, more than its absolute ceilings);
these are the deployment's bounds below that: a benchmark may not hold a build slot for hours, a
batch may not need gigabytes. A value above its bound answers 422 ``limit_exceeded`` naming the
request field and the setting that bounds it.
"""

from __future__ import annotations

from collections.abc import Iterator

from service.errors import LimitExceededError
from service.schemas import BuildCreate
from service.settings import Settings

__all__ = ["check_request_bounds", "request_bounds"]


def request_bounds(
    request: BuildCreate, settings: Settings
) -> Iterator[tuple[str, float | int | None, str, float | int]]:
    """(request field, value asked for, setting, bound) for every bounded size of ``request``."""
    benchmark, calibration, accuracy = request.benchmark, request.calibration, request.accuracy
    yield "benchmark.batch_size", benchmark.batch_size, "max_benchmark_batch_size", (
        settings.max_benchmark_batch_size
    )
    yield "benchmark.iterations", benchmark.iterations, "max_benchmark_iterations", (
        settings.max_benchmark_iterations
    )
    yield "benchmark.duration_s", benchmark.duration_s, "max_benchmark_duration_s", (
        settings.max_benchmark_duration_s
    )
    yield "benchmark.warmup_ms", benchmark.warmup_ms, "max_benchmark_warmup_ms", (
        settings.max_benchmark_warmup_ms
    )
    yield "calibration.batch_size", calibration.batch_size, "max_calibration_batch_size", (
        settings.max_calibration_batch_size
    )
    yield "calibration.max_samples", calibration.max_samples, "max_calibration_samples", (
        settings.max_calibration_samples
    )
    yield "accuracy.max_samples", accuracy.max_samples, "max_accuracy_samples", (
        settings.max_accuracy_samples
    )


def check_request_bounds(request: BuildCreate, settings: Settings) -> None:
    """Refuse a request asking for more than a setting allows (:class:`LimitExceededError`)."""
    for field, value, setting, bound in request_bounds(request, settings):
        if value is not None and value > bound:
            raise LimitExceededError(
                f"{field} is {value:,}, more than this server allows ({bound:,}).",
                hint=f"Ask for at most {bound:,}; the server's operator sets the bound with "
                f"TRTFORGE_{setting.upper()}.",
                field=field,
            )
