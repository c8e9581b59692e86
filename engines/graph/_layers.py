"""Linear layers (Conv, Gemm, MatMul with a constant weight) as matrices over sampled rows.

Every layer is seen the same way: its weight as ``[K, C/G, P]`` (output channels, input channels
per group, kernel window) and the activation as rows ``[R, C, P]`` (one per output position: the
values that position reads, zero padding included), so that ``y[r, k] = sum W[k, c, p] *
rows[r, c, p]`` over the group of ``k``. Smoothing and bias correction measure a layer's INT8
error on such rows without running the model.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import onnx

from engines.graph._onnx import GraphIndex

__all__ = ["LinearLayer", "layer_output", "linear_layers"]


@dataclass(frozen=True)
class LinearLayer:
    """One Conv/Gemm/MatMul whose input 1 is a constant float32 weight."""

    node: str
    op_type: str
    activation: str
    weight: str
    channel_axis: int
    """The activation's channel axis: 1 for Conv, -1 for Gemm and MatMul."""
    groups: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    """Begin pads then end pads (ONNX order), when ``auto_pad`` is NOTSET."""
    auto_pad: str = "NOTSET"
    trans_b: bool = False

    @property
    def window(self) -> int:
        return math.prod(self.kernel) if self.kernel else 1

    @property
    def row_key(self) -> tuple[str, tuple[object, ...]]:
        """Layers with equal keys read identical rows (e.g. Q, K and V of one attention)."""
        geometry = (self.kernel, self.strides, self.dilations, self.pads, self.auto_pad)
        return self.activation, (self.op_type == "Conv", *geometry)

    def channels(self, index: GraphIndex) -> int | None:
        shape = index.shape.get(self.weight)
        if shape is None or not all(isinstance(d, int) for d in shape):
            return None
        dims = [int(d) for d in shape if isinstance(d, int)]
        if self.op_type == "Conv":
            return dims[1] * self.groups
        return dims[0] if not self.trans_b else dims[1]

    # -- weights ------------------------------------------------------------------------------

    def matrix(self, weight: np.ndarray) -> np.ndarray:
        """The weight as ``[K, C/G, P]``."""
        if self.op_type == "Conv":
            return weight.reshape(weight.shape[0], weight.shape[1], -1)
        matrix = weight if self.trans_b else weight.T
        return matrix[:, :, None]

    def scale_inputs(self, weight: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """``weight`` with the coefficients of input channel ``j`` multiplied by ``scales[j]``."""
        s = np.asarray(scales, dtype=np.float64)
        if self.op_type == "Conv":
            k, per_group = weight.shape[0], weight.shape[1]
            grouped = weight.reshape(self.groups, k // self.groups, per_group, -1)
            factor = s.reshape(self.groups, 1, per_group, 1)
            return (grouped * factor).reshape(weight.shape).astype(np.float32)
        factor = s[None, :] if self.trans_b else s[:, None]
        return (weight * factor).astype(np.float32)

    def output_axis(self) -> int:
        """The axis of the weight holding output channels."""
        if self.op_type == "Conv":
            return 0
        return 0 if self.trans_b else 1

    # -- rows ---------------------------------------------------------------------------------

    def positions(self, shape: tuple[int, ...]) -> int:
        """Output positions of an activation of ``shape``: rows it yields."""
        if self.op_type != "Conv":
            return math.prod(shape[:-1])
        begin, end = self._pads(shape[2:])
        return shape[0] * math.prod(self._out_sizes(shape[2:], begin, end))

    def rows(self, values: np.ndarray, chosen: np.ndarray) -> np.ndarray:
        """The rows ``[len(chosen), C, P]`` of output positions ``chosen`` (flat indices)."""
        if self.op_type != "Conv":
            flat = values.reshape(-1, values.shape[-1])
            return np.ascontiguousarray(flat[chosen][:, :, None], dtype=np.float32)
        spatial = values.shape[2:]
        begin, end = self._pads(spatial)
        out = self._out_sizes(spatial, begin, end)
        padded = np.pad(values, [(0, 0), (0, 0), *zip(begin, end, strict=True)])
        where = np.unravel_index(chosen, (values.shape[0], *out))
        offsets = np.array(list(itertools.product(*(range(k) for k in self.kernel))))  # [P, S]
        coords = [
            where[s + 1][:, None] * self.strides[s] + offsets[None, :, s] * self.dilations[s]
            for s in range(len(spatial))
        ]  # each [R, P]
        patches = padded[(where[0][:, None], slice(None), *coords)]  # [R, P, C]
        return np.ascontiguousarray(patches.transpose(0, 2, 1), dtype=np.float32)

    def _pads(self, spatial: tuple[int, ...]) -> tuple[list[int], list[int]]:
        rank = len(spatial)
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = [], []
            for size, k, s, d in zip(spatial, self.kernel, self.strides, self.dilations, strict=True):
                out = -(-size // s)
                total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
                low = total // 2 if self.auto_pad == "SAME_UPPER" else total - total // 2
                begin.append(low)
                end.append(total - low)
            return begin, end
        if self.auto_pad == "VALID" or not self.pads:
            return [0] * rank, [0] * rank
        return list(self.pads[:rank]), list(self.pads[rank:])

    def _out_sizes(self, spatial: tuple[int, ...], begin: list[int], end: list[int]) -> list[int]:
        return [
            (size + b + e - ((k - 1) * d + 1)) // s + 1
            for size, b, e, k, s, d in zip(
                spatial, begin, end, self.kernel, self.strides, self.dilations, strict=True
            )
        ]


def layer_output(rows: np.ndarray, matrix: np.ndarray, groups: int = 1) -> np.ndarray:
    """``[R, K]``: the layer's output at the rows' positions (bias excluded)."""
    r, c, p = rows.shape
    k, per_group, _ = matrix.shape
    x = rows.reshape(r, groups, per_group, p).astype(np.float32, copy=False)
    w = matrix.reshape(groups, k // groups, per_group, p).astype(np.float32, copy=False)
    if groups == 1:
        return np.asarray(x.reshape(r, c * p) @ w.reshape(k, c * p).T)
    return np.asarray(np.einsum("rgcp,gkcp->rgk", x, w, optimize=True).reshape(r, k))


def _ints(node: onnx.NodeProto, name: str, default: list[int]) -> tuple[int, ...]:
    attr = next((a for a in node.attribute if a.name == name), None)
    return tuple(int(v) for v in attr.ints) if attr is not None and attr.ints else tuple(default)


def _int(node: onnx.NodeProto, name: str, default: int) -> int:
    attr = next((a for a in node.attribute if a.name == name), None)
    return int(attr.i) if attr is not None else default


def _conv(node: onnx.NodeProto, weight: np.ndarray) -> LinearLayer:
    spatial = weight.ndim - 2
    auto_pad = next((a.s.decode() for a in node.attribute if a.name == "auto_pad"), "NOTSET")
    return LinearLayer(
        node=node.name,
        op_type="Conv",
        activation=node.input[0],
        weight=node.input[1],
        channel_axis=1,
        groups=_int(node, "group", 1),
        kernel=tuple(int(d) for d in weight.shape[2:]),
        strides=_ints(node, "strides", [1] * spatial),
        dilations=_ints(node, "dilations", [1] * spatial),
        pads=_ints(node, "pads", [0] * (2 * spatial)),
        auto_pad=auto_pad or "NOTSET",
    )


def linear_layers(model: onnx.ModelProto) -> list[LinearLayer]:
    """The linear layers of a normalized ``model``, in graph order."""
    index = GraphIndex.build(model)
    layers: list[LinearLayer] = []
    for node in index.nodes:
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2 or not node.input[1]:
            continue
        x, w = node.input[0], node.input[1]
        weight = index.array(w)
        if weight is None or weight.dtype != np.float32 or index.is_constant(x):
            continue
        if not index.is_float32(x) or not np.all(np.isfinite(weight)):
            continue
        if node.op_type == "Conv" and weight.ndim >= 3:
            layers.append(_conv(node, weight))
        elif node.op_type == "Gemm" and weight.ndim == 2 and not _int(node, "transA", 0):
            trans_b = bool(_int(node, "transB", 0))
            layers.append(LinearLayer(node.name, "Gemm", x, w, -1, trans_b=trans_b))
        elif node.op_type == "MatMul" and weight.ndim == 2:
            layers.append(LinearLayer(node.name, "MatMul", x, w, -1))
    return layers
