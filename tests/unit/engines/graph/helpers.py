"""Shared helpers for the graph-pass tests: ranges from real activations, running, comparing."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

from calibrators.spec import CalibrationMethod
from calibrators.table import CalibrationTable
from engines.graph.inspect import normalize


def activations(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every float32 activation of ``model`` (graph inputs included) on ``feeds``."""
    work = normalize(model)
    graph = work.graph
    initializers = {t.name for t in graph.initializer}
    infos = {v.name: v for v in (*graph.value_info, *graph.input, *graph.output)}
    names = [i.name for i in graph.input if i.name not in initializers]
    names += [o for n in graph.node for o in n.output if o in infos]
    names = [
        n for n in dict.fromkeys(names) if infos[n].type.tensor_type.elem_type == TensorProto.FLOAT
    ]
    outputs = {o.name for o in graph.output}
    graph.output.extend(infos[n] for n in names if n not in outputs and n not in feeds)
    fetch = [n for n in names if n not in feeds]
    values = run(work, feeds, names=fetch)
    return {**{n: np.asarray(feeds[n]) for n in names if n in feeds}, **values}


def table_from_activations(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]
) -> CalibrationTable:
    """A min-max calibration table: amax = max|x| of each float activation on ``feeds``."""
    amax = {name: float(np.abs(v).max()) for name, v in activations(model, feeds).items()}
    samples = len(next(iter(feeds.values())))
    return CalibrationTable(amax=amax, method=CalibrationMethod.MINMAX, samples=samples)


def run(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    *,
    names: list[str] | None = None,
    optimize: bool = True,
) -> dict[str, np.ndarray]:
    """Run on ONNX Runtime's CPU provider; ``optimize=False`` runs the graph exactly as written
    (Q/DQ as float arithmetic, i.e. the precise fake-quantization TensorRT builds from)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    fetch = names or [o.name for o in session.get_outputs()]
    return dict(zip(fetch, session.run(fetch, dict(feeds)), strict=True))


def cosine_rows(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine similarity per sample (first axis)."""
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = candidate.reshape(len(candidate), -1).astype(np.float64)
    return np.asarray((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))


def nodes_by_name(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in model.graph.node}


def producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto | None:
    return next((n for n in model.graph.node if tensor in n.output), None)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    tensor = next(t for t in model.graph.initializer if t.name == name)
    return numpy_helper.to_array(tensor)


def attribute(node: onnx.NodeProto, name: str) -> object:
    attr = next((a for a in node.attribute if a.name == name), None)
    return None if attr is None else onnx.helper.get_attribute_value(attr)


def dequantized_source(
    model: onnx.ModelProto, tensor: str
) -> tuple[str, onnx.NodeProto, onnx.NodeProto] | None:
    """When ``tensor`` is a DequantizeLinear output: (quantized tensor, Q node, DQ node)."""
    dq = producer(model, tensor)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = producer(model, dq.input[0])
    assert q is not None and q.op_type == "QuantizeLinear", f"{tensor}: DQ without its Q"
    return q.input[0], q, dq
