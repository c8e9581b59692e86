"""What the INT8 graph techniques did (SmoothQuant/CLE smoothing, bias correction), layer by layer:
light types that sidecars, build reports and the wire schemas take. The passes themselves are
:mod:`engines.graph.smoothing` and :mod:`engines.graph.bias`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from engines.spec import TechniqueMode

__all__ = [
    "BiasCorrection",
    "BiasCorrectionReport",
    "ModelJudgement",
    "SmoothedTensor",
    "SmoothingReport",
]


class BiasCorrection(BaseModel):
    """One layer's bias shift and what it did to the layer's INT8 error."""

    model_config = ConfigDict(frozen=True)

    node: str
    bias: str
    """The constant shifted (its name in the output model)."""
    applied: bool
    max_shift: float
    """max_k |shift_k|."""
    sqnr_before_db: float
    """SQNR of the layer's output (weights and input quantized) on the sampled rows, unshifted."""
    sqnr_after_db: float


class BiasCorrectionReport(BaseModel):
    """What bias correction did, layer by layer."""

    model_config = ConfigDict(frozen=True)

    mode: TechniqueMode
    layers: list[BiasCorrection] = Field(default_factory=list)
    skipped: dict[str, str] = Field(default_factory=dict)
    """Quantized layer -> why its bias was not considered (no bias, no statistics)."""
    not_run: str = ""
    """Why the pass did nothing at all (``off``; a prequantized model)."""

    @property
    def corrected(self) -> list[str]:
        return [layer.node for layer in self.layers if layer.applied]


class ModelJudgement(BaseModel):
    """Smoothing judged on the whole model: the INT8 output SQNR (worst output, against FP32)
    with and without it, each with its own calibration table, on the same samples."""

    model_config = ConfigDict(frozen=True)

    samples: int
    held_out: bool = True
    """Whether the samples were held out from calibration (else calibration samples: there was
    no held-out split, and they favour the smoothing, fitted on them)."""
    sqnr_smoothed_db: float
    sqnr_plain_db: float
    min_gain_db: float
    """What smoothing must gain over the plain model to be kept."""
    kept: bool


class SmoothedTensor(BaseModel):
    """One activation tensor: the layers reading it, the ``a`` chosen and the error it changes."""

    model_config = ConfigDict(frozen=True)

    tensor: str
    layers: list[str]
    applied: bool
    alpha: float | None = None
    """The best ``a`` of the search (also when not applied); None when nothing was searched."""
    folded_into: str | None = None
    """Where ``1/s`` went: ``<op> <node>`` of the fold, or ``Mul <node>`` when one was inserted."""
    inserted_mul: bool = False
    sqnr_before_db: float | None = None
    """The layers' INT8 output SQNR on the calibration rows without smoothing."""
    sqnr_after_db: float | None = None
    """The same with the best ``a``."""
    reason: str = ""
    """Why it was not applied."""


class SmoothingReport(BaseModel):
    """What smoothing did, tensor by tensor."""

    model_config = ConfigDict(frozen=True)

    mode: TechniqueMode
    tensors: list[SmoothedTensor] = Field(default_factory=list)
    skipped: dict[str, str] = Field(default_factory=dict)
    """Layer -> why it was not considered (kept, GEMV, no statistics)."""
    not_run: str = ""
    """Why the pass did nothing at all (``off``; a prequantized model)."""
    judged: ModelJudgement | None = None
    """``auto``: the whole INT8 model with and without the smoothing, compared on held-out samples
    (None when nothing was smoothed, or ``on``)."""

    @property
    def applied(self) -> list[SmoothedTensor]:
        return [t for t in self.tensors if t.applied]
