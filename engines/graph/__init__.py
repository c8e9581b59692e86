"""ONNX graph passes: inspect and normalize a model, insert Q/DQ from a calibration table, convert
the rest to FP16, and :func:`prepare_model`, which applies them as a BuildSpec asks.

The passes work on copies and each returns a model that passes
``onnx.checker.check_model(full_check=True)`` plus a report of what it did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx

from engines.graph._kept import kept_nodes
from engines.graph.fp16 import Fp16Report, convert_fp16
from engines.graph.inspect import ModelInfo, TensorInfo, inspect_model, load_model, normalize
from engines.graph.prequantized import (
    PrequantizedReport,
    ScaleSource,
    inspect_quantization,
    is_prequantized,
)
from engines.graph.qdq import QuantizationReport, insert_qdq

if TYPE_CHECKING:
    from calibrators.table import CalibrationTable
    from engines.spec import BuildSpec

__all__ = [
    "Fp16Report",
    "ModelInfo",
    "PreparedModel",
    "PrequantizedReport",
    "QuantizationReport",
    "ScaleSource",
    "TensorInfo",
    "convert_fp16",
    "insert_qdq",
    "inspect_model",
    "inspect_quantization",
    "is_prequantized",
    "load_model",
    "normalize",
    "prepare_model",
]


@dataclass(frozen=True)
class PreparedModel:
    """The transformed model and the reports of the passes that ran (None = pass not run)."""

    model: onnx.ModelProto
    quantization: QuantizationReport | None
    fp16: Fp16Report | None

    @property
    def quantized_nodes(self) -> list[str]:
        return list(self.quantization.quantized_nodes) if self.quantization else []

    @property
    def kept_nodes(self) -> dict[str, str]:
        """Node -> why it stays out of the reduced precision (INT8 first, then FP16 reasons),
        for the nodes a user would expect there (:mod:`engines.graph._kept`), not every node
        without Q/DQ."""
        return kept_nodes(self.model, self.quantization, self.fp16)

    @property
    def fp32_nodes(self) -> list[str]:
        """Nodes the FP16 pass kept in FP32, in graph order."""
        return list(self.fp16.fp32_nodes) if self.fp16 is not None else []


def prepare_model(
    model: onnx.ModelProto,
    spec: BuildSpec,
    table: CalibrationTable | None,
    *,
    weight_levels: int = 127,
) -> PreparedModel:
    """Apply the passes ``spec.precision`` asks for: Q/DQ (int8, int8-fp16), then FP16 (fp16,
    int8-fp16), honouring ``spec.keep`` and ``spec.quantize_attention``. fp32 only normalizes.
    ``weight_levels`` is passed to :func:`insert_qdq` (127: full INT8; 63: 7-bit weights).

    A model that carries Q/DQ already (:func:`is_prequantized`) is built as it is: no table
    needed, its scales kept (the quantization report says ``prequantized: scales from the
    model``). Otherwise raises :class:`SpecError` when INT8 is asked for without a table.
    """
    precision = spec.precision
    carried = is_prequantized(model)
    if not carried:
        precision.require_table(table)
    work = normalize(model)
    quantization: QuantizationReport | None = None
    fp16: Fp16Report | None = None
    if precision.uses_int8 and (table is not None or carried):
        work, quantization = insert_qdq(
            work,
            table,
            keep=spec.keep.int8,
            quantize_attention=spec.quantize_attention,
            weight_levels=weight_levels,
        )
    if precision.uses_fp16:
        work, fp16 = convert_fp16(work, table=table, keep=spec.keep.fp16)
    return PreparedModel(model=work, quantization=quantization, fp16=fp16)
