"""Accuracy, size and CPU latency of trtforge's builds on real models (issue 3's quality bar).

One run measures, with trtforge's onnxruntime backend on this CPU (2 threads by default):

1. EfficientNet-Lite0 INT8 (entropy): ``calibrate`` -> ``build_artifact`` against ONNX Runtime's
   own ``quantize_static`` (QDQ, per-channel weights, CalibrationMethod.Entropy, symmetric INT8
   activations), both calibrated on the same crops and evaluated on the same crops, taken from
   *different photos* (scikit-image's samples split by photo). Metric: top-1 (and top-5)
   agreement with FP32. Target: ours >= ORT - 1 point.
2. Fashion-MNIST CNN INT8 (entropy, calibrated on training images): labelled test accuracy.
   Target: loss <= 0.5 point.
3. MiniLM FP16: sentence-embedding cosine similarity with FP32. Target: mean and min >= 0.999.
4. A table per model: FP32 / FP16 / INT8 entropy / INT8 minmax / INT8 percentile / INT8-FP16:
   accuracy, artifact size, CPU latency at batch 1 and the model's natural batch.

How INT8 runs matters on a CPU, so INT8 accuracy is reported in up to three ways:

- **TensorRT arithmetic** (primary): the Q/DQ model with full 8-bit weights, as trtforge hands it
  to TensorRT (``prepare_model``), run with ONNX Runtime's Q/DQ fusions off: float compute on
  INT8-rounded tensors, which is what TensorRT's INT8 kernels (int32 accumulation) compute.
- **as built, ORT session**: the onnxruntime backend's artifact run as its runner runs it (Q/DQ
  fused into ONNX Runtime's integer kernels). On x86 CPUs without AVX-VNNI those kernels
  saturate u8 x s8 products, so there the backend writes 7-bit weights (ORT's ``reduce_range``);
  the ORT baseline is then quantized with ``reduce_range`` too (ORT's advice for such CPUs).
- **as built, emulated**: the same artifact with the fusions off (section 1 only).

Latency is always the backend's default session. Every target is judged and printed; a miss
says MISSED (and the exit status is 1).

    python bench/accuracy.py [--quick] [--threads 2] [--cal-crops 256] [--eval-crops 512] ...

Writes bench/results/accuracy.{json,md} (``--quick``: accuracy_quick.*).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.accuracy_report import (
    BUILT_EMULATED,
    ORT,
    TRT,
    render,
    targets,
)
from bench.common import (
    CALIBRATION_SENTENCES,
    RESULTS,
    WORK,
    QdqEmulationRunner,
    activation_amax,
    crops_of,
    distinct_photos,
    environment,
    log,
    ort_quantize_static,
    photo_split,
    qdq_census,
    replace_activation_scales,
    seed_everything,
    write_json,
    write_text,
)
from calibrators.calibrate import calibrate
from calibrators.data import CalibrationDataset
from calibrators.spec import MethodSpec, entropy, minmax, percentile
from calibrators.table import CalibrationTable
from core.errors import TrtforgeError
from engines.accuracy import compare
from engines.accuracy_report import AccuracyMetric, AccuracyReport
from engines.backends.onnxruntime import OnnxRuntimeBackend
from engines.benchmark import benchmark
from engines.build import build_artifact
from engines.perf_report import BenchmarkOptions
from engines.spec import BackendName, BuildSpec, Precision
from engines.variants import MemoizedRunner
from tests import zoo

OUT = WORK / "accuracy"


@dataclass(frozen=True)
class Variant:
    name: str
    precision: Precision
    method: str | None  # calibration method of INT8 variants


VARIANTS = (
    Variant("fp32", Precision.FP32, None),
    Variant("fp16", Precision.FP16, None),
    Variant("int8 entropy", Precision.INT8, "entropy"),
    Variant("int8 minmax", Precision.INT8, "minmax"),
    Variant("int8 percentile", Precision.INT8, "percentile"),
    Variant("int8-fp16 entropy", Precision.INT8_FP16, "entropy"),
)
QUICK_VARIANTS = ("fp32", "fp16", "int8 entropy")
METHODS: dict[str, Callable[[], MethodSpec]] = {
    "entropy": entropy,
    "minmax": minmax,
    "percentile": percentile,
}


@dataclass
class Case:
    """One model with its calibration and evaluation data and how it is judged."""

    key: str
    title: str
    path: Path
    calibration: dict[str, np.ndarray]
    evaluation: dict[str, np.ndarray]
    metric: AccuracyMetric
    batch: int
    labels: np.ndarray | None = None
    notes: str = ""
    tables: dict[str, CalibrationTable] = field(default_factory=dict)
    artifacts: dict[str, Path] = field(default_factory=dict)
    weights_8bit: dict[str, Path] = field(default_factory=dict)

    @property
    def eval_set(self) -> CalibrationDataset:
        return CalibrationDataset.from_arrays(self.evaluation)

    @property
    def eval_count(self) -> int:
        return int(next(iter(self.evaluation.values())).shape[0])

    def table(self, method: str, threads: int) -> CalibrationTable:
        if method not in self.tables:
            count = int(next(iter(self.calibration.values())).shape[0])
            log(f"{self.key}: calibrating ({method}) on {count} samples")
            data = CalibrationDataset.from_arrays(self.calibration)
            self.tables[method] = calibrate(self.path, data, METHODS[method](), threads=threads)
        return self.tables[method]


# --- cases -----------------------------------------------------------------------------------


def efficientnet_case(args: argparse.Namespace) -> Case:
    cal_photos, eval_photos = photo_split(distinct_photos(), args.eval_photos)
    cal = zoo.preprocess_imagenet(crops_of(cal_photos, args.cal_crops, seed=args.seed))
    ev = zoo.preprocess_imagenet(crops_of(eval_photos, args.eval_crops, seed=args.seed + 1))
    return Case(
        key="efficientnet_lite0",
        title="EfficientNet-Lite0",
        path=zoo.efficientnet_lite0(),
        calibration={"input": cal},
        evaluation={"input": ev},
        metric=AccuracyMetric.TOP1_AGREEMENT,
        batch=args.effnet_batch,
        notes=f"{len(cal)} calibration crops of {', '.join(p.name for p in cal_photos)}; "
        f"{len(ev)} evaluation crops of {', '.join(p.name for p in eval_photos)} "
        "(scikit-image photos, split by photo)",
    )


def fashion_case(args: argparse.Namespace) -> Case:
    train, _ = zoo.fashion_mnist("train")
    test, labels = zoo.fashion_mnist("test")
    count = min(args.fashion_eval, len(test))
    return Case(
        key="fashion_cnn",
        title="Fashion-MNIST CNN",
        path=zoo.fashion_cnn(),
        calibration={"image": np.ascontiguousarray(train[: args.fashion_cal])},
        evaluation={"image": np.ascontiguousarray(test[:count])},
        metric=AccuracyMetric.ACCURACY,
        batch=args.fashion_batch,
        labels=labels[:count],
        notes=f"calibrated on the first {args.fashion_cal} training images; "
        f"evaluated on the first {count} test images (labelled accuracy)",
    )


def minilm_case(args: argparse.Namespace) -> Case:
    return Case(
        key="minilm",
        title="all-MiniLM-L6-v2",
        path=zoo.minilm(),
        calibration=zoo.minilm_inputs(CALIBRATION_SENTENCES, seq_len=args.seq_len),
        evaluation=zoo.minilm_inputs(None, seq_len=args.seq_len),
        metric=AccuracyMetric.COSINE,
        batch=args.minilm_batch,
        notes=f"INT8 calibrated on {len(CALIBRATION_SENTENCES)} sentences (bench/common.py); "
        f"evaluated on the {len(zoo.SENTENCES)} zoo.SENTENCES, sequence length {args.seq_len}",
    )


CASES: dict[str, Callable[[argparse.Namespace], Case]] = {
    "efficientnet_lite0": efficientnet_case,
    "fashion_cnn": fashion_case,
    "minilm": minilm_case,
}


# --- measuring -------------------------------------------------------------------------------


def summarize(report: AccuracyReport) -> dict[str, Any]:
    out = report.outputs[0]
    keys = (
        "top1_agreement",
        "top5_agreement",
        "reference_accuracy",
        "candidate_accuracy",
        "accuracy_drop",
        "cosine_similarity",
        "min_cosine_similarity",
        "sqnr_db",
        "max_abs_error",
    )
    return {k: getattr(out, k) for k in keys if getattr(out, k) is not None}


def accuracy_of(
    case: Case, path: Path, reference: MemoizedRunner, threads: int, *, emulated: bool
) -> dict[str, Any]:
    """Accuracy summary of the model at ``path``: Q/DQ emulated, or the backend's runner."""
    if emulated:
        runner: Any = QdqEmulationRunner(path, threads=threads)
    else:
        backend = OnnxRuntimeBackend(intra_op_threads=threads, providers=["CPUExecutionProvider"])
        runner = backend.load(path)
    with runner:
        report = compare(reference, runner, case.eval_set, batch_size=16, labels=case.labels)
    return summarize(report)


