"""Local engine commands: build (with calibration and accuracy budgets), and the helpers the
measurement commands share. No server involved."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from engines.accuracy_report import AccuracyMetric
from engines.names import BackendName, QdqExecution
from service.cli.options import (
    calibration_batch_option,
    enum_choice,
    handle_errors,
    max_samples_option,
    memory_limit_option,
    preprocess_option,
    spec_options,
    threads_option,
)
from service.cli.progress import CliRecorder, stage_progress

if TYPE_CHECKING:
    from calibrators.data import CalibrationDataset
    from calibrators.table import CalibrationTable
    from engines.backends.base import Artifact
    from engines.gate import GateResult
    from engines.spec import BuildSpec
    from engines.workflow import Split, Workflow

__all__ = ["dataset_from_options", "labels_from_file", "register"]


def dataset_from_options(data: Path, preprocess: Path | None) -> CalibrationDataset:
    from calibrators.data import CalibrationDataset
    from calibrators.spec import PreprocessSpec

    return CalibrationDataset.open(
        data, preprocess=PreprocessSpec.load(preprocess) if preprocess else None
    )


def labels_from_file(path: Path | None) -> np.ndarray | None:
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


def _workflow(model: Path, spec: BuildSpec, quiet: bool) -> Workflow:
    from engines.workflow import Workflow

    flow = Workflow(model, spec, recorder=CliRecorder(enabled=not quiet))
    click.get_current_context().call_on_close(flow.close)  # its prepared models' scratch folder
    return flow


def _split(
    flow: Workflow,
    data: Path | None,
    preprocess: Path | None,
    eval_fraction: float,
    labels: Path | None = None,
    *,
    max_samples: int | None = None,
) -> Split | None:
    """--data validated and split once: calibration never sees the held-out samples, so an
    accuracy budget or sensitivity is judged on unseen data."""
    if data is None:
        return None
    return flow.split(
        dataset_from_options(data, preprocess),
        eval_fraction=eval_fraction,
        labels=labels_from_file(labels),
        max_calibration_samples=max_samples,
    )


def _calibration(
    flow: Workflow,
    split: Split | None,
    table: Path | None,
    *,
    force: bool = False,
    memory_limit_bytes: int | None = None,
    batch_size: int | None = None,
    threads: int | None = None,
) -> CalibrationTable | None:
    from calibrators.table import CalibrationTable
    from engines.errors import SpecError

    if split is None and table is None and (force or flow.spec.precision.uses_int8):
        raise SpecError(
            f"--precision {flow.spec.precision.value} needs --data (to calibrate) or --table.",
            field="data",
        )
    given = CalibrationTable.load(table) if table is not None else None
    result = flow.calibrate(
        split.calibration if split else None,
        table=given,
        held_out=split.evaluation if split and split.held_out else None,
        force=force,
        memory_limit_bytes=memory_limit_bytes,
        batch_size=batch_size,
        threads=threads,
    )
    return result.table if result is not None else None


@click.command()
@click.argument("model", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@spec_options()
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
@preprocess_option
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
@memory_limit_option
@calibration_batch_option
@max_samples_option
@threads_option
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def build(
    model: Path,
    spec: BuildSpec,
    data: Path | None,
    table: Path | None,
    preprocess: Path | None,
    accuracy_budget: str | None,
    eval_fraction: float,
    labels: Path | None,
    memory_limit_bytes: int | None,
    batch_size: int | None,
    max_samples: int | None,
    threads: int | None,
    out: Path,
    as_json: bool,
) -> None:
    """Build a deployable artifact (TensorRT engine or Q/DQ / FP16 ONNX) from MODEL.

    With --data, a reduced-precision build is compared with FP32 on the held-out samples
    (--eval-fraction) and must pass the accuracy gate: a build that misses it exits 1 (errors exit 2),
    its artifact kept for inspection.
    """
    started = time.perf_counter()
    flow = _workflow(model, spec, as_json)
    gated = _gate_enabled(spec)
    split = _split(
        flow,
        data,
        preprocess,
        eval_fraction if accuracy_budget or gated else 0.0,
        labels,
        max_samples=max_samples,
    )
    loaded = _calibration(
        flow,
        split,
        table,
        memory_limit_bytes=memory_limit_bytes,
        batch_size=batch_size,
        threads=threads,
    )
    mixed: dict[str, Any] | None = None
    if accuracy_budget is not None:
        spec, mixed = _search_budget(flow, loaded, split, accuracy_budget)
    artifact = flow.build(out, loaded, spec=spec)
    gate_result = _check_gate(flow, artifact, split, spec, as_json) if gated else None
    meta = artifact.metadata
    summary: dict[str, Any] = {
        "artifact": str(artifact.path),
        "metadata": str(artifact.metadata_path),
        "backend": meta.backend,
        "precision": meta.precision,
        "seconds": round(time.perf_counter() - started, 3),
        "quantized_nodes": len(meta.quantized_nodes),
        "kept_nodes": meta.kept_nodes,
        "preparation": meta.preparation,
        "calibration_samples": loaded.samples if loaded is not None else None,
    }
    if mixed is not None:
        summary["mixed_precision"] = mixed
    if gate_result is not None:
        summary["gate"] = gate_result.model_dump(mode="json")
    if as_json:
        click.echo(json.dumps(summary))
    else:
        _print_build(artifact, summary, mixed, accuracy_budget)
    if gate_result is not None and not gate_result.passed:
        from engines.gate import gate_error

        error = gate_error(gate_result, spec.precision)
        click.echo(f"error: {error.message}", err=True)
        click.echo(f"hint: {error.hint}", err=True)
        raise SystemExit(1)  # built, but not good enough: 1 like compare's failed budget


def _print_build(
    artifact: Artifact, summary: dict[str, Any], mixed: dict[str, Any] | None, budget: str | None
) -> None:
    meta = artifact.metadata
    click.echo(
        f"wrote {artifact.path} ({meta.size_bytes / 1e6:.1f} MB, {meta.backend} {meta.backend_version}, {meta.precision}) in {summary['seconds']} s"
    )
    click.echo(f"backend: {meta.backend_reason}")
    prep = meta.preparation
    if "smoothing" in prep or "bias_correction" in prep:
        smoothed = len(prep.get("smoothing", {}).get("smoothed", []))
        corrected = len(prep.get("bias_correction", {}).get("corrected", []))
        judged = prep.get("smoothing", {}).get("judged")
        verdict = ""
        if judged:
            verdict = (
                f" ({'kept' if judged['kept'] else 'dropped'} by the whole-model check: "
                f"{judged['sqnr_smoothed_db']:.1f} vs {judged['sqnr_plain_db']:.1f} dB without)"
            )
        click.echo(
            f"smoothed activations: {smoothed}{verdict}; bias-corrected layers: {corrected}"
        )
    if "prequantized" in prep:
        click.echo("prequantized model: its own Q/DQ scales kept, nothing re-quantized")
    if meta.quantized_nodes or meta.kept_nodes:
        click.echo(
            f"INT8 nodes: {len(meta.quantized_nodes)}; kept in higher precision: {len(meta.kept_nodes)}"
        )
    if mixed is not None:
        met = "met" if mixed.get("budget_met", True) else "NOT met"
        click.echo(
            f"accuracy budget {budget}: {met} on the report split: {mixed['value_reached']} "
            f"(full INT8: {mixed['value_full_int8']}; search split: "
            f"{mixed.get('search_value_reached')}), kept {len(mixed['kept_nodes'])} node(s) out "
            f"of INT8, {mixed['int8_share']:.0%} of quantizable nodes still INT8"
        )
    gate = summary.get("gate")
    if gate is not None:
        verdict = "passed" if gate["passed"] else "FAILED"
        click.echo(
            f"accuracy gate ({gate['gate_text']}): {verdict} on {gate['samples']} held-out samples"
        )
    elif summary["precision"] != "fp32":
        click.echo("accuracy gate: not checked (pass --data to compare with FP32)")


def _gate_enabled(spec: BuildSpec) -> bool:
    from engines.gate import resolve_gate

    return resolve_gate(spec.gate, spec.precision).enabled


def _check_gate(
    flow: Workflow, artifact: Artifact, split: Split | None, spec: BuildSpec, quiet: bool
) -> GateResult | None:
    """Compare with FP32 on the held-out samples and check the gate; None without --data."""
    if split is None:
        return None
    accuracy = flow.evaluate(artifact, split.evaluation, labels=split.eval_labels)
    return flow.gate(accuracy, spec=spec)


def _search_budget(
    flow: Workflow, table: CalibrationTable | None, split: Split | None, budget_text: str
) -> tuple[BuildSpec, dict[str, Any]]:
    from engines.errors import SpecError

    if table is None or split is None or not split.held_out:
        raise SpecError(
            "--accuracy-budget needs an INT8 precision and --data with held-out samples.",
            hint="Pass --data and keep --eval-fraction above 0.",
            field="accuracy_budget",
        )
    from engines.accuracy_report import MetricBudget

    try:
        budget = MetricBudget.parse(budget_text)
    except ValueError as exc:
        raise SpecError(
            f"--accuracy-budget {budget_text!r}: {exc}", field="accuracy_budget"
        ) from exc
    result = flow.search_budget(table, split.evaluation, budget, labels=split.eval_labels)
    return result.apply_to(flow.spec), result.model_dump(mode="json")


@click.command()
@click.argument("model", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--data",
    type=click.Path(path_type=Path, exists=True),
    required=True,
    help="Calibration samples; --eval-fraction of them are held out to measure on.",
)
@preprocess_option
@click.option(
    "--table",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="A calibration table for MODEL instead of calibrating on --data.",
)
@spec_options(
    ["calibration", "histogram"],
    defaults={"precision": "int8", "backend": BackendName.ONNXRUNTIME.value},
)
@click.option("--eval-fraction", type=click.FloatRange(0.01, 0.9), default=0.2, show_default=True)
@click.option(
    "--metric",
    type=enum_choice(AccuracyMetric),
    default=AccuracyMetric.SQNR_DB.value,
    show_default=True,
    help="Accuracy metric against FP32 (accuracy/accuracy_drop need --labels).",
)
@click.option(
    "--labels",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help=".npy of int labels, one per --data sample.",
)
@click.option(
    "--samples", type=click.IntRange(min=1), default=32, show_default=True, help="Held-out samples."
)
@click.option(
    "--max-nodes",
    type=click.IntRange(min=0),
    default=None,
    help="Evaluate only the N nodes the cheap local-error proxy finds worst (default: all).",
)
@click.option(
    "--only-this", is_flag=True, help="Skip the 'all but this node' variants (half the work)."
)
@click.option(
    "--execution",
    type=enum_choice(QdqExecution),
    default=QdqExecution.REFERENCE.value,
    show_default=True,
    help="reference: Q/DQ computed as written (what TensorRT follows); onnxruntime: its integer kernels.",
)
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--all", "show_all", is_flag=True, help="Also list the nodes not evaluated.")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def sensitivity(
    model: Path,
    data: Path,
    preprocess: Path | None,
    table: Path | None,
    spec: BuildSpec,
    eval_fraction: float,
    metric: str,
    labels: Path | None,
    samples: int,
    max_nodes: int | None,
    only_this: bool,
    execution: str,
    threads: int | None,
    show_all: bool,
    out: Path | None,
    as_json: bool,
) -> None:
    """Rank MODEL's quantizable nodes by how much their INT8 quantization costs (by ONNX name)."""
    from engines.sensitivity import node_sensitivity

    flow = _workflow(model, spec, as_json)
    split = _split(flow, data, preprocess, eval_fraction, labels)
    loaded = _calibration(flow, split, table)
    if loaded is None or split is None or not split.held_out:
        from engines.errors import SpecError

        raise SpecError(
            "No held-out samples to measure sensitivity on.",
            hint="Pass more --data samples or raise --eval-fraction.",
            field="eval_fraction",
        )
    with stage_progress("ranking nodes", enabled=not as_json) as progress:
        report = node_sensitivity(
            model,
            loaded,
            spec,
            split.evaluation,
            metric=AccuracyMetric(metric),
            labels=split.eval_labels,
            max_nodes=max_nodes,
            all_but_this=not only_this,
            samples=samples,
            threads=threads,
            execution=QdqExecution(execution),
            progress=progress,
        )
    if out is not None:
        out.write_text(report.model_dump_json(indent=2))
    if as_json:
        click.echo(report.model_dump_json())
        return
    click.echo(render_sensitivity(report, show_all=show_all))


