"""The engine error tree.

::

    TrtforgeError (calibrators.errors)
    └── EngineError
        ├── SpecError             a BuildSpec does not fit the model (shapes, keep patterns, options)
        ├── GraphError            an ONNX graph pass failed or produced an invalid model
        ├── BackendUnavailableError  the chosen backend is not installed or has no device here
        ├── BuildError            the backend failed to build an artifact (log attached)
        ├── RunError              running an artifact failed
        ├── AccuracyBudgetError   no precision mix meets the requested accuracy budget
        └── AccuracyGateFailedError  a built artifact misses the accuracy gate against FP32

Each class's docstring is its default message.
"""

from __future__ import annotations

from core.errors import TrtforgeError

__all__ = [
    "AccuracyBudgetError",
    "AccuracyGateFailedError",
    "BackendUnavailableError",
    "BuildError",
    "EngineError",
    "GraphError",
    "RunError",
    "SpecError",
]


class EngineError(TrtforgeError):
    """The engine build failed."""

    code = "engine_failed"


class SpecError(EngineError):
    """The build spec does not fit the model."""

    code = "spec_invalid"


class GraphError(EngineError):
    """An ONNX graph transformation failed."""

    code = "graph_invalid"


class BackendUnavailableError(EngineError):
    """The requested backend is not available on this machine."""

    code = "backend_unavailable"
    default_hint = "Use --backend onnxruntime, or install TensorRT and run on a machine with a GPU."


class BuildError(EngineError):
    """The backend failed to build the artifact."""

    code = "build_failed"

    def __init__(
        self,
        message: str | None = None,
        *,
        hint: str | None = None,
        field: str | None = None,
        log: str = "",
    ) -> None:
        super().__init__(message, hint=hint, field=field)
        self.log = log


class RunError(EngineError):
    """Running the artifact failed."""

    code = "run_failed"


class AccuracyBudgetError(EngineError):
    """No precision mix meets the accuracy budget."""

    code = "accuracy_budget_unmet"
    default_hint = (
        "Loosen the budget, or calibrate with more representative data or another method."
    )


class AccuracyGateFailedError(EngineError):
    """The build does not reach the accuracy gate against the FP32 model."""

    code = "accuracy_gate_failed"
    default_hint = (
        "Try another calibration method (--method), an accuracy budget (--accuracy-budget), "
        "or keep rules (--keep); --gate none accepts the build as it is."
    )

    def __init__(
        self,
        message: str | None = None,
        *,
        hint: str | None = None,
        field: str | None = None,
        failed_outputs: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message, hint=hint, field=field)
        self.failed_outputs = failed_outputs
