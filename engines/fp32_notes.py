"""Speed and size against FP32, in words: why a reduced-precision artifact is as fast and as large
as it is on the backend and machine that built it (light: the sweep, the build report, the CLI
and the dashboard take it).

The reasons come from facts the build recorded, never from guesses about the machine:

- the backend (:class:`engines.names.BackendName`, from the sweep or the artifact's sidecar);
- the INT8 weight levels the backend used (``int8_weight_levels``: 63 means ONNX Runtime's x86
  kernels without VNNI, :func:`engines.backends.onnxruntime.int8_weight_levels`);
- the execution providers (ONNX Runtime on the CPU provider or not);
- how trtforge writes artifacts: an ONNX Runtime artifact carries INT8 as QuantizeLinear /
  DequantizeLinear pairs on FP32 weights (ONNX Runtime quantizes them when it loads the model),
  FP16 parts as FP16 tensors; a TensorRT engine stores INT8 weights.

A reason is attached only where the numbers would surprise: a variant slower than FP32, or an
INT8 ONNX artifact as large as its FP32 model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engines.names import BackendName
from engines.spec import Precision

__all__ = [
    "NO_VNNI_WEIGHT_LEVELS",
    "Fp32Facts",
    "build_notes",
    "size_note",
    "size_reason",
    "speed_expectation",
    "speed_note",
    "speed_reason",
    "unmeasured_speed_note",
]

NO_VNNI_WEIGHT_LEVELS = 63
"""The INT8 weight levels ONNX Runtime gets on x86 CPUs without VNNI (7-bit weights)."""

_CPU_PROVIDER = "CPUExecutionProvider"
_SLOWER_THAN_FP32 = 0.95
"""Below this speed ratio a variant counts as slower than FP32 (not just measurement noise)."""


@dataclass(frozen=True)
class Fp32Facts:
    """What a reason against FP32 is derived from (module docstring)."""

    backend: str
    precision: Precision
    int8_weight_levels: int | None = None
    """The INT8 weight levels the build used; None when not recorded."""
    cpu: bool = False
    """Whether ONNX Runtime ran it on its CPU provider."""

    @classmethod
    def from_sidecar(
        cls, backend: str, precision: str, options: Mapping[str, Any] | None
    ) -> Fp32Facts:
        """From an artifact sidecar's backend, precision and ``options`` (tolerant of sidecars
        written before ``int8_weight_levels`` was recorded there)."""
        options = options or {}
        levels = options.get("int8_weight_levels")
        providers = options.get("providers")
        return cls(
            backend=backend,
            precision=Precision(precision),
            int8_weight_levels=levels if isinstance(levels, int) else None,
            cpu=_on_cpu(providers if isinstance(providers, list) else None),
        )

    @classmethod
    def from_environment(
        cls,
        backend: str,
        precision: Precision,
        int8_weight_levels: int | None,
        environment: Mapping[str, str],
    ) -> Fp32Facts:
        """From a benchmark's environment (a runner's ``describe()``: ``providers`` is a
        comma-separated list)."""
        providers = environment.get("providers")
        return cls(
            backend=backend,
            precision=precision,
            int8_weight_levels=int8_weight_levels,
            cpu=_on_cpu(providers.split(",") if providers else None),
        )

    @property
    def onnxruntime(self) -> bool:
        return self.backend == BackendName.ONNXRUNTIME.value

    @property
    def label(self) -> str:
        """The precision as people write it: ``INT8``, ``INT8-FP16``."""
        return self.precision.value.upper()


def _on_cpu(providers: Sequence[str] | None) -> bool:
    return bool(providers) and providers is not None and providers[0] == _CPU_PROVIDER


def _slow_reason(facts: Fp32Facts) -> str | None:
    """Why ``facts``' precision does not pay on its backend, when the recorded facts say."""
    if not facts.onnxruntime:
        return None
    if facts.precision.uses_int8 and facts.int8_weight_levels == NO_VNNI_WEIGHT_LEVELS:
        return (
            "ONNX Runtime on this CPU has no VNNI INT8 kernels; TensorRT on a GPU is where "
            "INT8 pays"
        )
    if facts.precision is Precision.FP16 and facts.cpu:
        return (
            "ONNX Runtime's CPU provider has few FP16 kernels and casts to FP32 around the "
            "rest; FP16 pays on a GPU"
        )
    return None


def speed_reason(speedup: float, facts: Fp32Facts) -> str | None:
    """Why a variant ``speedup`` x FP32's speed is slower than FP32 (the recorded facts' reason,
    or that it is slower on this machine); None when it is not slower."""
    if speedup >= _SLOWER_THAN_FP32:
        return None
    return _slow_reason(facts) or "slower than FP32 on this machine"


def speed_note(speedup: float, facts: Fp32Facts) -> str:
    """``INT8 is 0.32x FP32 speed here: <reason>`` (the reason only where it is slower)."""
    text = f"{facts.label} is {speedup:.2f}x FP32 speed here"
    reason = speed_reason(speedup, facts)
    return f"{text}: {reason}" if reason else text


def unmeasured_speed_note(facts: Fp32Facts) -> str:
    """For a build, which measures only its artifact: that FP32 speed was not measured and what
    measures it."""
    return (
        "speed not measured (a build benchmarks only its artifact; "
        f"`trtforge sweep --variants fp32,{facts.precision.value}` measures both)"
    )


def speed_expectation(facts: Fp32Facts) -> str | None:
    """What to expect of the speed against FP32 where the recorded facts say, else None."""
    reason = _slow_reason(facts)
    if reason is None:
        return None
    return f"expect {facts.label} to be no faster than FP32 here: {reason}"


def size_reason(facts: Fp32Facts) -> str | None:
    """Why the artifact is about as large as FP32's, where trtforge's artifact format says."""
    if facts.onnxruntime and facts.precision.uses_int8:
        return "ONNX Q/DQ keeps FP32 weights (ONNX Runtime quantizes them when it loads the model)"
    return None


def size_note(ratio: float | None, facts: Fp32Facts) -> str | None:
    """``size 1.02x FP32: ONNX Q/DQ keeps FP32 weights``; without a ratio just the reason; None
    when there is neither."""
    reason = size_reason(facts)
    if ratio is None:
        return f"size: {reason}" if reason else None
    text = f"size {ratio:.2f}x FP32"
    return f"{text}: {reason}" if reason else text


def build_notes(facts: Fp32Facts, size_ratio: float | None = None) -> list[str]:
    """A build report's lines against FP32 (none for an FP32 build): speed not measured, what to
    expect, and the size (ratio when known) with its reason."""
    if facts.precision is Precision.FP32:
        return []
    notes = [unmeasured_speed_note(facts)]
    expectation = speed_expectation(facts)
    if expectation is not None:
        notes.append(expectation)
    size = size_note(size_ratio, facts)
    if size is not None:
        notes.append(size)
    return notes
