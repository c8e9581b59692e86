"""INT8 quality on real models under each calibration method, and the accuracy-gate table (issue 9).

For every model of ``bench/realmodels.py`` (three OCR models from the rapidocr-onnxruntime wheel,
EfficientNet-Lite0, MiniLM, the Fashion-MNIST CNN) this builds FP16 and INT8 under each method
(entropy, minmax, percentile 99.99, mse, and ``auto`` where ``CalibrationMethod.AUTO`` exists),
calibrated on the model's calibration set and evaluated on its separate evaluation set against
FP32:

- INT8 build: as a user gets it with no flags but the method, through
  ``engines.workflow.Workflow`` (ONNX Runtime backend, full 8-bit weights): SmoothQuant /
  cross-layer equalization on the FP32 model before calibration (``smoothing``, ``auto``), the
  table computed on the smoothed model, bias correction per build (``bias_correction``,
  ``auto``), then ``engines.graph.prepare_model`` on that prepared model: the Q/DQ graph
  trtforge hands TensorRT, run with ONNX Runtime's Q/DQ fusions off
  (``bench.common.QdqEmulationRunner``): "TensorRT arithmetic", as in bench/accuracy.py.
  ``plain`` rows (``--plain``, default auto and entropy) turn both techniques off;
- every build is compared with the ORIGINAL FP32 model, and checked against the product's
  default gate for its precision (``Workflow.gate``, ``engines.gate``);
- ``engines.accuracy.compare`` for its figures, plus figures computed here on whole outputs:
  ``sqnr_db`` = 10 log10(sum r^2 / sum (c - r)^2) per output, minimum over outputs;
  ``cosine`` = cosine of the whole output (all samples flattened), minimum over outputs;
  ``min_sample_cosine`` = minimum over samples of the per-sample cosine, samples whose reference
  is all zeros skipped; ``top1_agreement`` = same argmax over the last axis (class-score outputs
  only: [N, C] and [N, T, C]);
- the model's task metric (character accuracy, text-mask IoU, accuracy, ...).

Then the gate table: a build is *sound* when its task metric is within 1 point of FP32's or its
SQNR within 3 dB of the best single method's, *collapsed* otherwise; for each candidate gate
metric, the worst sound and the best collapsed value, so that a default threshold can sit
between them.

    python bench/int8_quality.py [--models ...] [--methods ...] [--plain auto entropy]
        [--calibration 64] [--evaluation 128] [--threads 2] [--output int8_quality] [--readme]
    python bench/int8_quality.py --merge A.json B.json ... --output int8_quality [--readme]

Writes bench/results/<output>.json and .md; ``--readme`` also replaces the section
"INT8 on real models" of bench/README.md (between its markers). ``--merge`` joins runs of one
model each (run one at a time on a small machine) into one result.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    RESULTS,
    ROOT,
    WORK,
    QdqEmulationRunner,
    environment,
    log,
    seed_everything,
    write_json,
    write_text,
)
from bench.int8_quality_report import gate_table, render, update_readme
from bench.realmodels import IN_DOMAIN, MODELS, RealModel, load
from calibrators.data import CalibrationDataset
from calibrators.spec import CalibrationMethod, MethodSpec, entropy, minmax, mse, percentile
from engines.accuracy import compare
from engines.accuracy_report import AccuracyReport
from engines.backends.onnxruntime import OnnxRuntimeBackend
from engines.spec import BackendName, BuildSpec, Precision, TechniqueMode
from engines.variants import MemoizedRunner
from engines.workflow import Workflow

OUT = WORK / "int8_quality"
SINGLE_METHODS = ("entropy", "minmax", "percentile", "mse")
PLAIN = " plain"
"""Suffix of the rows with smoothing and bias correction off."""


def method_specs() -> dict[str, MethodSpec]:
    """The single methods, plus ``auto`` when this trtforge has it."""
    specs = {
        "entropy": entropy(),
        "minmax": minmax(),
        "percentile": percentile(99.99),
        "mse": mse(),
    }
    auto = getattr(CalibrationMethod, "AUTO", None)
    if auto is not None:
        specs["auto"] = MethodSpec(method=auto)
    return specs


# --- running ---------------------------------------------------------------------------------


class Recorder:
    """A runner that keeps what the runner it wraps returned (for the task metric)."""

    def __init__(self, runner: Any) -> None:
        self._runner = runner
        self.parts: dict[str, list[np.ndarray]] = {}

    @property
    def inputs(self) -> Any:
        return self._runner.inputs

    @property
    def output_names(self) -> Any:
        return self._runner.output_names

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = self._runner.run(feeds)
        for name, value in out.items():
            self.parts.setdefault(name, []).append(np.array(value, copy=True))
        return out

    def timed_run(self, feeds: Mapping[str, np.ndarray]) -> Any:
        return self._runner.timed_run(feeds)

    def describe(self) -> dict[str, str]:
        return dict(self._runner.describe())

    def close(self) -> None:
        self._runner.close()

    def outputs(self) -> dict[str, np.ndarray]:
        return {n: np.concatenate(v) for n, v in self.parts.items()}


def output_metrics(
    candidate: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], class_scores: bool
) -> dict[str, float]:
    """sqnr_db, cosine, min_sample_cosine (minimum over outputs) and top1_agreement."""
    sqnr, cosine, min_cos, top1 = [], [], [], []
    for name, ref in reference.items():
        r = np.asarray(ref, np.float64).reshape(ref.shape[0], -1)
        c = np.asarray(candidate[name], np.float64).reshape(ref.shape[0], -1)
        noise = float(((c - r) ** 2).sum())
        signal = float((r**2).sum())
        sqnr.append(math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise))
        denom = float(np.linalg.norm(r) * np.linalg.norm(c))
        cosine.append(float((r * c).sum()) / denom if denom > 0 else float(noise == 0))
        rn, cn = np.linalg.norm(r, axis=1), np.linalg.norm(c, axis=1)
        live = rn > 0
        per = (r * c).sum(1)[live] / np.maximum(rn[live] * cn[live], 1e-300)
        min_cos.append(float(per.min()) if per.size else 1.0)
        if class_scores and ref.ndim in (2, 3) and ref.shape[-1] >= 2:
            top1.append(float(np.mean(ref.argmax(-1) == candidate[name].argmax(-1))))
    out = {"sqnr_db": min(sqnr), "cosine": min(cosine), "min_sample_cosine": min(min_cos)}
    if top1:
        out["top1_agreement"] = min(top1)
    return out


def engines_figures(report: AccuracyReport) -> dict[str, float]:
    """engines.accuracy.compare's figures (worst over outputs), under an ``engines_`` prefix."""
    out: dict[str, float] = {}
    for field in ("sqnr_db", "cosine_similarity", "min_cosine_similarity", "top1_agreement"):
        values = [getattr(o, field, None) for o in report.outputs]
        present = [float(v) for v in values if v is not None]
        if present:
            out[f"engines_{field}"] = min(present)
    return out


