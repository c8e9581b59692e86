"""Variant sweeps and one automatic-mixed-precision run on real models (issue 4's proof).

For EfficientNet-Lite0 (224x224 crops of scikit-image's photos) and all-MiniLM-L6-v2 (tokenized
sentences), with trtforge's onnxruntime backend on this CPU:

1. ``engines.sweep.sweep`` with variants fp32, fp16, int8, int8-fp16 and ``auto:METRIC:VALUE``:
   per variant size, build time, latency percentiles, throughput, accuracy against FP32 on the
   held-out samples, speedup and the Pareto front; written as bench/results/sweep_<model>.
   {json,md,svg}. The auto variant's budget sits between what full INT8 reaches and FP32
   (``--budget-fraction`` of the way), measured first on the same split with the same
   calibration, so full INT8 misses it by construction.
2. One ``engines.mixed.search_mixed_precision`` run (``--amp-model``, EfficientNet by default)
   with a budget full INT8 misses, listing the kept nodes; bench/results/sweep_amp.{json,md}.
   It runs Q/DQ the way TensorRT computes it (``--amp-execution reference``: 8-bit weights,
   Q/DQ computed as written) by default, so the kept nodes are the ones that matter on TensorRT;
   the sweep's auto variant runs as the onnxruntime backend does (on x86 CPUs without AVX-VNNI:
   7-bit weights in ONNX Runtime's integer kernels).

    python bench/sweep.py [--quick] [--models efficientnet_lite0 minilm] [--threads 2] ...

Also written: sweep_summary.json (settings, environment, per-model summary). ``--quick``
(< 2 min on 2 idle cores) writes sweep_quick_* instead.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    CALIBRATION_SENTENCES,
    RESULTS,
    WORK,
    crops_of,
    distinct_photos,
    environment,
    log,
    markdown_table,
    seed_everything,
    write_json,
    write_text,
)
from calibrators.calibrate import calibrate
from calibrators.data import CalibrationDataset
from calibrators.spec import entropy
from calibrators.table import CalibrationTable
from core.errors import TrtforgeError
from engines.accuracy import compare
from engines.accuracy_report import AccuracyMetric, AccuracyReport, MetricBudget
from engines.backends.onnxruntime import OnnxRuntimeBackend
from engines.build import build_artifact
from engines.mixed import MixedPrecisionResult, search_mixed_precision
from engines.perf_report import BenchmarkOptions
from engines.spec import BackendName, BuildSpec, Precision
from engines.sweep import sweep
from engines.sweep_report import SweepReport, render_markdown
from engines.variants import QdqExecution, VariantEvaluator
from tests import zoo

MODELS = ("efficientnet_lite0", "minilm")


@dataclass(frozen=True)
class Subject:
    """A model, its whole dataset (the sweep splits it) and the sweep's accuracy metric."""

    key: str
    path: Path
    dataset: CalibrationDataset
    metric: AccuracyMetric
    eval_fraction: float
    notes: str


def efficientnet(args: argparse.Namespace) -> Subject:
    crops = crops_of(distinct_photos(), args.crops, seed=args.seed)
    data = CalibrationDataset.from_arrays({"input": zoo.preprocess_imagenet(crops)})
    return Subject(
        key="efficientnet_lite0",
        path=zoo.efficientnet_lite0(),
        dataset=data,
        metric=AccuracyMetric.TOP1_AGREEMENT,
        eval_fraction=args.eval_fraction,
        notes=f"{args.crops} 224x224 crops of all distinct scikit-image photos; the sweep holds "
        f"out {args.eval_fraction:.0%} of them at random (crops of one photo can fall on both "
        "sides; bench/accuracy.py splits by photo)",
    )


def minilm(args: argparse.Namespace) -> Subject:
    sentences = [*CALIBRATION_SENTENCES, *zoo.SENTENCES]
    data = CalibrationDataset.from_arrays(zoo.minilm_inputs(sentences, seq_len=args.seq_len))
    fraction = len(zoo.SENTENCES) / len(sentences)
    return Subject(
        key="minilm",
        path=zoo.minilm(),
        dataset=data,
        metric=AccuracyMetric.COSINE,
        eval_fraction=fraction,
        notes=f"{len(sentences)} sentences (bench/common.py + zoo.SENTENCES), seq {args.seq_len}; "
        f"{fraction:.0%} held out at random",
    )


# --- the budget --------------------------------------------------------------------------------


