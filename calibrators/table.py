"""CalibrationTable: tensor name -> amax, read and written as TensorRT's calibration cache text.

The cache format, as TensorRT writes it::

    TRT-<version>-<Algorithm>
    <tensor name>: <hex>
    ...

``<version>`` is the writer's TensorRT version as one number: ``1000*major + 100*minor + patch``
up to 9.x (``8601`` = 8.6.1, ``8510`` = 8.5.10), ``10000*major + 100*minor + patch`` from 10.0
(``101303`` = 10.13.3). ``<Algorithm>`` names the calibrator class that wrote it. ``<hex>`` is
the IEEE-754 float32 bit pattern of the scale, ``amax / 127``, in lowercase hex without leading
zeros (a zero scale is ``0``). Every line, the last included, ends with ``\\n``.

TensorRT ignores a cache whose header does not match the reader: the version must be the running
TensorRT's and the algorithm that of the calibrator class reading it. So writing takes a target
version, and the algorithm is chosen for the calibrator that will serve the table
(:func:`algorithm_for_method`): ``entropy`` -> ``EntropyCalibration2``, ``minmax`` ->
``MinMaxCalibration``, and ``percentile``/``mse`` -> ``EntropyCalibration2`` by default, because
``trtexec --calib`` reads caches through an ``IInt8EntropyCalibrator2`` and trtforge's implicit
builds serve a table through the native calibrator class named by its algorithm. Pass
``calibrator=TensorRTAlgorithm.MINMAX`` to target an ``IInt8MinMaxCalibrator`` instead. The header
algorithm changes nothing about the scales; it only decides which calibrator accepts them.

Exactness: amax is stored as the float64 ``float32(scale) * 127`` (exact: a 24-bit significand
times a 7-bit integer fits in float64), and ``float32(amax / 127)`` gives back the very same
float32, so a cache read and written back is byte-identical.

The JSON twin (``.json``) carries the same ranges as amax plus the method, its parameters, the
sample count, the model and dataset digests, the algorithm and the TensorRT version. A table of
method ``auto`` also records, per tensor, which candidate range was chosen, by which criterion,
and every candidate's range and error (``range_choices``, :class:`RangeChoice`); other tables
leave that field out, so their JSON and digest are what they were. The cache text never holds it.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Collection, Iterable
from enum import StrEnum
from hashlib import sha256
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from calibrators.errors import TableError
from calibrators.spec import CalibrationMethod
from core.files import write_atomically

__all__ = [
    "DEFAULT_TRT_VERSION",
    "JSON_FORMAT",
    "CalibrationTable",
    "RangeChoice",
    "RangeCriterion",
    "TableMatch",
    "TensorRTAlgorithm",
    "algorithm_for_method",
    "is_tensorrt_internal_name",
    "trt_version_number",
    "trt_version_string",
]

JSON_FORMAT = "trtforge-calibration-table/1"
"""The ``format`` tag of the JSON twin."""

_INT8_MAX = 127.0
_FLOAT32_MAX = float(struct.unpack(">f", bytes.fromhex("7f7fffff"))[0])


class TensorRTAlgorithm(StrEnum):
    """The calibrator class a cache is meant for, as spelled in the cache header."""

    ENTROPY2 = "EntropyCalibration2"
    MINMAX = "MinMaxCalibration"
    ENTROPY = "EntropyCalibration"
    LEGACY = "LegacyCalibration"


_METHOD_ALGORITHMS = {
    CalibrationMethod.ENTROPY: TensorRTAlgorithm.ENTROPY2,
    CalibrationMethod.MINMAX: TensorRTAlgorithm.MINMAX,
    CalibrationMethod.PERCENTILE: TensorRTAlgorithm.ENTROPY2,
    CalibrationMethod.MSE: TensorRTAlgorithm.ENTROPY2,
    CalibrationMethod.AUTO: TensorRTAlgorithm.ENTROPY2,
}


def algorithm_for_method(
    method: CalibrationMethod | str | None, calibrator: TensorRTAlgorithm | str | None = None
) -> TensorRTAlgorithm:
    """The header algorithm to write for a table computed with ``method``.

    ``calibrator``, when given, wins: it is the native calibrator class the table will be served
    through. Otherwise entropy -> EntropyCalibration2, minmax -> MinMaxCalibration, and
    percentile/mse/auto (no TensorRT counterpart) -> EntropyCalibration2, the class
    ``trtexec --calib`` uses. A table of unknown method gets EntropyCalibration2 too.
    """
    if calibrator is not None:
        return TensorRTAlgorithm(calibrator)
    if method is None:
        return TensorRTAlgorithm.ENTROPY2
    return _METHOD_ALGORITHMS[CalibrationMethod(method)]


DEFAULT_TRT_VERSION = 101303
"""The header version written when neither the call nor the table names one: TensorRT 10.13.3,
the 10.x release the ``tensorrt-stubs`` in the dev extra describe. TensorRT ignores a cache of
another version, so pass the target's own (``trt_version_number(tensorrt.__version__)``);
trtforge's implicit builds always do."""

