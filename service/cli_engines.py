"""Local engine commands: build, bench, compare (and sweep). No server involved."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from service.cli import handle_errors
from service.progress import sample_progress, stage_progress

if TYPE_CHECKING:
    from calibrators.data import CalibrationDataset
    from calibrators.table import CalibrationTable
    from engines.backends.base import Runner
    from engines.spec import BuildSpec

__all__ = ["load_runner", "register"]


def load_runner(path: Path, *, threads: int | None = None) -> Runner:
    """Open an artifact with the backend its sidecar names; a bare .onnx opens in ONNX Runtime."""
    from engines.artifacts import read_metadata, sidecar_path
    from engines.backends.onnxruntime import OnnxRuntimeRunner

    if sidecar_path(path).exists() and read_metadata(path).backend == "tensorrt":
        from engines.backends.tensorrt import TensorRTBackend

        return TensorRTBackend().load(path)
    return OnnxRuntimeRunner(path, intra_op_threads=threads)


def _dataset(data: Path, preprocess: Path | None) -> CalibrationDataset:
    from calibrators.data import CalibrationDataset, PreprocessSpec

    return CalibrationDataset.open(
        data, preprocess=PreprocessSpec.load(preprocess) if preprocess else None
    )


def _labels(path: Path | None) -> np.ndarray | None:
    if path is None:
        return None
    from calibrators.errors import DatasetError

    try:
        labels: np.ndarray = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DatasetError(
            f"--labels {path.name} is not a plain .npy array: {exc}", field="labels"
        ) from exc
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DatasetError(
            f"--labels must be a 1-D integer array, got {labels.dtype} {labels.shape}.",
            field="labels",
        )
    return np.asarray(labels, dtype=np.int64)


def _build_spec(
    precision: str,
    method: str,
    percentile: float | None,
    backend: str,
    mode: str,
    keep: tuple[str, ...],
    keep_fp16: tuple[str, ...],
    shapes: tuple[str, ...],
) -> BuildSpec:
    from calibrators.methods import method_spec
    from engines.errors import SpecError
    from engines.spec import BuildSpec, KeepRules, ShapeProfile

    profiles: dict[str, ShapeProfile] = {}
    for item in shapes:
        name, sep, text = item.rpartition(":")
        if not sep or not name:
            raise SpecError(
                f"--shapes {item!r} needs NAME:MIN/OPT/MAX.",
                hint="e.g. --shapes input:1x3x224x224/8x3x224x224/32x3x224x224",
                field="shapes",
            )
        try:
            profiles[name] = ShapeProfile.parse(text)
        except ValueError as exc:
            raise SpecError(f"--shapes {item!r}: {exc}", field="shapes") from exc
    try:
        params = {"percentile": percentile} if percentile is not None else {}
        return BuildSpec(
            precision=precision,
            calibration=method_spec(method, **params),
            backend=backend,
            mode=mode,
            profiles=profiles,
            keep=KeepRules(int8=keep, fp16=keep_fp16),
        )
    except ValueError as exc:
        raise SpecError(f"Invalid build options: {exc}", field="spec") from exc


def _table_for_build(
    model: Path,
    spec: BuildSpec,
    table: Path | None,
    data: Path | None,
    preprocess: Path | None,
    eval_fraction: float,
    quiet: bool,
) -> tuple[CalibrationTable | None, CalibrationDataset | None, list[int]]:
    """(table, held-out split, its sample positions) for a build: loaded or calibrated from --data.

    Calibration never sees the held-out samples, so an accuracy budget is judged on unseen data.
    """
    from calibrators.calibrate import calibrate
    from calibrators.table import CalibrationTable

    dataset = _dataset(data, preprocess) if data is not None else None
    evaluation = None
    positions: list[int] = []
    if dataset is not None and eval_fraction > 0:
        calibration_idx, positions = dataset.split_indices(eval_fraction, seed=0)
        dataset, evaluation = dataset.subset(calibration_idx), dataset.subset(positions)
    if not spec.precision.uses_int8:
        return None, evaluation, positions
    if table is not None:
        return CalibrationTable.load(table), evaluation, positions
    if dataset is None:
        from engines.errors import SpecError

        raise SpecError(
            f"--precision {spec.precision.value} needs --data (to calibrate) or --table.",
            field="data",
        )
    with sample_progress("calibrating", enabled=not quiet) as progress:
        calibrated = calibrate(
            model, dataset, spec.calibration, histogram=spec.histogram, progress=progress
        )
    return calibrated, evaluation, positions


@click.command()
@click.argument("model", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "int8", "int8-fp16"]),
    default="int8-fp16",
    show_default=True,
)
@click.option(
    "--data",
    type=click.Path(path_type=Path, exists=True),
    default=None,
    help="Calibration dataset (INT8 without --table).",
)
@click.option(
    "--table",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="A calibration table (cache text or .json).",
)
@click.option(
    "--preprocess", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None
)
@click.option(
    "--method",
    type=click.Choice(["entropy", "minmax", "percentile", "mse"]),
    default="entropy",
    show_default=True,
)
@click.option("--percentile", type=float, default=None)
@click.option(
    "--backend",
    type=click.Choice(["auto", "tensorrt", "onnxruntime"]),
    default="auto",
    show_default=True,
)
@click.option(
    "--mode",
    type=click.Choice(["explicit", "implicit"]),
    default="explicit",
    show_default=True,
    help="TensorRT: explicit Q/DQ (10.x and 11.x) or implicit calibration (10.x only).",
)
@click.option(
    "--keep", multiple=True, help="Node name, op type or re:REGEX kept out of INT8 (repeatable)."
)
@click.option(
    "--keep-fp16",
    multiple=True,
    help="Node name, op type or re:REGEX kept out of FP16 (repeatable).",
)
@click.option(
    "--shapes",
    multiple=True,
    help="NAME:MIN/OPT/MAX optimization profile, e.g. input:1x3x224x224/8x3x224x224/32x3x224x224.",
)
@click.option(
    "--accuracy-budget",
    default=None,
    help="METRIC:VALUE, e.g. top1_agreement:0.99 or cosine:0.999: keep the most sensitive nodes out of INT8 until met.",
)
@click.option(
    "--eval-fraction",
    type=click.FloatRange(0, 0.9),
    default=0.2,
    show_default=True,
    help="Share of --data held out for the accuracy budget.",
)
@click.option(
    "--labels",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help=".npy of int labels for --data (accuracy_drop budgets).",
)
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def build(
    model: Path,
    precision: str,
    data: Path | None,
    table: Path | None,
    preprocess: Path | None,
    method: str,
    percentile: float | None,
    backend: str,
    mode: str,
    keep: tuple[str, ...],
    keep_fp16: tuple[str, ...],
    shapes: tuple[str, ...],
    accuracy_budget: str | None,
    eval_fraction: float,
    labels: Path | None,
    out: Path,
    as_json: bool,
) -> None:
    """Build a deployable artifact (TensorRT engine or Q/DQ / FP16 ONNX) from MODEL."""
    from engines.build import build_artifact

    started = time.perf_counter()
    spec = _build_spec(precision, method, percentile, backend, mode, keep, keep_fp16, shapes)
    loaded, evaluation, positions = _table_for_build(
        model, spec, table, data, preprocess, eval_fraction if accuracy_budget else 0.0, as_json
    )
    mixed: dict[str, Any] | None = None
    if accuracy_budget is not None:
        held_labels = _labels(labels)
        if held_labels is not None:
            held_labels = held_labels[np.asarray(positions, dtype=np.int64)]
        spec, mixed = _search_budget(
            model, spec, loaded, evaluation, accuracy_budget, held_labels, as_json
        )
    with stage_progress("building", enabled=not as_json) as progress:
        artifact = build_artifact(model, spec, loaded, out, progress=progress)
    meta = artifact.metadata
    summary: dict[str, Any] = {
        "artifact": str(artifact.path),
        "metadata": str(artifact.metadata_path),
        "backend": meta.backend,
        "precision": meta.precision,
        "seconds": round(time.perf_counter() - started, 3),
        "quantized_nodes": len(meta.quantized_nodes),
        "kept_nodes": meta.kept_nodes,
    }
    if mixed is not None:
        summary["mixed_precision"] = mixed
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(
        f"wrote {artifact.path} ({meta.size_bytes / 1e6:.1f} MB, {meta.backend} {meta.backend_version}, {meta.precision}) in {summary['seconds']} s"
    )
    click.echo(f"backend: {meta.backend_reason}")
    if meta.quantized_nodes or meta.kept_nodes:
        click.echo(
            f"INT8 nodes: {len(meta.quantized_nodes)}; kept in higher precision: {len(meta.kept_nodes)}"
        )
    if mixed is not None:
        click.echo(
            f"accuracy budget {accuracy_budget}: reached {mixed['value_reached']} (full INT8: {mixed['value_full_int8']}), kept {len(mixed['kept_nodes'])} node(s) out of INT8, {mixed['int8_share']:.0%} of quantizable nodes still INT8"
        )


def _search_budget(
    model: Path,
    spec: BuildSpec,
    table: CalibrationTable | None,
    evaluation: CalibrationDataset | None,
    budget_text: str,
    labels: np.ndarray | None,
    quiet: bool,
) -> tuple[BuildSpec, dict[str, Any]]:
    from engines.errors import SpecError

    if table is None or evaluation is None or len(evaluation) == 0:
        raise SpecError(
            "--accuracy-budget needs an INT8 precision and --data with held-out samples.",
            hint="Pass --data and keep --eval-fraction above 0.",
            field="accuracy_budget",
        )
    from engines.accuracy import MetricBudget
    from engines.mixed import search_mixed_precision

    try:
        budget = MetricBudget.parse(budget_text)
    except ValueError as exc:
        raise SpecError(
            f"--accuracy-budget {budget_text!r}: {exc}", field="accuracy_budget"
        ) from exc
    with stage_progress("searching precision", enabled=not quiet) as progress:
        result = search_mixed_precision(
            model, table, spec, evaluation, budget, labels=labels, progress=progress
        )
    new_spec = result.apply_to(spec)
    return new_spec, result.model_dump(mode="json")


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--data",
    type=click.Path(path_type=Path, exists=True),
    default=None,
    help="Real samples to rotate through (default: seeded random inputs).",
)
@click.option(
    "--preprocess", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=None, help="Samples per query (default 1)."
)
@click.option(
    "--batch-sweep",
    default=None,
    help="Comma-separated batch sizes to measure one after another, e.g. 1,8,32.",
)
@click.option("--warmup-ms", type=click.FloatRange(min=0), default=200.0, show_default=True)
@click.option("--iterations", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--duration-s", type=click.FloatRange(min=0), default=3.0, show_default=True)
@click.option(
    "--shapes",
    multiple=True,
    help="NAME:DIMS for random inputs of dynamic models, e.g. input_ids:1x128.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads."
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write the PerfReport JSON here.",
)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def bench(
    artifact: Path,
    data: Path | None,
    preprocess: Path | None,
    batch_size: int | None,
    batch_sweep: str | None,
    warmup_ms: float,
    iterations: int,
    duration_s: float,
    shapes: tuple[str, ...],
    seed: int,
    threads: int | None,
    out: Path | None,
    as_json: bool,
) -> None:
    """Measure latency and throughput of ARTIFACT (trtexec's procedure and vocabulary)."""
    from engines.benchmark import BenchmarkOptions, benchmark, render_perf_table
    from engines.errors import SpecError

    dims: dict[str, tuple[int, ...]] = {}
    for item in shapes:
        name, _, text = item.rpartition(":")
        try:
            dims[name] = tuple(int(d) for d in text.lower().split("x"))
        except ValueError as exc:
            raise SpecError(
                f"--shapes {item!r} needs NAME:DIMS like input_ids:1x128.", field="shapes"
            ) from exc
    sizes = [int(b) for b in batch_sweep.split(",")] if batch_sweep else [batch_size or 1]
    dataset = _dataset(data, preprocess) if data is not None else None
    reports = []
    with load_runner(artifact, threads=threads) as runner:
        for size in sizes:
            options = BenchmarkOptions(
                warmup_ms=warmup_ms,
                iterations=iterations,
                duration_s=duration_s,
                batch_size=size,
                seed=seed,
                shapes=dims,
            )
            with stage_progress(f"benchmark batch {size}", enabled=not as_json) as progress:
                reports.append(benchmark(runner, dataset, options, progress=progress))
    payload = [r.model_dump(mode="json") for r in reports]
    if out is not None:
        out.write_text(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2))
    if as_json:
        click.echo(json.dumps(payload[0] if len(payload) == 1 else payload))
        return
    for report in reports:
        click.echo(render_perf_table(report))


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--model",
    "reference",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    required=True,
    help="The FP32 ONNX model the artifact was built from.",
)
@click.option(
    "--data",
    type=click.Path(path_type=Path, exists=True),
    required=True,
    help="Evaluation samples (not used for calibration).",
)
@click.option(
    "--preprocess", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None
)
@click.option(
    "--labels",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help=".npy of int class labels, one per sample: adds true accuracy.",
)
@click.option("--max-samples", type=click.IntRange(min=1), default=None)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option(
    "--atol",
    type=float,
    default=None,
    help="Fail an output when |candidate - reference| > atol + rtol*|reference| anywhere.",
)
@click.option("--rtol", type=float, default=None)
@click.option(
    "--budget",
    default=None,
    help="METRIC:VALUE that must hold, e.g. top1_agreement:0.99, cosine:0.999, sqnr_db:30.",
)
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write the AccuracyReport JSON here.",
)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def compare(
    artifact: Path,
    reference: Path,
    data: Path,
    preprocess: Path | None,
    labels: Path | None,
    max_samples: int | None,
    batch_size: int,
    atol: float | None,
    rtol: float | None,
    budget: str | None,
    threads: int | None,
    out: Path | None,
    as_json: bool,
) -> None:
    """Compare ARTIFACT's outputs with the FP32 model's; exit 1 when tolerances or budget fail."""
    from engines.accuracy import MetricBudget, Tolerance
    from engines.accuracy import compare as compare_outputs
    from engines.backends.onnxruntime import OnnxRuntimeRunner
    from engines.errors import SpecError

    tolerance = (
        Tolerance(atol=atol or 0.0, rtol=rtol or 0.0)
        if atol is not None or rtol is not None
        else None
    )
    try:
        parsed = MetricBudget.parse(budget) if budget else None
    except ValueError as exc:
        raise SpecError(f"--budget {budget!r}: {exc}", field="budget") from exc
    dataset = _dataset(data, preprocess)
    with (
        OnnxRuntimeRunner(reference, intra_op_threads=threads) as ref,
        load_runner(artifact, threads=threads) as cand,
        stage_progress("comparing", enabled=not as_json) as progress,
    ):
        report = compare_outputs(
            ref,
            cand,
            dataset,
            batch_size=batch_size,
            max_samples=max_samples,
            labels=_labels(labels),
            tolerances=tolerance,
            budget=parsed,
            progress=progress,
        )
    text = report.model_dump_json(indent=2)
    if out is not None:
        out.write_text(text)
    if as_json:
        click.echo(report.model_dump_json())
    else:
        click.echo(render_accuracy(report))
    if report.passed is False:
        raise SystemExit(1)


