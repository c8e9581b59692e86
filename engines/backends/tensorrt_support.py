"""What the TensorRT backend does in plain Python: parser error messages, the mode check, layer
to ONNX node mapping, file names beside an artifact, and the parent's preparation helpers.

Nothing here imports ``tensorrt``: the door (:mod:`engines.backends.tensorrt`) calls these, and
they are tested without TensorRT. Names of helpers used only by the implicit path contain
``implicit``, as in the door.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from engines.backends.tensorrt_job import BuildJob
from engines.errors import EngineError
from engines.spec import BuildSpec, TensorRTMode, node_matches

__all__ = [
    "TRT11_VERSION",
    "NodeReports",
    "ParserProblem",
    "Pin",
    "check_mode_supported",
    "layer_pins_implicit",
    "onnx_node_of_layer",
    "parser_error_message",
    "publish_build_inputs",
    "save_prepared_onnx",
    "side_files",
    "timing_cache_file",
]

TRT11_VERSION = 110000
"""Cache-header version number of TensorRT 11.0.0 (:func:`calibrators.table.trt_version_number`)."""

Pin = Literal["float32", "float16"]

NodeReports = tuple[list[str], dict[str, str], list[str]]
"""(quantized nodes, node -> why it stays out of a reduced precision, FP32 nodes)."""


class ParserProblem(BaseModel):
    """One ``trt.OnnxParser`` error, copied out of TensorRT."""

    model_config = ConfigDict(frozen=True)

    node: int
    node_name: str
    operator: str
    code: str
    description: str


def parser_error_message(problems: Sequence[ParserProblem]) -> str:
    """One message naming each failing ONNX node (name, op type, index) and TensorRT's reason."""
    if not problems:
        return "TensorRT's ONNX parser failed without reporting an error."
    parts = []
    for p in problems[:5]:
        where = f"node {p.node_name!r}" if p.node_name else f"node #{p.node}"
        op = f" ({p.operator})" if p.operator else ""
        parts.append(f"{where}{op}: {p.description} [{p.code}]")
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return "TensorRT cannot parse the ONNX model: " + "; ".join(parts) + more + "."


def check_mode_supported(mode: TensorRTMode, trt_version: int) -> None:
    """Implicit quantization exists only in TensorRT 10.x (``trt_version``: header number)."""
    if mode is TensorRTMode.IMPLICIT and trt_version >= TRT11_VERSION:
        raise EngineError(
            "TensorRT 11 removed implicit quantization (calibrators, INT8/FP16 builder flags).",
            hint="Build with --mode explicit: trtforge writes Q/DQ + FP16 ONNX that TensorRT 11 "
            "builds strongly typed.",
            field="mode",
        )


_ONNX_LAYER_RE = re.compile(r"\[ONNX Layer: (.*)\]")


def onnx_node_of_layer(layer_name: str, metadata: str) -> str:
    """The ONNX node a TensorRT layer came from: the parser's ``[ONNX Layer: NAME]`` metadata,
    else the layer's own name (which the parser takes from the node)."""
    match = _ONNX_LAYER_RE.search(metadata or "")
    return match.group(1) if match else layer_name


def timing_cache_file(folder: Path, gpu_key: str, trt_version: str) -> Path:
    """``<folder>/<gpu key>-trt<version>.timing-cache``, odd characters replaced by ``-``."""
    stem = re.sub(r"[^A-Za-z0-9.]+", "-", f"{gpu_key}-trt{trt_version}").strip("-")
    return Path(folder) / f"{stem}.timing-cache"


def side_files(artifact: Path) -> dict[str, Path]:
    """The files written beside an artifact, by kind (:mod:`engines.backends.tensorrt`)."""
    artifact = Path(artifact)
    kinds = ("layers.json", "reproduce.py", "build.log", "prepared.onnx", "calibration.cache")
    return {kind: artifact.with_name(f"{artifact.name}.{kind}") for kind in kinds}


def save_prepared_onnx(model: Any, path: Path) -> None:
    """Save the ONNX model TensorRT will parse; weights go to ``<name>.data`` past 2 GiB."""
    import onnx

    from engines.backends.onnxruntime import MAX_PROTOBUF_BYTES

    large = model.ByteSize() > MAX_PROTOBUF_BYTES
    location = f"{path.name}.data" if large else None
    onnx.save_model(model, str(path), save_as_external_data=large, location=location)


def layer_pins_implicit(model: Any, spec: BuildSpec) -> dict[str, Pin]:
    """Which ONNX nodes' layers to pin, and to what, from the spec's keep rules."""
    fp16, int8 = spec.precision.uses_fp16, spec.precision.uses_int8
    pins: dict[str, Pin] = {}
    for node in model.graph.node:
        no_fp16 = fp16 and node_matches(spec.keep.fp16, node.name, node.op_type)
        no_int8 = int8 and node_matches(spec.keep.int8, node.name, node.op_type)
        if node.name and (no_fp16 or (no_int8 and not fp16)):
            pins[node.name] = "float32"
        elif node.name and no_int8:
            pins[node.name] = "float16"
    return pins


def publish_build_inputs(job: BuildJob, files: dict[str, Path]) -> dict[str, str]:
    """Move what TensorRT read (prepared ONNX + its external data, calibration cache) beside
    the artifact; they were written under their final names, which the ONNX refers to."""
    published: dict[str, str] = {}
    folder = files["prepared.onnx"].parent
    if job.mode is TensorRTMode.EXPLICIT:
        source = Path(job.onnx_path)
        data = source.with_name(source.name + ".data")
        if data.exists():
            data.replace(folder / data.name)
        source.replace(folder / source.name)
        published["prepared_onnx"] = source.name
    if job.calibration_cache:
        cache = Path(job.calibration_cache)
        cache.replace(folder / cache.name)
        published["calibration_cache"] = cache.name
    return published
