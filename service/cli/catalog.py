"""Client commands for the server's models, datasets and tables: ``trtforge models list | update``
and ``trtforge datasets list | update`` (names and tags, as ``GET ?name=&tag=`` and ``PATCH``),
``trtforge tables list | download | import``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from core.files import write_atomically
from service.cli.options import handle_errors
from service.cli.server import _client, _server_options

__all__ = ["datasets", "models", "tables"]


def _list_options(func: Any) -> Any:
    func = click.option("--json", "as_json", is_flag=True)(func)
    func = click.option(
        "--tag", "tags", multiple=True, help="Only those carrying this tag (repeatable: all)."
    )(func)
    return click.option(
        "--name", default=None, help="Only those whose name or file name contains this."
    )(func)


def _update_options(func: Any) -> Any:
    func = click.option("--json", "as_json", is_flag=True)(func)
    func = click.option("--clear-tags", is_flag=True, help="Remove every tag.")(func)
    func = click.option(
        "--tag", "tags", multiple=True, help="Set the tags to these (repeatable)."
    )(func)
    func = click.option("--clear-name", is_flag=True, help="Remove the name.")(func)
    return click.option("--name", default=None, help="Set the name.")(func)


def _changes(
    name: str | None, clear_name: bool, tags: tuple[str, ...], clear_tags: bool
) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if name is not None or clear_name:
        changes["name"] = None if clear_name else name
    if tags or clear_tags:
        changes["tags"] = [] if clear_tags else list(tags)
    if not changes:
        raise click.UsageError(
            "Nothing to change: give --name, --clear-name, --tag or --clear-tags."
        )
    return changes


def _print(item: Any, as_json: bool) -> None:
    if as_json:
        click.echo(item.model_dump_json())
    else:
        tags = ",".join(item.tags) or "-"
        click.echo(f"{item.id}  {item.filename}  {item.name or '-'}  {tags}")


@click.group()
def models() -> None:
    """The server's models: list them by name and tags, rename and retag them."""


@models.command("list")
@_list_options
@_server_options
@handle_errors
def models_list(
    name: str | None, tags: tuple[str, ...], as_json: bool, server: str, token: str | None
) -> None:
    """Models, newest first (id, file name, name, tags)."""
    with _client(server, token) as client:
        page = client.list_models(name=name, tags=list(tags) or None)
    if as_json:
        click.echo(page.model_dump_json())
        return
    for item in page.items:
        _print(item, False)


@models.command("update")
@click.argument("model_id")
@_update_options
@_server_options
@handle_errors
def models_update(model_id: str, **options: Any) -> None:
    """Set or clear MODEL_ID's name and tags."""
    changes = _changes(
        options["name"], options["clear_name"], options["tags"], options["clear_tags"]
    )
    with _client(options["server"], options["token"]) as client:
        _print(client.update_model(model_id, **changes), options["as_json"])


@click.group()
def datasets() -> None:
    """The server's datasets: list them by name and tags, rename and retag them."""


@datasets.command("list")
@_list_options
@_server_options
@handle_errors
def datasets_list(
    name: str | None, tags: tuple[str, ...], as_json: bool, server: str, token: str | None
) -> None:
    """Datasets, newest first (id, file name, name, tags)."""
    with _client(server, token) as client:
        page = client.list_datasets(name=name, tags=list(tags) or None)
    if as_json:
        click.echo(page.model_dump_json())
        return
    for item in page.items:
        _print(item, False)


@datasets.command("update")
@click.argument("dataset_id")
@_update_options
@_server_options
@handle_errors
def datasets_update(dataset_id: str, **options: Any) -> None:
    """Set or clear DATASET_ID's name and tags."""
    changes = _changes(
        options["name"], options["clear_name"], options["tags"], options["clear_tags"]
    )
    with _client(options["server"], options["token"]) as client:
        _print(client.update_dataset(dataset_id, **changes), options["as_json"])


@click.group()
def tables() -> None:
    """The server's calibration tables: list them, download one as a TensorRT cache or JSON,
    import a TensorRT cache for a model."""


@tables.command("list")
@click.option("--model-id", default=None, help="Only the tables of this model id.")
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@click.option("--offset", type=click.IntRange(min=0), default=0)
@click.option("--json", "as_json", is_flag=True)
@_server_options
@handle_errors
def tables_list(
    model_id: str | None, limit: int, offset: int, as_json: bool, server: str, token: str | None
) -> None:
    """Tables, newest first: id, model, method, samples, tensors, source, created (UTC)."""
    with _client(server, token) as client:
        page = client.list_tables(model_id=model_id, limit=limit, offset=offset)
    if as_json:
        click.echo(page.model_dump_json())
        return
    for t in page.items:
        click.echo(
            f"{t.id}  model {t.model_id[:12]}  {t.method or t.algorithm}  {t.samples} samples  "
            f"{t.num_tensors} tensors  {t.source}  {t.created_at:%Y-%m-%d %H:%M:%S}"
        )
    shown = offset + len(page.items)
    if shown < page.total:
        click.echo(f"{shown} of {page.total}; --offset {shown} shows more", err=True)


@tables.command("download")
@click.argument("table_id")
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="The file: trtforge JSON when it ends in .json, else a TensorRT calibration cache.",
)
@click.option(
    "--trt-version", default=None, help="The TensorRT version the cache's header names (10.x)."
)
@_server_options
@handle_errors
def tables_download(
    table_id: str, out: Path, trt_version: str | None, server: str, token: str | None
) -> None:
    """Write TABLE_ID to --out (a cache trtexec --calib and TensorRT 10's calibrators read)."""
    as_json = out.suffix.lower() == ".json"
    with _client(server, token) as client:
        text = client.table_text(
            table_id, format="json" if as_json else "trt", trt_version=trt_version
        )
    write_atomically(out, text)
    click.echo(str(out), err=True)


@tables.command("import")
@click.argument("model_id")
@click.argument("path", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--ignore-unknown", is_flag=True, help="Drop tensors the model does not have instead of refusing."
)
@click.option("--json", "as_json", is_flag=True)
@_server_options
@handle_errors
def tables_import(
    model_id: str, path: Path, ignore_unknown: bool, as_json: bool, server: str, token: str | None
) -> None:
    """Import PATH (a TensorRT calibration cache, or a trtforge JSON table) for MODEL_ID."""
    with _client(server, token) as client:
        table = client.import_table(model_id, path, ignore_unknown=ignore_unknown)
    click.echo(table.model_dump_json() if as_json else f"{table.id}  {table.num_tensors} tensors")