def build_spec(precision: Precision, method: MethodSpec | None, techniques: bool) -> BuildSpec:
    """The spec a user gives: the precision and method, everything else default (``techniques``
    False: smoothing and bias correction off)."""
    spec = BuildSpec(precision=precision, backend=BackendName.ONNXRUNTIME)
    if method is not None:
        spec = spec.model_copy(update={"calibration": method})
    if not techniques:
        off = TechniqueMode.OFF
        spec = spec.model_copy(update={"smoothing": off, "bias_correction": off})
    return spec


def build_model(
    flow: Workflow, model: RealModel, out: Path, threads: int
) -> tuple[Path, dict[str, Any]]:
    """The Q/DQ (or FP16) graph trtforge gives TensorRT, 8-bit weights, saved at ``out``: for
    INT8, calibrated through ``flow`` (smoothing before calibration, bias correction per build,
    as the spec says) and prepared from the model ``flow`` made of the FP32 one."""
    import onnx

    from engines.graph import prepare_model
    from engines.graph.inspect import load_model

    spec = flow.spec
    row: dict[str, Any] = {"spec": spec.model_dump(mode="json")}
    table = None
    source = flow.model_path
    if spec.precision.uses_int8:
        data = CalibrationDataset.from_arrays(model.calibration)
        split = flow.split(data, eval_fraction=0)
        start = time.perf_counter()
        calibration = flow.calibrate(
            split.calibration,
            held_out=CalibrationDataset.from_arrays(model.evaluation),  # as a build's split
            batch_size=model.calibration_batch_size,
            threads=threads,
        )
        if calibration is None:
            raise RuntimeError(f"{model.key}: the workflow computed no calibration table")
        row["calibration_seconds"] = round(time.perf_counter() - start, 2)
        table = calibration.table
        start = time.perf_counter()
        source = flow.int8_source(spec, table)
        row["bias_correction_seconds"] = round(time.perf_counter() - start, 2)
        row["smoothing"] = smoothing_record(calibration.smoothing)
        row["bias_correction"] = bias_record(flow.bias_correction)
        choices = getattr(table, "range_choices", None)
        if choices:
            chosen: dict[str, int] = {}
            for choice in choices.values():
                chosen[choice.method] = chosen.get(choice.method, 0) + 1
            row["auto_choices"] = dict(sorted(chosen.items(), key=lambda kv: -kv[1]))
    prepared = prepare_model(load_model(source), spec, table, weight_levels=127)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(prepared.model, str(out))
    row["quantized_nodes"] = len(prepared.quantized_nodes)
    return out, row


