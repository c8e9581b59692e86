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

INT8 accuracy is reported two ways, because ONNX Runtime's CPU INT8 kernels are not what a
TensorRT engine computes: *emulated* runs the Q/DQ model with ONNX Runtime's Q/DQ fusions off
(float compute on INT8-rounded tensors, TensorRT's arithmetic; the primary number), *ORT
kernels* runs it as the onnxruntime backend's runner does by default (Q/DQ fused into
QLinearConv etc.; on x86 CPUs without AVX-VNNI their u8s8 products saturate). Latency is always
the backend's default session. Every target is judged and printed; a miss says MISSED.

    python bench/accuracy.py [--quick] [--threads 2] [--cal-crops 256] [--eval-crops 512] ...

Writes bench/results/accuracy.{json,md} (``--quick``: accuracy_quick.*).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    CALIBRATION_SENTENCES,
    RESULTS,
    WORK,
    QdqEmulationRunner,
    crops_of,
    distinct_photos,
    environment,
    fmt_bytes,
    fmt_pct,
    log,
    markdown_table,
    photo_split,
    seed_everything,
    write_json,
    write_text,
)
from calibrators.calibrate import calibrate
from calibrators.data import CalibrationDataset
from calibrators.methods import MethodSpec, entropy, minmax, percentile
from calibrators.table import CalibrationTable
from engines.accuracy import AccuracyMetric, AccuracyReport, compare
from engines.backends.onnxruntime import OnnxRuntimeBackend
from engines.benchmark import BenchmarkOptions, benchmark
from engines.build import build_artifact
from engines.sensitivity import MemoizedRunner
from engines.spec import BackendName, BuildSpec, Precision
from tests import zoo

OUT = WORK / "accuracy"
MODES = ("emulated", "ort_kernels")


@dataclass(frozen=True)
class Variant:
    name: str
    precision: Precision
    method: str | None  # calibration method for INT8 variants


VARIANTS = (
    Variant("fp32", Precision.FP32, None),
    Variant("fp16", Precision.FP16, None),
    Variant("int8 entropy", Precision.INT8, "entropy"),
    Variant("int8 minmax", Precision.INT8, "minmax"),
    Variant("int8 percentile", Precision.INT8, "percentile"),
    Variant("int8-fp16 entropy", Precision.INT8_FP16, "entropy"),
)
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

    @property
    def eval_set(self) -> CalibrationDataset:
        return CalibrationDataset.from_arrays(self.evaluation)

    def table(self, method: str, threads: int) -> CalibrationTable:
        if method not in self.tables:
            log(f"{self.key}: calibrating ({method}) on {_count(self.calibration)} samples")
            data = CalibrationDataset.from_arrays(self.calibration)
            self.tables[method] = calibrate(self.path, data, METHODS[method](), threads=threads)
        return self.tables[method]


def _count(arrays: dict[str, np.ndarray]) -> int:
    return int(next(iter(arrays.values())).shape[0])


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
        notes=f"{len(cal)} calibration crops of {[p.name for p in cal_photos]}; "
        f"{len(ev)} evaluation crops of {[p.name for p in eval_photos]}",
    )


def fashion_case(args: argparse.Namespace) -> Case:
    train, _ = zoo.fashion_mnist("train")
    test, labels = zoo.fashion_mnist("test")
    return Case(
        key="fashion_cnn",
        title="Fashion-MNIST CNN",
        path=zoo.fashion_cnn(),
        calibration={"image": np.ascontiguousarray(train[: args.fashion_cal])},
        evaluation={"image": np.ascontiguousarray(test[: args.fashion_eval])},
        metric=AccuracyMetric.ACCURACY,
        batch=args.fashion_batch,
        labels=labels[: args.fashion_eval],
        notes=f"calibrated on the first {args.fashion_cal} training images; "
        f"evaluated on the first {min(args.fashion_eval, len(test))} test images",
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
        f"evaluated on zoo.SENTENCES ({len(zoo.SENTENCES)}), seq {args.seq_len}",
    )


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


