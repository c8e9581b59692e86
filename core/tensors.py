"""What a model's graph inputs are: names, numpy dtypes and (possibly symbolic) shapes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from core.errors import ModelError

__all__ = ["TensorSpec", "model_input_specs"]


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's name, numpy dtype name and shape (int = static, str = symbolic, None = unknown)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    @classmethod
    def from_value_info(cls, value_info: onnx.ValueInfoProto) -> TensorSpec:
        """The spec of an ONNX graph input/output; :class:`ModelError` if it is not a plain tensor."""
        if not value_info.type.HasField("tensor_type"):
            raise ModelError(f"Graph value {value_info.name!r} is not a tensor.", field="model")
        tensor_type = value_info.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(
                f"Graph value {value_info.name!r} has ONNX element type {tensor_type.elem_type}, "
                "which has no numpy equivalent.",
                field="model",
            ) from exc
        dims: list[int | str | None] = []
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                dims.append(int(dim.dim_value))
            else:
                dims.append(dim.dim_param or None)
        return cls(value_info.name, dtype, tuple(dims))


def model_input_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    """The graph inputs a caller must feed (those that are not initializers), in graph order."""
    initializers = {init.name for init in model.graph.initializer}
    return [
        TensorSpec.from_value_info(vi) for vi in model.graph.input if vi.name not in initializers
    ]