def latency(case: Case, path: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """p50/mean/p90 latency and throughput at batch 1 and the natural batch (default session)."""
    options = BenchmarkOptions(
        warmup_ms=args.warmup_ms, duration_s=args.duration, iterations=args.iterations
    )
    backend = OnnxRuntimeBackend(intra_op_threads=args.threads, providers=["CPUExecutionProvider"])
    out: dict[str, dict[str, float]] = {}
    with backend.load(path) as runner:
        for batch in sorted({1, case.batch}):
            perf = benchmark(
                runner, case.eval_set, options.model_copy(update={"batch_size": batch})
            )
            out[str(batch)] = {
                "p50_ms": perf.latency.median_ms,
                "mean_ms": perf.latency.mean_ms,
                "p90_ms": perf.latency.p90_ms,
                "throughput_qps": perf.throughput_qps,
                "queries": perf.queries,
            }
    return out


def spec_of(variant: Variant) -> BuildSpec:
    spec = BuildSpec(precision=variant.precision, backend=BackendName.ONNXRUNTIME)
    if variant.method:
        spec = spec.model_copy(update={"calibration": METHODS[variant.method]()})
    return spec


def save_8bit(case: Case, variant: Variant, table: CalibrationTable, out: Path) -> Path:
    """The Q/DQ model with full 8-bit weights, as trtforge hands it to TensorRT."""
    import onnx

    from engines.graph import prepare_model
    from engines.graph.inspect import load_model

    prepared = prepare_model(load_model(case.path), spec_of(variant), table, weight_levels=127)
    onnx.save(prepared.model, str(out))
    return out


def measure_variant(
    case: Case, variant: Variant, reference: MemoizedRunner, args: argparse.Namespace
) -> dict[str, Any]:
    table = case.table(variant.method, args.threads) if variant.method else None
    stem = f"{case.key}-{variant.name.replace(' ', '-')}"
    log(f"{case.key}: building {variant.name}")
    start = time.perf_counter()
    artifact = build_artifact(case.path, spec_of(variant), table, OUT / f"{stem}.onnx")
    build_s = time.perf_counter() - start
    case.artifacts[variant.name] = artifact.path
    log(f"{case.key}: evaluating {variant.name}")
    accuracy = {ORT: accuracy_of(case, artifact.path, reference, args.threads, emulated=False)}
    if table is not None:
        path = save_8bit(case, variant, table, OUT / f"{stem}-8bit-weights.onnx")
        case.weights_8bit[variant.name] = path
        accuracy[TRT] = accuracy_of(case, path, reference, args.threads, emulated=True)
    else:
        accuracy[TRT] = accuracy[ORT]
    log(f"{case.key}: timing {variant.name}")
    return {
        "variant": variant.name,
        "precision": variant.precision.value,
        "calibration": variant.method,
        "artifact": artifact.path.name,
        "size_bytes": artifact.metadata.size_bytes,
        "build_seconds": round(build_s, 2),
        "int8_weights": artifact.metadata.options.get("int8_weights"),
        "quantized_nodes": len(artifact.metadata.quantized_nodes),
        "fp32_nodes": len(artifact.metadata.fp32_nodes),
        "accuracy": accuracy,
        "latency": latency(case, artifact.path, args),
    }


# --- section 1: against ONNX Runtime's quantize_static -----------------------------------------


def versus_ort(
    case: Case, row: dict[str, Any], reference: MemoizedRunner, args: argparse.Namespace
) -> dict[str, Any]:
    """Our INT8 entropy models against ORT's, plus two crossed models (TensorRT arithmetic) that
    separate the effect of the ranges from the effect of the Q/DQ placement."""
    threads = args.threads
    ours_built = case.artifacts["int8 entropy"]
    ours_8bit = case.weights_8bit["int8 entropy"]
    seven_bit = "7-bit" in str(row.get("int8_weights") or "")
    cache = OUT / "ort-calibration-cache.json"
    cache.unlink(missing_ok=True)
    log("efficientnet_lite0: onnxruntime.quantization.quantize_static (entropy)")
    start = time.perf_counter()
    ort_8bit = ort_quantize_static(
        case.path,
        OUT / "efficientnet_lite0-ort-quantize_static.onnx",
        case.calibration,
        cache_path=cache,
        stride_batches=args.ort_stride,
    )
    ort_seconds = time.perf_counter() - start
    ort_built = ort_8bit
    if seven_bit:
        ort_built = ort_quantize_static(
            case.path,
            OUT / "efficientnet_lite0-ort-quantize_static-reduce_range.onnx",
            case.calibration,
            reduce_range=True,
            cache_path=cache,
        )
    log("efficientnet_lite0: evaluating ORT's models and the crossed models")
    ours = {
        TRT: row["accuracy"][TRT],
        ORT: row["accuracy"][ORT],
        BUILT_EMULATED: accuracy_of(case, ours_built, reference, threads, emulated=True),
    }
    theirs = {
        TRT: accuracy_of(case, ort_8bit, reference, threads, emulated=True),
        ORT: accuracy_of(case, ort_built, reference, threads, emulated=False),
        BUILT_EMULATED: accuracy_of(case, ort_built, reference, threads, emulated=True),
    }
    ort_default_session = None
    crossed: dict[str, dict[str, Any]] = {}
    if args.diagnostics:
        if seven_bit:
            ort_default_session = accuracy_of(case, ort_8bit, reference, threads, emulated=False)
        crossed = crossed_models(case, ort_8bit, reference, threads)
    verdicts = {}
    for mode in (TRT, ORT, BUILT_EMULATED):
        mine, base = ours[mode]["top1_agreement"], theirs[mode]["top1_agreement"]
        verdicts[mode] = {
            "ours_top1": mine,
            "ort_top1": base,
            "difference_points": 100 * (mine - base),
            "passed": mine >= base - 0.01,
        }
    log("efficientnet_lite0: timing ORT's model")
    return {
        "ours": ours,
        "ort": theirs,
        "latency": {"ours": row["latency"], "ort": latency(case, ort_built, args)},
        "ort_8bit_weights_ort_session": ort_default_session,
        "ort_reduce_range_for_as_built": seven_bit,
        "ort_quantize_seconds": round(ort_seconds, 1),
        "ort_size_bytes": ort_built.stat().st_size,
        "placement": {"ours": qdq_census(ours_8bit), "ort": qdq_census(ort_8bit)},
        "crossed_tensorrt_arithmetic": crossed,
        "verdicts": verdicts,
    }


def crossed_models(
    case: Case, ort_8bit: Path, reference: MemoizedRunner, threads: int
) -> dict[str, dict[str, Any]]:
    """Our placement with ORT's activation ranges, ORT's placement with ours (8-bit, emulated)."""
    ours_table = case.tables["entropy"]
    ort_table = CalibrationTable(amax=activation_amax(ort_8bit))
    variant = next(v for v in VARIANTS if v.name == "int8 entropy")
    ours_with_ort = save_8bit(
        case, variant, ort_table, OUT / "efficientnet_lite0-ours-ort-ranges.onnx"
    )
    scales = {t: ours_table.scale(t) for t, a in ours_table.amax.items() if a > 0}
    ort_with_ours, replaced = replace_activation_scales(
        ort_8bit, OUT / "efficientnet_lite0-ort-our-ranges.onnx", scales
    )
    return {
        "range comparison": range_comparison(ours_table, ort_table),
        "our placement, ORT's ranges": accuracy_of(
            case, ours_with_ort, reference, threads, emulated=True
        ),
        f"ORT's placement, our ranges ({replaced} scales replaced)": accuracy_of(
            case, ort_with_ours, reference, threads, emulated=True
        ),
    }


def range_comparison(ours: CalibrationTable, ort: CalibrationTable) -> dict[str, Any]:
    """How our entropy amax compares with ORT's on the activations both quantize."""
    common = sorted(t for t in ort.amax if ours.amax.get(t, 0) > 0 and ort.amax[t] > 0)
    ratio = {t: ours.amax[t] / ort.amax[t] for t in common}
    values = np.array(list(ratio.values())) if ratio else np.ones(1)
    tightest = sorted(ratio, key=ratio.__getitem__)[:8]
    return {
        "tensors": len(common),
        "median_ratio_ours_to_ort": float(np.median(values)),
        "ours_tighter_by_over_20_percent": int(np.count_nonzero(values < 0.8)),
        "ours_wider_by_over_20_percent": int(np.count_nonzero(values > 1.25)),
        "tightest": {t: [round(ours.amax[t], 4), round(ort.amax[t], 4)] for t in tightest},
    }


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="few samples, short timings, 3 variants (< 2 min)")
    add("--threads", type=int, default=2)
    add("--seed", type=int, default=0)
    add("--models", nargs="+", default=list(CASES), choices=list(CASES))
    add(
        "--variants",
        nargs="+",
        default=None,
        help="default all (quick: fp32, fp16, int8 entropy): "
        + ", ".join(v.name for v in VARIANTS),
    )
    add(
        "--cal-crops", type=int, default=None, help="EfficientNet calibration crops (256; quick 16)"
    )
    add(
        "--eval-crops", type=int, default=None, help="EfficientNet evaluation crops (512; quick 64)"
    )
    add(
        "--eval-photos",
        nargs="+",
        default=None,
        help="photos held out for evaluation (default: every second distinct photo)",
    )
    add(
        "--fashion-cal",
        type=int,
        default=None,
        help="training images to calibrate on (1000; quick 256)",
    )
    add("--fashion-eval", type=int, default=None, help="test images (10000; quick 2000)")
    add("--seq-len", type=int, default=32)
    add("--effnet-batch", type=int, default=8)
    add("--fashion-batch", type=int, default=64)
    add("--minilm-batch", type=int, default=32)
    add("--duration", type=float, default=None, help="benchmark seconds per point (2; quick 0.2)")
    add("--warmup-ms", type=float, default=None, help="benchmark warm-up (200; quick 50)")
    add("--iterations", type=int, default=None, help="minimum timed queries (10; quick 2)")
    add("--ort-stride", type=int, default=4, help="batches of 8 per ORT histogram collection")
    add("--skip-ort", action="store_true", help="skip the quantize_static comparison")
    add(
        "--diagnostics",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="crossed range/placement models and ORT's 8-bit model in its session (default on; "
        "quick off)",
    )
    add(
        "--output",
        default=None,
        help="result stem under bench/results (accuracy; quick accuracy_quick)",
    )
    args = parser.parse_args(argv)
    defaults: dict[str, tuple[Any, Any]] = {
        "cal_crops": (256, 16),
        "eval_crops": (512, 64),
        "diagnostics": (True, False),
        "fashion_cal": (1000, 256),
        "fashion_eval": (10000, 2000),
        "duration": (2.0, 0.2),
        "warmup_ms": (200.0, 50.0),
        "iterations": (10, 2),
        "output": ("accuracy", "accuracy_quick"),
        "variants": ([v.name for v in VARIANTS], list(QUICK_VARIANTS)),
    }
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    unknown = set(args.variants) - {v.name for v in VARIANTS}
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}")
    return args