def full_int8_value(
    subject: Subject,
    table: CalibrationTable,
    evaluation: CalibrationDataset,
    execution: QdqExecution,
    threads: int,
) -> tuple[float, float]:
    """(metric, SQNR dB) of full INT8 on the held-out samples as the search evaluates it."""
    from engines.graph.inspect import load_model

    evaluator = VariantEvaluator(
        load_model(subject.path),
        BuildSpec(precision=Precision.INT8, backend=BackendName.ONNXRUNTIME),
        table,
        evaluation,
        max_samples=None,
        threads=threads,
        execution=execution,
    )
    return _values(subject, evaluator.evaluate(()))


def artifact_int8_value(
    subject: Subject, table: CalibrationTable, evaluation: CalibrationDataset, threads: int
) -> tuple[float, float]:
    """(metric, SQNR dB) of the full-INT8 artifact as the sweep measures its ``int8`` row:
    built by the onnxruntime backend, run by its runner, compared with the FP32 model."""
    spec = BuildSpec(precision=Precision.INT8, backend=BackendName.ONNXRUNTIME)
    out = WORK / "sweep" / f"{subject.key}-preflight-int8.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    artifact = build_artifact(subject.path, spec, table, out)
    backend = OnnxRuntimeBackend(intra_op_threads=threads)
    with backend.load(subject.path) as reference, backend.load(artifact.path) as candidate:
        return _values(subject, compare(reference, candidate, evaluation))


def _values(subject: Subject, report: AccuracyReport) -> tuple[float, float]:
    value = report.metric(subject.metric)
    sqnr = report.metric(AccuracyMetric.SQNR_DB)
    if value is None or sqnr is None:
        raise SystemExit(f"{subject.key}: the model reports no {subject.metric.value}")
    return value, sqnr


def pick_budget(metric: AccuracyMetric, full: float, sqnr: float, fraction: float) -> MetricBudget:
    """A budget ``fraction`` of the way from full INT8 to FP32 (1.0), which full INT8 misses.

    When full INT8 already matches FP32 in ``metric`` (e.g. every top-1 agrees), the budget is
    stated in SQNR instead: 6 dB above full INT8's.
    """
    if metric.higher_is_better and full < 1.0 - 1e-6:
        value = full + fraction * (1.0 - full)
        value = math.ceil(value * 1e4) / 1e4
        if value > full:
            return MetricBudget(metric=metric, value=min(value, 1.0))
    return MetricBudget(metric=AccuracyMetric.SQNR_DB, value=round(sqnr + 6.0, 1))


# --- the sweep ---------------------------------------------------------------------------------


def run_sweep(
    subject: Subject, budget: MetricBudget, args: argparse.Namespace, stem: str
) -> SweepReport:
    variants = ["fp32", "fp16", "int8", "int8-fp16", f"auto:{budget.metric.value}:{budget.value:g}"]
    options = BenchmarkOptions(
        warmup_ms=args.warmup_ms,
        duration_s=args.duration,
        iterations=args.iterations,
        batch_size=1,
    )
    out_dir = WORK / "sweep" / subject.key
    shutil.rmtree(out_dir, ignore_errors=True)
    log(f"{subject.key}: sweep {', '.join(variants)}")

    def progress(stage: str, fraction: float) -> None:
        log(f"{subject.key}: {stage} ({fraction:.0%})")

    report = sweep(
        subject.path,
        subject.dataset,
        variants,
        out_dir=out_dir,
        backend=BackendName.ONNXRUNTIME,
        eval_fraction=subject.eval_fraction,
        seed=args.seed,
        benchmark_options=options,
        base_spec=BuildSpec(calibration=entropy()),
        accuracy_metric=subject.metric,
        mixed_max_nodes=args.max_nodes,
        progress=progress,
    )
    for suffix in ("json", "svg"):
        shutil.copyfile(out_dir / f"sweep.{suffix}", RESULTS / f"{stem}_{subject.key}.{suffix}")
    return report


# --- the automatic mixed precision run ---------------------------------------------------------


def amp_run(
    subject: Subject,
    table: CalibrationTable,
    evaluation: CalibrationDataset,
    budget: MetricBudget,
    execution: QdqExecution,
    args: argparse.Namespace,
) -> MixedPrecisionResult:
    log(f"{subject.key}: search_mixed_precision for {budget} ({execution.value} execution)")
    return search_mixed_precision(
        subject.path,
        table,
        BuildSpec(precision=Precision.INT8, backend=BackendName.ONNXRUNTIME),
        evaluation,
        budget,
        max_nodes=args.max_nodes,
        all_but_this=False,
        max_samples=None,
        sensitivity_samples=args.sensitivity_samples,
        threads=args.threads,
        execution=execution,
    )


