"""Service commands of ``trtforge``: serve, worker, submit, status, download, report, tokens.

``serve``/``worker``/``tokens`` work on this machine's database (``TRTFORGE_*`` settings or the
options); ``submit``/``status``/``download``/``report`` talk to a server through
:class:`service.client.TrtforgeClient` (``--server``/``--token`` or ``TRTFORGE_SERVER`` /
``TRTFORGE_TOKEN``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import click
from pydantic import ValidationError

from service.cli.evaluation import evaluation_options, evaluation_request
from service.cli.options import enum_choice, handle_errors, preprocess_option, spec_options
from service.cli.progress import sample_progress
from service.projects import DEFAULT_PROJECT, is_project_name
from service.schemas import Scope, TargetRequest

if TYPE_CHECKING:
    from engines.spec import BuildSpec

__all__ = ["register"]

P = ParamSpec("P")
R = TypeVar("R")


def _server_options(func: Callable[P, R]) -> Callable[P, R]:
    func = click.option(
        "--token",
        envvar="TRTFORGE_TOKEN",
        default=None,
        help="Bearer token (env TRTFORGE_TOKEN).",
    )(func)
    func = click.option(
        "--server",
        envvar="TRTFORGE_SERVER",
        default="http://127.0.0.1:8000",
        show_default=True,
        help="Server URL (env TRTFORGE_SERVER).",
    )(func)
    return func


def _local_options(func: Callable[P, R]) -> Callable[P, R]:
    func = click.option(
        "--database-url",
        default=None,
        help="SQLAlchemy URL (default: SQLite in the data directory; env TRTFORGE_DATABASE_URL).",
    )(func)
    func = click.option(
        "--data-dir",
        type=click.Path(path_type=Path, file_okay=False),
        default=None,
        help="Data directory (env TRTFORGE_DATA_DIR; default ~/.local/share/trtforge).",
    )(func)
    return func


def _emit(data: Any) -> None:
    click.echo(json.dumps(data, indent=None, default=str))


# -- server side -------------------------------------------------------------------------------


@click.command()
@click.option("--host", default=None, help="Bind address (default 127.0.0.1; env TRTFORGE_HOST).")
@click.option("--port", type=int, default=None, help="Port (default 8000; env TRTFORGE_PORT).")
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="In-process build slots (default: one per GPU, else 1; 0: use `trtforge worker`).",
)
@click.option(
    "--auth/--no-auth",
    default=None,
    help="Require bearer tokens (default: only when binding to a non-loopback address).",
)
@click.option("--log-level", default="info", show_default=True)
@_local_options
@handle_errors
def serve(
    host: str | None,
    port: int | None,
    workers: int | None,
    auth: bool | None,
    log_level: str,
    data_dir: Path | None,
    database_url: str | None,
) -> None:
    """Start the API server (and, by default, its build workers)."""
    import uvicorn

    from service.api.app import create_app
    from service.api.server import uvicorn_options
    from service.settings import load_settings

    settings = load_settings(
        host=host,
        port=port,
        workers=workers,
        auth=auth,
        data_dir=data_dir,
        database_url=database_url,
    )
    click.echo(
        f"trtforge serving on {settings.base_url} (data: {settings.data_dir}, "
        f"auth: {'on' if settings.auth_required else 'off'})",
        err=True,
    )
    uvicorn.run(create_app(settings), log_level=log_level, **uvicorn_options(settings))


@click.command()
@click.option(
    "--slots",
    type=click.IntRange(min=1),
    default=None,
    help="Concurrent builds (default: one per GPU, else TRTFORGE_CPU_CONCURRENCY).",
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    help="A label this worker carries (repeatable; added to TRTFORGE_WORKER_LABELS). Builds "
    "that ask for labels run only on workers that carry all of them.",
)
@click.option(
    "--api",
    "api_url",
    envvar="TRTFORGE_API_URL",
    default=None,
    help="Work through this API (e.g. http://api:8000; env TRTFORGE_API_URL) instead of the "
    "database: no shared filesystem, inputs cached in --data-dir. Needs a worker token.",
)
@click.option(
    "--token",
    envvar="TRTFORGE_TOKEN",
    default=None,
    help="With --api: a token of scope worker (env TRTFORGE_TOKEN).",
)
@_local_options
@handle_errors
def worker(
    slots: int | None,
    labels: tuple[str, ...],
    api_url: str | None,
    token: str | None,
    data_dir: Path | None,
    database_url: str | None,
) -> None:
    """Run build workers against the server's database, or through its API with --api (until
    Ctrl-C or SIGTERM)."""
    from service.db import Database
    from service.queue import open_queue
    from service.settings import load_settings
    from service.store.storage import Storage
    from service.worker.slots import Worker

    settings = load_settings(data_dir=data_dir, database_url=database_url, workers=slots)
    if labels:
        settings = load_settings(
            data_dir=data_dir,
            database_url=database_url,
            workers=slots,
            worker_labels=[*settings.worker_labels, *labels],
        )
    if api_url is not None:
        if database_url is not None:
            raise click.UsageError("Give --api or --database-url, not both.")
        from service.worker.remote import run_remote_worker

        run_remote_worker(settings, api_url, token, echo=lambda line: click.echo(line, err=True))
        return
    db = Database.from_settings(settings)
    storage = Storage(settings.data_dir)
    storage.prepare()
    db.migrate()
    runner = Worker(settings, db, storage, open_queue(db, settings))
    shown = f", labels: {', '.join(settings.worker_labels)}" if settings.worker_labels else ""
    click.echo(f"trtforge worker {runner.id}: {len(runner.slots)} slot(s){shown}", err=True)
    try:
        runner.run_forever()
    finally:
        db.dispose()


@click.group()
def tokens() -> None:
    """Create, list and revoke API tokens (on this machine's database)."""


def _token_db(data_dir: Path | None, database_url: str | None) -> Any:
    from service.db import Database
    from service.settings import load_settings

    settings = load_settings(data_dir=data_dir, database_url=database_url)
    db = Database.from_settings(settings)
    db.migrate()
    return db


def _project_name(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if not is_project_name(value):
        raise click.BadParameter(
            f"{value!r} is not a project name: 1-63 lowercase letters, digits, '_', '.' or '-', "
            "starting with a letter or digit."
        )
    return value


@tokens.command("create")
@click.option("--name", required=True, help="Who or what uses it, e.g. ci.")
@click.option(
    "--scope",
    type=enum_choice(Scope),
    default=Scope.READ.value,
    show_default=True,
    help="read < build (upload, submit, cancel) < admin (tokens).",
)
@click.option(
    "--project",
    default=DEFAULT_PROJECT,
    show_default=True,
    callback=_project_name,
    help="The project whose models, datasets and builds it sees (admin tokens: all projects).",
)
@click.option("--json", "as_json", is_flag=True)
@_local_options
@handle_errors
def tokens_create(
    name: str,
    scope: str,
    project: str,
    as_json: bool,
    data_dir: Path | None,
    database_url: str | None,
) -> None:
    """Create a token and print it once (only its hash is stored)."""
    from service.api.auth import create_token

    db = _token_db(data_dir, database_url)
    with db.session() as session:
        row, token = create_token(session, name, Scope(scope), project)
    db.dispose()
    if as_json:
        _emit(
            {
                "id": row.id,
                "name": row.name,
                "scope": row.scope,
                "project": row.project,
                "token": token,
            }
        )
        return
    click.echo(token)
    click.echo(
        f"token {row.id} ({scope}, project {project}) for {name!r}: shown once, store it now",
        err=True,
    )


@tokens.command("list")
@click.option("--json", "as_json", is_flag=True)
@_local_options
@handle_errors
def tokens_list(as_json: bool, data_dir: Path | None, database_url: str | None) -> None:
    """List tokens (never their secrets)."""
    from service.api.auth import list_tokens, token_public

    db = _token_db(data_dir, database_url)
    with db.session() as session:
        rows = [token_public(r) for r in list_tokens(session)]
    db.dispose()
    if as_json:
        _emit([r.model_dump(mode="json") for r in rows])
        return
    for r in rows:
        state = f"revoked {r.revoked_at:%Y-%m-%d}" if r.revoked_at else "active"
        click.echo(f"{r.id}  {r.scope.value:<5}  {state:<18}  {r.project:<16}  {r.name}")


@tokens.command("revoke")
@click.argument("token_id")
@_local_options
@handle_errors
def tokens_revoke(token_id: str, data_dir: Path | None, database_url: str | None) -> None:
    """Revoke a token by id."""
    from service.api.auth import revoke_token

    db = _token_db(data_dir, database_url)
    with db.session() as session:
        revoke_token(session, token_id)
    db.dispose()
    click.echo(f"revoked {token_id}", err=True)


# -- client side -------------------------------------------------------------------------------


def _client(server: str, token: str | None) -> Any:
    """The client of the remote commands; ``TRTFORGE_PROJECT`` picks an admin token's project."""
    from service.client import TrtforgeClient

    return TrtforgeClient(server, token, project=os.environ.get("TRTFORGE_PROJECT") or None)


@click.command()
@click.argument("model", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@spec_options()
@click.option(
    "--data",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    required=True,
    help="Calibration data (INT8), benchmark inputs and held-out samples for the accuracy gate.",
)
@preprocess_option
@click.option("--table", "table_id", default=None, help="Use this stored calibration table id.")
@click.option(
    "--target-gpu",
    default=None,
    help="Run on a worker with this GPU: sm_90 or 9.0 (compute capability), or part of its name "
    "(H100).",
)
@click.option(
    "--target-tensorrt",
    default=None,
    help="Run on a worker with this TensorRT version (a prefix: 10.13 matches 10.13.x).",
)
@click.option(
    "--target-label",
    "target_labels",
    multiple=True,
    help="Run on a worker that carries this label (repeatable: all of them).",
)
@evaluation_options
@click.option("--wait", is_flag=True, help="Follow the build until it ends.")
@click.option("--timeout", type=float, default=None, help="Seconds --wait waits at most.")
@click.option(
    "--download",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Download the artifact into this folder (implies --wait).",
)
@click.option("--json", "as_json", is_flag=True)
@_server_options
@handle_errors
def submit(model: Path, spec: BuildSpec, data: Path, **options: Any) -> None:
    """Upload MODEL and its calibration data, and submit a build (the spec options are the
    fields of the build's spec, as in POST /v1/builds)."""
    from calibrators.spec import PreprocessSpec

    as_json = bool(options["as_json"])
    preprocess = PreprocessSpec.load(options["preprocess"]) if options["preprocess"] else None
    target = _target_request(
        options["target_gpu"], options["target_tensorrt"], options["target_labels"]
    )
    with _client(options["server"], options["token"]) as client:
        with sample_progress(f"uploading {model.name}", enabled=not as_json, unit="B") as bar:
            uploaded = client.upload_model(
                model, name=options["name"], tags=list(options["tags"]) or None, progress=bar
            )
        with sample_progress(f"uploading {data.name}", enabled=not as_json, unit="B") as bar:
            dataset = client.upload_dataset(
                data, model_id=uploaded.id, preprocess=preprocess, progress=bar
            )
        extra = evaluation_request(client, uploaded.id, options, preprocess, quiet=as_json)
        build = client.submit_build(
            uploaded.id, dataset.id, spec, table_id=options["table_id"], target=target, **extra
        )
        if not as_json:
            click.echo(f"build {build.id}: {build.status.value} ({_target(build)})", err=True)
        if options["wait"] or options["download"]:
            build = _follow(client, build.id, options["timeout"], as_json)
        artifact = None
        if options["download"] and build.artifact is not None:
            options["download"].mkdir(parents=True, exist_ok=True)
            artifact = _download(client, build.id, options["download"], as_json)
    _report_outcome(build, artifact, as_json)


def _target_request(
    gpu: str | None, tensorrt: str | None, labels: tuple[str, ...]
) -> TargetRequest | None:
    """The ``--target-*`` options as the request's target (None when none is given)."""
    if gpu is None and tensorrt is None and not labels:
        return None
    try:
        return TargetRequest(gpu=gpu, tensorrt=tensorrt, labels=list(labels))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0])
        name = "--target-label" if field == "labels" else f"--target-{field}"
        raise click.BadParameter(str(first["msg"]), param_hint=name) from exc


def _follow(client: Any, build_id: str, timeout: float | None, as_json: bool) -> Any:
    from service.client import BuildEvent

    with sample_progress("building", enabled=not as_json, unit="%") as bar:

        def show(event: BuildEvent) -> None:
            if event.build is not None:
                bar(round(event.build.progress * 100), 100)
            if event.log is not None and not as_json and not sys.stderr.isatty():
                click.echo(f"  {event.log.message}", err=True)

        return client.wait(build_id, timeout_s=timeout, on_event=show)


def _download(client: Any, build_id: str, dest: Path, as_json: bool) -> Path:
    with sample_progress("downloading", enabled=not as_json, unit="B") as bar:
        path: Path = client.download_artifact(build_id, dest, progress=bar)
    return path


def _report_outcome(build: Any, artifact: Path | None, as_json: bool) -> None:
    if as_json:
        data = build.model_dump(mode="json")
        if artifact is not None:
            data["downloaded"] = str(artifact)
        _emit(data)
    else:
        _print_build(build)
        if artifact is not None:
            click.echo(f"artifact: {artifact}")
    if build.status.value in ("failed", "cancelled"):
        raise SystemExit(1)


def _print_build(build: Any) -> None:
    click.echo(
        f"{build.id}  {build.status.value}  {build.progress * 100:.0f}%"
        f"  {build.spec.precision.value}  {_target(build)}"
    )
    if build.stage_seconds:
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in build.stage_seconds.items())
        click.echo(f"stages: {stages}")
    if build.table_from_cache is not None:
        click.echo(f"calibration table: {'reused' if build.table_from_cache else 'computed'}")
    if build.error is not None:
        click.echo(f"error: {build.error.message}")
        if build.error.hint:
            click.echo(f"hint: {build.error.hint}")


