"""Client commands for the server's models and datasets: ``trtforge models list | update`` and
``trtforge datasets list | update`` (names and tags, as ``GET ?name=&tag=`` and ``PATCH``)."""

from __future__ import annotations

from typing import Any

import click

from service.cli.options import handle_errors
from service.cli.server import _client, _server_options

__all__ = ["datasets", "models"]


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
