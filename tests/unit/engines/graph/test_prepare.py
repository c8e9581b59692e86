"""``engines.graph.prepare_model``: the passes a BuildSpec asks for, in order."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from calibrators.table import CalibrationTable
from engines.errors import SpecError
from engines.graph import prepare_model
from engines.spec import BuildSpec, KeepRules, Precision
from tests import zoo
from tests.unit.engines.graph.helpers import cosine_rows, run


def _ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def test_fp32_only_normalizes(tiny_eval_images: np.ndarray) -> None:
    prepared = prepare_model(
        zoo.tiny_cnn(constants_as_nodes=True), BuildSpec(precision=Precision.FP32), None
    )
    assert prepared.quantization is None and prepared.fp16 is None
    assert "Constant" not in _ops(prepared.model) and "QuantizeLinear" not in _ops(prepared.model)
    assert prepared.kept_nodes == {} and prepared.quantized_nodes == []


def test_int8_needs_a_table() -> None:
    with pytest.raises(SpecError, match="needs INT8 ranges") as caught:
        prepare_model(zoo.tiny_cnn(), BuildSpec(precision=Precision.INT8), None)
    assert caught.value.field == "table"


def test_fp16_without_table(tiny_eval_images: np.ndarray) -> None:
    prepared = prepare_model(zoo.tiny_cnn(), BuildSpec(precision=Precision.FP16), None)
    assert prepared.quantization is None and prepared.fp16 is not None
    assert len(prepared.fp16.fp16_nodes) == 12 and "QuantizeLinear" not in _ops(prepared.model)


def test_int8_fp16_applies_both_passes_with_their_keep_lists(
    tiny_table: CalibrationTable, tiny_eval_images: np.ndarray
) -> None:
    spec = BuildSpec(precision=Precision.INT8_FP16, keep=KeepRules(int8=("conv3",), fp16=("fc",)))
    prepared = prepare_model(zoo.tiny_cnn(), spec, tiny_table)
    model = prepared.model
    onnx.checker.check_model(model, full_check=True)
    assert prepared.quantization is not None and prepared.fp16 is not None
    assert "conv3" not in prepared.quantized_nodes and "conv1" in prepared.quantized_nodes
    assert prepared.kept_nodes["conv3"] == "not INT8: kept by user"
    assert prepared.kept_nodes["fc"] == "FP32: kept by user"
    # Placement decisions are in the pass's report, not among the kept nodes (engines.graph._kept).
    assert prepared.quantization.skipped["maxpool"].startswith("excluded by rule")
    # With conv3 kept, nothing reads the Concat in INT8: cat, conv3.w, ap and mp stay unquantized.
    assert _ops(model)["QuantizeLinear"] == 8
    assert prepared.quantization.skipped["concat"] == (
        "excluded by rule: its output feeds no quantized op"
    )
    assert set(prepared.kept_nodes) == {"conv3", "fc"}
    out = next(o for o in model.graph.output if o.name == "logits")
    assert out.type.tensor_type.elem_type == TensorProto.FLOAT
    feeds = {"image": tiny_eval_images}
    assert (
        cosine_rows(
            run(zoo.tiny_cnn(), feeds)["logits"], run(model, feeds, optimize=False)["logits"]
        ).min()
        > 0.99
    )

    int8_only = prepare_model(zoo.tiny_cnn(), BuildSpec(precision=Precision.INT8), tiny_table)
    assert int8_only.fp16 is None and _ops(int8_only.model)["QuantizeLinear"] == 12
    assert "Cast" not in _ops(int8_only.model)