def evaluate(
    case: Case, path: Path, reference: MemoizedRunner, threads: int, quantized: bool
) -> dict[str, dict[str, Any]]:
    """Per execution mode (both for Q/DQ models, one otherwise): the accuracy summary."""
    results: dict[str, dict[str, Any]] = {}
    loader = OnnxRuntimeBackend(intra_op_threads=threads, providers=["CPUExecutionProvider"])
    runners: list[tuple[str, Any]] = [("ort_kernels", lambda: loader.load(path))]
    if quantized:
        runners.insert(0, ("emulated", lambda: QdqEmulationRunner(path, threads=threads)))
    for mode, open_runner in runners:
        with open_runner() as candidate:
            report = compare(reference, candidate, case.eval_set, batch_size=16, labels=case.labels)
        results[mode] = summarize(report)
    if not quantized:
        results["emulated"] = results["ort_kernels"]
    return results


def latency(case: Case, path: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """p50/mean/p90 latency and throughput at batch 1 and the natural batch (default session)."""
    options = BenchmarkOptions(
        warmup_ms=args.warmup_ms, duration_s=args.duration, iterations=args.iterations
    )
    loader = OnnxRuntimeBackend(intra_op_threads=args.threads, providers=["CPUExecutionProvider"])
    out: dict[str, dict[str, float]] = {}
    with loader.load(path) as runner:
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


def measure_variant(
    case: Case, variant: Variant, reference: MemoizedRunner, args: argparse.Namespace
) -> dict[str, Any]:
    table = case.table(variant.method, args.threads) if variant.method else None
    spec = BuildSpec(precision=variant.precision, backend=BackendName.ONNXRUNTIME)
    if variant.method:
        spec = spec.model_copy(update={"calibration": METHODS[variant.method]()})
    name = f"{case.key}-{variant.name.replace(' ', '-')}.onnx"
    log(f"{case.key}: building {variant.name}")
    start = time.perf_counter()
    artifact = build_artifact(case.path, spec, table, OUT / name)
    build_s = time.perf_counter() - start
    case.artifacts[variant.name] = artifact.path
    quantized = variant.precision.uses_int8
    log(f"{case.key}: evaluating {variant.name}")
    accuracy = evaluate(case, artifact.path, reference, args.threads, quantized)
    log(f"{case.key}: timing {variant.name}")
    return {
        "variant": variant.name,
        "precision": variant.precision.value,
        "calibration": variant.method,
        "artifact": artifact.path.name,
        "size_bytes": artifact.metadata.size_bytes,
        "build_seconds": round(build_s, 2),
        "quantized_nodes": len(artifact.metadata.quantized_nodes),
        "fp32_nodes": len(artifact.metadata.fp32_nodes),
        "accuracy": accuracy,
        "latency": latency(case, artifact.path, args),
    }


def metric_value(case: Case, accuracy: dict[str, Any]) -> float:
    key = {
        AccuracyMetric.TOP1_AGREEMENT: "top1_agreement",
        AccuracyMetric.ACCURACY: "candidate_accuracy",
        AccuracyMetric.COSINE: "cosine_similarity",
    }[case.metric]
    return float(accuracy[key])


# --- ONNX Runtime's own quantizer ------------------------------------------------------------


class _Reader:
    """quantize_static's data reader over fixed batches, with the ``set_range`` that
    ``CalibStridedMinMax`` uses to collect (and histogram) a few batches at a time."""

    def __init__(self, arrays: dict[str, np.ndarray], batch: int) -> None:
        total = _count(arrays)
        self.batches = [
            {k: v[i : i + batch] for k, v in arrays.items()} for i in range(0, total, batch)
        ]
        self.start, self.end, self.pos = 0, len(self.batches), 0

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end, self.pos = start_index, end_index, start_index

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= min(self.end, len(self.batches)):
            return None
        self.pos += 1
        return self.batches[self.pos - 1]

    def rewind(self) -> None:
        self.set_range(0, len(self.batches))


def ort_quantize(case: Case, out: Path, batch: int, stride_batches: int) -> Path:
    """EfficientNet through ``onnxruntime.quantization.quantize_static`` (QDQ, per channel,
    entropy, symmetric activations). Histograms are collected ``stride_batches`` batches at a
    time (ORT's own ``CalibStridedMinMax`` loop): its entropy calibrator otherwise holds every
    activation of every calibration sample in memory (~5 GB for 64 EfficientNet crops)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    reader = _Reader(case.calibration, batch)
    stride = max(d for d in range(1, stride_batches + 1) if len(reader) % d == 0)

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def get_next(self) -> dict[str, np.ndarray] | None:
            return reader.get_next()

        def __len__(self) -> int:
            return len(reader)

        def set_range(self, start_index: int, end_index: int) -> None:
            reader.set_range(start_index, end_index)

    quantize_static(
        str(case.path),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"ActivationSymmetric": True, "CalibStridedMinMax": stride},
    )
    return out


def qdq_census(path: Path) -> dict[str, Any]:
    """Which ops read a DequantizeLinear output (the quantized ops), by op type."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dq_outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    ops = Counter(
        n.op_type
        for n in model.graph.node
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
        and any(i in dq_outputs for i in n.input)
    )
    q_count = sum(1 for n in model.graph.node if n.op_type == "QuantizeLinear")
    return {"quantized_ops": dict(sorted(ops.items())), "quantize_linear_nodes": q_count}


