"""``trtforge submit/status/download/report``, ``builds`` and ``workers`` against a real server."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from engines.techniques import (
    BiasCorrection,
    BiasCorrectionReport,
    ModelJudgement,
    SmoothedTensor,
    SmoothingReport,
)
from service.cli import remote
from service.cli import server as server_commands
from service.cli.report_text import render_report_summary
from service.schemas import BuildPublic, BuildReport
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
    server_commands.register(group)
    remote.register(group)
    return group


def _inputs(folder: Path, seed: int) -> tuple[Path, Path]:
    """A tiny CNN and 6 calibration samples, as files a user would pass."""
    model, data = folder / "cnn.onnx", folder / "calib.npz"
    model.write_bytes(model_bytes(seed=seed))
    data.write_bytes(dataset_bytes(count=6, seed=seed))
    return model, data


def _built(
    runner: CliRunner, cli: click.Group, folder: Path, precision: str, at: list[str], seed: int
) -> dict[str, Any]:
    """``trtforge submit --wait --json`` of the tiny inputs: the ended build."""
    model, data = _inputs(folder, seed)
    args = ["submit", str(model), "--data", str(data), "--precision", precision, "--wait", "--json"]
    submitted = runner.invoke(cli, [*args, *at])
    assert submitted.exit_code == 0, submitted.output
    build: dict[str, Any] = json.loads(submitted.stdout)
    return build


def test_submit_wait_download_then_status_and_report(
    server: Server, cli: click.Group, tmp_path: Path
) -> None:
    model, data = _inputs(tmp_path, seed=7)
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

    report = runner.invoke(cli, ["report", build["id"], "--json", "--server", server.url])
    assert json.loads(report.stdout)["build_id"] == build["id"]
    _check_summary(runner, cli, server, build, json.loads(report.stdout), model.stat().st_size)
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


def _check_summary(
    runner: CliRunner,
    cli: click.Group,
    server: Server,
    build: dict[str, Any],
    document: dict[str, Any],
    model_bytes: int,
) -> None:
    """``trtforge report ID`` prints a short summary of the same report, no raw JSON."""
    summary = runner.invoke(cli, ["report", build["id"], "--server", server.url])
    assert summary.exit_code == 0, summary.output
    text = summary.stdout
    lines = {line[:12].strip(): line[12:] for line in text.splitlines() if line[:12].strip()}
    assert lines["build"] == f"{build['id']}  succeeded"
    meta = document["artifact_metadata"]
    assert lines["target"] == f"onnxruntime {meta['backend_version']} on {meta['device']}"
    assert lines["precision"] == "fp16"
    latency = document["performance"]["latency"]
    assert lines["latency"].startswith(
        f"p50 {latency['median_ms']:.3f} ms, p99 {latency['p99_ms']:.3f} ms (host wall clock"
    )
    assert lines["throughput"] == f"{document['performance']['throughput_qps']:.1f} samples/s"
    # FP32 speed is not measured by a build: said, not invented; the size is against the model.
    assert lines["vs FP32"].startswith("speed not measured (a build benchmarks only its artifact")
    ratio = document["artifact"]["size_bytes"] / model_bytes
    assert f"size {ratio:.2f}x FP32 (FP32 model " in text and ratio < 0.75  # FP16 weights
    assert lines["accuracy"].startswith("gate sqnr_db >= 5: passed (worst sqnr_db ")
    assert lines["nodes"] == f"{len(document['kept_nodes'])} kept in higher precision, 0 in INT8"
    assert lines["artifact"].startswith(document["artifact"]["filename"])
    assert lines["sha256"] == document["artifact"]["sha256"]
    assert len(text.splitlines()) < 15 and "{" not in text
    _check_int8_words(document, build)


def _check_int8_words(document: dict[str, Any], build: dict[str, Any]) -> None:
    """The summary's FP32 words come from the sidecar: ONNX Q/DQ keeps FP32 weights, and 7-bit
    weights (no VNNI) make INT8 no faster than FP32 on that CPU (the fp16 report, made int8)."""

    def as_int8(levels: int) -> BuildReport:
        meta = document["artifact_metadata"]
        options = {**meta["options"], "int8_weight_levels": levels}
        options["providers"] = ["CPUExecutionProvider"]
        spec = {**document["spec"], "precision": "int8"}
        return BuildReport.model_validate(
            {**document, "spec": spec, "artifact_metadata": {**meta, "options": options}}
        )

    public = BuildPublic.model_validate(build)
    size = document["artifact"]["size_bytes"]
    text = render_report_summary(as_int8(63), public, size)
    assert "expect INT8 to be no faster than FP32 here: ONNX Runtime on this CPU has no VNNI" in text
    assert "size 1.00x FP32: ONNX Q/DQ keeps FP32 weights" in text
    text = render_report_summary(as_int8(127), public, None)
    assert "VNNI" not in text and "size: ONNX Q/DQ keeps FP32 weights" in text
    # what prepared the model: smoothing with auto's whole-model verdict, bias correction
    layer = {"node": "conv1", "bias": "b", "max_shift": 0.1, "sqnr_before_db": 1, "sqnr_after_db": 2}
    prepared = as_int8(127).model_copy(
        update={
            "smoothing": SmoothingReport(
                mode="auto",
                tensors=[SmoothedTensor(tensor="t", layers=["conv2"], applied=False)],
                judged=ModelJudgement(
                    samples=128, sqnr_smoothed_db=15.6, sqnr_plain_db=16.6, min_gain_db=0.5, kept=False
                ),
            ),
            "bias_correction": BiasCorrectionReport(
                mode="auto", layers=[BiasCorrection(applied=True, **layer)]
            ),
        }
    )
    [line] = [x for x in render_report_summary(prepared, public, None).splitlines() if "prepared" in x]
    assert line.split(None, 1)[1] == (
        "smoothing 0/1 (dropped: 15.6 vs 16.6 dB without, on 128 held-out samples), "
        "bias correction 1/1"
    )


def test_errors_are_one_line_with_a_hint(server: Server, cli: click.Group) -> None:
    result = CliRunner().invoke(cli, ["status", "nope", "--server", server.url])
    assert result.exit_code == 2
    assert result.stderr.splitlines()[0] == "error: No build with id 'nope'."
    assert result.stderr.splitlines()[1].startswith("hint: ")


def test_builds_are_listed_logged_cancelled_and_deleted_and_workers_shown(
    server: Server, cli: click.Group, tmp_path: Path
) -> None:
    runner = CliRunner()
    at = ["--server", server.url]
    build_id = _built(runner, cli, tmp_path, "fp16", at, seed=11)["id"]

    listed = runner.invoke(cli, ["builds", "list", "--precision", "fp16", *at])
    assert listed.exit_code == 0, listed.output
    [line] = [x for x in listed.stdout.splitlines() if x.startswith(build_id)]
    assert "succeeded" in line and "fp16" in line and "onnxruntime" in line
    failed_only = runner.invoke(cli, ["builds", "list", "--status", "failed", *at])
    assert failed_only.exit_code == 0 and build_id not in failed_only.stdout
    as_json = runner.invoke(cli, ["builds", "list", "--json", "--limit", "1", *at])
    assert json.loads(as_json.stdout)["items"][0]["id"] == build_id  # newest first

    logs = runner.invoke(cli, ["builds", "logs", build_id, *at])
    assert logs.exit_code == 0 and logs.stdout.rstrip().endswith("Build succeeded.")
    followed = runner.invoke(cli, ["builds", "logs", build_id, "--follow", *at])
    assert followed.exit_code == 0 and followed.stdout == logs.stdout  # ended: no line twice

    refused = runner.invoke(cli, ["builds", "cancel", build_id, *at])
    assert refused.exit_code == 2 and "already ended (succeeded)" in refused.stderr

    shown = runner.invoke(cli, ["workers", *at])
    assert shown.exit_code == 0, shown.output
    assert "slots 1" in shown.stdout and "targets: onnxruntime " in shown.stdout
    assert " (cpu)" in shown.stdout and "cpu cpu" not in shown.stdout  # BuildTarget's own words

    assert runner.invoke(cli, ["builds", "delete", build_id, *at]).exit_code == 0
    gone = runner.invoke(cli, ["status", build_id, *at])
    assert gone.exit_code == 2 and "No build" in gone.stderr


def test_tables_are_listed_downloaded_as_cache_or_json_and_imported(
    server: Server, cli: click.Group, tmp_path: Path
) -> None:
    runner = CliRunner()
    at = ["--server", server.url]
    build = _built(runner, cli, tmp_path, "int8", at, seed=13)
    table_id, model_id = build["table_id"], build["model_id"]
    listed = runner.invoke(cli, ["tables", "list", "--model-id", model_id, *at])
    assert listed.exit_code == 0, listed.output
    assert any(line.startswith(table_id) for line in listed.stdout.splitlines())

    cache, twin = tmp_path / "model.cache", tmp_path / "model.json"
    for out in (cache, twin):
        got = runner.invoke(cli, ["tables", "download", table_id, "--out", str(out), *at])
        assert got.exit_code == 0, got.output
    assert cache.read_text().startswith("TRT-")  # a TensorRT calibration cache header
    amax = json.loads(twin.read_text())["amax"]
    assert amax and len(cache.read_text().splitlines()) == len(amax) + 1

    imported = runner.invoke(cli, ["tables", "import", model_id, str(cache), "--json", *at])
    assert imported.exit_code == 0, imported.output
    assert json.loads(imported.stdout)["num_tensors"] == len(amax)
    missing = runner.invoke(cli, ["tables", "download", "nope", "--out", str(tmp_path / "x"), *at])
    assert missing.exit_code == 2 and "No calibration table" in missing.stderr
    assert not (tmp_path / "x").exists()  # nothing half-written
