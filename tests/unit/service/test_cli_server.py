from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from service.api.auth import authenticate
from service.cli.server import register
from service.db import Database
from service.schemas import Scope


@pytest.fixture
def cli() -> click.Group:
    group = click.Group()
    register(group)
    return group


def test_commands_are_registered(cli: click.Group) -> None:
    assert {"serve", "worker", "submit", "status", "download", "report", "tokens"} <= set(
        cli.commands
    )


def test_tokens_create_list_revoke(cli: click.Group, tmp_path: Path) -> None:
    runner = CliRunner()
    where = ["--data-dir", str(tmp_path)]
    created = runner.invoke(
        cli, ["tokens", "create", "--scope", "build", "--name", "ci", "--json", *where]
    )
    assert created.exit_code == 0, created.output
    info = json.loads(created.stdout)
    assert info["scope"] == "build" and info["token"].startswith("tfk_")
    db = Database(f"sqlite:///{tmp_path / 'trtforge.db'}")
    with db.session() as session:
        assert (
            authenticate(session, f"Bearer {info['token']}", Scope.BUILD, required=True).name
            == "ci"
        )
    listed = runner.invoke(cli, ["tokens", "list", *where])
    assert info["id"] in listed.stdout and "active" in listed.stdout
    assert info["token"] not in listed.stdout
    revoked = runner.invoke(cli, ["tokens", "revoke", info["id"], *where])
    assert revoked.exit_code == 0
    assert "revoked" in runner.invoke(cli, ["tokens", "list", *where]).stdout
    with db.session() as session, pytest.raises(Exception, match="unknown or revoked"):
        authenticate(session, f"Bearer {info['token']}", Scope.READ, required=True)
    db.dispose()
    missing = runner.invoke(cli, ["tokens", "revoke", "nope", *where])
    assert missing.exit_code == 2
    assert "No token with id 'nope'" in missing.stderr


def test_plain_create_prints_only_the_token_on_stdout(cli: click.Group, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["tokens", "create", "--name", "x", "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 0
    assert result.stdout.strip().startswith("tfk_") and "\n" not in result.stdout.strip()


def test_serve_refuses_an_open_bind_without_auth(cli: click.Group, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["serve", "--host", "0.0.0.0", "--no-auth", "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "auth cannot be off" in result.stderr


def test_client_commands_report_an_unreachable_server(cli: click.Group) -> None:
    result = CliRunner().invoke(cli, ["status", "abc", "--server", "http://127.0.0.1:9"])
    assert result.exit_code == 2
    assert "Cannot reach the trtforge server" in result.stderr


def test_report_takes_one_of_json_and_html(cli: click.Group) -> None:
    result = CliRunner().invoke(
        cli, ["report", "abc", "--json", "--html", "--server", "http://127.0.0.1:9"]
    )
    assert result.exit_code == 2
    assert "Choose one of --json and --html" in result.output
