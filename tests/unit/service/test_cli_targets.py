"""The target options of ``trtforge submit`` and ``trtforge worker --label``, refused before
anything is uploaded or started when they are malformed."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from service.cli.server import register


@pytest.fixture
def cli() -> click.Group:
    group = click.Group()
    register(group)
    return group


@pytest.mark.parametrize(
    ("option", "value"),
    [("--target-tensorrt", "ten"), ("--target-gpu", "sm 90!"), ("--target-label", "no spaces")],
)
def test_submit_refuses_a_malformed_target_naming_the_option(
    cli: click.Group, tmp_path: Path, option: str, value: str
) -> None:
    (tmp_path / "m.onnx").write_bytes(b"x")
    (tmp_path / "d.npz").write_bytes(b"x")
    files = [str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz")]
    server = ["--server", "http://127.0.0.1:9"]  # never reached
    result = CliRunner().invoke(cli, ["submit", *files, option, value, *server])
    assert result.exit_code == 2, result.output
    assert option in result.stderr and "Cannot reach" not in result.stderr


def test_worker_refuses_a_malformed_label(cli: click.Group, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["worker", "--label", "ok", "--label", "not ok", "--data-dir", str(tmp_path)]
    )
    assert result.exit_code != 0
    assert "worker_labels" in result.stderr and "TRTFORGE_WORKER_LABELS" in result.stderr
