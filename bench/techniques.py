"""SmoothQuant and bias correction on/off on real models (issue 9 §2).

For each model of ``bench/realmodels.py`` asked for and each calibration method, four INT8 builds:
plain, smoothing, bias correction, both (each technique in ``auto`` unless ``--force``), in the
order a build runs them:

1. :func:`engines.graph.layer_stats.collect_layer_stats` on the FP32 model (calibration set);
2. :func:`engines.graph.smoothing.smooth` -> the smoothed FP32 model (saved) and its stats;
3. :func:`calibrators.calibrate.calibrate` on the (smoothed) model;
4. :func:`engines.graph.bias.correct_biases` with that table;
5. :func:`engines.graph.prepare_model` (Q/DQ, 8-bit weights), run with ONNX Runtime's Q/DQ
   fusions off: TensorRT's arithmetic (``bench.common.QdqEmulationRunner``).

Figures on the separate evaluation set against FP32: whole-output SQNR and cosine, the task metric.

    python bench/techniques.py [--models ocr_rec minilm] [--methods minmax entropy]
        [--calibration 64] [--evaluation 128] [--threads 2] [--force]

Writes bench/results/techniques.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, WORK, QdqEmulationRunner, log, write_json, write_text
from bench.int8_quality import method_specs, output_metrics
from bench.realmodels import RealModel, load, run_fp32
from calibrators.calibrate import calibrate
from calibrators.data import CalibrationDataset
from engines.spec import BuildSpec, Precision, TechniqueMode

OUT = WORK / "techniques"
VARIANTS = (("plain", False, False), ("smooth", True, False), ("bias", False, True), ("both", True, True))


def run_model(path: Path, model: RealModel, threads: int) -> dict[str, np.ndarray]:
    with QdqEmulationRunner(path, threads=threads) as runner:
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, model.evaluation_count, model.batch_size):
            feeds = {k: v[start : start + model.batch_size] for k, v in model.evaluation.items()}
            for name, value in runner.run(feeds).items():
                parts.setdefault(name, []).append(np.asarray(value))
    return {n: np.concatenate(v) for n, v in parts.items()}


def build(
    model: RealModel,
    method: str,
    smoothing: bool,
    bias: bool,
    mode: TechniqueMode,
    args: argparse.Namespace,
) -> tuple[Path, dict[str, Any]]:
    import onnx

    from engines.graph import prepare_model
    from engines.graph.bias import correct_biases
    from engines.graph.inspect import load_model
    from engines.graph.layer_stats import collect_layer_stats
    from engines.graph.smoothing import smooth

    dataset = CalibrationDataset.from_arrays(model.calibration)
    info: dict[str, Any] = {}
    start = time.perf_counter()
    fp32 = load_model(model.path)
    path = model.path
    stats = None
    if smoothing or bias:
        stats = collect_layer_stats(model.path, dataset, batch_size=model.calibration_batch_size,
                                    threads=args.threads)
        info["stats_seconds"] = round(time.perf_counter() - start, 1)
    if smoothing:
        assert stats is not None
        result = smooth(fp32, stats, mode=mode)
        fp32, stats = result.model, result.stats
        path = OUT / f"{model.key}-smoothed.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(fp32, str(path))
        applied = result.report.applied
        info["smoothing"] = {
            "tensors": len(result.report.tensors),
            "applied": len(applied),
            "with_mul": sum(t.inserted_mul for t in applied),
            "detail": [t.model_dump() for t in applied],
        }
    table = calibrate(path, dataset, method_specs()[method],
                      batch_size=model.calibration_batch_size, threads=args.threads)
    if bias:
        assert stats is not None
        fp32, report = correct_biases(fp32, stats, table, mode=mode)
        info["bias"] = {"layers": len(report.layers), "corrected": len(report.corrected)}
    prepared = prepare_model(fp32, BuildSpec(precision=Precision.INT8), table, weight_levels=127)
    out = OUT / f"{model.key}-{method}-{int(smoothing)}{int(bias)}.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(prepared.model, str(out))
    info["prepare_seconds"] = round(time.perf_counter() - start, 1)
    return out, info


def measure(key: str, args: argparse.Namespace) -> dict[str, Any]:
    model = load(key, calibration=args.calibration, evaluation=args.evaluation, seed=0)
    reference = run_fp32(model, threads=args.threads)
    rows: dict[str, Any] = {"fp32": {"task": model.evaluate(reference, reference)}}
    mode = TechniqueMode.ON if args.force else TechniqueMode.AUTO
    for method in args.methods:
        for name, smoothing, bias in VARIANTS:
            if name not in args.variants:
                continue
            label = f"{method} {name}"
            log(f"{key}: {label}")
            path, info = build(model, method, smoothing, bias, mode, args)
            outputs = run_model(path, model, args.threads)
            rows[label] = {
                "task": model.evaluate(outputs, reference),
                **output_metrics(outputs, reference, model.class_scores),
                **info,
            }
            log(f"{key}: {label}: {rows[label]['task']} sqnr {rows[label]['sqnr_db']:.2f} dB")
            path.unlink(missing_ok=True)
    return {"metric": model.metric, "title": model.title, "variants": rows}


def render(results: Mapping[str, Any]) -> str:
    lines = ["| model | build | task metric | SQNR dB | cosine | smoothed (Mul) | biases corrected |",
             "|---|---|---|---|---|---|---|"]
    for key, result in results.items():
        metric = result["metric"]
        for label, row in result["variants"].items():
            task = row["task"].get(metric, float("nan"))
            if label == "fp32":
                lines.append(f"| {key} | FP32 | {task:.4f} | | | | |")
                continue
            smooth_info = row.get("smoothing")
            smoothed = (f"{smooth_info['applied']}/{smooth_info['tensors']} ({smooth_info['with_mul']})"
                        if smooth_info else "")
            bias = row.get("bias")
            biased = f"{bias['corrected']}/{bias['layers']}" if bias else ""
            lines.append(
                f"| {key} | int8 {label} | {task:.4f} | {row['sqnr_db']:.2f} | {row['cosine']:.5f} "
                f"| {smoothed} | {biased} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ocr_rec", "minilm"])
    parser.add_argument("--methods", nargs="+", default=["minmax", "entropy"])
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--evaluation", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=[v[0] for v in VARIANTS])
    parser.add_argument("--force", action="store_true", help="techniques 'on' instead of 'auto'")
    parser.add_argument("--output", default="techniques")
    args = parser.parse_args(argv)
    results = {key: measure(key, args) for key in args.models}
    write_json(RESULTS / f"{args.output}.json", results)
    write_text(RESULTS / f"{args.output}.md", render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
