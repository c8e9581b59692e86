"""BuildSpec: everything that decides what artifact a build produces.

Frozen pydantic models with a canonical digest used in cache keys, and a JSON round-trip.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Any, Protocol

from pydantic import Field, field_validator, model_validator

from calibrators.spec import HistogramMode, MethodSpec, auto
from engines.accuracy_report import MetricBudget
from engines.errors import SpecError
from engines.frozen import FrozenModel
from engines.names import BackendName

__all__ = [
    "MAX_KEEP_PATTERNS",
    "MAX_KEEP_PATTERN_CHARS",
    "BackendName",
    "BuildSpec",
    "CompiledPattern",
    "KeepRules",
    "Precision",
    "ShapeProfile",
    "TechniqueMode",
    "TensorRTMode",
    "TensorRTOptions",
    "compile_keep_pattern",
    "node_matches",
]


class Precision(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT8_FP16 = "int8-fp16"

    @property
    def uses_int8(self) -> bool:
        return self in (Precision.INT8, Precision.INT8_FP16)

    @property
    def uses_fp16(self) -> bool:
        return self in (Precision.FP16, Precision.INT8_FP16)

    def require_table(self, table: object | None) -> None:
        """Raise :class:`SpecError` (field ``table``) when this precision needs INT8 ranges and
        ``table`` is None: the one wording of that error for every builder."""
        if self.uses_int8 and table is None:
            raise SpecError(
                f"Precision {self.value} needs INT8 ranges but no calibration table was given.",
                hint="Pass --data to calibrate (or calibrate first with trtforge calibrate), "
                "or pass --table.",
                field="table",
            )


class TechniqueMode(StrEnum):
    """Whether a post-training technique runs: ``auto`` on the layers where it lowers the INT8
    error measured on the calibration data, ``on`` wherever it applies, ``off`` never."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class TensorRTMode(StrEnum):
    EXPLICIT = "explicit"
    IMPLICIT = "implicit"


