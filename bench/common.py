"""Shared helpers for the bench scripts: real-photo data split by photo, the machine, reports.

The photo helpers follow ``tests/zoo.py`` (``photo_crops``, ``preprocess_imagenet``) but keep
calibration and evaluation honest: crops are drawn from disjoint sets of *photos*, so no
evaluation crop shares pixels with a calibration crop. scikit-image ships ``cat`` and
``chelsea`` as the same picture; photos are deduplicated by content before they are split.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engines.backends.onnxruntime import SessionRunner, create_session_options  # noqa: E402
from tests import zoo  # noqa: E402

__all__ = [
    "CALIBRATION_SENTENCES",
    "RESULTS",
    "ROOT",
    "WORK",
    "NamedPhoto",
    "QdqEmulationRunner",
    "activation_amax",
    "crops_of",
    "distinct_photos",
    "environment",
    "fmt_bytes",
    "fmt_pct",
    "log",
    "markdown_table",
    "ort_quantize_static",
    "photo_split",
    "qdq_census",
    "replace_activation_scales",
    "seed_everything",
    "stopwatch",
    "write_json",
    "write_text",
]

RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "work"

# Sentences for calibrating MiniLM's INT8 variants; disjoint from zoo.SENTENCES, which are the
# evaluation sentences. Mixed topics and lengths, like the evaluation set.
CALIBRATION_SENTENCES = [
    "The bakery on the corner sells fresh croissants every morning.",
    "Our flight was delayed by three hours because of fog.",
    "Linear algebra is the language of machine learning.",
    "The orchestra rehearsed the symphony for the concert.",
    "A small boat drifted slowly across the quiet lake.",
    "The database index made the query ten times faster.",
    "Farmers harvested the wheat before the heavy rain.",
    "The toddler stacked colourful blocks into a tower.",
    "Investors are worried about rising interest rates.",
    "The lighthouse guided ships through the narrow strait.",
    "He repaired the bicycle chain with a simple tool.",
    "Volcanic ash grounded flights across the region.",
    "The novel tells the story of two sisters in Lisbon.",
    "Please submit the quarterly report by Friday afternoon.",
    "Whales communicate with long, low-frequency songs.",
    "The kernel scheduler balances threads across CPU cores.",
    "A thunderstorm knocked out power in the village.",
    "The chef seasoned the soup with thyme and pepper.",
    "Students gathered in the hall for the graduation ceremony.",
    "Memory bandwidth often limits inference throughput.",
    "The referee blew the whistle at the end of the match.",
    "Autumn leaves covered the path through the park.",
    "The hospital opened a new wing for children.",
    "Encryption keeps messages private between two parties.",
    "The painter mixed blue and yellow to make green.",
    "Traffic was heavy on the bridge during rush hour.",
    "The telescope captured images of a comet's tail.",
    "She practised the piano for two hours every day.",
    "The company announced record profits this quarter.",
    "Penguins huddle together to survive the cold winter.",
    "Unit tests catch regressions before they reach users.",
    "The old castle stands on a hill above the town.",
    "A gentle rain fell on the tin roof all night.",
    "The marathon route passes through the city centre.",
    "Vaccines train the immune system to fight infections.",
    "The museum's new exhibit features ancient pottery.",
    "My neighbour grows tomatoes and basil on her balcony.",
    "The startup raised funding to expand into Europe.",
    "Snow closed the mountain pass for the weekend.",
    "Gradient descent minimizes the loss step by step.",
    "The kids built a sandcastle near the waves.",
    "The court ruled in favour of the small business.",
    "A cup of green tea helps me relax in the evening.",
    "The satellite entered orbit after a successful launch.",
    "Cyclists raced through the hills in the summer heat.",
    "The printer ran out of paper in the middle of the job.",
    "Bees pollinate flowers while collecting nectar.",
    "The detective found a clue hidden under the carpet.",
]


def log(message: str) -> None:
    """Progress on stderr with a timestamp (stdout carries the results)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    """Seed numpy's legacy global generator (everything else takes explicit seeds)."""
    np.random.seed(seed)  # third-party code (ORT quantizer) may use it