def render_amp(subject: Subject, result: MixedPrecisionResult) -> str:
    ranks = {}
    if result.sensitivity is not None:
        ranks = {n.node: n for n in result.sensitivity.nodes}
    rows = []
    for name in result.kept_nodes:
        node = ranks.get(name)
        rows.append(
            [
                f"`{name}`",
                node.op_type if node else "",
                node.rank if node else "",
                "-"
                if node is None or node.metric_only_this is None
                else f"{node.metric_only_this:.4g}",
                "-" if node is None else f"{node.proxy_sqnr_db:.1f}",
            ]
        )
    met = result.budget.met_by(result.value_reached)
    missed_full = not result.budget.met_by(result.value_full_int8)
    lines = [
        f"## Automatic mixed precision: {subject.key}",
        "",
        f"Budget **{result.budget}** on {result.samples} held-out samples, Q/DQ executed as "
        f"`{result.execution.value}`. Full INT8: {result.value_full_int8:.6g} "
        f"({'misses' if missed_full else 'already meets'} the budget). Keeping "
        f"{len(result.kept_nodes)} of {result.quantizable_nodes} quantizable nodes out of INT8 "
        f"reaches {result.value_reached:.6g} ({'meets' if met else 'MISSES'} the budget); "
        f"{result.int8_share:.0%} of the quantizable nodes stay INT8. {result.evaluations} "
        f"variants evaluated in {result.seconds:.1f} s.",
        "",
    ]
    if rows:
        metric = result.sensitivity.metric.value if result.sensitivity else ""
        lines.append(
            markdown_table(
                [
                    "kept node",
                    "op",
                    "sensitivity rank",
                    f"{metric} only this node INT8",
                    "proxy SQNR dB",
                ],
                rows,
            )
        )
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="small samples, short timings (< 2 min)"
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--crops", type=int, default=None, help="EfficientNet crops (default 320; quick 48)"
    )
    parser.add_argument(
        "--eval-fraction", type=float, default=0.2, help="EfficientNet held-out share"
    )
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument(
        "--duration", type=float, default=None, help="benchmark s (default 2; quick 0.2)"
    )
    parser.add_argument("--warmup-ms", type=float, default=None, help="default 200; quick 50")
    parser.add_argument("--iterations", type=int, default=None, help="default 10; quick 2")
    parser.add_argument(
        "--max-nodes", type=int, default=None, help="sensitivity evaluations (default 12; quick 3)"
    )
    parser.add_argument("--sensitivity-samples", type=int, default=None, help="default 32; quick 8")
    parser.add_argument(
        "--budget-fraction",
        type=float,
        default=0.5,
        help="budget between full INT8 (0) and FP32 (1)",
    )
    parser.add_argument("--amp-model", choices=MODELS, default="efficientnet_lite0")
    parser.add_argument(
        "--amp-execution",
        choices=[e.value for e in QdqExecution],
        default=QdqExecution.REFERENCE.value,
    )
    parser.add_argument("--skip-amp", action="store_true")
    parser.add_argument(
        "--output", default=None, help="result file stem (default sweep; quick sweep_quick)"
    )
    args = parser.parse_args(argv)
    defaults = {
        "crops": (320, 48),
        "duration": (2.0, 0.2),
        "warmup_ms": (200.0, 50.0),
        "iterations": (10, 2),
        "max_nodes": (12, 3),
        "sensitivity_samples": (32, 8),
        "output": ("sweep", "sweep_quick"),
    }
    for name, (full, small) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if args.quick else full)
    if not 0 < args.budget_fraction < 1:
        parser.error("--budget-fraction must be in (0, 1)")
    return args


def sweep_model(subject: Subject, args: argparse.Namespace) -> dict[str, Any]:
    """Pick the auto budget from the full-INT8 artifact, sweep, and (for ``--amp-model``) run
    the standalone search."""
    calibration, evaluation = subject.dataset.split(subject.eval_fraction, args.seed)
    log(f"{subject.key}: calibrating (entropy) on {len(calibration)} samples for the budget")
    table = calibrate(subject.path, calibration, entropy(), threads=args.threads)
    full, sqnr = artifact_int8_value(subject, table, evaluation, args.threads)
    budget = pick_budget(subject.metric, full, sqnr, args.budget_fraction)
    log(f"{subject.key}: full INT8 artifact {subject.metric.value} {full:.6g}; auto {budget}")
    report = run_sweep(subject, budget, args, args.output)
    out: dict[str, Any] = {
        "notes": subject.notes,
        "full_int8_artifact": {subject.metric.value: full, "sqnr_db": sqnr},
        "auto_budget": str(budget),
        "report": f"{args.output}_{subject.key}.json",
        "summary": [
            {
                "variant": v.name,
                "accuracy": v.accuracy_value,
                "p50_ms": v.latency_p50_ms,
                "speedup_vs_fp32": v.speedup_vs_fp32,
                "kept_nodes": v.kept_nodes,
                "pareto": v.pareto,
                "budget_value": v.accuracy.budget_value,
                "mixed": None
                if v.mixed is None
                else {
                    "budget": v.mixed.budget.model_dump(mode="json"),
                    "value_full_int8": v.mixed.value_full_int8,
                },
            }
            for v in report.variants
        ],
        "failed": [f.model_dump(mode="json") for f in getattr(report, "failed", [])],
        "markdown": render_markdown(report),
    }
    if not args.skip_amp and subject.key == args.amp_model:
        execution = QdqExecution(args.amp_execution)
        full, sqnr = full_int8_value(subject, table, evaluation, execution, args.threads)
        amp_budget = pick_budget(subject.metric, full, sqnr, args.budget_fraction)
        try:
            out["amp"] = amp_run(subject, table, evaluation, amp_budget, execution, args)
        except TrtforgeError as exc:  # e.g. AccuracyBudgetError: report it, keep the sweep
            out["amp_error"] = f"{amp_budget}: {exc}"
    return out