class ShapeProfile(FrozenModel):
    """One optimization profile entry: min/opt/max shapes of one input."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @model_validator(mode="after")
    def _ordered(self) -> ShapeProfile:
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise ValueError("min, opt and max must have the same rank")
        for lo, mid, hi in zip(self.min, self.opt, self.max, strict=True):
            if not (1 <= lo <= mid <= hi):
                raise ValueError(
                    f"need 1 <= min <= opt <= max in every dim, got {self.min}/{self.opt}/{self.max}"
                )
        return self

    @classmethod
    def parse(cls, text: str) -> ShapeProfile:
        """Parse ``1x3x224x224/8x3x224x224/32x3x224x224`` (one shape means min = opt = max)."""
        parts = text.split("/")
        if len(parts) not in (1, 3):
            raise ValueError(
                f"expected MIN/OPT/MAX shapes like 1x3x224x224/8x3x224x224/32x3x224x224, got {text!r}"
            )
        shapes = [tuple(int(d) for d in p.lower().split("x")) for p in parts]
        if len(shapes) == 1:
            shapes = shapes * 3
        return cls(min=shapes[0], opt=shapes[1], max=shapes[2])


MAX_KEEP_PATTERNS = 10_000
"""Keep patterns per precision (a mixed-precision search may add one per node)."""
MAX_KEEP_PATTERN_CHARS = 1_000


class CompiledPattern(Protocol):
    """A compiled keep regex (RE2's ``_Regexp``)."""

    def fullmatch(self, text: str) -> object | None: ...


@lru_cache(maxsize=4096)
def compile_keep_pattern(regex: str) -> CompiledPattern:
    """Compile the ``<regex>`` of a ``re:<regex>`` keep pattern with RE2.

    RE2 matches in time linear in the name's length whatever the pattern (no backtracking), so
    a user's pattern cannot freeze a server or a build. Its syntax is Python's without
    backreferences and lookaround. Raises ``ValueError`` naming what RE2 refused.
    """
    import re2  # google-re2: a declared dependency, loaded where patterns are used

    options = re2.Options()
    options.log_errors = False  # the error is raised, not printed to stderr
    try:
        compiled: CompiledPattern = re2.compile(regex, options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode(errors="replace")
        raise ValueError(
            f"keep pattern 're:{regex}' is not a valid regex: {reason} (RE2 syntax: Python's "
            "without backreferences or lookaround)"
        ) from None
    return compiled


class KeepRules(FrozenModel):
    """Nodes kept out of a precision: exact ONNX node names, op types, or regexes over node names.

    A pattern matches a node when it equals the node's name or op type, or when it is written
    ``re:<regex>`` and the regex (RE2 syntax, matched in linear time) matches the whole node name.
    """

    int8: tuple[str, ...] = ()
    fp16: tuple[str, ...] = ()

    @field_validator("int8", "fp16")
    @classmethod
    def _valid_patterns(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        if len(patterns) > MAX_KEEP_PATTERNS:
            raise ValueError(
                f"{len(patterns):,} keep patterns, more than the limit of {MAX_KEEP_PATTERNS:,}"
            )
        for p in patterns:
            if len(p) > MAX_KEEP_PATTERN_CHARS:
                raise ValueError(
                    f"keep pattern {p[:40]!r}... has {len(p):,} characters, more than the limit "
                    f"of {MAX_KEEP_PATTERN_CHARS:,}"
                )
            if p.startswith("re:"):
                compile_keep_pattern(p[3:])
        return patterns


def node_matches(patterns: tuple[str, ...], name: str, op_type: str) -> bool:
    """Whether a node (name, op type) matches any keep pattern (``re:`` ones with RE2)."""
    for p in patterns:
        if p.startswith("re:"):
            if compile_keep_pattern(p[3:]).fullmatch(name) is not None:
                return True
        elif p in (name, op_type):
            return True
    return False


class TensorRTOptions(FrozenModel):
    """TensorRT builder options; ``None`` means TensorRT's default."""

    workspace_bytes: Annotated[int, Field(gt=0)] | None = None
    optimization_level: Annotated[int, Field(ge=0, le=5)] | None = None
    timing_cache: bool = True
    hardware_compatibility: str | None = None  # "none" | "ampere_plus" | "same_compute_capability"
    version_compatible: bool = False

    @field_validator("hardware_compatibility")
    @classmethod
    def _hwc(cls, v: str | None) -> str | None:
        if v is not None and v not in ("none", "ampere_plus", "same_compute_capability"):
            raise ValueError(
                "hardware_compatibility must be none, ampere_plus or same_compute_capability"
            )
        return v


_NONE = "none"


class AccuracyGate(FrozenModel):
    """Budgets a build must meet on every float output; no budgets: the gate is off (``none``).

    Validates from a gate, the text ``"none"``, ``"METRIC:VALUE"``, or a list of those texts.
    """

    budgets: tuple[MetricBudget, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list | tuple) or not all(isinstance(v, str) for v in texts):
            return value
        try:
            return {"budgets": _parse_budgets(list(texts))}
        except SpecError as exc:  # pydantic reports ValueErrors as validation errors
            raise ValueError(f"{exc.message} {exc.hint}") from exc

    @classmethod
    def parse(cls, texts: str | Sequence[str]) -> AccuracyGate:
        """``METRIC:VALUE`` texts (``sqnr_db:12``, ``top1_agreement:0.95``) or ``none``.

        :class:`SpecError` (field ``gate``) for a text that is neither, or ``none`` among
        budgets.
        """
        items = [texts] if isinstance(texts, str) else list(texts)
        return cls(budgets=_parse_budgets(items))

    @classmethod
    def off(cls) -> AccuracyGate:
        """The gate that lets every build through (``none``)."""
        return cls()

    @property
    def enabled(self) -> bool:
        return bool(self.budgets)

    def __str__(self) -> str:
        return ", ".join(str(b) for b in self.budgets) if self.budgets else _NONE


def _parse_budgets(texts: list[str]) -> tuple[MetricBudget, ...]:
    wanted = [t.strip() for t in texts if t.strip()]
    if any(t.lower() == _NONE for t in wanted):
        if len(wanted) > 1:
            raise SpecError(
                f"The gate {', '.join(wanted)} mixes 'none' with budgets.",
                hint="Give either 'none' (no gate) or METRIC:VALUE budgets.",
                field="gate",
            )
        return ()
    budgets: list[MetricBudget] = []
    for text in wanted:
        try:
            budgets.append(MetricBudget.parse(text))
        except SpecError as exc:
            raise SpecError(exc.message, hint=exc.hint, field="gate") from exc
    return tuple(budgets)


class BuildSpec(FrozenModel):
    """What to build. ``None`` fields mean "use the default"."""

    precision: Precision = Precision.INT8_FP16
    calibration: MethodSpec = Field(default_factory=auto)
    histogram: HistogramMode = HistogramMode.EXACT
    backend: BackendName = BackendName.AUTO
    mode: TensorRTMode = TensorRTMode.EXPLICIT
    profiles: dict[str, ShapeProfile] = Field(default_factory=dict)
    keep: KeepRules = Field(default_factory=KeepRules)
    tensorrt: TensorRTOptions = Field(default_factory=TensorRTOptions)
    quantize_attention: bool = False
    gate: AccuracyGate | None = None
    """Accuracy gate against FP32 (:mod:`engines.gate`; ``"none"``: off); None: the precision's
    default (:func:`engines.gate.resolve_gate`)."""
    smoothing: TechniqueMode = TechniqueMode.AUTO
    """INT8: SmoothQuant-style migration of activation outliers into the weights, before
    calibration (:func:`engines.graph.smoothing.smooth`)."""
    bias_correction: TechniqueMode = TechniqueMode.AUTO
    """INT8: shift biases by the expected output error of the quantized weights, after
    calibration (:func:`engines.graph.bias.correct_biases`)."""

    def canonical_json(self) -> str:
        """JSON with sorted keys and no whitespace: the text the digest is taken over."""
        import json

        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()
