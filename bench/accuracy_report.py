"""Targets and Markdown of bench/accuracy.py: what is judged, and how the results read."""

from __future__ import annotations

import argparse
from typing import Any, Protocol

from bench.common import fmt_bytes, fmt_pct, markdown_table
from engines.accuracy_report import AccuracyMetric


class Case(Protocol):
    """What the report reads of a benchmark case (``bench.accuracy.Case``)."""

    key: str
    title: str
    notes: str
    metric: AccuracyMetric
    batch: int

    @property
    def eval_count(self) -> int: ...

TRT, ORT, BUILT_EMULATED = "tensorrt_arithmetic", "as_built_ort", "as_built_emulated"
LABELS = {
    TRT: "TensorRT arithmetic (8-bit weights, Q/DQ emulated)",
    ORT: "as built, ORT session",
    BUILT_EMULATED: "as built, Q/DQ emulated",
}
METRIC_KEYS = {
    AccuracyMetric.TOP1_AGREEMENT: "top1_agreement",
    AccuracyMetric.ACCURACY: "candidate_accuracy",
    AccuracyMetric.COSINE: "cosine_similarity",
}


def goal(target: str, value: str, passed: bool, primary: bool) -> dict[str, Any]:
    return {"target": target, "value": value, "passed": passed, "primary": primary}


