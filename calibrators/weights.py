"""Weight quantization as the Q/DQ pass does it: symmetric INT8 per output channel.

Shared by :mod:`engines.graph.qdq` (which writes the scales into the graph) and by the ``auto``
calibration method (which measures a consumer's error with its weights quantized), so both see
the very same quantized weights.

Which axis holds the output channels (:func:`weight_axis`):

- ``Conv``: ``W`` is ``[C_out, C_in / group, k...]``, axis 0.
- ``ConvTranspose``: ``W`` is ``[C_in, C_out / group, k...]``, axis 1.
- ``Gemm``: ``B`` is ``[K, N]``, axis 1; with ``transB=1`` it is ``[N, K]``, axis 0.
- ``MatMul``: a 2-D constant ``B`` is ``[K, N]``, axis 1; other ranks get one scale (``None``).

Scales are ``float32(max|W_k| / levels)`` (``levels`` = 127 for full INT8), never below
:data:`WEIGHT_SCALE_FLOOR`. The floor exists because real exports carry channels whose largest
weight is a denormal (3.2e-40 was seen in a detector's 1x1 Conv): ``max / 127`` is then a denormal
or zero scale, which TensorRT or a float16 copy of the scale flushes to 0, and ``x / 0`` is inf
or NaN. A floored channel quantizes to exactly 0 where its weights are below half the floor, so
the denormal channel becomes an exact zero channel. The floor, 2**-14, is float16's smallest
normal number, so it stays a normal number after an FP16 build casts scales to float16 (an exact
conversion: it is a power of two). Channels whose max|W| is below ``127 * 2**-14`` (about 7.8e-3)
get fewer than 127 levels; their absolute rounding error is at most ``2**-15`` (3.1e-5), below
that of any channel above the floor with ``max|W| > 7.8e-3``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import onnx

__all__ = [
    "INT8_LEVELS",
    "WEIGHT_OPS",
    "WEIGHT_SCALE_FLOOR",
    "fake_quantize",
    "fake_quantize_weight",
    "node_weight_axis",
    "quantize_weight",
    "weight_axis",
    "weight_scales",
]

INT8_LEVELS = 127
"""Symmetric INT8: ``scale = amax / 127``. QuantizeLinear (ONNX and TensorRT) saturates to
[-128, 127], so a value just below ``-amax`` still reaches -128; weights never do (their scale
comes from their own max)."""

WEIGHT_SCALE_FLOOR = float(np.finfo(np.float16).tiny)
"""The smallest weight scale written: 2**-14, float16's smallest normal (see the module doc)."""

WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
"""Ops whose input 1 is a weight the Q/DQ pass quantizes per output channel when constant."""

Float32Array = npt.NDArray[np.float32]


def weight_axis(op_type: str, weight_rank: int, *, trans_b: bool = False) -> int | None:
    """The output-channel axis of the weight (input 1) of an ``op_type`` node; None = per tensor.

    ``weight_rank`` is the weight's number of dimensions; ``trans_b`` is Gemm's ``transB``.
    Raises ``ValueError`` for an op that has no quantized weight.
    """
    if op_type == "Conv":
        axis: int | None = 0
    elif op_type == "ConvTranspose":
        axis = 1
    elif op_type == "Gemm":
        axis = 0 if trans_b else 1
    elif op_type == "MatMul":
        axis = 1 if weight_rank == 2 else None
    else:
        raise ValueError(f"{op_type} has no quantized weight; expected one of {sorted(WEIGHT_OPS)}")
    return axis if axis is not None and axis < weight_rank else None


def node_weight_axis(node: onnx.NodeProto, weight_rank: int) -> int | None:
    """:func:`weight_axis` for ``node`` (reads Gemm's ``transB`` attribute)."""
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    return weight_axis(node.op_type, weight_rank, trans_b=bool(trans_b))


def weight_scales(
    values: npt.ArrayLike, axis: int | None, levels: int = INT8_LEVELS
) -> Float32Array:
    """float32 scales ``max(max|W_k| / levels, WEIGHT_SCALE_FLOOR)``: 1-D over ``axis``, or a
    0-d array when ``axis`` is None. Non-finite weights raise ``ValueError``."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    array = np.asarray(values)
    if not np.all(np.isfinite(array)):
        raise ValueError("weights hold NaN or Inf; they cannot be quantized")
    magnitude = np.abs(array.astype(np.float64))
    if axis is None:
        amax = np.asarray(magnitude.max() if magnitude.size else 0.0)
    else:
        channels = array.shape[axis]
        moved = np.moveaxis(magnitude, axis, 0).reshape(channels, -1)
        amax = moved.max(axis=1) if moved.shape[1] else np.zeros(channels)
    scale = (amax / levels).astype(np.float32)
    return np.maximum(scale, np.float32(WEIGHT_SCALE_FLOOR)).astype(np.float32)


def _broadcast(scales: Float32Array, axis: int | None, ndim: int) -> Float32Array:
    if axis is None or scales.ndim == 0:
        return scales
    shape = [1] * ndim
    shape[axis] = scales.shape[0]
    return scales.reshape(shape)


def quantize_weight(
    values: npt.ArrayLike, axis: int | None, levels: int = INT8_LEVELS
) -> tuple[npt.NDArray[np.int8], Float32Array]:
    """``(q, scales)``: int8 weights and their scales, as QuantizeLinear computes them in float32
    (``round_half_even(W / scale)``, saturated to ``[-levels - 1, levels]``)."""
    array = np.asarray(values, dtype=np.float32)
    scales = weight_scales(array, axis, levels)
    ratio = array / _broadcast(scales, axis, array.ndim)
    q = np.clip(np.rint(ratio), -levels - 1, levels).astype(np.int8)
    return q, scales


def fake_quantize_weight(
    values: npt.ArrayLike, axis: int | None, levels: int = INT8_LEVELS
) -> Float32Array:
    """The weights after QuantizeLinear -> DequantizeLinear per channel (float32)."""
    q, scales = quantize_weight(values, axis, levels)
    return (q.astype(np.float32) * _broadcast(scales, axis, q.ndim)).astype(np.float32)


def fake_quantize(
    values: npt.ArrayLike,
    amax: float,
    levels: int = INT8_LEVELS,
    out: Float32Array | None = None,
) -> Float32Array:
    """An activation after per-tensor Q/DQ with ``scale = float32(amax / levels)`` (the table's
    scale): ``clip(round_half_even(x / scale), -levels - 1, levels) * scale`` in float32, as
    QuantizeLinear -> DequantizeLinear compute it.

    ``amax <= 0`` (an all-zero tensor) gives zeros. ``out`` may be ``values`` itself (in place).
    """
    array = np.asarray(values, dtype=np.float32)
    scale = np.float32(amax / levels)
    if not scale > 0:
        result = np.zeros_like(array) if out is None else out
        result[...] = 0.0
        return result
    result = np.divide(array, scale, out=out)
    np.rint(result, out=result)
    np.clip(result, -levels - 1, levels, out=result)
    result *= scale
    return result
