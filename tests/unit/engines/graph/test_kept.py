"""``PreparedModel.kept_nodes``: the nodes a user would expect in the reduced precision that the
build kept out of it, with the reason; not every node without Q/DQ."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calibrators.table import CalibrationTable
from engines.graph import prepare_model
from engines.spec import BuildSpec, KeepRules, Precision
from tests import zoo
from tests.unit.engines.graph.helpers import table_from_activations


def test_qdq_nodes_and_placement_decisions_are_not_kept(tiny_table: CalibrationTable) -> None:
    prepared = prepare_model(zoo.tiny_cnn(), BuildSpec(precision=Precision.INT8_FP16), tiny_table)
    assert prepared.quantization is not None and prepared.fp16 is not None
    qdq_fp32 = [
        n for n, why in prepared.fp16.fp32_nodes.items() if why.startswith("Q/DQ keeps float32")
    ]
    assert len(qdq_fp32) >= 12  # every Q and DQ node stays FP32 in the FP16 pass...
    assert "maxpool" in prepared.quantization.skipped  # ...and MaxPool gets no Q/DQ...
    assert prepared.kept_nodes == {}  # ...yet nothing a user would quantize was kept


def _attention_model() -> onnx.ModelProto:
    """x -> q = x Wq, k = x Wk -> softmax(q k^T) x -> Conv-free head: a Gemm-like MatMul, plus an
    Exp whose output exceeds the FP16 range and a Shape (no FP16 kernel)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), name)
        for name in ("wq", "wk", "wo")
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["probs", "x"], ["context"], name="pv"),
        helper.make_node("MatMul", ["context", "wo"], ["out"], name="o_proj"),
        helper.make_node("Exp", ["out"], ["big"], name="exp"),
        helper.make_node("Shape", ["big"], ["shape"], name="shape"),
    ]
    graph = helper.make_graph(
        nodes,
        "attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8])],
        [
            helper.make_tensor_value_info("big", TensorProto.FLOAT, [2, 4, 8]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [3]),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_rule_range_and_keep_reasons_are_kept() -> None:
    model = _attention_model()
    x = np.random.default_rng(1).normal(size=(2, 4, 8)).astype(np.float32)
    table = table_from_activations(model, {"x": x})
    amax = {**table.amax, "big": 1e6}  # Exp's output beyond FP16: the Exp stays FP32
    del amax["context"]  # no range: o_proj cannot be quantized
    table = table.model_copy(update={"amax": amax})
    spec = BuildSpec(precision=Precision.INT8_FP16, keep=KeepRules(int8=("k_proj",)))
    prepared = prepare_model(model, spec, table)
    kept = prepared.kept_nodes
    assert prepared.quantized_nodes == ["q_proj"]
    assert kept["k_proj"] == "not INT8: kept by user"
    assert kept["qk"] == kept["pv"] == (
        "not INT8: excluded by rule: attention core (MatMul around Softmax)"
    )
    assert kept["o_proj"].startswith("not INT8: no range: tensor 'context'")
    assert kept["exp"].startswith("FP32: range: 'big' reaches")
    assert set(kept) == {"k_proj", "qk", "pv", "o_proj", "exp"}  # not Shape, Q/DQ, Transpose


def test_fp16_keep_rules_on_quantized_nodes_are_kept(tiny_table: CalibrationTable) -> None:
    spec = BuildSpec(precision=Precision.INT8_FP16, keep=KeepRules(fp16=("fc", "maxpool")))
    prepared = prepare_model(zoo.tiny_cnn(), spec, tiny_table)
    assert "fc" in prepared.quantized_nodes
    assert prepared.kept_nodes == {"fc": "FP32: kept by user", "maxpool": "FP32: kept by user"}