def ort_activation_amax(path: Path) -> dict[str, float]:
    """amax (= scale x 127) of each per-tensor activation QuantizeLinear in an ORT QDQ model."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    amax: dict[str, float] = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits:
            continue
        scale = inits.get(node.input[1])
        if scale is not None and scale.size == 1:
            amax[node.input[0]] = float(scale.reshape(-1)[0]) * 127.0
    return amax


def with_activation_scales(src: Path, dst: Path, table: CalibrationTable) -> tuple[Path, int]:
    """ORT's QDQ model with our table's scale on every activation it quantizes that we have."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    replaced = 0
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits:
            continue
        tensor, scale_name = node.input[0], node.input[1]
        if tensor in table.amax and table.amax[tensor] > 0 and scale_name in inits:
            value = np.asarray(table.scale(tensor), dtype=np.float32)
            inits[scale_name].CopyFrom(numpy_helper.from_array(value, scale_name))
            replaced += 1
    onnx.save(model, str(dst))
    return dst, replaced


def versus_ort(
    case: Case, ours: dict[str, Any], reference: MemoizedRunner, args: argparse.Namespace
) -> dict[str, Any]:
    """Section 1: our INT8 entropy artifact against ORT's quantize_static, plus two crossed
    models that separate the effect of the ranges from the effect of the Q/DQ placement."""
    ort_path = OUT / "efficientnet_lite0-ort-quantize_static.onnx"
    log("efficientnet_lite0: onnxruntime.quantization.quantize_static (entropy)")
    start = time.perf_counter()
    ort_quantize(case, ort_path, batch=8, stride_batches=args.ort_stride)
    ort_seconds = time.perf_counter() - start
    ort = evaluate(case, ort_path, reference, args.threads, quantized=True)
    # Crossed: our placement with ORT's ranges, and ORT's placement with our ranges.
    ort_table = CalibrationTable(amax=ort_activation_amax(ort_path))
    spec = BuildSpec(precision=Precision.INT8, backend=BackendName.ONNXRUNTIME)
    crossed = build_artifact(
        case.path, spec, ort_table, OUT / "efficientnet_lite0-ours-with-ort-ranges.onnx"
    )
    ort_ours_path, replaced = with_activation_scales(
        ort_path, OUT / "efficientnet_lite0-ort-with-our-ranges.onnx", case.table("entropy", 0)
    )
    diagnostics = {
        "our placement, ORT's ranges": evaluate(
            case, crossed.path, reference, args.threads, quantized=True
        )["emulated"],
        f"ORT's placement, our ranges ({replaced} scales replaced)": evaluate(
            case, ort_ours_path, reference, args.threads, quantized=True
        )["emulated"],
    }
    verdicts = {}
    for mode in MODES:
        mine, theirs = ours[mode]["top1_agreement"], ort[mode]["top1_agreement"]
        verdicts[mode] = {
            "ours_top1": mine,
            "ort_top1": theirs,
            "difference_points": 100 * (mine - theirs),
            "passed": mine >= theirs - 0.01,
        }
    return {
        "ours": ours,
        "ort": ort,
        "ort_quantize_seconds": round(ort_seconds, 1),
        "ort_size_bytes": ort_path.stat().st_size,
        "placement": {
            "ours": qdq_census(case.artifacts["int8 entropy"]),
            "ort": qdq_census(ort_path),
        },
        "diagnostics_emulated": diagnostics,
        "verdicts": verdicts,
    }


