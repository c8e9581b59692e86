from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.unit.engines.graph.test_smoothing import _conv_relu_conv, _images
from tests.unit.service.test_cli_local import trtforge


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, image=np.random.default_rng(0).normal(0, 1, (40, 3, 16, 16)).astype(np.float32))
    return path


def test_build_int8_calibrates_and_writes_artifact_with_sidecar(
    tiny_cnn_path: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tiny.int8.onnx"
    result = trtforge(
        "build",
        str(tiny_cnn_path),
        "--precision",
        "int8",
        "--method",
        "minmax",
        "--data",
        str(tiny_data),
        "--backend",
        "onnxruntime",
        "--keep",
        "fc",
        "--out",
        str(out),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert set(summary) >= {
        "artifact",
        "metadata",
        "backend",
        "precision",
        "seconds",
        "quantized_nodes",
        "kept_nodes",
    }
    assert summary["backend"] == "onnxruntime" and summary["precision"] == "int8"
    assert summary["quantized_nodes"] >= 3 and "fc" in summary["kept_nodes"]
    sidecar = json.loads(Path(summary["metadata"]).read_text())
    assert sidecar["table_sha256"] and sidecar["spec"]["keep"]["int8"] == ["fc"]
    assert out.stat().st_size == sidecar["size_bytes"]


def test_build_says_whether_auto_smoothing_survived_the_whole_model_check(tmp_path: Path) -> None:
    model, data = tmp_path / "wide.onnx", tmp_path / "images.npz"
    onnx.save(_conv_relu_conv(), model)  # a few wide channels: smoothing pays on the whole model
    np.savez(data, x=_images(48, seed=1))
    out = tmp_path / "wide.int8.onnx"
    result = trtforge(
        "build", str(model), "--precision", "int8", "--method", "minmax", "--data", str(data),
        "--backend", "onnxruntime", "--out", str(out),
    )
    assert result.returncode == 0, result.stderr
    judged = json.loads(out.with_name(out.name + ".json").read_text())["preparation"]["smoothing"]["judged"]
    assert judged["kept"] and judged["held_out"]
    assert (
        f"(kept by the whole-model check: {judged['sqnr_smoothed_db']:.1f} vs "
        f"{judged['sqnr_plain_db']:.1f} dB without)" in result.stdout
    )


def test_bench_and_compare_report_in_json(
    tiny_cnn_path: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tiny.fp16.onnx"
    assert (
        trtforge("build", str(tiny_cnn_path), "--precision", "fp16", "--out", str(out)).returncode
        == 0
    )
    bench = trtforge(
        "bench", str(out), "--duration-s", "0.2", "--warmup-ms", "10", "--iterations", "5", "--json"
    )
    assert bench.returncode == 0, bench.stderr
    perf = json.loads(bench.stdout)
    assert perf["queries"] >= 5 and perf["throughput_qps"] > 0
    assert (perf["cuda_graph"], perf["spin_wait"], perf["use_transfers"]) == (False, False, True)
    graph = trtforge("bench", str(out), "--cuda-graph", "--duration-s", "0.1")
    assert graph.returncode != 0 and "TensorRT engines only" in graph.stderr
    assert "--cuda-graph" in graph.stderr and "Traceback" not in graph.stderr
    assert (
        perf["latency"]["min_ms"]
        <= perf["latency"]["median_ms"]
        <= perf["latency"]["p99_ms"]
        <= perf["latency"]["max_ms"]
    )
    compare = trtforge(
        "compare",
        str(out),
        "--model",
        str(tiny_cnn_path),
        "--data",
        str(tiny_data),
        "--budget",
        "cosine:0.999",
        "--json",
    )
    assert compare.returncode == 0, compare.stderr
    report = json.loads(compare.stdout)
    assert report["samples"] == 40 and report["passed"] is True
    assert report["outputs"][0]["cosine_similarity"] > 0.999


def test_bench_on_onnxruntime_prints_only_host_latency(
    tiny_cnn_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tiny.fp32.onnx"
    built = trtforge("build", str(tiny_cnn_path), "--precision", "fp32", "--out", str(out))
    assert built.returncode == 0, built.stderr
    bench = trtforge("bench", str(out), "--duration-s", "0.2", "--warmup-ms", "10")
    assert bench.returncode == 0, bench.stderr
    rows = [line.split()[0:2] for line in bench.stdout.splitlines()]
    assert ["Host", "latency"] in rows
    for absent in ("GPU Compute", "H2D", "D2H", "Enqueue", "GPU compute", "cuda_graph"):
        assert absent not in bench.stdout
    assert "GPU" not in "".join(line for line in bench.stdout.splitlines() if "Warning" in line)
    assert "Timing: host wall clock per query" in bench.stdout


def test_compare_exits_one_when_the_budget_fails(
    tiny_cnn_path: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tiny.int8.onnx"
    assert (
        trtforge(
            "build",
            str(tiny_cnn_path),
            "--precision",
            "int8",
            "--data",
            str(tiny_data),
            "--backend",
            "onnxruntime",
            "--out",
            str(out),
        ).returncode
        == 0
    )
    result = trtforge(
        "compare",
        str(out),
        "--model",
        str(tiny_cnn_path),
        "--data",
        str(tiny_data),
        "--budget",
        "sqnr_db:200",
    )
    assert result.returncode == 1
    assert "FAILED" in result.stdout and "sqnr_db" in result.stdout


def test_build_errors_are_clear_and_leave_nothing(
    tiny_cnn_path: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "x.onnx"
    no_data = trtforge("build", str(tiny_cnn_path), "--precision", "int8", "--out", str(out))
    assert (
        no_data.returncode != 0 and "--data" in no_data.stderr and "Traceback" not in no_data.stderr
    )
    bad_shape = trtforge(
        "build",
        str(tiny_cnn_path),
        "--precision",
        "fp32",
        "--shapes",
        "image:1x3x32x32/2x3x32x32/4x3x32x32",
        "--out",
        str(out),
    )
    assert (
        bad_shape.returncode != 0
        and "image" in bad_shape.stderr
        and "Traceback" not in bad_shape.stderr
    )
    unknown_keep = trtforge(
        "build",
        str(tiny_cnn_path),
        "--precision",
        "int8",
        "--data",
        str(tiny_data),
        "--keep",
        "no_such_node",
        "--out",
        str(out),
    )
    assert unknown_keep.returncode != 0 and "no_such_node" in unknown_keep.stderr
    assert not list(tmp_path.glob("x.onnx*"))


def test_sweep_writes_markdown_json_and_svg(
    tiny_cnn_path: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    result = trtforge(
        "sweep",
        str(tiny_cnn_path),
        "--data",
        str(tiny_data),
        "--variants",
        "fp32,int8",
        "--backend",
        "onnxruntime",
        "--method",
        "percentile",
        "--percentile",
        "99.9",
        "--duration-s",
        "0.1",
        "--warmup-ms",
        "5",
        "--out",
        str(out),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [v["name"] for v in report["variants"]] == ["fp32", "int8"]
    assert report["calibration"] == {
        "method": "percentile", "percentile": 99.9, "num_quant_bins": 128, "samples": None
    }  # fmt: skip
    assert (out / "sweep.md").read_text().count("| fp32 |") == 1
    assert (out / "sweep.svg").read_text().startswith("<svg") or "<svg" in (
        out / "sweep.svg"
    ).read_text()[:200]


def test_sweep_takes_a_table_and_a_separate_eval_dataset(
    tiny_cnn_path: Path, tiny_data: Path, tmp_path: Path
) -> None:
    table = tmp_path / "tiny.cache"
    calibrated = trtforge(
        "calibrate", str(tiny_cnn_path), "--data", str(tiny_data), "--method", "minmax",
        "--out", str(table),
    )  # fmt: skip
    assert calibrated.returncode == 0, calibrated.stderr
    held_out = tmp_path / "eval.npz"
    np.savez(
        held_out, image=np.random.default_rng(5).normal(0, 1, (6, 3, 16, 16)).astype(np.float32)
    )
    out = tmp_path / "sweep"
    result = trtforge(
        "sweep", str(tiny_cnn_path), "--data", str(tiny_data), "--eval-data", str(held_out),
        "--table", str(table), "--variants", "fp32,int8", "--backend", "onnxruntime",
        "--duration-s", "0.1", "--warmup-ms", "5", "--out", str(out), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["eval_samples"] == 6 and report["table_given"]
    assert report["calibration_samples"] == 0  # a TensorRT cache does not record it
    assert report["calibration"] is None  # a cache names TensorRT's algorithm, not our method
    assert all(v["accuracy"]["samples"] == 6 for v in report["variants"])
    assert "a given calibration table (cache" in (out / "sweep.md").read_text()


def test_compare_takes_polygraphy_style_per_output_tolerances(
    tiny_cnn_path: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tiny.fp16.onnx"
    assert (
        trtforge("build", str(tiny_cnn_path), "--precision", "fp16", "--out", str(out)).returncode
        == 0
    )
    base = ("compare", str(out), "--model", str(tiny_cnn_path), "--data", str(tiny_data), "--json")
    strict = trtforge(*base, "--atol", "logits:1e-9")
    assert strict.returncode == 1, strict.stderr  # FP16 is not within 1e-9
    [logits] = json.loads(strict.stdout)["outputs"]
    assert logits["tolerance"] == {"atol": 1e-9, "rtol": 0.0} and logits["passed"] is False
    loose = trtforge(*base, "--atol", "0.5", "--rtol", "logits:0.1")
    assert loose.returncode == 0, loose.stderr
    [logits] = json.loads(loose.stdout)["outputs"]
    assert logits["tolerance"] == {"atol": 0.5, "rtol": 0.1} and logits["passed"] is True
    unknown = trtforge(*base, "--atol", "nosuch:1")
    assert unknown.returncode not in (0, 1) and "nosuch" in unknown.stderr
    assert "logits" in unknown.stderr  # the hint lists the outputs there are
    bad = trtforge(*base, "--rtol", "logits:lots")
    assert bad.returncode not in (0, 1) and "--rtol 'logits:lots'" in bad.stderr


def test_sensitivity_ranks_nodes_by_onnx_name(
    tiny_cnn_path: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sens.json"
    args = ("sensitivity", str(tiny_cnn_path), "--data", str(tiny_data), "--samples", "8")
    result = trtforge(*args, "--max-nodes", "2", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert json.loads(out.read_text()) == report
    nodes = report["nodes"]
    assert [n["rank"] for n in nodes] == list(range(1, len(nodes) + 1))
    assert len(nodes) == report["quantizable_nodes"] >= 2 and report["evaluated_nodes"] == 2
    evaluated = [n for n in nodes if n["metric_only_this"] is not None]
    assert len(evaluated) == 2 and all(n["metric_all_but_this"] is not None for n in evaluated)
    names = {n["node"] for n in nodes}
    model_nodes = {n.name for n in onnx.load(str(tiny_cnn_path)).graph.node}
    assert names <= model_nodes  # ONNX node names, not layer indices
    text = trtforge(*args, "--max-nodes", "1", "--only-this")
    assert text.returncode == 0, text.stderr
    assert "only this INT8" in text.stdout and "1 evaluated" in text.stdout
    rows = [line for line in text.stdout.splitlines()[2:] if line.strip()[:1].isdigit()]
    assert len(rows) == 1  # the evaluated node only, then a line for the rest
    assert "not evaluated" in text.stdout and "--all" in text.stdout
    everything = trtforge(*args, "--max-nodes", "1", "--only-this", "--all")
    every_row = [line for line in everything.stdout.splitlines()[2:] if line.strip()[:1].isdigit()]
    assert len(every_row) == len(nodes) and "not evaluated" not in everything.stdout
    no_labels = trtforge(*args, "--metric", "accuracy", "--max-nodes", "1")
    assert no_labels.returncode != 0 and "Traceback" not in no_labels.stderr
    assert "label" in no_labels.stderr.lower()


def _sequence_model(path: Path) -> Path:
    """x [N, 8, 16] -> MatMul -> Relu -> MatMul -> Softmax over classes: an [N, T, C] output
    like a CTC recognizer's or a token classifier's."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    w1 = numpy_helper.from_array(rng.normal(0, 0.4, (16, 32)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.4, (32, 12)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["z"], name="fc2"),
            helper.make_node("Softmax", ["z"], ["probs"], name="softmax", axis=-1),
        ],
        "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 16])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", 8, 12])],
        [w1, w2],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_accuracy_budget_on_a_sequence_output(tmp_path: Path) -> None:
    model = _sequence_model(tmp_path / "seq.onnx")
    data = tmp_path / "seq.npz"
    np.savez(data, x=np.random.default_rng(2).normal(0, 1, (48, 8, 16)).astype(np.float32))
    result = trtforge(
        "build",
        str(model),
        "--precision",
        "int8",
        "--data",
        str(data),
        "--backend",
        "onnxruntime",
        "--accuracy-budget",
        "top1_agreement:0.99",
        "--out",
        str(tmp_path / "seq.int8.onnx"),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    mixed = json.loads(result.stdout)["mixed_precision"]
    assert mixed["budget"]["metric"] == "top1_agreement"
    assert mixed["search_value_reached"] >= 0.99
    assert 0 <= mixed["value_reached"] <= 1


def test_build_exits_one_when_the_gate_fails_and_keeps_the_artifact(
    tiny_cnn_path: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "gated.onnx"
    base = ["build", str(tiny_cnn_path), "--precision", "int8", "--data", str(tiny_data)]
    gated = trtforge(*base, "--backend", "onnxruntime", "--gate", "sqnr_db:200", "--out", str(out))
    assert gated.returncode == 1, gated.stderr
    assert "accuracy gate" in gated.stderr and "logits" in gated.stderr
    assert "hint:" in gated.stderr and "--method" in gated.stderr
    assert out.exists() and "FAILED" in gated.stdout
    passed = trtforge(*base, "--backend", "onnxruntime", "--gate", "cosine:0.5", "--out", str(out))
    assert passed.returncode == 0, passed.stderr
    assert "accuracy gate (cosine >= 0.5): passed" in passed.stdout
    bad = trtforge(*base, "--gate", "nonsense:1", "--out", str(out))
    assert bad.returncode == 2 and "--gate" in bad.stderr


def test_compare_takes_the_class_axis_of_an_nchw_output(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(
        np.random.default_rng(3).normal(0, 1, (5, 2, 1, 1)).astype(np.float32), "w"
    )
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["scores"], name="head")],
        "seg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 4, 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 5, 4, 4])],
        [w],
    )
    model = tmp_path / "seg.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    data = tmp_path / "seg.npz"
    np.savez(data, x=np.random.default_rng(4).normal(0, 1, (6, 2, 4, 4)).astype(np.float32))
    args = ["compare", str(model), "--model", str(model), "--data", str(data), "--json"]
    result = trtforge(*args, "--class-axis", "scores:1")
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)["outputs"][0]
    assert output["class_axis"] == 1 and output["class_positions"] == 6 * 4 * 4
    assert output["top1_agreement"] == 1.0
    bad = trtforge(*args, "--class-axis", "scores:x")
    assert bad.returncode == 2 and "--class-axis" in bad.stderr


def test_build_takes_the_dataset_options_calibrate_takes(
    tiny_cnn_path: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "few.onnx"
    args = ["build", str(tiny_cnn_path), "--precision", "int8", "--data", str(tiny_data)]
    result = trtforge(
        *args,
        "--backend",
        "onnxruntime",
        "--max-samples",
        "7",
        "--batch-size",
        "3",
        "--threads",
        "1",
        "--memory-limit",
        "256MiB",
        "--out",
        str(out),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["calibration_samples"] == 7  # --max-samples of the calibration split
    assert "--max-samples" in trtforge("build", "--help").stdout
