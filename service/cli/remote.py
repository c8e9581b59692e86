"""Client commands for what the server measures beyond one build: ``trtforge sweeps submit |
show | list`` (variant sweeps through the queue) and ``trtforge sensitivity-submit BUILD_ID``;
:func:`register` also adds ``trtforge models`` / ``datasets`` (:mod:`service.cli.catalog`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from engines.accuracy_report import AccuracyMetric
from engines.names import QdqExecution
from engines.spec import Precision
from service.cli.evaluation import evaluation_request
from service.cli.options import enum_choice, handle_errors, preprocess_option, spec_options
from service.cli.progress import sample_progress
from service.cli.server import _client, _server_options
from service.schemas import SweepPreset

if TYPE_CHECKING:
    from engines.spec import BuildSpec
    from service.schemas import SensitivityPublic, SweepPublic

__all__ = ["register", "render_sweep"]


# -- sweeps ------------------------------------------------------------------------------------


@click.group()
def sweeps() -> None:
    """Variant sweeps on a server: one build per variant, compared (Pareto front)."""


@sweeps.command("submit")
@click.argument("model", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--data",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    required=True,
    help="Calibration samples (and held-out samples without --eval-data).",
)
@preprocess_option
@click.option(
    "--variants",
    default=None,
    help=f"Comma-separated: {', '.join(p.value for p in Precision)}, auto:METRIC:VALUE "
    "(default: --preset precisions).",
)
@click.option("--preset", type=enum_choice(SweepPreset), default=None, help="A named variant set.")
@spec_options(exclude=["precision"])
@click.option(
    "--eval-data",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="Separate evaluation samples (same --preprocess); then all of --data calibrates.",
)
@click.option(
    "--labels",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help=".npy of int labels, one per evaluation sample.",
)
@click.option("--name", default=None, help="A name for the sweep.")
@click.option("--wait", is_flag=True, help="Poll the sweep until every build has ended.")
@click.option("--timeout", type=float, default=None, help="Seconds --wait waits at most.")
@click.option("--json", "as_json", is_flag=True)
@_server_options
@handle_errors
def sweeps_submit(model: Path, data: Path, spec: BuildSpec, **options: Any) -> None:
    """Upload MODEL and its data, and sweep its variants on the server (every spec option
    applies to each variant)."""
    from calibrators.spec import PreprocessSpec
    from service.schemas import SweepCreate

    as_json = bool(options["as_json"])
    preprocess = PreprocessSpec.load(options["preprocess"]) if options["preprocess"] else None
    with _client(options["server"], options["token"]) as client:
        with sample_progress(f"uploading {model.name}", enabled=not as_json, unit="B") as bar:
            uploaded = client.upload_model(model, progress=bar)
        with sample_progress(f"uploading {data.name}", enabled=not as_json, unit="B") as bar:
            dataset = client.upload_dataset(
                data, model_id=uploaded.id, preprocess=preprocess, progress=bar
            )
        extra = evaluation_request(client, uploaded.id, options, preprocess, quiet=as_json)
        fields: dict[str, Any] = {
            "model_id": uploaded.id,
            "dataset_id": dataset.id,
            "spec": spec.model_dump(mode="json", exclude={"precision"}),
        }
        if options["variants"]:
            fields["variants"] = [v for v in options["variants"].split(",") if v.strip()]
        if options["preset"]:
            fields["preset"] = options["preset"]
        for key in ("eval_dataset_id", "labels"):
            if extra[key] is not None:
                fields[key] = extra[key]
        if options["name"]:
            fields["name"] = options["name"]
        sweep = client.create_sweep(SweepCreate.model_validate(fields))
        if options["wait"]:
            sweep = client.wait_sweep(sweep.id, timeout_s=options["timeout"])
    _show(sweep, as_json)


@sweeps.command("show")
@click.argument("sweep_id")
@click.option("--wait", is_flag=True, help="Poll the sweep until every build has ended.")
@click.option("--timeout", type=float, default=None, help="Seconds --wait waits at most.")
@click.option("--json", "as_json", is_flag=True)
@_server_options
@handle_errors
def sweeps_show(
    sweep_id: str, wait: bool, timeout: float | None, as_json: bool, server: str, token: str | None
) -> None:
    """A sweep's builds, measured variants and Pareto front."""
    with _client(server, token) as client:
        if wait:
            sweep = client.wait_sweep(sweep_id, timeout_s=timeout)
        else:
            sweep = client.get_sweep(sweep_id)
    _show(sweep, as_json)