def render_sensitivity(report: Any, *, show_all: bool = False) -> str:
    """The ranked nodes as a readable table: the evaluated ones (all with ``show_all``)."""

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.4g}"

    metric = report.metric.value
    lines = [
        f"{report.quantizable_nodes} quantizable nodes, {report.evaluated_nodes} evaluated on "
        f"{report.samples} held-out samples ({report.evaluations} variants, {report.seconds:.1f} s, "
        f"Q/DQ {report.execution.value}); {metric} "
        f"{'higher' if report.higher_is_better else 'lower'} is better",
        f"{'rank':>4}  {'only this INT8':>14}  {'all but this':>12}  {'proxy dB':>8}  node (op)",
    ]
    evaluated = [
        n
        for n in report.nodes
        if n.metric_only_this is not None or n.metric_all_but_this is not None
    ]
    shown = report.nodes if show_all or len(evaluated) == len(report.nodes) else evaluated
    for n in shown:
        lines.append(
            f"{n.rank:>4}  {fmt(n.metric_only_this):>14}  {fmt(n.metric_all_but_this):>12}  "
            f"{n.proxy_sqnr_db:>8.1f}  {n.node} ({n.op_type})"
        )
    hidden = len(report.nodes) - len(shown)
    if hidden:
        lines.append(f"... {hidden} node(s) not evaluated (ranked by proxy); --all lists them")
    return "\n".join(lines)


def register(group: click.Group) -> None:
    """Add the build and sensitivity commands to the root group."""
    group.add_command(build)
    group.add_command(sensitivity)
