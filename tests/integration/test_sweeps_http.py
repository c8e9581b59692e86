"""Sweeps, sensitivity and names over real HTTP: the Python client and the CLI against
``trtforge serve`` with its in-process worker (SQLite; PostgreSQL when configured)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from engines.spec import AccuracyGate, BuildSpec
from service.client import TrtforgeClient
from service.errors import ApiError
from service.schemas import BenchmarkOptionsIn, SensitivityOptions, SweepCreate, SweepStatus
from tests.integration.conftest import ROOT, Server, running_server
from tests.unit.service.support import DATABASES, dataset_bytes, images, model_bytes, npz_bytes

FAST = BenchmarkOptionsIn(warmup_ms=0, iterations=3, duration_s=0)


@pytest.fixture(scope="module", params=DATABASES)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("sweeps")
    with running_server(request.param, folder) as srv:
        yield srv


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("files")
    paths = {
        "model": folder / "tiny.onnx",
        "data": folder / "calib.npz",
        "eval": folder / "eval.npz",
        "labels": folder / "labels.npy",
    }
    paths["model"].write_bytes(model_bytes())
    paths["data"].write_bytes(dataset_bytes(count=8))
    paths["eval"].write_bytes(npz_bytes(image=images(4, seed=5)))
    np.save(paths["labels"], np.array([0, 1, 2, 3], dtype=np.int64))
    return paths


def _cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from service.cli.main import main; main()", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TRTFORGE_SERVER": server.url},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_a_sweep_over_http_measures_each_variant_and_draws_its_front(
    server: Server, files: dict[str, Path]
) -> None:
    with TrtforgeClient(server.url) as client:
        model = client.upload_model(files["model"], name="tiny", tags=["demo"])
        assert client.list_models(tags=["demo"]).items[0].id == model.id
        data = client.upload_dataset(files["data"], model_id=model.id, tags=["calib"])
        evaluation = client.upload_dataset(files["eval"], model_id=model.id)
        sweep = client.create_sweep(
            SweepCreate(
                model_id=model.id,
                dataset_id=data.id,
                eval_dataset_id=evaluation.id,
                labels=[0, 1, 2, 3],
                variants=["fp32", "int8"],
                benchmark=FAST,
                spec=BuildSpec(gate=AccuracyGate.off()),
            )
        )
        done = client.wait_sweep(sweep.id, timeout_s=240, poll_s=0.5)
        assert done.status is SweepStatus.SUCCEEDED, done.failed
        assert [p.variant for p in done.points] == ["fp32", "int8"]
        assert done.accuracy_metric is not None and done.accuracy_metric.value == "accuracy"
        assert done.pareto_front and done.chart.points
        assert client.list_sweeps(model_id=model.id).items[0].id == sweep.id
        int8 = next(v.build_id for v in done.variants if v.name == "int8")
        head = httpx.head(f"{server.url}/v1/builds/{int8}/artifact")
        assert head.status_code == 200 and int(head.headers["content-length"]) > 0
        with pytest.raises(ApiError) as refused:
            client.create_sweep(SweepCreate(model_id=model.id, dataset_id=data.id, variants=["x"]))
        assert refused.value.status_code == 422 and refused.value.field == "variants"

    shown = _cli(server, "sweeps", "show", done.id, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["pareto_front"] == done.pareto_front
    table = _cli(server, "sweeps", "show", done.id)
    assert "fp32" in table.stdout and "int8" in table.stdout


def test_sensitivity_over_http_through_the_cli(server: Server, files: dict[str, Path]) -> None:
    with TrtforgeClient(server.url) as client:
        model = client.upload_model(files["model"])
        data = client.upload_dataset(files["data"], model_id=model.id)
        build = client.submit_build(model.id, data.id, benchmark=FAST)
        client.wait(build.id, timeout_s=240)
        asked = client.request_sensitivity(build.id, SensitivityOptions(samples=2, max_nodes=1))
        assert asked.run_build_id != build.id
    ranked = _cli(
        server, "sensitivity-submit", build.id, "--samples", "2", "--max-nodes", "1", "--wait",
        "--json", "--timeout", "240",
    )
    assert ranked.returncode == 0, ranked.stderr
    answer = json.loads(ranked.stdout)
    assert answer["run_build_id"] == asked.run_build_id  # the same options: the same build
    assert answer["status"] == "succeeded" and answer["report"]["evaluated_nodes"] == 1


def test_submit_sends_the_evaluation_options_of_trtforge_build(
    server: Server, files: dict[str, Path]
) -> None:
    submitted = _cli(
        server, "submit", str(files["model"]), "--data", str(files["data"]),
        "--eval-data", str(files["eval"]), "--labels", str(files["labels"]),
        "--accuracy-budget", "cosine:0.5", "--precision", "int8", "--gate", "none",
        "--name", "tiny cli", "--tag", "cli", "--wait", "--json", "--timeout", "240",
    )
    assert submitted.returncode == 0, submitted.stderr
    build = json.loads(submitted.stdout)
    assert build["status"] == "succeeded" and build["labels"] == 4
    assert build["accuracy_budget"] == {"metric": "cosine", "value": 0.5}
    with TrtforgeClient(server.url) as client:
        assert client.get_model(build["model_id"]).name == "tiny cli"
        report = client.report(build["id"])
        assert report.dataset["evaluation_samples"] == 4 and report.mixed_precision is not None
        tagged = client.list_builds(model_tags=["cli"]).items  # the model's builds, this one too
        assert build["id"] in [b.id for b in tagged]
        assert {b.model_id for b in tagged} == {build["model_id"]}


def test_models_and_datasets_are_renamed_and_listed_by_tag_from_the_cli(
    server: Server, files: dict[str, Path]
) -> None:
    with TrtforgeClient(server.url) as client:
        model = client.upload_model(files["model"])
    renamed = _cli(server, "models", "update", model.id, "--name", "renamed", "--tag", "x1")
    assert renamed.returncode == 0, renamed.stderr
    assert "renamed" in renamed.stdout and "x1" in renamed.stdout
    listed = _cli(server, "models", "list", "--tag", "x1", "--json")
    assert [m["id"] for m in json.loads(listed.stdout)["items"]] == [model.id]
    cleared = _cli(server, "models", "update", model.id, "--clear-tags", "--json")
    assert json.loads(cleared.stdout)["tags"] == []
    nothing = _cli(server, "datasets", "update", "whatever")
    assert nothing.returncode == 2 and "Nothing to change" in nothing.stderr
