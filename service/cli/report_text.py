"""``trtforge report``'s default output: a build report as a short, readable summary.

What a build measured, one line per question a user asks first: did it pass, what was it built
for, how fast, how does it compare with FP32, how accurate against its gate, what was kept out of
INT8, which file. The full document is ``--json``; the page ``--html``.

A build benchmarks only its artifact, so speed against FP32 is not in the report and is never
made up: the summary says so and names the command that measures both (:mod:`engines.fp32_notes`
adds what the recorded facts say to expect). Size against FP32 is the artifact's size over the
uploaded model's, when the caller knows the latter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engines.accuracy_report import AccuracyMetric
from engines.fp32_notes import Fp32Facts, build_notes
from engines.perf_report import TimingSource

if TYPE_CHECKING:
    from service.schemas import BuildPublic, BuildReport

__all__ = ["render_report_summary"]

_WIDTH = 12


def _line(name: str, text: str) -> str:
    return f"{name:<{_WIDTH}}{text}"


def _size(size_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size_bytes >= scale:
            return f"{size_bytes / scale:.2f} {unit}"
    return f"{size_bytes} B"


def _target(report: BuildReport, build: BuildPublic) -> str:
    backend = build.backend or report.artifact_metadata.backend
    version = build.backend_version or report.artifact_metadata.backend_version
    capability = build.compute_capability or report.artifact_metadata.compute_capability
    where = report.artifact_metadata.device
    if capability and capability != "cpu":
        where += f", compute capability {capability}"
    return f"{backend} {version} on {where}"


def _precision(report: BuildReport) -> str:
    text = report.spec.precision.value
    cal = report.calibration
    if cal is not None:
        reused = ", reused" if cal.from_cache else ""
        text += f" (calibration {cal.method or 'given table'}, {cal.samples} samples{reused})"
    return text


def _latency(report: BuildReport) -> str:
    perf = report.performance
    text = f"p50 {perf.latency.median_ms:.3f} ms, p99 {perf.latency.p99_ms:.3f} ms"
    if perf.timing is TimingSource.HOST:
        return f"{text} (host wall clock, batch {perf.batch_size})"
    compute = perf.gpu_compute
    return (
        f"{text} (batch {perf.batch_size}); GPU compute p50 {compute.median_ms:.3f} ms, "
        f"p99 {compute.p99_ms:.3f} ms"
    )


def _accuracy(report: BuildReport) -> list[str]:
    accuracy, gate = report.accuracy, report.gate
    if accuracy is None:
        return [_line("accuracy", "not evaluated")]
    samples = f"{accuracy.samples} held-out sample{'' if accuracy.samples == 1 else 's'}"
    if gate is None or not gate.gate.enabled:
        metrics = []
        for metric in (AccuracyMetric.SQNR_DB, AccuracyMetric.COSINE):
            value = accuracy.metric(metric)
            if value is not None:
                metrics.append(f"{metric.value} {value:.4g}")
        return [_line("accuracy", f"no gate; worst {', '.join(metrics)} over {samples}")]
    measured = []
    for budget in gate.gate.budgets:
        value = accuracy.metric(budget.metric)
        measured.append(f"{budget.metric.value} {'-' if value is None else f'{value:.4g}'}")
    verdict = "passed" if gate.passed else "FAILED"
    lines = [
        _line(
            "accuracy",
            f"gate {gate.gate_text}: {verdict} (worst {', '.join(measured)} over {samples})",
        )
    ]
    lines += [_line("", f"failed: {failure}") for failure in gate.failures]
    return lines


def _techniques(report: BuildReport) -> str:
    """``smoothing 42/44 (kept: 19.1 vs 15.0 dB on 128 held-out samples), bias 29/32``; empty
    when neither ran."""
    parts = []
    smoothing = report.smoothing
    if smoothing is not None and smoothing.tensors:
        text = f"smoothing {len(smoothing.applied)}/{len(smoothing.tensors)}"
        judged = smoothing.judged
        if judged is not None:
            where = "held-out" if judged.held_out else "calibration"
            text += (
                f" ({'kept' if judged.kept else 'dropped'}: {judged.sqnr_smoothed_db:.1f} vs "
                f"{judged.sqnr_plain_db:.1f} dB without, on {judged.samples} {where} samples)"
            )
        parts.append(text)
    bias = report.bias_correction
    if bias is not None and bias.layers:
        parts.append(f"bias correction {len(bias.corrected)}/{len(bias.layers)}")
    return ", ".join(parts)


def render_report_summary(
    report: BuildReport, build: BuildPublic, fp32_model_bytes: int | None = None
) -> str:
    """The summary of ``report`` (module docstring); ``build`` gives the status and target,
    ``fp32_model_bytes`` the uploaded model's size for the size ratio (None: not known)."""
    perf = report.performance
    meta = report.artifact_metadata
    facts = Fp32Facts.from_sidecar(meta.backend, report.spec.precision.value, meta.options)
    lines = [
        _line("build", f"{report.build_id}  {build.status.value}"),
        _line("target", _target(report, build)),
        _line("precision", _precision(report)),
        _line("latency", _latency(report)),
        _line("throughput", f"{perf.throughput_qps:.1f} samples/s"),
    ]
    ratio = report.artifact.size_bytes / fp32_model_bytes if fp32_model_bytes else None
    for i, note in enumerate(build_notes(facts, ratio)):
        if note.startswith("size ") and fp32_model_bytes:
            note += f" (FP32 model {_size(fp32_model_bytes)})"
        lines.append(_line("vs FP32" if i == 0 else "", note))
    lines += _accuracy(report)
    lines.append(
        _line(
            "nodes",
            f"{len(report.kept_nodes)} kept in higher precision, "
            f"{len(report.quantized_nodes)} in INT8",
        )
    )
    prepared = _techniques(report)
    if prepared:
        lines.append(_line("prepared", prepared))
    lines.append(_line("artifact", f"{report.artifact.filename} ({_size(report.artifact.size_bytes)})"))
    lines.append(_line("sha256", report.artifact.sha256))
    lines.append(f"full report: trtforge report {report.build_id} --json (or --html)")
    return "\n".join(lines)