def smoothing_record(report: Any) -> dict[str, Any] | None:
    """How many activations SmoothQuant / CLE smoothed, and ``auto``'s whole-model check (its
    SQNR with and without, on calibration rows); None: smoothing off."""
    if report is None:
        return None
    applied = report.applied
    return {
        "smoothed": len(applied),
        "considered": len(report.tensors),
        "inserted_mul": sum(bool(t.inserted_mul) for t in applied),
        "judged": report.judged.model_dump() if report.judged is not None else None,
    }


def bias_record(report: Any) -> dict[str, int] | None:
    """How many quantized layers' biases were corrected (None: bias correction off)."""
    if report is None:
        return None
    return {"corrected": len(report.corrected), "considered": len(report.layers)}


def evaluate(
    model: RealModel,
    path: Path,
    reference: MemoizedRunner,
    reference_outputs: Mapping[str, np.ndarray],
    threads: int,
) -> tuple[dict[str, Any], AccuracyReport]:
    labels = model.labels if model.key in ("ocr_cls", "fashion_cnn") else None
    with QdqEmulationRunner(path, threads=threads) as runner:
        recorder = Recorder(runner)
        report = compare(
            reference,
            recorder,
            CalibrationDataset.from_arrays(model.evaluation),
            batch_size=model.batch_size,
            labels=labels,
        )
    outputs = recorder.outputs()
    figures = {
        "task": model.evaluate(outputs, reference_outputs),
        **output_metrics(outputs, reference_outputs, model.class_scores),
        **engines_figures(report),
    }
    return figures, report


def measure_model(key: str, args: argparse.Namespace) -> dict[str, Any]:
    log(f"{key}: preparing data")
    model = load(key, calibration=args.calibration, evaluation=args.evaluation, seed=args.seed)
    backend = OnnxRuntimeBackend(intra_op_threads=args.threads, providers=["CPUExecutionProvider"])
    rows: dict[str, dict[str, Any]] = {}
    with MemoizedRunner(backend.load(model.path)) as reference:
        log(f"{key}: FP32 reference on {model.evaluation_count} samples")
        recorder = Recorder(reference)
        data = CalibrationDataset.from_arrays(model.evaluation).validate(list(reference.inputs))
        for feeds in data.batches(model.batch_size):
            recorder.run(feeds)
        ref_out = recorder.outputs()
        rows["fp32"] = {"task": model.evaluate(ref_out, ref_out)}
        variants: list[tuple[str, BuildSpec]] = [("fp16", build_spec(Precision.FP16, None, True))]
        variants += [
            (f"int8 {m}", build_spec(Precision.INT8, s, True)) for m, s in args.specs.items()
        ]
        variants += [
            (f"int8 {m}{PLAIN}", build_spec(Precision.INT8, method_specs()[m], False))
            for m in args.plain
        ]
        for name, spec in variants:
            try:
                rows[name] = measure_variant(model, name, spec, reference, ref_out, args)
            except Exception as exc:  # record it, go on with the other variants
                log(f"{key}: {name} FAILED: {exc!r}")
                traceback.print_exc()
                rows[name] = {"error": repr(exc)}
    return {
        "title": model.title,
        "path": str(
            model.path.relative_to(ROOT) if model.path.is_relative_to(ROOT) else model.path
        ),
        "metric": model.metric,
        "calibration_samples": model.calibration_count,
        "evaluation_samples": model.evaluation_count,
        "notes": model.notes,
        "in_domain": model.in_domain,
        "variants": rows,
    }


