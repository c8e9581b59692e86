"""``trtforge submit/status/download/report`` against a real server."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from service.cli.server import register
from tests.integration.conftest import Server, running_server
from tests.unit.service.support import dataset_bytes, model_bytes


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """SQLite only: the CLI goes through the client, whatever the database."""
    with running_server("sqlite", tmp_path_factory.mktemp("cli-server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def cli() -> click.Group:
    group = click.Group()
    register(group)
    return group


def test_submit_wait_download_then_status_and_report(
    server: Server, cli: click.Group, tmp_path: Path
) -> None:
    model, data = tmp_path / "cnn.onnx", tmp_path / "calib.npz"
    model.write_bytes(model_bytes(seed=7))
    data.write_bytes(dataset_bytes(count=6, seed=7))
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(
        cli,
        [
            "submit",
            str(model),
            "--data",
            str(data),
            "--precision",
            "fp16",
            "--gate",
            "sqnr_db:5",
            "--bias-correction",
            "off",
            "--download",
            str(out),
            "--json",
            "--server",
            server.url,
        ],
    )
    assert result.exit_code == 0, result.output
    build = json.loads(result.stdout)
    assert build["status"] == "succeeded"
    assert build["spec"]["gate"] == {"budgets": [{"metric": "sqnr_db", "value": 5.0}]}
    assert build["spec"]["bias_correction"] == "off"  # every spec option reaches the server
    artifact = Path(build["downloaded"])
    assert artifact.parent == out
    assert hashlib.sha256(artifact.read_bytes()).hexdigest() == build["artifact"]["sha256"]
    sidecar = json.loads(artifact.with_name(artifact.name + ".json").read_text())
    assert sidecar["sha256"] == build["artifact"]["sha256"] and sidecar["precision"] == "fp16"

    status = runner.invoke(cli, ["status", build["id"], "--server", server.url])
    assert status.exit_code == 0
    assert f"{build['id']}  succeeded  100%  fp16" in status.stdout

    again = runner.invoke(
        cli, ["download", build["id"], "--out", str(tmp_path / "b.onnx"), "--server", server.url]
    )
    assert again.exit_code == 0
    assert (tmp_path / "b.onnx").read_bytes() == artifact.read_bytes()

    report = runner.invoke(cli, ["report", build["id"], "--server", server.url])
    assert json.loads(report.stdout)["build_id"] == build["id"]
    html = runner.invoke(
        cli,
        [
            "report",
            build["id"],
            "--html",
            "--out",
            str(tmp_path / "r.html"),
            "--server",
            server.url,
        ],
    )
    assert html.exit_code == 0
    assert "<h1>Build report" in (tmp_path / "r.html").read_text()


def test_errors_are_one_line_with_a_hint(server: Server, cli: click.Group) -> None:
    result = CliRunner().invoke(cli, ["status", "nope", "--server", server.url])
    assert result.exit_code == 2
    assert result.stderr.splitlines()[0] == "error: No build with id 'nope'."
    assert result.stderr.splitlines()[1].startswith("hint: ")