def run_case(
    case: Case, args: argparse.Namespace
) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    rows: dict[str, dict[str, Any]] = {}
    vs_ort = None
    backend = OnnxRuntimeBackend(intra_op_threads=args.threads, providers=["CPUExecutionProvider"])
    with MemoizedRunner(backend.load(case.path)) as reference:
        for variant in VARIANTS:
            if variant.name not in args.variants:
                continue
            try:
                rows[variant.name] = measure_variant(case, variant, reference, args)
            except TrtforgeError as exc:  # record it, go on with the other variants
                log(f"{case.key}: {variant.name} FAILED: {exc.message}")
                rows[variant.name] = {"variant": variant.name, "error": f"{exc.code}: {exc}"}
        entropy_row = rows.get("int8 entropy", {})
        if case.key == "efficientnet_lite0" and not args.skip_ort and "accuracy" in entropy_row:
            try:
                vs_ort = versus_ort(case, entropy_row, reference, args)
            except Exception as exc:  # ORT's quantizer raises anything; keep the other results
                log(f"{case.key}: the quantize_static comparison FAILED: {exc!r}")
                vs_ort = {"error": repr(exc)}
    return rows, vs_ort


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    seed_everything(args.seed)
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    env = environment(args.threads)
    cases: dict[str, Case] = {}
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    vs_ort = None
    for key in args.models:
        log(f"{key}: preparing data")
        cases[key] = CASES[key](args)
        rows[key], found = run_case(cases[key], args)
        vs_ort = found or vs_ort
    goals = targets(cases, rows, vs_ort)
    markdown = render(env, cases, rows, vs_ort, goals, args)
    seconds = round(time.perf_counter() - started, 1)
    result = {
        "environment": env,
        "settings": vars(args),
        "seconds": seconds,
        "targets": goals,
        "efficientnet_vs_ort": vs_ort,
        "variants": rows,
        "cases": {k: c.notes for k, c in cases.items()},
    }
    write_json(RESULTS / f"{args.output}.json", result)
    write_text(RESULTS / f"{args.output}.md", markdown)
    print(markdown)
    print(f"{seconds} s; wrote {RESULTS / args.output}.json and .md")
    missed = [g for g in goals if not g["passed"]]
    for g in missed:
        print(f"MISSED{'' if g['primary'] else ' (secondary)'}: {g['target']}: {g['value']}")
    return 1 if any(g["primary"] for g in missed) else 0


if __name__ == "__main__":
    sys.exit(main())
