"""What every `trtforge` command shares: the error handler and the options defined once."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import ParamSpec, TypeVar

import click

from core.errors import TrtforgeError
from engines.names import BackendName

__all__ = [
    "backend_option",
    "calibration_batch_option",
    "fail",
    "handle_errors",
    "max_samples_option",
    "memory_limit_option",
    "method_option",
    "preprocess_option",
    "threads_option",
]

P = ParamSpec("P")
R = TypeVar("R")


def fail(message: str, hint: str = "") -> None:
    """Print one clear line (plus a hint line) on stderr and exit non-zero."""
    click.echo(f"error: {message}", err=True)
    if hint:
        click.echo(f"hint: {hint}", err=True)
    raise SystemExit(2)


backend_option = click.option(
    "--backend",
    type=click.Choice([name.value for name in BackendName]),
    default=BackendName.AUTO.value,
    show_default=True,
    help="auto: TensorRT where it can run (installed, NVIDIA GPU), else ONNX Runtime.",
)
"""``--backend``: the backend registry's names (:mod:`engines.backends.registry`)."""

calibration_batch_option = click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Calibration batch (default: what fits --memory-limit).",
)
max_samples_option = click.option(
    "--max-samples",
    type=click.IntRange(min=1),
    default=None,
    help="Calibrate on the first N samples only.",
)
threads_option = click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads for ONNX Runtime and for binning activations (default: all available).",
)
"""The dataset options every command that calibrates shares (with --memory-limit, --preprocess)."""

method_option = click.option(
    "--method",
    type=click.Choice(["auto", "entropy", "minmax", "percentile", "mse"]),
    default="auto",
    show_default=True,
    help="Calibration method; auto picks per tensor the candidate range (entropy, minmax, "
    "percentiles, mse) with the least error at the layers reading it.",
)
"""``--method``: the calibration method, shared by every command that calibrates."""

preprocess_option = click.option(
    "--preprocess",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="JSON preprocessing spec for image zips.",
)
"""``--preprocess``: shared by every command that reads a dataset."""


def _byte_size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    from calibrators.memory import parse_byte_size

    try:
        return None if value is None else parse_byte_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


memory_limit_option = click.option(
    "--memory-limit",
    "memory_limit_bytes",
    default="1GiB",
    show_default=True,
    callback=_byte_size,
    help="Memory for calibration activations (1GiB, 512MiB, 2GB or bytes): ONNX Runtime runs "
    "micro-batches, and groups of tensors, that fit it whatever --batch-size is.",
)
"""``--memory-limit``: shared by every command that collects calibration statistics."""


def handle_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn trtforge errors (and the usual OS errors) into one line on stderr, no traceback."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except TrtforgeError as exc:
            fail(exc.message, exc.hint)
        except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            fail(f"{exc.strerror}: {exc.filename}")
        except KeyboardInterrupt:
            fail("interrupted")
        raise AssertionError("unreachable")

    return wrapper