_VERSION_RE = re.compile(r"^(\d+)(?:\.(\d+))?(?:\.(\d+))?")


def trt_version_number(version: str) -> int:
    """The number TensorRT writes in a cache header for ``version``.

    ``"8.6.1"`` -> 8601, ``"10.13.3"`` -> 101303; a build number or suffix is ignored
    (``"10.13.3.9"``, ``"10.0.0b6"``); missing parts count as 0.
    """
    match = _VERSION_RE.match(version.strip())
    if match is None:
        raise TableError(
            f"{version!r} is not a TensorRT version.",
            hint="Write it as MAJOR.MINOR.PATCH, e.g. 10.13.3.",
            field="trt_version",
        )
    major, minor, patch = (int(part) if part else 0 for part in match.groups())
    minor_limit = 100 if major >= 10 else 10
    if major < 1 or minor >= minor_limit or patch >= 100:
        raise TableError(
            f"TensorRT version {version!r} cannot be written in a cache header.",
            hint="Use a real TensorRT version such as 8.6.1 or 10.13.3.",
            field="trt_version",
        )
    if major >= 10:
        return 10000 * major + 100 * minor + patch
    return 1000 * major + 100 * minor + patch


def trt_version_string(number: int) -> str:
    """The inverse of :func:`trt_version_number`: 8601 -> ``"8.6.1"``, 101303 -> ``"10.13.3"``."""
    if number >= 100000:
        return f"{number // 10000}.{number // 100 % 100}.{number % 100}"
    return f"{number // 1000}.{number // 100 % 10}.{number % 100}"


_INTERNAL_NAME_RE = re.compile(r"^\(Unnamed Layer\* \d+\) \[[^\]]*\]_output(?:_\d+)?$")


def is_tensorrt_internal_name(name: str) -> bool:
    """Whether ``name`` is a tensor TensorRT made up (``(Unnamed Layer* 4) [Shuffle]_output``)."""
    return _INTERNAL_NAME_RE.match(name) is not None


class TableMatch(BaseModel):
    """How a table's tensors line up with a model's tensor names."""

    model_config = ConfigDict(frozen=True)

    matched_tensors: int
    unknown_tensors: tuple[str, ...]
    """In the table but not in the model (table order), TensorRT-internal names excluded."""
    tensorrt_internal_tensors: tuple[str, ...]
    """In the table, made up by TensorRT (``(Unnamed Layer* N) [...]_output``): no ONNX name."""
    missing_tensors: tuple[str, ...]
    """In the model but not in the table (model order)."""

    @property
    def complete(self) -> bool:
        """True when every model tensor has a range and every table tensor exists in the model."""
        return not self.unknown_tensors and not self.missing_tensors