@click.command()
@click.argument("model", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--data",
    type=click.Path(path_type=Path, exists=True),
    required=True,
    help="Calibration + held-out evaluation samples.",
)
@click.option(
    "--preprocess", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None
)
@click.option(
    "--variants",
    default="fp32,fp16,int8,int8-fp16",
    show_default=True,
    help="Comma-separated: fp32, fp16, int8, int8-fp16, auto:METRIC:VALUE.",
)
@click.option(
    "--method",
    type=click.Choice(["entropy", "minmax", "percentile", "mse"]),
    default="entropy",
    show_default=True,
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "tensorrt", "onnxruntime"]),
    default="auto",
    show_default=True,
)
@click.option("--eval-fraction", type=click.FloatRange(0.01, 0.9), default=0.2, show_default=True)
@click.option(
    "--labels",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help=".npy of int labels for every --data sample.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Benchmark batch size.",
)
@click.option("--duration-s", type=click.FloatRange(min=0), default=3.0, show_default=True)
@click.option("--warmup-ms", type=click.FloatRange(min=0), default=200.0, show_default=True)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Folder for the artifacts and sweep.{json,md,svg}.",
)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def sweep(
    model: Path,
    data: Path,
    preprocess: Path | None,
    variants: str,
    method: str,
    backend: str,
    eval_fraction: float,
    labels: Path | None,
    batch_size: int,
    duration_s: float,
    warmup_ms: float,
    out_dir: Path,
    as_json: bool,
) -> None:
    """Build, benchmark and compare precision variants of MODEL; report the Pareto front."""
    from calibrators.methods import method_spec
    from engines.benchmark import BenchmarkOptions
    from engines.spec import BackendName, BuildSpec
    from engines.sweep import render_markdown
    from engines.sweep import sweep as run_sweep

    options = BenchmarkOptions(batch_size=batch_size, duration_s=duration_s, warmup_ms=warmup_ms)
    out_dir.mkdir(parents=True, exist_ok=True)
    with stage_progress("sweeping", enabled=not as_json) as progress:
        report = run_sweep(
            model,
            _dataset(data, preprocess),
            [v.strip() for v in variants.split(",") if v.strip()],
            out_dir=out_dir,
            backend=BackendName(backend),
            eval_fraction=eval_fraction,
            benchmark_options=options,
            labels=_labels(labels),
            base_spec=BuildSpec(calibration=method_spec(method)),
            progress=progress,
        )
    if as_json:
        click.echo(report.model_dump_json())
    else:
        click.echo(render_markdown(report))
        click.echo(
            f"\nwrote {out_dir / 'sweep.md'}, {out_dir / 'sweep.json'}, {out_dir / 'sweep.svg'}"
        )