@click.command()
@click.argument("build_id")
@click.option("--json", "as_json", is_flag=True)
@_server_options
@handle_errors
def status(build_id: str, as_json: bool, server: str, token: str | None) -> None:
    """Show a build's status."""
    with _client(server, token) as client:
        build = client.get_build(build_id)
    if as_json:
        _emit(build.model_dump(mode="json"))
    else:
        _print_build(build)


@click.command()
@click.argument("build_id")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path(),
    show_default=True,
    help="File or folder.",
)
@click.option("--json", "as_json", is_flag=True)
@_server_options
@handle_errors
def download(build_id: str, out: Path, as_json: bool, server: str, token: str | None) -> None:
    """Download a build's artifact (resumes; checks the sha256)."""
    with _client(server, token) as client:
        path = _download(client, build_id, out, as_json)
    if as_json:
        _emit({"build_id": build_id, "artifact": str(path)})
    else:
        click.echo(str(path))


@click.command()
@click.argument("build_id")
@click.option(
    "--json", "as_json", is_flag=True, help="The full report (JSON) instead of a summary."
)
@click.option("--html", "as_html", is_flag=True, help="The HTML page instead of a summary.")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None)
@_server_options
@handle_errors
def report(
    build_id: str,
    as_json: bool,
    as_html: bool,
    out: Path | None,
    server: str,
    token: str | None,
) -> None:
    """Print (or save) a build's report: a summary (status, target, speed, accuracy against the
    gate, artifact), the full JSON with --json, the HTML page with --html."""
    if as_json and as_html:
        raise click.UsageError("Choose one of --json and --html.")
    with _client(server, token) as client:
        if as_html:
            text = client.report_html(build_id)
        elif as_json:
            text = client.report(build_id).model_dump_json(indent=2)
        else:
            text = _report_summary(client, build_id)
    if out is None:
        click.echo(text)
    else:
        out.write_text(text, encoding="utf-8")
        click.echo(str(out), err=True)


def _report_summary(client: Any, build_id: str) -> str:
    """The readable summary; a build without a report yet shows its status before the error."""
    from service.cli.report_text import render_report_summary
    from service.errors import ApiError

    build = client.get_build(build_id)
    try:
        document = client.report(build_id)
    except ApiError as exc:
        if exc.remote_code == "not_ready":
            _print_build(build)
        raise
    model_bytes: int | None = None
    if document.model.get("id"):
        try:
            model_bytes = client.get_model(document.model["id"]).size_bytes
        except ApiError:  # the model was deleted since: no size ratio
            model_bytes = None
    return str(render_report_summary(document, build, model_bytes))


def register(group: click.Group) -> None:
    """Add the service commands to the root group."""
    for command in (serve, worker, submit, status, download, report, tokens):
        group.add_command(command)


def _target(build: Any) -> str:
    """What the build is built for, or what it waits for."""
    if build.backend is None:
        return f"{build.requested_backend}, waiting for a worker"
    where = "" if build.compute_capability in (None, "cpu") else f", sm {build.compute_capability}"
    return f"{build.backend} {build.backend_version}{where}"
