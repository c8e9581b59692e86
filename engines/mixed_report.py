"""The result of an accuracy-budget search (:func:`engines.mixed.search_mixed_precision`): the
nodes kept out of INT8 and what the mix reaches.

Light: pydantic and the light report modules only, so the wire (:mod:`service.schemas`) can carry it.
"""

from __future__ import annotations

from collections.abc import Mapping

from engines.accuracy_report import AccuracyReport, MetricBudget
from engines.frozen import FrozenReport
from engines.names import QdqExecution
from engines.sensitivity_report import SensitivityReport
from engines.spec import BuildSpec, KeepRules

__all__ = ["MixedPrecisionResult"]


class MixedPrecisionResult(FrozenReport):
    """The nodes to keep out of INT8 so that the budget is met, and what that reaches."""

    budget: MetricBudget
    execution: QdqExecution
    weight_levels: int
    """INT8 weight levels the search built variants with (:mod:`engines.variants`)."""
    kept_nodes: list[str]
    """Kept out of INT8, most sensitive first (beyond the spec's own ``keep.int8`` patterns)."""
    keep_patterns: list[str]
    """``kept_nodes`` as ``BuildSpec.keep`` patterns matching exactly those nodes
    (:func:`engines.variants.keep_patterns`)."""
    quantizable_nodes: int
    int8_nodes: int
    int8_share: float
    """``int8_nodes / quantizable_nodes`` (1.0 when nothing is quantizable)."""
    value_full_int8: float
    """The budget's metric with every quantizable node in INT8, on the report split."""
    value_reached: float
    """The budget's metric of the chosen mix on the report split (may miss the budget)."""
    budget_met: bool
    """Whether ``value_reached`` meets the budget (the report split's verdict)."""
    search_value_full_int8: float
    """Full INT8 on the search split."""
    search_value_reached: float
    """The chosen mix on the search split (it meets the budget there)."""
    accuracy: AccuracyReport
    """The chosen mix against the FP32 reference on the report split."""
    search_accuracy: AccuracyReport
    """The chosen mix on the search split."""
    sensitivity: SensitivityReport | None
    """``None`` when full INT8 already met the budget on the search split."""
    evaluations: int
    """Model variants built and compared, sensitivity and the report split included."""
    samples: int
    """Samples of the report split the reported figures were measured on."""
    search_samples: int
    """Samples of the search split the nodes were chosen on."""
    search_indices: list[int]
    """Positions in the held-out dataset of the search split (before ``max_samples``)."""
    report_indices: list[int]
    """Positions of the report split."""
    seconds: float

    def apply_to(self, spec: BuildSpec) -> BuildSpec:
        """``spec`` with the kept nodes added to ``keep.int8``."""
        extra = tuple(p for p in self.keep_patterns if p not in spec.keep.int8)
        keep = KeepRules(int8=(*spec.keep.int8, *extra), fp16=spec.keep.fp16)
        return spec.model_copy(update={"keep": keep})

    def label_kept_nodes(self, kept_nodes: Mapping[str, str]) -> dict[str, str]:
        """An artifact's ``kept_nodes`` (node -> reason) with the reason of the nodes this
        search kept saying so: its keep patterns reach the build as keep rules, which the Q/DQ
        pass reports as ``kept by user``. Nodes the search did not keep are unchanged."""
        ours = set(self.kept_nodes)
        why = f"not INT8: accuracy budget search ({self.budget})"
        labelled: dict[str, str] = {}
        for node, reason in kept_nodes.items():
            if node in ours and reason.startswith("not INT8: kept by user"):
                reason = why + reason[len("not INT8: kept by user") :]
            labelled[node] = reason
        return labelled