def targets(
    cases: dict[str, Case],
    rows: dict[str, dict[str, dict[str, Any]]],
    vs_ort: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if vs_ort is not None:
        out += versus_ort_goals(cases["efficientnet_lite0"], vs_ort)
    fashion = rows.get("fashion_cnn", {}).get("int8 entropy")
    name = "Fashion-MNIST CNN INT8 entropy loses <= 0.5 point of labelled accuracy"
    if fashion is not None and "error" in fashion:
        out.append(goal(name, f"failed: {fashion['error']}", False, True))
    elif fashion is not None:
        for mode in (TRT, ORT):
            acc = fashion["accuracy"][mode]
            drop = acc["accuracy_drop"]
            value = (
                f"FP32 {fmt_pct(acc['reference_accuracy'])} -> INT8 "
                f"{fmt_pct(acc['candidate_accuracy'])} (loss {100 * drop:.2f} points, "
                f"{cases['fashion_cnn'].eval_count} test images)"
            )
            out.append(goal(f"{name} [{LABELS[mode]}]", value, drop <= 0.005, mode == TRT))
    fp16 = rows.get("minilm", {}).get("fp16")
    name = "MiniLM FP16 sentence-embedding cosine with FP32 >= 0.999 (mean and min)"
    if fp16 is not None and "error" in fp16:
        out.append(goal(name, f"failed: {fp16['error']}", False, True))
    elif fp16 is not None:
        acc = fp16["accuracy"][ORT]
        mean, low = acc["cosine_similarity"], acc["min_cosine_similarity"]
        value = f"mean {mean:.6f}, min {low:.6f} over {cases['minilm'].eval_count} sentences"
        out.append(goal(name, value, mean >= 0.999 and low >= 0.999, True))
    return out


def versus_ort_goals(case: Case, vs_ort: dict[str, Any]) -> list[dict[str, Any]]:
    name = "EfficientNet-Lite0 INT8 entropy top-1 agreement >= ORT quantize_static - 1 point"
    if "error" in vs_ort:
        return [goal(name, f"could not be measured: {vs_ort['error']}", False, True)]
    out = []
    for mode, v in vs_ort["verdicts"].items():
        value = (
            f"trtforge {fmt_pct(v['ours_top1'])} vs ORT {fmt_pct(v['ort_top1'])} "
            f"({v['difference_points']:+.2f} points, {case.eval_count} crops)"
        )
        out.append(goal(f"{name} [{LABELS[mode]}]", value, v["passed"], mode == TRT))
    return out


def _row(label: str, a: dict[str, Any]) -> list[str]:
    return [
        label,
        fmt_pct(a["top1_agreement"]),
        fmt_pct(a.get("top5_agreement")),
        f"{a['sqnr_db']:.2f}",
        f"{a['cosine_similarity']:.5f}",
    ]


def render_versus_ort(case: Case, vs: dict[str, Any]) -> list[str]:
    body = []
    for mode in (TRT, ORT, BUILT_EMULATED):
        body.append(_row(f"trtforge, {LABELS[mode]}", vs["ours"][mode]))
        body.append(_row(f"ORT quantize_static, {LABELS[mode]}", vs["ort"][mode]))
    if vs["ort_8bit_weights_ort_session"] is not None:
        body.append(
            _row(
                "ORT quantize_static, 8-bit weights, ORT session",
                vs["ort_8bit_weights_ort_session"],
            )
        )
    crossed = dict(vs["crossed_tensorrt_arithmetic"])
    ranges = crossed.pop("range comparison", None)
    for label, acc in crossed.items():
        body.append(_row(f"crossed: {label}, TensorRT arithmetic", acc))
    p = vs["placement"]
    rr = (
        "with reduce_range (7-bit weights) for the as-built rows, "
        if vs["ort_reduce_range_for_as_built"]
        else ""
    )
    return [
        "## 1. EfficientNet-Lite0: trtforge INT8 entropy vs ONNX Runtime quantize_static",
        "",
        f"{case.notes}. ORT: QDQ, per-channel, entropy, symmetric activations, {rr}calibrated on "
        f"the same crops in {vs['ort_quantize_seconds']} s.",
        "",
        markdown_table(
            [
                "model, execution",
                "top-1 agreement",
                "top-5 agreement",
                "logits SQNR dB",
                "logits cosine",
            ],
            body,
        ),
        "",
        f"Quantized ops (ops reading a DequantizeLinear): trtforge {p['ours']['quantized_ops']} "
        f"({p['ours']['quantize_linear_nodes']} QuantizeLinear); ORT {p['ort']['quantized_ops']} "
        f"({p['ort']['quantize_linear_nodes']} QuantizeLinear).",
        "",
        *render_ranges(ranges),
        *render_latency(case, vs["latency"]),
    ]


def render_latency(case: Case, timings: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    parts = []
    for label, lat in (("trtforge's artifact", timings["ours"]), ("ORT's model", timings["ort"])):
        points = ", ".join(f"batch {b} {v['p50_ms']:.2f} ms" for b, v in lat.items())
        parts.append(f"{label} {points}")
    return [f"CPU latency as built (p50, ORT session): {'; '.join(parts)}.", ""]


def render_ranges(ranges: dict[str, Any] | None) -> list[str]:
    if not ranges:
        return []
    tight = "; ".join(f"`{t}` {a} vs {b}" for t, (a, b) in ranges["tightest"].items())
    return [
        f"Activation ranges on the {ranges['tensors']} tensors both quantize: our amax / ORT's "
        f"median {ranges['median_ratio_ours_to_ort']:.3f}; ours tighter by > 20% on "
        f"{ranges['ours_tighter_by_over_20_percent']}, wider by > 25% on "
        f"{ranges['ours_wider_by_over_20_percent']}. Tightest (ours vs ORT amax): {tight}.",
        "",
    ]


def render_variants(case: Case, variants: dict[str, dict[str, Any]]) -> list[str]:
    name = {
        AccuracyMetric.TOP1_AGREEMENT: "top-1 agreement",
        AccuracyMetric.ACCURACY: "labelled accuracy",
        AccuracyMetric.COSINE: "cosine mean / min",
    }[case.metric]
    body = []
    for r in variants.values():
        if "error" in r:
            body.append([r["variant"], f"FAILED: {r['error']}", "", "", "", "", ""])
            continue
        cells = []
        for mode in (TRT, ORT):
            a = r["accuracy"][mode]
            if case.metric is AccuracyMetric.COSINE:
                cells.append(f"{a['cosine_similarity']:.6f} / {a['min_cosine_similarity']:.6f}")
            else:
                cells.append(fmt_pct(a[METRIC_KEYS[case.metric]]))
        if r["calibration"] is None:
            cells[1] = "(same run)"
        b1, bn = r["latency"]["1"], r["latency"][str(case.batch)]
        body.append(
            [
                r["variant"],
                cells[0],
                cells[1],
                fmt_bytes(r["size_bytes"]),
                f"{b1['p50_ms']:.3f}",
                f"{bn['p50_ms']:.3f}",
                f"{bn['throughput_qps']:.1f}",
            ]
        )
    lines = [f"### {case.title}", "", case.notes + ".", ""]
    lines.append(
        markdown_table(
            [
                "variant",
                f"{name}, TensorRT arithmetic",
                f"{name}, as built (ORT session)",
                "artifact size",
                "p50 ms, batch 1",
                f"p50 ms, batch {case.batch}",
                f"samples/s, batch {case.batch}",
            ],
            body,
        )
    )
    measured = [r for r in variants.values() if "accuracy" in r]
    first = measured[0]["accuracy"][ORT] if measured else {}
    if "reference_accuracy" in first:
        lines += ["", f"FP32 reference labelled accuracy: {fmt_pct(first['reference_accuracy'])}."]
    weights = {r["int8_weights"] for r in measured if r["int8_weights"]}
    if weights:
        lines += [
            "",
            f"INT8 artifacts of the onnxruntime backend here: {', '.join(sorted(weights))}.",
        ]
    return [*lines, ""]


def render(
    env: dict[str, Any],
    cases: dict[str, Case],
    rows: dict[str, dict[str, dict[str, Any]]],
    vs_ort: dict[str, Any] | None,
    goals: list[dict[str, Any]],
    args: argparse.Namespace,
) -> str:
    machine = env["machine"]
    lines = [
        "# trtforge accuracy bench",
        "",
        f"{env['date']}, {machine['cpu']} ({machine['logical_cpus']} logical CPUs, "
        f"{machine['memory_gib']} GiB, load {machine['load_average_1m']}), {args.threads} threads, "
        f"onnxruntime {env['onnxruntime']}{', --quick' if args.quick else ''}. Accuracy is against "
        "the FP32 model in ONNX Runtime. *TensorRT arithmetic*: the Q/DQ model with 8-bit weights "
        "that trtforge gives TensorRT, run with ONNX Runtime's Q/DQ fusions off; *as built, ORT "
        "session*: the onnxruntime backend's artifact run by its runner. Latency: the artifact "
        "in the backend's default session, trtexec procedure (engines.benchmark), "
        f"{args.duration:g} s per point.",
        "",
        "## Targets",
        "",
    ]
    for g in goals:
        tag = "PASS" if g["passed"] else "MISSED"
        lines.append(
            f"- **{tag}** {g['target']}: {g['value']}{'' if g['primary'] else ' (secondary)'}"
        )
    lines.append("")
    if vs_ort is not None and "error" not in vs_ort:
        lines += render_versus_ort(cases["efficientnet_lite0"], vs_ort)
    lines += ["## 2. Variants: accuracy, size, CPU latency", ""]
    for key, variants in rows.items():
        lines += render_variants(cases[key], variants)
    return "\n".join(lines)
