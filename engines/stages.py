"""The stages of one build, in order. Light on purpose: the wire schemas import it."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Stage"]


class Stage(StrEnum):
    """Workflow stages, in the order they run."""

    CALIBRATE = "calibrate"
    BUILD = "build"
    BENCHMARK = "benchmark"
    EVALUATE = "evaluate"
