"""An ONNX model's structure without its weights, read without loading the file whole.

Checking an upload needs the graph (nodes, inputs, outputs, opsets, tensor names, dims and
types), not the gigabytes of weights in it; ``onnx.load`` and ``onnx.checker.check_model(path)``
both hold the whole file in memory. :func:`load_skeleton` walks the protobuf wire format of the
memory-mapped file instead and copies everything except the data of large tensors.

A tensor whose ``raw_data`` (or packed ``float_data``/``double_data``, which are laid out the
same way) is longer than ``keep_bytes`` is written as *external data* pointing at the model
file itself, at the offset where its bytes really are. The skeleton is therefore a valid model
that describes the same weights: ``onnx.checker`` validates it (sizes included) from a file
beside the model, and shape inference sees every dim and every small constant (shape tensors).

Only messages that can hold tensors (model, graph, function, node, attribute, tensor) larger
than ``keep_bytes`` are walked field by field; everything smaller is copied as it is.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from core.errors import ModelError

__all__ = ["SKELETON_KEEP_BYTES", "Skeleton", "load_skeleton"]

SKELETON_KEEP_BYTES = 4096
"""Tensor data up to this size stays in the skeleton (shape constants, scalars)."""

_VARINT, _FIXED64, _LENGTH, _START_GROUP, _END_GROUP, _FIXED32 = range(6)
_WALKED = frozenset(
    {
        "ModelProto",
        "GraphProto",
        "FunctionProto",
        "TrainingInfoProto",
        "NodeProto",
        "AttributeProto",
        "TensorProto",
    }
)
_T = onnx.TensorProto
_RAW_DATA = _T.DESCRIPTOR.fields_by_name["raw_data"].number
_DATA_TYPE = _T.DESCRIPTOR.fields_by_name["data_type"].number
_EXTERNAL_DATA = _T.DESCRIPTOR.fields_by_name["external_data"].number
_DATA_LOCATION = _T.DESCRIPTOR.fields_by_name["data_location"].number
# packed repeated fields whose bytes are the tensor's little-endian values, as raw_data would be
_SAME_AS_RAW = {
    _T.DESCRIPTOR.fields_by_name["float_data"].number: _T.FLOAT,
    _T.DESCRIPTOR.fields_by_name["double_data"].number: _T.DOUBLE,
}


@dataclass(frozen=True)
class Skeleton:
    """A model's structure; large tensor data stays in the file (see the module docstring)."""

    model: onnx.ModelProto
    stripped: int
    """Tensors whose data was left in the file (external data pointing at the model file)."""
    external: bool
    """Whether the model itself keeps tensors in other files (external data beside it)."""


class _Malformed(Exception):
    pass


def _varint(buf: mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | _LENGTH) + _encode_varint(len(payload)) + payload


def _entry(key: str, value: str) -> bytes:
    body = _length_field(1, key.encode()) + _length_field(2, value.encode())
    return _length_field(_EXTERNAL_DATA, body)


@dataclass
class _TensorState:
    data_type: int | None = None
    has_external: bool = False
    data_at: tuple[int, int] | None = None  # (offset, length) of the data left in the file


@dataclass
class _Walker:
    buf: mmap.mmap
    location: str
    keep_bytes: int
    stripped: int = 0

    def message(self, start: int, end: int, descriptor: Any) -> bytes:
        """The message in ``buf[start:end]`` re-encoded with large tensor data left out."""
        tensor = _TensorState() if descriptor.name == "TensorProto" else None
        parts: list[bytes] = []
        pos = start
        while pos < end:
            field_start = pos
            tag, pos = _varint(self.buf, pos, end)
            number, wire = tag >> 3, tag & 7
            if wire == _LENGTH:
                pos, replaced = self._length_delimited(pos, end, number, descriptor, tensor)
                if replaced is not None:
                    parts.append(replaced)
                    continue
            else:
                pos = self._scalar(pos, end, number, wire, tensor)
            parts.append(self.buf[field_start:pos])
        if tensor is not None:
            parts.append(self._tensor_tail(tensor))
        return b"".join(parts)

    def _scalar(
        self, pos: int, end: int, number: int, wire: int, tensor: _TensorState | None
    ) -> int:
        if wire == _VARINT:
            value, pos = _varint(self.buf, pos, end)
            if tensor is not None and number == _DATA_TYPE:
                tensor.data_type = value
            if tensor is not None and number == _DATA_LOCATION and value == _T.EXTERNAL:
                tensor.has_external = True
        elif wire in (_FIXED64, _FIXED32):
            pos += 8 if wire == _FIXED64 else 4
        else:
            raise _Malformed(f"unsupported wire type {wire}")
        if pos > end:
            raise _Malformed("a field runs past the end of its message")
        return pos

    def _length_delimited(
        self, pos: int, end: int, number: int, descriptor: Any, tensor: _TensorState | None
    ) -> tuple[int, bytes | None]:
        """(end of the field, its re-encoding or None to copy it as it is)."""
        length, pos = _varint(self.buf, pos, end)
        payload_end = pos + length
        if payload_end > end:
            raise _Malformed("a field runs past the end of its message")
        if tensor is not None and number == _EXTERNAL_DATA:
            tensor.has_external = True
        if length <= self.keep_bytes:
            return payload_end, None
        if tensor is not None and (
            number == _RAW_DATA
            or (number in _SAME_AS_RAW and tensor.data_type == _SAME_AS_RAW[number])
        ):
            if tensor.data_at is not None:
                raise _Malformed("a tensor holds its data twice")
            tensor.data_at = (pos, length)
            return payload_end, b""
        sub = descriptor.fields_by_number.get(number)
        if sub is not None and sub.message_type is not None and sub.message_type.name in _WALKED:
            return payload_end, _length_field(number, self.message(pos, payload_end, sub.message_type))
        return payload_end, None

    def _tensor_tail(self, tensor: _TensorState) -> bytes:
        if tensor.data_at is None:
            return b""
        if tensor.has_external:
            raise _Malformed("a tensor holds both inline and external data")
        self.stripped += 1
        offset, length = tensor.data_at
        return b"".join(
            (
                _encode_varint(_DATA_LOCATION << 3 | _VARINT) + _encode_varint(_T.EXTERNAL),
                _entry("location", self.location),
                _entry("offset", str(offset)),
                _entry("length", str(length)),
            )
        )


