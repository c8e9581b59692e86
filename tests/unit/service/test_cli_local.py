from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from calibrators.table import CalibrationTable


def trtforge(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from service.cli.main import main; main()", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
    )


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, image=np.random.default_rng(0).normal(0, 1, (20, 3, 16, 16)).astype(np.float32))
    return path


def test_calibrate_json_summary_and_cache_file(
    tiny_cnn_path: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tiny.cache"
    result = trtforge(
        "calibrate",
        str(tiny_cnn_path),
        "--data",
        str(tiny_data),
        "--method",
        "entropy",
        "--batch-size",
        "8",
        "--trt-version",
        "10.13.3",
        "--out",
        str(out),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert set(summary) == {
        "tensors",
        "samples",
        "seconds",
        "peak_rss_mb",
        "method",
        "table",
        "model_sha256",
        "dataset_sha256",
    }
    assert summary["samples"] == 20 and summary["tensors"] == 13 and summary["method"] == "entropy"
    text = out.read_text()
    assert text.startswith("TRT-101303-EntropyCalibration2\n")
    table = CalibrationTable.from_cache_text(text)
    assert len(table.amax) == 13


def test_calibrate_json_table_and_convert_and_show(
    tiny_cnn_path: Path, tiny_data: Path, tmp_path: Path
) -> None:
    as_json = tmp_path / "t.json"
    assert (
        trtforge(
            "calibrate",
            str(tiny_cnn_path),
            "--data",
            str(tiny_data),
            "--method",
            "minmax",
            "--out",
            str(as_json),
        ).returncode
        == 0
    )
    table = CalibrationTable.load(as_json)
    assert table.samples == 20 and table.dataset_sha256
    cache = tmp_path / "t.cache"
    converted = trtforge("table", "convert", str(as_json), str(cache))
    assert converted.returncode == 0, converted.stderr
    assert cache.read_text().splitlines()[0].endswith("-MinMaxCalibration")
    shown = trtforge("table", "show", str(cache), "--top", "3", "--json")
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["tensors"] == 13 and len(info["widest"]) == 3
    assert info["widest"][0]["amax"] == pytest.approx(max(table.amax.values()), rel=1e-6)
    text = trtforge("table", "show", str(cache)).stdout
    assert "not recorded" in text and "samples 0" not in text
    assert "method minmax, samples 20" in trtforge("table", "show", str(as_json)).stdout


def test_calibrate_memory_limit_changes_the_runs_not_the_table(
    tiny_cnn_path: Path, tiny_data: Path, tmp_path: Path
) -> None:
    tables = []
    for limit in ("1GiB", "40KiB"):  # 40 KiB: below one sample, tensors observed in groups
        out = tmp_path / f"{limit}.json"
        result = trtforge(
            "calibrate", str(tiny_cnn_path), "--data", str(tiny_data), "--batch-size", "8",
            "--memory-limit", limit, "--out", str(out),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        tables.append(CalibrationTable.load(out))
    assert list(tables[0].amax) == list(tables[1].amax)
    for name, amax in tables[0].amax.items():
        assert tables[1].amax[name] == pytest.approx(amax, rel=1e-5), name
    bad = trtforge(
        "calibrate", str(tiny_cnn_path), "--data", str(tiny_data), "--memory-limit", "lots",
        "--out", str(tmp_path / "x.json"),
    )  # fmt: skip
    assert bad.returncode == 2 and "--memory-limit" in bad.stderr and "1GiB" in bad.stderr


def test_errors_are_one_line_without_traceback(tiny_cnn_path: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, wrong_name=np.zeros((2, 3, 16, 16), np.float32))
    result = trtforge(
        "calibrate", str(tiny_cnn_path), "--data", str(bad), "--out", str(tmp_path / "x.cache")
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "image" in result.stderr
    assert not (tmp_path / "x.cache").exists()