def check(key: str, out: dict[str, Any]) -> list[str]:
    """What went wrong in one model's sweep: failed variants, an auto variant that does not
    meet its budget or whose budget full INT8 already meets, a failed AMP run."""
    problems = [f"MISSED: {key} variant {f['name']} failed: {f['message']}" for f in out["failed"]]
    for v in out["summary"]:
        mixed = v.get("mixed")
        if mixed is None:
            continue
        budget = MetricBudget.model_validate(mixed["budget"])
        if budget.met_by(mixed["value_full_int8"]):
            problems.append(f"MISSED: {key} {v['variant']}: full INT8 already meets {budget}")
        if not budget.met_by(v["budget_value"]):
            problems.append(f"MISSED: {key} {v['variant']} does not meet {budget}")
    if "amp_error" in out:
        problems.append(f"MISSED: {key} automatic mixed precision failed: {out['amp_error']}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    seed_everything(args.seed)
    started = time.perf_counter()
    env = environment(args.threads)
    builders = {"efficientnet_lite0": efficientnet, "minilm": minilm}
    header = (
        f"{env['date']} on {env['machine']['cpu']} ({env['machine']['logical_cpus']} logical CPUs, "
        f"{env['machine']['memory_gib']} GiB), {args.threads} threads, onnxruntime "
        f"{env['onnxruntime']}{' (--quick)' if args.quick else ''}."
    )
    sections: list[str] = []
    results: dict[str, Any] = {}
    amp: tuple[Subject, MixedPrecisionResult] | None = None
    problems: list[str] = []
    for key in args.models:
        log(f"{key}: preparing data")
        subject = builders[key](args)
        try:
            out = sweep_model(subject, args)
        except TrtforgeError as exc:  # keep going with the other model
            problems.append(f"MISSED: the {key} sweep failed: {exc}")
            log(problems[-1])
            continue
        problems += check(key, out)
        title, _, rest = out.pop("markdown").partition("\n")
        md = (
            f"{title}\n\n{header} {subject.notes}. The full-INT8 artifact, measured first on the "
            f"same split: {subject.metric.value} "
            f"{out['full_int8_artifact'][subject.metric.value]:.6g}, so the auto variant's budget "
            f"is {out['auto_budget']}.\n{rest}"
        )
        write_text(RESULTS / f"{args.output}_{key}.md", md)
        sections.append(md)
        if "amp" in out:
            amp = (subject, out.pop("amp"))
        results[key] = out
    if amp is not None:
        subject, result = amp
        text = render_amp(subject, result)
        sections.append(text)
        write_text(
            RESULTS / f"{args.output}_amp.md",
            f"# trtforge automatic mixed precision\n\n{header}\n\n{text}",
        )
        write_json(
            RESULTS / f"{args.output}_amp.json",
            {"environment": env, "model": subject.key, "result": result.model_dump(mode="json")},
        )
    seconds = round(time.perf_counter() - started, 1)
    write_json(
        RESULTS / f"{args.output}_summary.json",
        {"environment": env, "settings": vars(args), "seconds": seconds, "models": results},
    )
    print("\n\n".join(sections))
    print(f"\n{seconds} s; results in {RESULTS}/{args.output}_*")
    if amp is not None:
        _, result = amp
        if result.budget.met_by(result.value_full_int8):
            problems.append(
                f"MISSED: full INT8 already meets {result.budget}; pick a tighter budget"
            )
        if not result.budget.met_by(result.value_reached):
            problems.append(f"MISSED: the mixed-precision result does not meet {result.budget}")
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