class RangeCriterion(StrEnum):
    """What decided an ``auto`` range."""

    CONSUMER_OUTPUT = "consumer_output"
    """The least error at the outputs of the Conv/ConvTranspose/Gemm/MatMul nodes reading the
    tensor, their weights quantized per channel (plus the tensor's own error when an Add, pool or
    Concat reads it too)."""
    TENSOR = "tensor"
    """The least quantization error of the tensor itself (no weighted node reads it)."""
    ACTIVATION_BOUND = "activation_bound"
    """A bounded activation (ReLU6, Sigmoid, ...) that reaches its bound keeps it."""


class RangeChoice(BaseModel):
    """How ``auto`` chose one tensor's range (an alias records its source's choice)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str
    """The chosen candidate: ``entropy``, ``minmax``, ``percentile:99.9``, ..., ``mse``."""
    criterion: RangeCriterion
    candidates: dict[str, float] = Field(default_factory=dict)
    """Candidate -> its amax."""
    errors: dict[str, float] = Field(default_factory=dict)
    """Candidate -> its error: squared error over reference energy (1 / SQNR), averaged over the
    consumers for ``consumer_output``; empty for ``activation_bound``."""
    consumers: tuple[str, ...] = ()
    """The nodes whose outputs were measured (``consumer_output`` only)."""

    @field_validator("candidates", "errors")
    @classmethod
    def _finite(cls, values: dict[str, float]) -> dict[str, float]:
        for label, value in values.items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{label!r} must be finite and >= 0, got {value!r}")
        return values


def _scale_bits(amax: float) -> int:
    """The float32 bit pattern of ``amax / 127``, rounded once to float32 (as struct does)."""
    return int(struct.unpack(">I", struct.pack(">f", amax / _INT8_MAX))[0])


def _amax_from_bits(bits: int) -> float:
    scale = float(struct.unpack(">f", bits.to_bytes(4, "big"))[0])
    return scale * _INT8_MAX


class CalibrationTable(BaseModel):
    """Per-tensor ranges (amax: the largest magnitude kept; scale = amax / 127) plus provenance.

    ``algorithm`` defaults from ``method`` (:func:`algorithm_for_method`). ``trt_version`` is the
    header number the table was read with (``None`` for tables trtforge computed).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    amax: dict[str, float]
    method: CalibrationMethod | None = None
    parameters: dict[str, float | int | str] = Field(default_factory=dict)
    samples: int = Field(default=0, ge=0)
    model_sha256: str | None = None
    dataset_sha256: str | None = None
    algorithm: TensorRTAlgorithm = TensorRTAlgorithm.ENTROPY2
    trt_version: int | None = Field(default=None, gt=0)
    range_choices: dict[str, RangeChoice] | None = None
    """Per tensor, how ``auto`` chose its range (``None`` for other methods and for caches)."""

    @model_validator(mode="before")
    @classmethod
    def _default_algorithm(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("algorithm") is None:
            data = dict(data)
            data["algorithm"] = algorithm_for_method(data.get("method"))
        return data

    @field_validator("amax")
    @classmethod
    def _valid_ranges(cls, amax: dict[str, float]) -> dict[str, float]:
        for name, value in amax.items():
            if not name or "\n" in name or "\r" in name:
                raise ValueError(f"tensor name {name!r} cannot be written in a cache line")
            if not math.isfinite(value) or value < 0 or math.copysign(1.0, value) < 0:
                raise ValueError(f"amax of {name!r} must be finite and >= 0, got {value!r}")
            if value / _INT8_MAX > _FLOAT32_MAX:
                raise ValueError(f"amax of {name!r} ({value!r}) overflows a float32 scale")
        return amax

    def scale(self, name: str) -> float:
        """The float32 scale of tensor ``name`` (``float32(amax / 127)``), as a Python float."""
        try:
            amax = self.amax[name]
        except KeyError:
            raise TableError(
                f"Tensor {name!r} has no range in this calibration table.",
                hint="Recalibrate with the model the table is used with.",
                field="table",
            ) from None
        return float(struct.unpack(">f", struct.pack(">f", amax / _INT8_MAX))[0])

    def with_algorithm(
        self, algorithm: TensorRTAlgorithm | str, *, trt_version: int | None = None
    ) -> CalibrationTable:
        """The same ranges, retargeted at another calibrator class (and TensorRT version)."""
        update: dict[str, Any] = {"algorithm": TensorRTAlgorithm(algorithm)}
        if trt_version is not None:
            update["trt_version"] = trt_version
        return self.model_copy(update=update)

    # -- TensorRT cache text -------------------------------------------------------------------

    def to_cache_text(self, trt_version: int | None = None) -> str:
        """TensorRT's cache text for TensorRT ``trt_version`` (header number, e.g. 101303).

        ``None`` keeps the version the table was read with, else :data:`DEFAULT_TRT_VERSION`.
        """
        version = trt_version or self.trt_version or DEFAULT_TRT_VERSION
        if version <= 0:
            raise TableError(f"TensorRT version number {version} is invalid.", field="trt_version")
        lines = [f"TRT-{version}-{self.algorithm.value}"]
        lines.extend(f"{name}: {_scale_bits(amax):x}" for name, amax in self.amax.items())
        return "\n".join(lines) + "\n"

    @classmethod
    def from_cache_text(cls, text: str) -> CalibrationTable:
        """Parse TensorRT's cache text. Raises :class:`TableError` naming the bad line."""
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the newline that ends the last line
        if not lines:
            raise TableError("The calibration cache is empty.", field="table")
        version, algorithm = _parse_header(lines[0].removesuffix("\r"))
        amax: dict[str, float] = {}
        first_line: dict[str, int] = {}
        for number, raw in enumerate(lines[1:], start=2):
            line = raw.removesuffix("\r")
            if not line.strip():
                continue
            name, value = _parse_scale_line(line, number)
            if name in amax:
                raise TableError(
                    f"Line {number}: tensor {name!r} already has a scale on line "
                    f"{first_line[name]}.",
                    hint="Keep one line per tensor; the cache was edited or concatenated.",
                    field="table",
                )
            amax[name] = value
            first_line[name] = number
        return cls(amax=amax, algorithm=algorithm, trt_version=version)

    # -- JSON twin -----------------------------------------------------------------------------

    def _dump(self, exclude: set[str]) -> dict[str, Any]:
        if self.range_choices is None:
            exclude = exclude | {"range_choices"}  # tables without choices read as before
        return self.model_dump(mode="json", exclude=exclude)

    def to_json(self) -> str:
        """The JSON twin: ranges as amax plus all metadata (amax order kept)."""
        payload = {"format": JSON_FORMAT, **self._dump(set())}
        return json.dumps(payload, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> CalibrationTable:
        """Read the JSON twin written by :meth:`to_json`."""
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TableError(
                f"Line {exc.lineno}: the table is not valid JSON ({exc.msg}).",
                hint="Write the table with `trtforge calibrate --out TABLE.json`.",
                field="table",
            ) from exc
        if not isinstance(payload, dict) or payload.get("format") != JSON_FORMAT:
            raise TableError(
                f"The JSON is not a trtforge calibration table (expected format {JSON_FORMAT!r}).",
                hint="Convert a TensorRT cache with `trtforge table convert CACHE TABLE.json`.",
                field="table",
            )
        payload.pop("format")
        try:
            return cls.model_validate(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise TableError(
                f"The calibration table's {where or 'content'} is invalid: {first['msg']}.",
                hint="Rewrite the table with trtforge rather than editing it by hand.",
                field="table",
            ) from exc

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: Path, *, trt_version: int | None = None) -> Path:
        """Write the table atomically: ``.json`` -> JSON twin, any other suffix -> cache text."""
        path = Path(path)
        text = self.to_json() if path.suffix.lower() == ".json" else self.to_cache_text(trt_version)
        _write_atomically(path, text.encode("utf-8"))
        return path

    @classmethod
    def load(cls, path: Path) -> CalibrationTable:
        """Read a table written by :meth:`save` or by TensorRT (format chosen by suffix)."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise TableError(
                f"Cannot read the calibration table {str(path)!r}: {exc.strerror or exc}.",
                hint="Check the path.",
                field="table",
            ) from exc
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise TableError(
                f"{path.name}, line {line}: not UTF-8 text.",
                hint="A calibration table is text; this looks like a binary file.",
                field="table",
            ) from exc
        if path.suffix.lower() == ".json":
            return cls.from_json(text)
        return cls.from_cache_text(text)

    # -- identity and matching ----------------------------------------------------------------

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON of every field (ranges in table order)."""
        canonical = json.dumps(
            {"amax": list(self.amax.items()), **self._dump({"amax"})},
            sort_keys=True,
            separators=(",", ":"),
        )
        return sha256(canonical.encode("utf-8")).hexdigest()

    def compare_with_model(self, tensor_names: Collection[str]) -> TableMatch:
        """Which table tensors the model lacks, and which model tensors the table lacks."""
        model_names = _unique(tensor_names)
        known = set(model_names)
        unknown = [n for n in self.amax if n not in known and not is_tensorrt_internal_name(n)]
        internal = [n for n in self.amax if n not in known and is_tensorrt_internal_name(n)]
        missing = [n for n in model_names if n not in self.amax]
        return TableMatch(
            matched_tensors=len(model_names) - len(missing),
            unknown_tensors=tuple(unknown),
            tensorrt_internal_tensors=tuple(internal),
            missing_tensors=tuple(missing),
        )


_HEADER_RE = re.compile(r"^TRT-(\d+)-([A-Za-z0-9]+)$")
_HEX_RE = re.compile(r"^[0-9a-fA-F]{1,8}$")


def _parse_header(line: str) -> tuple[int, TensorRTAlgorithm]:
    match = _HEADER_RE.match(line)
    if match is None:
        raise TableError(
            f"Line 1: expected a header like 'TRT-8601-EntropyCalibration2', got {line[:80]!r}.",
            field="table",
        )
    try:
        algorithm = TensorRTAlgorithm(match.group(2))
    except ValueError:
        known = ", ".join(a.value for a in TensorRTAlgorithm)
        raise TableError(
            f"Line 1: unknown calibration algorithm {match.group(2)!r}.",
            hint=f"TensorRT writes one of: {known}.",
            field="table",
        ) from None
    version = int(match.group(1))
    if version <= 0:
        raise TableError(f"Line 1: TensorRT version {version} is invalid.", field="table")
    return version, algorithm


def _parse_scale_line(line: str, number: int) -> tuple[str, float]:
    # Tensor names may contain ": " themselves (TensorFlow's "Einsum:0", TensorRT's own names);
    # the scale is always after the last one.
    name, sep, hex_text = line.rpartition(": ")
    if not sep or not name:
        raise TableError(
            f"Line {number}: expected '<tensor name>: <hex scale>', got {line[:80]!r}.",
            field="table",
        )
    if _HEX_RE.match(hex_text) is None:
        raise TableError(
            f"Line {number}: {hex_text[:40]!r} is not a float32 bit pattern in hex "
            f"(tensor {name!r}).",
            hint="Scales are 1-8 hex digits, e.g. '3c010204' for amax 1.0.",
            field="table",
        )
    bits = int(hex_text, 16)
    amax = _amax_from_bits(bits)
    if not math.isfinite(amax) or bits >> 31:
        raise TableError(
            f"Line {number}: scale {hex_text} of tensor {name!r} is "
            f"{'not finite' if not math.isfinite(amax) else 'negative'}.",
            hint="Recalibrate: TensorRT only writes finite, non-negative scales.",
            field="table",
        )
    return name, amax


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _write_atomically(path: Path, data: bytes) -> None:
    """Never a half-written table: see :func:`core.files.write_atomically`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, data)
    except OSError as exc:
        raise TableError(
            f"Cannot write the calibration table {str(path)!r}: {exc.strerror or exc}.",
            hint="Choose a path in a writable folder with free space.",
            field="out",
        ) from exc