def measure_variant(
    model: RealModel,
    name: str,
    spec: BuildSpec,
    reference: MemoizedRunner,
    ref_out: Mapping[str, np.ndarray],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Build ``spec`` through a Workflow, evaluate it against FP32, check the default gate."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{model.key}-{name}")
    log(f"{model.key}: building {name} (calibration on {model.calibration_count} samples)")
    with Workflow(model.path, spec, int8_weight_levels=127) as flow:
        path, row = build_model(flow, model, OUT / f"{stem}.onnx", args.threads)
        log(f"{model.key}: evaluating {name}")
        start = time.perf_counter()
        figures, report = evaluate(model, path, reference, ref_out, args.threads)
        row.update(figures)
        row["evaluation_seconds"] = round(time.perf_counter() - start, 2)
        try:
            gate = flow.gate(report)
            row["default_gate"] = {
                "gate": gate.gate_text,
                "passed": gate.passed,
                "failures": [str(f) for f in gate.failures],
            }
        except Exception as exc:  # a gate the report cannot answer: recorded, not fatal
            row["default_gate"] = {"error": repr(exc)}
    if not args.keep_models:
        path.unlink(missing_ok=True)
    techniques = [
        f"smoothed {r['smoothed']}/{r['considered']}" if (r := row.get("smoothing")) else "",
        f"biases {r['corrected']}/{r['considered']}" if (r := row.get("bias_correction")) else "",
        (
            f"judged {j['sqnr_smoothed_db']:.1f} vs {j['sqnr_plain_db']:.1f} dB "
            f"({'kept' if j['kept'] else 'dropped'})"
            if (r := row.get("smoothing")) and (j := r.get("judged"))
            else ""
        ),
    ]
    log(
        f"{model.key}: {name}: {row['task']} sqnr {row['sqnr_db']:.2f} dB cos "
        f"{row['cosine']:.4f} {' '.join(t for t in techniques if t)}"
    )
    return row


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    specs = method_specs()
    add("--models", nargs="+", default=list(IN_DOMAIN), choices=list(MODELS))
    add("--methods", nargs="+", default=list(specs), choices=list(specs))
    add(
        "--plain",
        nargs="*",
        default=[m for m in ("auto", "entropy") if m in specs],
        choices=list(specs),
        help="methods also built with smoothing and bias correction off",
    )
    add("--calibration", type=int, default=64, help="calibration samples per model")
    add("--evaluation", type=int, default=128, help="evaluation samples per model")
    add("--threads", type=int, default=2)
    add("--seed", type=int, default=0)
    add("--keep-models", action="store_true", help="keep the built .onnx under bench/work")
    add("--output", default="int8_quality", help="result stem under bench/results")
    add("--readme", action="store_true", help="rewrite the README section from this run")
    add("--render", metavar="JSON", help="only re-render a saved result (tables, gate, README)")
    add("--merge", nargs="+", metavar="JSON", help="join saved results into --output")
    args = parser.parse_args(argv)
    args.specs = {m: specs[m] for m in args.methods}
    return args


def render_saved(path: Path, args: argparse.Namespace) -> int:
    """Recompute the gate table of a saved result and write its .json, .md (and README)."""
    import json

    result = json.loads(path.read_text(encoding="utf-8"))
    result["gate"] = gate_table(result["models"], SINGLE_METHODS)
    write_json(path, result)
    markdown = render(result)
    write_text(path.with_suffix(".md"), markdown)
    if args.readme:
        update_readme(ROOT / "bench" / "README.md", markdown)
    print(markdown)
    return 0


def merge_saved(paths: Sequence[Path], args: argparse.Namespace) -> int:
    """Join results of separate runs (one model each) into ``--output``: models in the order
    given, seconds summed, each run's settings kept under ``runs``."""
    import json

    runs = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    models = {k: v for run in runs for k, v in run["models"].items()}
    settings = dict(runs[0]["settings"])
    settings["models"] = list(models)
    settings["evaluation"] = sorted({run["settings"]["evaluation"] for run in runs})
    result = {
        "environment": runs[0]["environment"],
        "settings": settings,
        "seconds": round(sum(run["seconds"] for run in runs), 1),
        "runs": [
            {"file": p.name, "models": list(r["models"]), "seconds": r["seconds"],
             "settings": r["settings"], "trtforge": r["environment"].get("trtforge")}
            for p, r in zip(paths, runs, strict=True)
        ],
        "models": models,
    }
    path = RESULTS / f"{args.output}.json"
    write_json(path, result)
    return render_saved(path, args)


def source_state() -> dict[str, Any]:
    """The commit measured, and the files of the packages that differed from it (shared tree)."""
    import subprocess

    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    changed = git("status", "--short", "--", "calibrators", "engines")
    return {"commit": git("rev-parse", "HEAD"), "uncommitted": changed.splitlines()}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return render_saved(Path(args.render), args)
    if args.merge:
        return merge_saved([Path(p) for p in args.merge], args)
    seed_everything(args.seed)
    started = time.perf_counter()
    env = environment(args.threads)
    env["trtforge"] = source_state()
    models = {key: measure_model(key, args) for key in args.models}
    gates = gate_table(models, SINGLE_METHODS)
    seconds = round(time.perf_counter() - started, 1)
    settings = {k: v for k, v in vars(args).items() if k != "specs"}
    settings["method_specs"] = {m: s.model_dump(mode="json") for m, s in args.specs.items()}
    result = {
        "environment": env,
        "settings": settings,
        "seconds": seconds,
        "models": models,
        "gate": gates,
    }
    write_json(RESULTS / f"{args.output}.json", result)
    markdown = render(result)
    write_text(RESULTS / f"{args.output}.md", markdown)
    if args.readme:
        update_readme(ROOT / "bench" / "README.md", markdown)
    print(markdown)
    print(f"{seconds} s; wrote {RESULTS / args.output}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