# --- targets and rendering -------------------------------------------------------------------


def targets(
    cases: dict[str, Case],
    rows: dict[str, dict[str, dict[str, Any]]],
    vs_ort: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if vs_ort is not None:
        for mode in MODES:
            v = vs_ort["verdicts"][mode]
            out.append(
                {
                    "target": f"EfficientNet-Lite0 INT8 entropy top-1 agreement >= ORT quantize_static - 1 point ({mode})",
                    "value": f"ours {fmt_pct(v['ours_top1'])} vs ORT {fmt_pct(v['ort_top1'])} ({v['difference_points']:+.2f} points)",
                    "passed": v["passed"],
                    "primary": mode == "emulated",
                }
            )
    if "fashion_cnn" in rows and "int8 entropy" in rows["fashion_cnn"]:
        for mode in MODES:
            acc = rows["fashion_cnn"]["int8 entropy"]["accuracy"][mode]
            drop = acc["accuracy_drop"]
            out.append(
                {
                    "target": f"Fashion-MNIST CNN INT8 labelled accuracy loss <= 0.5 point ({mode})",
                    "value": f"FP32 {fmt_pct(acc['reference_accuracy'])} -> INT8 {fmt_pct(acc['candidate_accuracy'])} (loss {100 * drop:.2f} points, {len(cases['fashion_cnn'].eval_set)} test images)",
                    "passed": drop <= 0.005,
                    "primary": mode == "emulated",
                }
            )
    if "minilm" in rows and "fp16" in rows["minilm"]:
        acc = rows["minilm"]["fp16"]["accuracy"]["emulated"]
        mean, low = acc["cosine_similarity"], acc["min_cosine_similarity"]
        out.append(
            {
                "target": "MiniLM FP16 embedding cosine with FP32 >= 0.999 (mean and min)",
                "value": f"mean {mean:.6f}, min {low:.6f} over {len(cases['minilm'].eval_set)} sentences",
                "passed": mean >= 0.999 and low >= 0.999,
                "primary": True,
            }
        )
    return out


def render(
    env: dict[str, Any],
    cases: dict[str, Case],
    rows: dict[str, dict[str, dict[str, Any]]],
    vs_ort: dict[str, Any] | None,
    goals: list[dict[str, Any]],
    args: argparse.Namespace,
) -> str:
    lines = [
        "# trtforge accuracy bench",
        "",
        f"{env['date']} on {env['machine']['cpu']} ({env['machine']['logical_cpus']} logical CPUs, "
        f"{env['machine']['memory_gib']} GiB), {args.threads} threads, onnxruntime {env['onnxruntime']}"
        f"{' (--quick)' if args.quick else ''}. *emulated*: Q/DQ run with ONNX Runtime's Q/DQ fusions "
        "off (TensorRT's arithmetic); *ORT kernels*: the backend's default session (QLinear* int8 kernels).",
        "",
        "## Targets",
        "",
    ]
    for g in goals:
        tag = "PASS" if g["passed"] else "MISSED"
        lines.append(
            f"- **{tag}** {g['target']}: {g['value']}{'' if g['primary'] else ' (secondary)'}"
        )
    if vs_ort is not None:
        lines += [
            "",
            "## 1. EfficientNet-Lite0: trtforge INT8 entropy vs ONNX Runtime quantize_static",
            "",
            cases["efficientnet_lite0"].notes,
            "",
        ]
        body = []
        for label, acc in (
            ("trtforge (onnxruntime backend)", vs_ort["ours"]),
            ("ORT quantize_static", vs_ort["ort"]),
        ):
            for mode in MODES:
                a = acc[mode]
                body.append(
                    [
                        f"{label}, {mode}",
                        fmt_pct(a["top1_agreement"]),
                        fmt_pct(a.get("top5_agreement")),
                        f"{a['sqnr_db']:.2f}",
                        f"{a['cosine_similarity']:.5f}",
                    ]
                )
        for label, a in vs_ort["diagnostics_emulated"].items():
            body.append(
                [
                    f"diagnostic: {label}, emulated",
                    fmt_pct(a["top1_agreement"]),
                    fmt_pct(a.get("top5_agreement")),
                    f"{a['sqnr_db']:.2f}",
                    f"{a['cosine_similarity']:.5f}",
                ]
            )
        lines.append(
            markdown_table(
                ["model", "top-1 agreement", "top-5 agreement", "logits SQNR dB", "logits cosine"],
                body,
            )
        )
        p = vs_ort["placement"]
        lines += [
            "",
            f"Quantized ops (read a DequantizeLinear): trtforge {p['ours']['quantized_ops']} "
            f"({p['ours']['quantize_linear_nodes']} QuantizeLinear); ORT {p['ort']['quantized_ops']} "
            f"({p['ort']['quantize_linear_nodes']} QuantizeLinear). ORT quantize_static took "
            f"{vs_ort['ort_quantize_seconds']} s.",
        ]
    lines += ["", "## Variants (accuracy, size, CPU latency)", ""]
    for key, variants in rows.items():
        case = cases[key]
        lines += [f"### {case.title}", "", case.notes, ""]
        metric = {
            AccuracyMetric.TOP1_AGREEMENT: "top-1 agreement",
            AccuracyMetric.ACCURACY: "labelled accuracy",
            AccuracyMetric.COSINE: "cosine (mean / min)",
        }[case.metric]
        body = []
        for r in variants.values():
            acc = r["accuracy"]
            cells = []
            for mode in MODES:
                a = acc[mode]
                if case.metric is AccuracyMetric.COSINE:
                    cells.append(f"{a['cosine_similarity']:.6f} / {a['min_cosine_similarity']:.6f}")
                else:
                    cells.append(fmt_pct(metric_value(case, a)))
            lat = r["latency"]
            b1, bn = lat["1"], lat[str(case.batch)]
            body.append(
                [
                    r["variant"],
                    cells[0],
                    cells[1] if r["precision"] in ("int8", "int8-fp16") else "=",
                    fmt_bytes(r["size_bytes"]),
                    f"{b1['p50_ms']:.3f}",
                    f"{bn['p50_ms']:.3f}",
                    f"{bn['throughput_qps']:.1f}",
                ]
            )
        lines.append(
            markdown_table(
                [
                    "variant",
                    f"{metric} (emulated)",
                    "ORT kernels",
                    "size",
                    "p50 ms b1",
                    f"p50 ms b{case.batch}",
                    f"qps b{case.batch}",
                ],
                body,
            )
        )
        if case.metric is AccuracyMetric.ACCURACY:
            ref = next(iter(variants.values()))["accuracy"]["emulated"]["reference_accuracy"]
            lines += ["", f"FP32 reference accuracy: {fmt_pct(ref)}."]
        lines.append("")
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sample counts and short timings (< 2 min)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--models",
        nargs="+",
        default=["efficientnet_lite0", "fashion_cnn", "minilm"],
        choices=["efficientnet_lite0", "fashion_cnn", "minilm"],
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="subset of: " + ", ".join(v.name for v in VARIANTS),
    )
    parser.add_argument(
        "--cal-crops",
        type=int,
        default=None,
        help="EfficientNet calibration crops (default 256; quick 32)",
    )
    parser.add_argument(
        "--eval-crops",
        type=int,
        default=None,
        help="EfficientNet evaluation crops (default 512; quick 128)",
    )
    parser.add_argument(
        "--eval-photos",
        nargs="+",
        default=None,
        help="photos held out for evaluation (default: every second distinct photo)",
    )
    parser.add_argument(
        "--fashion-cal",
        type=int,
        default=None,
        help="training images to calibrate on (default 1000; quick 256)",
    )
    parser.add_argument(
        "--fashion-eval", type=int, default=None, help="test images (default 10000; quick 2000)"
    )
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--effnet-batch", type=int, default=8)
    parser.add_argument("--fashion-batch", type=int, default=64)
    parser.add_argument("--minilm-batch", type=int, default=32)
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="benchmark seconds per batch size (default 2; quick 0.2)",
    )
    parser.add_argument("--warmup-ms", type=float, default=None, help="default 200; quick 50")
    parser.add_argument(
        "--iterations", type=int, default=None, help="minimum timed queries (default 10; quick 2)"
    )
    parser.add_argument(
        "--ort-stride", type=int, default=4, help="batches of 8 per ORT histogram collection"
    )
    parser.add_argument(
        "--skip-ort", action="store_true", help="skip ONNX Runtime's quantize_static comparison"
    )
    parser.add_argument(
        "--output",
        default=None,
        help="result file stem under bench/results (default accuracy, quick accuracy_quick)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "cal_crops": (256, 32),
        "eval_crops": (512, 128),
        "fashion_cal": (1000, 256),
        "fashion_eval": (10000, 2000),
        "duration": (2.0, 0.2),
        "warmup_ms": (200.0, 50.0),
        "iterations": (10, 2),
        "output": ("accuracy", "accuracy_quick"),
    }
    for name, (full, small) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    if args.variants is None:
        args.variants = [v.name for v in VARIANTS]
    unknown = set(args.variants) - {v.name for v in VARIANTS}
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    seed_everything(args.seed)
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    env = environment(args.threads)
    builders = {
        "efficientnet_lite0": efficientnet_case,
        "fashion_cnn": fashion_case,
        "minilm": minilm_case,
    }
    cases: dict[str, Case] = {}
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    vs_ort = None
    chosen = [v for v in VARIANTS if v.name in args.variants]
    for key in args.models:
        log(f"{key}: preparing data")
        case = cases[key] = builders[key](args)
        rows[key] = {}
        with MemoizedRunner(
            OnnxRuntimeBackend(
                intra_op_threads=args.threads, providers=["CPUExecutionProvider"]
            ).load(case.path)
        ) as reference:
            for variant in chosen:
                rows[key][variant.name] = measure_variant(case, variant, reference, args)
            if key == "efficientnet_lite0" and not args.skip_ort and "int8 entropy" in rows[key]:
                vs_ort = versus_ort(case, rows[key]["int8 entropy"]["accuracy"], reference, args)
    goals = targets(cases, rows, vs_ort)
    markdown = render(env, cases, rows, vs_ort, goals, args)
    result = {
        "environment": env,
        "settings": {k: v for k, v in vars(args).items()},
        "seconds": round(time.perf_counter() - started, 1),
        "targets": goals,
        "efficientnet_vs_ort": vs_ort,
        "variants": rows,
        "cases": {k: c.notes for k, c in cases.items()},
    }
    write_json(RESULTS / f"{args.output}.json", result)
    write_text(RESULTS / f"{args.output}.md", markdown)
    print(markdown)
    print(f"\n{result['seconds']} s; wrote {RESULTS / args.output}.json and .md")
    missed = [g for g in goals if not g["passed"] and g["primary"]]
    for g in missed:
        print(f"MISSED: {g['target']}: {g['value']}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
