"""Commands that work on local files, with no server: calibrate and table."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from service.cli.options import (
    calibration_batch_option,
    handle_errors,
    max_samples_option,
    memory_limit_option,
    preprocess_option,
    spec_options,
    threads_option,
)
from service.cli.progress import sample_progress

if TYPE_CHECKING:
    from calibrators.data import CalibrationDataset
    from engines.spec import BuildSpec

__all__ = ["register"]


def _peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, unlike ru_maxrss, restarts at exec, so a
    parent's memory (inherited through fork) does not count."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _open_dataset(data: Path, preprocess: Path | None) -> CalibrationDataset:
    from calibrators.data import CalibrationDataset
    from calibrators.spec import PreprocessSpec

    spec = PreprocessSpec.load(preprocess) if preprocess is not None else None
    return CalibrationDataset.open(data, preprocess=spec)


def _trt_version(text: str | None) -> int | None:
    from calibrators.errors import TableError
    from calibrators.table import trt_version_number

    if text is None:
        return None
    try:
        return int(text) if text.isdigit() else trt_version_number(text)
    except ValueError as exc:
        raise TableError(
            f"--trt-version {text!r} is not a TensorRT version.", hint="Use e.g. 10.13.3 or 101303."
        ) from exc


@click.command()
@click.argument("model", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--data",
    "data",
    type=click.Path(path_type=Path, exists=True),
    required=True,
    help=".npz, directory or .zip of .npz shards, or .zip of images (with --preprocess).",
)
@spec_options(["calibration", "histogram"])
@calibration_batch_option
@max_samples_option
@memory_limit_option
@preprocess_option
@click.option(
    "--trt-version", default=None, help="TensorRT version the cache is written for (e.g. 10.13.3)."
)
@threads_option
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Table path: .json for JSON, anything else for TensorRT cache text.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@handle_errors
def calibrate(
    model: Path,
    data: Path,
    spec: BuildSpec,
    batch_size: int | None,
    max_samples: int | None,
    memory_limit_bytes: int | None,
    preprocess: Path | None,
    trt_version: str | None,
    threads: int | None,
    out: Path,
    as_json: bool,
) -> None:
    """Compute an INT8 calibration table for MODEL from a calibration dataset."""
    from calibrators.calibrate import calibrate as run_calibration

    method = spec.calibration.method.value
    version = _trt_version(trt_version)
    dataset = _open_dataset(data, preprocess)
    started = time.perf_counter()
    with sample_progress("calibrating", enabled=not as_json) as progress:
        table = run_calibration(
            model,
            dataset,
            spec.calibration,
            histogram=spec.histogram,
            batch_size=batch_size,
            max_samples=max_samples,
            threads=threads,
            progress=progress,
            memory_limit_bytes=memory_limit_bytes,
        )
    seconds = time.perf_counter() - started
    if version is not None:
        table = table.model_copy(update={"trt_version": version})
    table.save(out)
    summary = {
        "tensors": len(table.amax),
        "samples": table.samples,
        "seconds": round(seconds, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "method": method,
        "table": str(out),
        "model_sha256": table.model_sha256,
        "dataset_sha256": table.dataset_sha256,
    }
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(
            f"wrote {out}: {summary['tensors']} tensors from {table.samples} samples in {seconds:.1f} s ({method})"
        )


@click.group()
def table() -> None:
    """Convert and inspect calibration tables."""


@table.command("convert")
@click.argument("source", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.argument("dest", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--trt-version", default=None, help="TensorRT version written in the cache header.")
@handle_errors
def table_convert(source: Path, dest: Path, trt_version: str | None) -> None:
    """Convert SOURCE to DEST (TensorRT cache text <-> JSON, by suffix)."""
    from calibrators.table import CalibrationTable

    loaded = CalibrationTable.load(source)
    version = _trt_version(trt_version)
    if version is not None:
        loaded = loaded.model_copy(update={"trt_version": version})
    loaded.save(dest)
    click.echo(f"wrote {dest} ({len(loaded.amax)} tensors)")


@table.command("show")
@click.argument("source", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def table_show(source: Path, top: int, as_json: bool) -> None:
    """Summarize a table: algorithm, counts, and the widest ranges."""
    from calibrators.table import CalibrationTable

    loaded = CalibrationTable.load(source)
    widest = sorted(loaded.amax.items(), key=lambda kv: kv[1], reverse=True)[:top]
    values = np.array(list(loaded.amax.values()), dtype=np.float64)
    info: dict[str, Any] = {
        "algorithm": str(loaded.algorithm),
        "trt_version": loaded.trt_version,
        "method": str(loaded.method) if loaded.method else None,
        "samples": loaded.samples,
        "tensors": len(loaded.amax),
        "zero_ranges": int(np.sum(values == 0)),
        "median_amax": float(np.median(values)) if values.size else None,
        "widest": [{"tensor": k, "amax": v, "scale": loaded.scale(k)} for k, v in widest],
    }
    if as_json:
        click.echo(json.dumps(info))
        return
    click.echo(f"{source.name}: {info['tensors']} tensors, {info['algorithm']}")
    if info["method"] is None and not info["samples"]:
        # a TensorRT cache holds the header and the scales only
        click.echo(
            f"TensorRT {info['trt_version'] or '-'} cache: method and sample count not recorded "
            "(a TensorRT cache stores scales only; trtforge's .json twin keeps them)"
        )
    else:
        click.echo(f"method {info['method'] or '-'}, samples {info['samples']}")
    click.echo(f"zero ranges: {info['zero_ranges']}; median amax: {info['median_amax']}")
    click.echo(f"{'amax':>12}  {'scale':>12}  tensor")
    for row in info["widest"]:
        click.echo(f"{row['amax']:12.6g}  {row['scale']:12.6g}  {row['tensor']}")


def register(group: click.Group) -> None:
    """Add the local commands to the root group."""
    group.add_command(calibrate)
    group.add_command(table)