@contextmanager
def stopwatch() -> Iterator[Callable[[], float]]:
    """``with stopwatch() as elapsed: ...; elapsed()`` seconds since the block started."""
    start = time.perf_counter()
    end: list[float] = []
    yield lambda: (end[0] if end else time.perf_counter()) - start
    end.append(time.perf_counter())


# --- photos --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NamedPhoto:
    """One distinct scikit-image sample photo (RGB uint8)."""

    name: str
    pixels: np.ndarray


def distinct_photos() -> list[NamedPhoto]:
    """zoo.PHOTOS that exist in this scikit-image, RGB, without content duplicates, in zoo order."""
    from skimage import data

    seen: set[str] = set()
    out: list[NamedPhoto] = []
    for name in zoo.PHOTOS:
        fn = getattr(data, name, None)
        if fn is None:
            continue
        img = fn()
        if isinstance(img, tuple):
            img = img[0]
        if img.ndim != 3 or img.shape[2] < 3:
            continue
        pixels = np.ascontiguousarray(img[:, :, :3])
        digest = hashlib.sha256(pixels.tobytes()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        out.append(NamedPhoto(name, pixels))
    return out


def photo_split(
    photos: Sequence[NamedPhoto], eval_names: Sequence[str] | None = None
) -> tuple[list[NamedPhoto], list[NamedPhoto]]:
    """(calibration photos, evaluation photos): ``eval_names``, or every second photo."""
    if eval_names is None:
        return list(photos[0::2]), list(photos[1::2])
    unknown = sorted(set(eval_names) - {p.name for p in photos})
    if unknown:
        raise SystemExit(f"unknown photo(s) {unknown}; available: {[p.name for p in photos]}")
    chosen = set(eval_names)
    calibration = [p for p in photos if p.name not in chosen]
    evaluation = [p for p in photos if p.name in chosen]
    if not calibration or not evaluation:
        raise SystemExit("need at least one calibration photo and one evaluation photo")
    return calibration, evaluation


def crops_of(
    photos: Sequence[NamedPhoto], count: int, *, seed: int, size: int = 256
) -> list[np.ndarray]:
    """``count`` RGB crops cycling over ``photos`` (zoo.photo_crops' procedure: random square of
    50-100% of the short side, random position, horizontal flip half the time, resized)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        img = photos[i % len(photos)].pixels
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.5, 1.0))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        crop = img[top : top + side, left : left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        resized = Image.fromarray(np.ascontiguousarray(crop)).resize(
            (size, size), Image.Resampling.BILINEAR
        )
        out.append(np.asarray(resized))
    return out


# --- runners ------------------------------------------------------------------------------------


class QdqEmulationRunner(SessionRunner):
    """ONNX Runtime over an ``.onnx`` file with its Q/DQ fusions off (``session.disable_quant_qdq``).

    QuantizeLinear/DequantizeLinear then run as the ops they are: float compute on tensors
    rounded to the INT8 grid, which is the arithmetic TensorRT performs for a Q/DQ network (INT8
    kernels with FP32 accumulation). With the fusions on (ONNX Runtime's default), Q/DQ become
    QLinearConv/QLinearMatMul int8 kernels whose u8s8 products saturate on x86 CPUs without
    AVX-VNNI, which says something about that CPU, not about the quantized model.
    Feeds are validated and queries timed by :class:`engines.backends.runner.BaseRunner`.
    """

    def __init__(self, model_path: Path, *, threads: int) -> None:
        import onnxruntime as ort

        options = create_session_options(threads)
        options.add_session_config_entry("session.disable_quant_qdq", "1")
        self.model_path = Path(model_path)
        self._threads = threads
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        super().__init__(session, self.model_path.name)

    def _describe(self) -> dict[str, str]:
        return {
            "backend": "onnxruntime (Q/DQ emulated: session.disable_quant_qdq=1)",
            "model": self.model_path.name,
            "threads": str(self._threads),
        }


# --- environment and reports ---------------------------------------------------------------------


def environment(threads: int) -> dict[str, Any]:
    """Date, machine and library versions recorded with every result file."""
    import onnx
    import onnxruntime
    import psutil

    from engines.backends.onnxruntime import cpu_name

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_name(),
            "logical_cpus": psutil.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(),
            "load_average_1m": round(os.getloadavg()[0], 2),
        },
        "threads": threads,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; the first column left-aligned, the rest right-aligned."""
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def fmt_bytes(size: int) -> str:
    return f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size / 1024:.1f} KiB"


def write_text(path: Path, text: str) -> Path:
    """Write through a temporary file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text if text.endswith("\n") else text + "\n")
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, data: Any) -> Path:
    """JSON (NaN/inf as strings, numpy scalars as numbers), atomically."""
    return write_text(path, json.dumps(_jsonable(data), indent=2))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return "NaN" if np.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Path):
        return str(value)
    return value


# --- ONNX Runtime's own quantizer (the baseline) --------------------------------------------------


class _StridedReader:
    """Fixed batches for ``quantize_static``, with the ``set_range`` and ``len`` its
    ``CalibStridedMinMax`` loop uses to collect (and histogram) a few batches at a time."""

    def __init__(self, arrays: Mapping[str, np.ndarray], batch: int) -> None:
        total = int(next(iter(arrays.values())).shape[0])
        self.batches = [
            {k: v[i : i + batch] for k, v in arrays.items()} for i in range(0, total, batch)
        ]
        self.end, self.pos = len(self.batches), 0

    def set_range(self, start_index: int, end_index: int) -> None:
        self.pos, self.end = start_index, end_index

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= min(self.end, len(self.batches)):
            return None
        self.pos += 1
        return self.batches[self.pos - 1]


def ort_quantize_static(
    model_path: Path,
    out_path: Path,
    calibration: Mapping[str, np.ndarray],
    *,
    reduce_range: bool = False,
    cache_path: Path | None = None,
    batch: int = 8,
    stride_batches: int = 4,
) -> Path:
    """ONNX Runtime's ``quantize_static``: QDQ, per-channel INT8 weights, entropy calibration,
    symmetric INT8 activations.

    Histograms are collected ``stride_batches`` batches at a time through ORT's own
    ``CalibStridedMinMax`` loop: its entropy calibrator otherwise keeps every activation of every
    calibration sample in memory (~5 GB for 64 EfficientNet-Lite0 crops). ``cache_path``: ORT's
    calibration cache (JSON), written by the first call and reused by later ones, so a second
    model (e.g. ``reduce_range``) costs no second calibration.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    reader = _StridedReader(calibration, batch)
    count = len(reader.batches)
    stride = max(d for d in range(1, max(stride_batches, 1) + 1) if count % d == 0)

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def get_next(self) -> dict[str, np.ndarray] | None:
            return reader.get_next()

        def __len__(self) -> int:
            return count

        def set_range(self, start_index: int, end_index: int) -> None:
            reader.set_range(start_index, end_index)

    quantize_static(
        str(model_path),
        str(out_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=reduce_range,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"ActivationSymmetric": True, "CalibStridedMinMax": stride},
        calibration_cache_path=None if cache_path is None else str(cache_path),
    )
    return out_path


def qdq_census(path: Path) -> dict[str, Any]:
    """Ops that read a DequantizeLinear output (the quantized ops) by type, and the Q count."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dq_outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    ops: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if any(i in dq_outputs for i in node.input):
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    q_count = sum(1 for n in model.graph.node if n.op_type == "QuantizeLinear")
    return {"quantized_ops": dict(sorted(ops.items())), "quantize_linear_nodes": q_count}


def activation_amax(path: Path) -> dict[str, float]:
    """amax (= scale x 127) of each per-tensor activation QuantizeLinear in a QDQ model."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    amax: dict[str, float] = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits:
            continue
        scale = inits.get(node.input[1])
        if scale is not None and scale.size == 1:
            amax[node.input[0]] = float(scale.reshape(-1)[0]) * 127.0
    return amax


def replace_activation_scales(
    src: Path, dst: Path, scales: Mapping[str, float]
) -> tuple[Path, int]:
    """A copy of QDQ model ``src`` whose activation QuantizeLinear (and its DequantizeLinear,
    which shares the scale initializer) use ``scales[tensor]`` where given."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    replaced = 0
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits:
            continue
        tensor, scale_name = node.input[0], node.input[1]
        if tensor in scales and scales[tensor] > 0 and scale_name in inits:
            value = np.asarray(scales[tensor], dtype=np.float32)
            inits[scale_name].CopyFrom(numpy_helper.from_array(value, scale_name))
            replaced += 1
    onnx.save(model, str(dst))
    return dst, replaced
