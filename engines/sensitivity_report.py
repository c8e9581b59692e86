"""The per-node INT8 sensitivity report (:func:`engines.sensitivity.node_sensitivity`).

Light: pydantic and the light report modules only, so the wire (:mod:`service.schemas`) can carry it.
"""

from __future__ import annotations

from engines.accuracy_report import AccuracyMetric
from engines.frozen import FrozenReport
from engines.names import QdqExecution

__all__ = ["NodeSensitivity", "SensitivityReport"]


class NodeSensitivity(FrozenReport):
    """How much one node's INT8 quantization costs, in the report's metric."""

    node: str
    """ONNX node name."""
    op_type: str
    rank: int
    """1 = most sensitive."""
    metric_only_this: float | None
    """Only this node in INT8; ``None`` when the node was not evaluated (``max_nodes``)."""
    metric_all_but_this: float | None
    """Every quantizable node but this one in INT8; ``None`` when not evaluated."""
    proxy_sqnr_db: float
    """Local quantization SQNR of the node's worst quantized input (the cheap estimate)."""


class SensitivityReport(FrozenReport):
    """Quantizable nodes ranked most sensitive first, with how the ranking was measured."""

    metric: AccuracyMetric
    higher_is_better: bool
    execution: QdqExecution
    weight_levels: int
    """INT8 weight levels of the variants (127; 63 for 7-bit weights, see the module docstring)."""
    samples: int
    quantizable_nodes: int
    evaluated_nodes: int
    evaluations: int
    """Model variants built and compared."""
    seconds: float
    nodes: list[NodeSensitivity]

    @property
    def ranked_nodes(self) -> list[str]:
        """Node names, most sensitive first."""
        return [n.node for n in self.nodes]