def render_accuracy(report: Any) -> str:
    """A readable table of an AccuracyReport."""
    lines = [f"{report.samples} samples compared"]
    header = f"{'output':<24} {'max abs':>10} {'mean abs':>10} {'rel L2':>9} {'cosine':>9} {'SQNR dB':>8} {'top-1':>7} {'top-5':>7} {'acc drop':>9}"
    lines += [header, "-" * len(header)]

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for o in report.outputs:
        lines.append(
            f"{o.name[:24]:<24} {o.max_abs_error:>10.4g} {o.mean_abs_error:>10.4g} {o.rel_l2_error:>9.4f} "
            f"{o.cosine_similarity:>9.6f} {o.sqnr_db:>8.2f} {fmt(o.top1_agreement, '7.4f'):>7} "
            f"{fmt(o.top5_agreement, '7.4f'):>7} {fmt(o.accuracy_drop, '+9.4f'):>9}"
        )
    if report.budget is not None:
        lines.append(f"budget {report.budget}: {report.budget_value}")
    if report.passed is not None:
        lines.append("PASSED" if report.passed else "FAILED: " + "; ".join(report.failures))
    return "\n".join(lines)


def register(group: click.Group) -> None:
    """Add the engine commands to the root group."""
    for command in (build, bench, compare, sweep):
        group.add_command(command)