@sweeps.command("list")
@click.option("--model", "model_id", default=None, help="Only sweeps of this model id.")
@click.option("--json", "as_json", is_flag=True)
@_server_options
@handle_errors
def sweeps_list(model_id: str | None, as_json: bool, server: str, token: str | None) -> None:
    """The server's sweeps, newest first."""
    with _client(server, token) as client:
        page = client.list_sweeps(model_id=model_id)
    if as_json:
        click.echo(page.model_dump_json())
        return
    for item in page.items:
        names = ", ".join(v.name for v in item.variants)
        click.echo(f"{item.id}  {item.status.value}  {item.name or '-'}  {names}")


def _show(sweep: SweepPublic, as_json: bool) -> None:
    if as_json:
        click.echo(sweep.model_dump_json())
    else:
        click.echo(render_sweep(sweep))
    if sweep.status.value == "failed":
        raise SystemExit(1)


def render_sweep(sweep: SweepPublic) -> str:
    """The sweep as a table: one line per variant (status, p50, throughput, accuracy, front)."""
    metric = sweep.accuracy_metric.value if sweep.accuracy_metric else "accuracy"
    lines = [
        f"sweep {sweep.id} ({sweep.name or 'unnamed'}): {sweep.status.value}",
        f"{'variant':<24} {'status':<12} {'p50 ms':>9} {'qps':>9} {metric:>15}  front",
    ]
    points = {p.variant: p for p in sweep.points}
    for variant in sweep.variants:
        point = points.get(variant.name)
        status = variant.status.value if variant.status else "deleted"
        if point is None:
            lines.append(f"{variant.name:<24} {status:<12} {'-':>9} {'-':>9} {'-':>15}")
            continue
        value = "-" if point.accuracy_value is None else f"{point.accuracy_value:.6g}"
        lines.append(
            f"{variant.name:<24} {status:<12} {point.latency_p50_ms:>9.3f} "
            f"{point.throughput_qps:>9.1f} {value:>15}  {'*' if point.pareto else ''}"
        )
    for error in sweep.failed:
        lines.append(f"{error.field}: {error.message}")
    return "\n".join(lines)


# -- sensitivity -------------------------------------------------------------------------------


@click.command("sensitivity-submit")
@click.argument("build_id")
@click.option(
    "--metric",
    type=enum_choice(AccuracyMetric),
    default=AccuracyMetric.SQNR_DB.value,
    show_default=True,
    help="Accuracy metric against FP32 (accuracy/accuracy_drop need the build's labels).",
)
@click.option("--samples", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option("--max-nodes", type=click.IntRange(min=0), default=None)
@click.option("--only-this", is_flag=True, help="Skip the 'all but this node' variants.")
@click.option(
    "--execution",
    type=enum_choice(QdqExecution),
    default=QdqExecution.REFERENCE.value,
    show_default=True,
)
@click.option("--wait", is_flag=True, help="Follow the build that computes it until it ends.")
@click.option("--timeout", type=float, default=None, help="Seconds --wait waits at most.")
@click.option("--json", "as_json", is_flag=True)
@_server_options
@handle_errors
def sensitivity_submit(build_id: str, **options: Any) -> None:
    """Rank BUILD_ID's quantizable nodes by INT8 sensitivity on the server's workers."""
    from service.schemas import SensitivityOptions

    asked = SensitivityOptions(
        metric=AccuracyMetric(options["metric"]),
        samples=options["samples"],
        max_nodes=options["max_nodes"],
        only_this=options["only_this"],
        execution=QdqExecution(options["execution"]),
    )
    with _client(options["server"], options["token"]) as client:
        public = client.request_sensitivity(build_id, asked)
        if options["wait"] and not public.status.terminal:
            client.wait(public.run_build_id, timeout_s=options["timeout"])
            public = client.get_sensitivity(build_id)
    _show_sensitivity(public, bool(options["as_json"]))


def _show_sensitivity(public: SensitivityPublic, as_json: bool) -> None:
    if as_json:
        click.echo(public.model_dump_json())
        return
    click.echo(
        f"sensitivity of {public.build_id}: build {public.run_build_id} {public.status.value}"
    )
    if public.report is not None:
        from service.cli.engines import render_sensitivity

        click.echo(render_sensitivity(public.report))
    elif public.error is not None:
        click.echo(f"error: {public.error.message}")


def register(group: click.Group) -> None:
    """Add ``sweeps``, ``sensitivity-submit``, ``models``, ``datasets``, ``tables``, ``builds``
    and ``workers`` to the root group."""
    from service.cli.builds import builds, workers
    from service.cli.catalog import datasets, models, tables

    for command in (sweeps, sensitivity_submit, models, datasets, tables, builds, workers):
        group.add_command(command)