def load_skeleton(path: Path, *, keep_bytes: int = SKELETON_KEEP_BYTES) -> Skeleton:
    """Read the structure of the model at ``path`` (:mod:`core.skeleton`).

    Memory grows with the graph, not the weights. :class:`ModelError` when the file is not a
    readable ONNX model. The result's external data (stripped tensors pointing at ``path``, and
    the model's own external files) is relative to ``path``'s folder.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, 2)
            if size == 0:
                raise ModelError(f"{path.name} is empty, not an ONNX model.", field="model")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                walker = _Walker(buf, path.name, keep_bytes)
                data = walker.message(0, size, onnx.ModelProto.DESCRIPTOR)
    except FileNotFoundError as exc:
        raise ModelError(f"Model file {path.name!r} does not exist.", field="model") from exc
    except _Malformed as exc:
        raise ModelError(f"{path.name} is not a readable ONNX model: {exc}.", field="model") from exc
    try:
        model = onnx.ModelProto.FromString(data)
    except Exception as exc:  # DecodeError and friends for bytes that are not a ModelProto
        raise ModelError(f"{path.name} is not a readable ONNX model: {exc}", field="model") from exc
    external = False
    for tensor in _tensors(model):
        if tensor.data_location != _T.EXTERNAL:
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        if entries.get("location") == path.name:
            _check_stripped_size(tensor, int(entries.get("length", "-1")))
        else:
            external = True
            _check_external_extent(tensor, entries, path.parent)
    return Skeleton(model=model, stripped=walker.stripped, external=external)


_SUB_BYTE_BITS: dict[int, int] = {
    getattr(_T, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
    if hasattr(_T, name)
}


def _expected_bytes(tensor: onnx.TensorProto) -> int | None:
    count = int(math.prod(tensor.dims))
    bits = _SUB_BYTE_BITS.get(int(tensor.data_type))
    if bits is not None:
        return -(-count * bits // 8)
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except Exception:  # UNDEFINED or a type this onnx does not know: the checker decides
        return None
    return None if dtype.hasobject else count * int(dtype.itemsize)


def _check_stripped_size(tensor: onnx.TensorProto, length: int) -> None:
    """The checker does not compare external data lengths with dims: compare them here, as it
    does for inline data."""
    expected = _expected_bytes(tensor)
    if expected is not None and length != expected:
        raise ModelError(
            f"Tensor {tensor.name!r} holds {length:,} bytes of data but its shape "
            f"{list(tensor.dims)} and type need {expected:,}.",
            field="model",
        )


def _check_external_extent(tensor: onnx.TensorProto, entries: dict[str, str], folder: Path) -> None:
    """A tensor's external data must fit its file and its shape (the checker only asks that the
    file exists). Files outside ``folder`` are not looked at: the path rules refuse them."""
    root = folder.resolve()
    target = (root / entries.get("location", "")).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        return
    try:
        offset = int(entries.get("offset") or 0)
        length = int(entries["length"]) if entries.get("length") else None
    except ValueError as exc:
        raise ModelError(
            f"Tensor {tensor.name!r} has a malformed external data offset or length.",
            field="model",
        ) from exc
    expected = _expected_bytes(tensor)
    if length is not None and expected is not None and length != expected:
        raise ModelError(
            f"Tensor {tensor.name!r} declares {length:,} bytes of external data but its shape "
            f"{list(tensor.dims)} and type need {expected:,}.",
            field="model",
        )
    need = length if length is not None else expected
    size = target.stat().st_size
    if offset < 0 or (need is not None and offset + need > size):
        raise ModelError(
            f"Tensor {tensor.name!r} needs {need or 0:,} bytes at offset {offset:,} of "
            f"{entries['location']!r}, which holds {size:,}.",
            hint="Upload the model's data files complete, as saved beside the .onnx file.",
            field="model",
        )


def _tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    graphs = [model.graph, *(g for i in model.training_info for g in (i.initialization, i.algorithm))]
    nodes = [node for function in model.functions for node in function.node]
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            yield from graph.initializer
            nodes.extend(graph.node)
            continue
        node = nodes.pop()
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                graphs.append(attr.g)
            graphs.extend(attr.graphs)


