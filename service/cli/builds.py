"""Client commands for builds and the fleet: ``trtforge builds list | logs | cancel | delete``
and ``trtforge workers`` (``GET /v1/builds``, ``/logs``, ``POST .../cancel``, ``DELETE``,
``GET /v1/workers``). ``submit``, ``status``, ``download`` and ``report`` stay top-level."""

from __future__ import annotations

import json
from typing import Any

import click

from engines.names import BackendName
from engines.spec import Precision
from service.cli.options import enum_choice, handle_errors
from service.cli.server import _client, _print_build, _server_options, _target
from service.schemas import BuildStatus

__all__ = ["builds", "workers"]


@click.group()
def builds() -> None:
    """The server's builds: list them, read their logs, cancel and delete them."""


@builds.command("list")
@click.option("--status", type=enum_choice(BuildStatus), default=None)
@click.option("--precision", type=enum_choice(Precision), default=None)
@click.option(
    "--backend",
    type=enum_choice(BackendName),
    default=None,
    help="Built for, or asked for, this backend.",
)
@click.option("--model-id", default=None, help="Only builds of this model id.")
@click.option("--model", "model_name", default=None, help="Part of the model's name or file name.")
@click.option("--tag", "tags", multiple=True, help="The model carries this tag (repeatable: all).")
@click.option("--limit", type=click.IntRange(1, 500), default=20, show_default=True)
@click.option("--offset", type=click.IntRange(min=0), default=0)
@click.option("--json", "as_json", is_flag=True)
@_server_options
@handle_errors
def builds_list(**options: Any) -> None:
    """Builds, newest first: id, status, progress, precision, target, model, created (UTC)."""
    with _client(options["server"], options["token"]) as client:
        page = client.list_builds(
            status=BuildStatus(options["status"]) if options["status"] else None,
            precision=options["precision"],
            backend=options["backend"],
            model_id=options["model_id"],
            model_name=options["model_name"],
            model_tags=list(options["tags"]) or None,
            limit=options["limit"],
            offset=options["offset"],
        )
    if options["as_json"]:
        click.echo(page.model_dump_json())
        return
    for build in page.items:
        line = (
            f"{build.id}  {build.status.value:<11} {build.progress * 100:>3.0f}%  "
            f"{build.spec.precision.value:<9} {_target(build)}  model {build.model_id[:12]}  "
            f"{build.created_at:%Y-%m-%d %H:%M:%S}"
        )
        if build.error is not None:
            line += f"  ({build.error.code})"
        click.echo(line)
    shown = options["offset"] + len(page.items)
    if shown < page.total:
        click.echo(f"{shown} of {page.total}; --offset {shown} shows more", err=True)


@builds.command("logs")
@click.argument("build_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the build ends.")
@click.option("--timeout", type=float, default=None, help="Seconds --follow waits at most.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@_server_options
@handle_errors
def builds_logs(
    build_id: str,
    follow: bool,
    timeout: float | None,
    as_json: bool,
    server: str,
    token: str | None,
) -> None:
    """BUILD_ID's log lines (time, level, stage, message)."""
    last = 0

    def show(line: Any) -> None:
        nonlocal last
        if line.seq <= last:
            return  # a reconnected event stream repeats what was shown
        last = line.seq
        if as_json:
            click.echo(line.model_dump_json())
        else:
            stage = f" [{line.stage}]" if line.stage else ""
            click.echo(f"{line.at:%H:%M:%S} {line.level:<7}{stage} {line.message}")

    with _client(server, token) as client:
        for line in client.logs(build_id):
            show(line)
        if follow:
            build = client.wait(
                build_id,
                timeout_s=timeout,
                on_event=lambda event: show(event.log) if event.log is not None else None,
            )
            for line in client.logs(build_id, after=last):  # the last lines, should any be missed
                show(line)
            if build.status is not BuildStatus.SUCCEEDED:
                raise SystemExit(1)


@builds.command("cancel")
@click.argument("build_id")
@click.option("--wait", is_flag=True, help="Wait until the build has ended.")
@click.option("--timeout", type=float, default=None, help="Seconds --wait waits at most.")
@click.option("--json", "as_json", is_flag=True)
@_server_options
@handle_errors
def builds_cancel(
    build_id: str,
    wait: bool,
    timeout: float | None,
    as_json: bool,
    server: str,
    token: str | None,
) -> None:
    """Cancel BUILD_ID: a queued build at once, a running one at its next step."""
    with _client(server, token) as client:
        build = client.cancel_build(build_id)
        if wait and not build.status.terminal:
            build = client.wait(build_id, timeout_s=timeout)
    if as_json:
        click.echo(build.model_dump_json())
    else:
        _print_build(build)


@builds.command("delete")
@click.argument("build_id")
@_server_options
@handle_errors
def builds_delete(build_id: str, server: str, token: str | None) -> None:
    """Delete an ended build, its logs, and its artifact and report unless shared."""
    with _client(server, token) as client:
        client.delete_build(build_id)
    click.echo(f"deleted {build_id}", err=True)


@click.command()
@click.option("--all", "include_stopped", is_flag=True, help="Also stopped workers.")
@click.option("--json", "as_json", is_flag=True)
@_server_options
@handle_errors
def workers(include_stopped: bool, as_json: bool, server: str, token: str | None) -> None:
    """Build workers: host, state, slots, targets, labels, running builds, problem."""
    with _client(server, token) as client:
        found = client.workers(include_stopped=include_stopped)
    if as_json:
        click.echo(json.dumps([w.model_dump(mode="json") for w in found]))
        return
    if not found:
        click.echo("no live workers (builds wait in the queue until one starts)", err=True)
    for worker in found:
        targets = "; ".join(map(str, worker.targets))
        labels = ",".join(worker.labels) or "-"
        click.echo(
            f"{worker.id}  {worker.hostname}  {worker.state.value}  slots {worker.slots}  "
            f"running {len(worker.running_builds)}  targets: {targets}  labels: {labels}"
        )
        if worker.problem:
            click.echo(f"  problem: {worker.problem}")

