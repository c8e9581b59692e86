"""Local measurement commands: bench, compare, sweep. No server involved."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from engines.spec import Precision
from service.cli.engines import dataset_from_options, labels_from_file
from service.cli.options import handle_errors, preprocess_option, spec_options
from service.cli.progress import stage_progress

if TYPE_CHECKING:
    from engines.spec import BuildSpec

__all__ = ["register", "render_accuracy"]


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--data",
    type=click.Path(path_type=Path, exists=True),
    default=None,
    help="Real samples to rotate through (default: seeded random inputs).",
)
@preprocess_option
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
    "--cuda-graph", is_flag=True, help="TensorRT: launch a CUDA graph of the enqueue (trtexec's)."
)
@click.option("--spin-wait", is_flag=True, help="TensorRT: poll for completion, no blocking wait.")
@click.option(
    "--no-transfers",
    is_flag=True,
    help="TensorRT: leave host<->device copies out of the timed queries.",
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
    cuda_graph: bool,
    spin_wait: bool,
    no_transfers: bool,
    out: Path | None,
    as_json: bool,
) -> None:
    """Measure latency and throughput of ARTIFACT (trtexec's procedure and vocabulary)."""
    from engines.backends.registry import open_artifact
    from engines.benchmark import benchmark, render_perf_table
    from engines.errors import SpecError
    from engines.perf_report import BenchmarkOptions

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
    dataset = dataset_from_options(data, preprocess) if data is not None else None
    reports = []
    with open_artifact(artifact, threads=threads) as runner:
        for size in sizes:
            options = BenchmarkOptions(
                warmup_ms=warmup_ms,
                iterations=iterations,
                duration_s=duration_s,
                batch_size=size,
                seed=seed,
                shapes=dims,
                cuda_graph=cuda_graph,
                spin_wait=spin_wait,
                use_transfers=not no_transfers,
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
@preprocess_option
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
    multiple=True,
    help="Fail an output when |candidate - reference| > atol + rtol*|reference| anywhere. "
    "VALUE for every output, or OUTPUT:VALUE for one (repeatable, like Polygraphy).",
)
@click.option("--rtol", multiple=True, help="VALUE or OUTPUT:VALUE (repeatable).")
@click.option(
    "--budget",
    default=None,
    help="METRIC:VALUE that must hold, e.g. top1_agreement:0.99, cosine:0.999, sqnr_db:30.",
)
@click.option(
    "--class-axis",
    multiple=True,
    help="AXIS or OUTPUT:AXIS holding class scores (repeatable), e.g. 1 for [N, C, H, W]; "
    "default: the last axis of [N, C], [N, T, C] and channels-last outputs.",
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
    atol: tuple[str, ...],
    rtol: tuple[str, ...],
    budget: str | None,
    class_axis: tuple[str, ...],
    threads: int | None,
    out: Path | None,
    as_json: bool,
) -> None:
    """Compare ARTIFACT's outputs with the FP32 model's; exit 1 when tolerances or budget fail."""
    from engines.accuracy import compare as compare_outputs
    from engines.accuracy_report import MetricBudget
    from engines.backends.onnxruntime import OnnxRuntimeRunner
    from engines.backends.registry import open_artifact
    from engines.errors import SpecError

    tolerance = tolerances_from_options(atol, rtol)
    try:
        parsed = MetricBudget.parse(budget) if budget else None
    except ValueError as exc:
        raise SpecError(f"--budget {budget!r}: {exc}", field="budget") from exc
    dataset = dataset_from_options(data, preprocess)
    with (
        OnnxRuntimeRunner(reference, intra_op_threads=threads) as ref,
        open_artifact(artifact, threads=threads) as cand,
        stage_progress("comparing", enabled=not as_json) as progress,
    ):
        unknown = sorted(n for n in tolerance or {} if n != "*" and n not in cand.output_names)
        if unknown:
            raise SpecError(
                f"--atol/--rtol name output(s) the artifact lacks: {', '.join(unknown)}.",
                hint=f"Its outputs: {', '.join(cand.output_names)}.",
                field="atol",
            )
        report = compare_outputs(
            ref,
            cand,
            dataset,
            batch_size=batch_size,
            max_samples=max_samples,
            labels=labels_from_file(labels),
            tolerances=tolerance,
            budget=parsed,
            progress=progress,
            class_axis=_class_axes(class_axis),
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


def _class_axes(texts: tuple[str, ...]) -> int | dict[str, int] | None:
    """``--class-axis``: one AXIS for every output, or OUTPUT:AXIS per output."""
    from engines.errors import SpecError

    if not texts:
        return None
    axes: dict[str, int] = {}
    for text in texts:
        name, _, axis = text.rpartition(":")
        try:
            axes[name or "*"] = int(axis)
        except ValueError as exc:
            raise SpecError(
                f"--class-axis {text!r} is not AXIS or OUTPUT:AXIS.",
                hint="e.g. --class-axis 1 or --class-axis logits:1",
                field="class_axis",
            ) from exc
    return axes["*"] if list(axes) == ["*"] else axes


@click.command()
@click.argument("model", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--data",
    type=click.Path(path_type=Path, exists=True),
    required=True,
    help="Calibration + held-out evaluation samples.",
)
@preprocess_option
@click.option(
    "--variants",
    default=",".join(precision.value for precision in Precision),
    show_default=True,
    help=f"Comma-separated: {', '.join(precision.value for precision in Precision)}, "
    "auto:METRIC:VALUE.",
)
@spec_options(exclude=["precision"])
@click.option(
    "--eval-fraction",
    type=click.FloatRange(0.01, 0.9),
    default=0.2,
    show_default=True,
    help="Share of --data held out for evaluation (without --eval-data).",
)
@click.option(
    "--eval-data",
    type=click.Path(path_type=Path, exists=True),
    default=None,
    help="Separate evaluation samples (same --preprocess); then all of --data calibrates.",
)
@click.option(
    "--table",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="A calibration table for this model (cache text or .json) instead of calibrating.",
)
@click.option(
    "--labels",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help=".npy of int labels, one per --data sample (per --eval-data sample with --eval-data).",
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
    spec: BuildSpec,
    eval_fraction: float,
    eval_data: Path | None,
    table: Path | None,
    labels: Path | None,
    batch_size: int,
    duration_s: float,
    warmup_ms: float,
    out_dir: Path,
    as_json: bool,
) -> None:
    """Build, benchmark and compare precision variants of MODEL (every other spec option applies
    to each); report the Pareto front."""
    from calibrators.table import CalibrationTable
    from engines.perf_report import BenchmarkOptions
    from engines.sweep import render_markdown
    from engines.sweep import sweep as run_sweep

    options = BenchmarkOptions(batch_size=batch_size, duration_s=duration_s, warmup_ms=warmup_ms)
    out_dir.mkdir(parents=True, exist_ok=True)
    with stage_progress("sweeping", enabled=not as_json) as progress:
        report = run_sweep(
            model,
            dataset_from_options(data, preprocess),
            [v.strip() for v in variants.split(",") if v.strip()],
            out_dir=out_dir,
            backend=spec.backend,
            eval_fraction=eval_fraction,
            eval_dataset=dataset_from_options(eval_data, preprocess) if eval_data else None,
            table=CalibrationTable.load(table) if table else None,
            benchmark_options=options,
            labels=labels_from_file(labels),
            base_spec=spec,
            progress=progress,
        )
    if as_json:
        click.echo(report.model_dump_json())
    else:
        click.echo(render_markdown(report))
        click.echo(
            f"\nwrote {out_dir / 'sweep.md'}, {out_dir / 'sweep.json'}, {out_dir / 'sweep.svg'}"
        )


def tolerances_from_options(atol: Sequence[str], rtol: Sequence[str]) -> dict[str, Any] | None:
    """``--atol``/``--rtol`` items (``VALUE`` or ``OUTPUT:VALUE``) -> output name (``*``: every
    output not named) -> Tolerance; a bound not given is 0. None when neither option is given."""
    from engines.accuracy_report import Tolerance
    from engines.errors import SpecError

    given: dict[str, dict[str, float]] = {"atol": {}, "rtol": {}}
    for option, items in (("atol", atol), ("rtol", rtol)):
        for item in items:
            name, _, text = item.rpartition(":")
            try:
                value = float(text)
            except ValueError:
                value = float("nan")
            if not value >= 0:  # also refuses NaN
                raise SpecError(
                    f"--{option} {item!r} needs a number >= 0, as VALUE or OUTPUT:VALUE.",
                    hint=f"e.g. --{option} 1e-3 or --{option} logits:1e-3",
                    field=option,
                )
            given[option][name or "*"] = value
    names = set(given["atol"]) | set(given["rtol"])
    if not names:
        return None
    return {
        name: Tolerance(
            atol=given["atol"].get(name, given["atol"].get("*", 0.0)),
            rtol=given["rtol"].get(name, given["rtol"].get("*", 0.0)),
        )
        for name in names
    }


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
    """Add the measurement commands to the root group."""
    for command in (bench, compare, sweep):
        group.add_command(command)

