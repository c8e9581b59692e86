"""Real models that nobody on this project trained, with data and a task metric (issue 9).

Three OCR models ship in the ``rapidocr-onnxruntime`` 1.4.4 wheel on PyPI. :func:`ocr_models_dir`
fetches it with ``pip download --no-deps`` into ``.cache/models`` (never from a model hub),
checks its SHA-256 and unzips the models:

- ``ocr_rec``: PP-OCRv4 text recognizer (CTC), input ``x`` [N, 3, 48, W] (W = 320 here), output
  [N, T, 6625] softmax over the character dict stored in the model's metadata (plus CTC blank at
  0 and space at the end, as RapidOCR reads it). Data: single text lines rendered with PIL in
  Debian's DejaVu fonts (package ``fonts-dejavu-core``; ``apt-get install fonts-dejavu-core``)
  from random words, numbers, dates and prices, with their ground truth. Metric: character
  accuracy after greedy CTC decoding, PaddleOCR's ``1 - mean(edit distance / max(len))``
  (spaces ignored).
- ``ocr_det``: PP-OCRv4 text detector (DB), input [N, 3, 640, 640], output [N, 1, 640, 640]
  text probability. Data: 640x640 document-like pages (paper, gradients, scikit-image photos)
  with rendered text lines. Metric: IoU of the text mask (probability > 0.3, PaddleOCR's
  ``thresh``) with FP32's mask, pooled over the set.
- ``ocr_cls``: mobile v2 text-orientation classifier, input [N, 3, 48, 192], output [N, 2]
  (0 / 180 degrees). Data: rendered lines, half of them rotated by 180 degrees. Metric: true
  accuracy against the rotation that was applied (``top1_agreement`` with FP32 also reported).

And three from the test zoo (``tests/zoo.py``, exported from installed packages):
``efficientnet_lite0`` (top-1 agreement with FP32 on crops of scikit-image photos, calibration and
evaluation photos disjoint), ``minilm`` (sentence-embedding cosine with FP32) and ``fashion_cnn``
(labelled Fashion-MNIST test accuracy).

The rendering and the text metrics live in ``bench/ocr_data.py``. Everything is deterministic
for a given seed; calibration and evaluation data are drawn from
disjoint sources (different words, photos, images). ``python bench/realmodels.py`` prints each
model's FP32 task metric on its evaluation set.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import CALIBRATION_SENTENCES, crops_of, distinct_photos, log, photo_split  # noqa: E402
from bench.ocr_data import (  # noqa: E402
    character_accuracy,
    ctc_greedy_decode,
    document_pages,
    normalize_line,
    normalize_pages,
    text_lines,
)
from tests import zoo  # noqa: E402

__all__ = [
    "IN_DOMAIN",
    "MODELS",
    "OCR_WHEEL",
    "RealModel",
    "load",
    "ocr_models_dir",
    "rec_characters",
    "run_fp32",
]

MODEL_CACHE = ROOT / ".cache" / "models"
OCR_WHEEL = "rapidocr-onnxruntime==1.4.4"
OCR_WHEEL_FILE = "rapidocr_onnxruntime-1.4.4-py3-none-any.whl"
OCR_WHEEL_SHA256 = "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf"
OCR_FILES = {
    "ocr_det": "ch_PP-OCRv4_det_infer.onnx",
    "ocr_rec": "ch_PP-OCRv4_rec_infer.onnx",
    "ocr_cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
}
DET_THRESHOLD = 0.3
"""PaddleOCR's DB ``thresh``: a pixel is text where the probability exceeds it."""
REC_WIDTH = 320

Outputs = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class RealModel:
    """A model file with calibration data, separate evaluation data and its task metrics.

    ``evaluate(candidate, reference)`` takes the outputs of a build and of FP32 on
    ``evaluation`` (whole set, output name -> array) and returns task metrics, higher is better,
    in [0, 1]; ``metric`` names the primary one.
    """

    key: str
    title: str
    path: Path
    calibration: dict[str, np.ndarray]
    evaluation: dict[str, np.ndarray]
    metric: str
    evaluate: Callable[[Outputs, Outputs], dict[str, float]]
    batch_size: int = 16
    calibration_batch_size: int | None = None
    notes: str = ""
    labels: np.ndarray | None = field(default=None, repr=False)
    class_scores: bool = False
    """The output's last axis holds class scores ([N, C] or [N, T, C]): top-1 agreement applies."""
    in_domain: bool = True
    """False: evaluated on inputs the model was not made for (text-free photos for an OCR model),
    to show what such samples do to the metrics; left out of the gate table."""

    @property
    def calibration_count(self) -> int:
        return int(next(iter(self.calibration.values())).shape[0])

    @property
    def evaluation_count(self) -> int:
        return int(next(iter(self.evaluation.values())).shape[0])


# --- fetching the OCR wheel ----------------------------------------------------------------------


def ocr_models_dir(cache_root: Path = MODEL_CACHE) -> Path:
    """The folder holding the three OCR models, fetched and unzipped on first use."""
    folder = cache_root / "rapidocr_onnxruntime-1.4.4"
    if all((folder / name).exists() for name in OCR_FILES.values()):
        return folder
    wheel_dir = cache_root / "wheels"
    wheel = wheel_dir / OCR_WHEEL_FILE
    if not wheel.exists():
        log(f"pip download --no-deps {OCR_WHEEL} -> {wheel_dir}")
        wheel_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-q",
                OCR_WHEEL,
                "-d",
                str(wheel_dir),
            ],
            check=True,
        )
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != OCR_WHEEL_SHA256:
        raise SystemExit(
            f"{wheel}: SHA-256 {digest}, expected {OCR_WHEEL_SHA256}; delete it and retry"
        )
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for name in OCR_FILES.values():
            tmp = folder / f".{name}.tmp"
            tmp.write_bytes(zf.read(f"rapidocr_onnxruntime/models/{name}"))
            tmp.replace(folder / name)
    return folder


@cache
def rec_characters(path: Path) -> tuple[str, ...]:
    """The recognizer's classes: blank, the metadata's ``character`` lines, space (RapidOCR)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    return ("<blank>", *meta["character"].splitlines(), " ")


def _top1(outputs: Outputs) -> np.ndarray:
    return np.asarray(next(iter(outputs.values()))).argmax(axis=-1)


# --- the models ---------------------------------------------------------------------------------


def ocr_rec(cal: int, ev: int, seed: int) -> RealModel:
    path = ocr_models_dir() / OCR_FILES["ocr_rec"]
    chars = rec_characters(path)
    _, cal_lines = text_lines(cal, seed=seed, evaluation=False)
    truth, ev_lines = text_lines(ev, seed=seed + 1, evaluation=True)

    def evaluate(candidate: Outputs, reference: Outputs) -> dict[str, float]:
        probs = next(iter(candidate.values()))
        ref = next(iter(reference.values()))
        text = ctc_greedy_decode(probs, chars)
        exact = [p.replace(" ", "") == t.replace(" ", "") for p, t in zip(text, truth, strict=True)]
        return {
            "char_accuracy": character_accuracy(text, truth),
            "line_accuracy": float(np.mean(exact)),
            "step_top1_agreement": float(np.mean(probs.argmax(-1) == ref.argmax(-1))),
        }

    return RealModel(
        key="ocr_rec",
        class_scores=True,
        title="PP-OCRv4 recognizer (CTC)",
        path=path,
        calibration={"x": np.stack([normalize_line(x, REC_WIDTH) for x in cal_lines])},
        evaluation={"x": np.stack([normalize_line(x, REC_WIDTH) for x in ev_lines])},
        metric="char_accuracy",
        evaluate=evaluate,
        notes=f"rendered text lines 3x48x{REC_WIDTH} (DejaVu fonts); ground-truth character accuracy",
    )


def ocr_det(cal: int, ev: int, seed: int) -> RealModel:
    path = ocr_models_dir() / OCR_FILES["ocr_det"]

    def evaluate(candidate: Outputs, reference: Outputs) -> dict[str, float]:
        c = next(iter(candidate.values())) > DET_THRESHOLD
        r = next(iter(reference.values())) > DET_THRESHOLD
        inter = np.logical_and(c, r).sum(axis=(1, 2, 3))
        union = np.logical_or(c, r).sum(axis=(1, 2, 3))
        per_page = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        return {
            "mask_iou": float(inter.sum() / max(int(union.sum()), 1)),
            "min_page_mask_iou": float(per_page.min()),
            "pixel_agreement": float(np.mean(c == r)),
        }

    return RealModel(
        key="ocr_det",
        title="PP-OCRv4 detector (DB)",
        path=path,
        calibration={"x": normalize_pages(document_pages(cal, seed=seed, evaluation=False))},
        evaluation={"x": normalize_pages(document_pages(ev, seed=seed + 1, evaluation=True))},
        metric="mask_iou",
        evaluate=evaluate,
        batch_size=4,
        calibration_batch_size=2,
        notes="rendered 640x640 pages (paper, gradients, scikit-image photos split by photo); "
        f"text-mask IoU (p > {DET_THRESHOLD}) with FP32, pooled",
    )


def ocr_cls(cal: int, ev: int, seed: int) -> RealModel:
    path = ocr_models_dir() / OCR_FILES["ocr_cls"]

    def lines(count: int, seed: int, evaluation: bool) -> tuple[np.ndarray, np.ndarray]:
        _, rendered = text_lines(count, seed=seed, evaluation=evaluation)
        flip = np.random.default_rng(seed + 100).permutation(count) < count // 2
        arrays = [
            normalize_line(x[::-1, ::-1] if f else x, 192)
            for x, f in zip(rendered, flip, strict=True)
        ]
        return np.stack(arrays), flip.astype(np.int64)

    cal_x, _ = lines(cal, seed, False)
    ev_x, labels = lines(ev, seed + 1, True)

    def evaluate(candidate: Outputs, reference: Outputs) -> dict[str, float]:
        pred, ref = _top1(candidate), _top1(reference)
        return {
            "accuracy": float(np.mean(pred == labels)),
            "top1_agreement": float(np.mean(pred == ref)),
        }

    return RealModel(
        key="ocr_cls",
        class_scores=True,
        title="PP-OCR mobile v2 orientation classifier",
        path=path,
        calibration={"x": cal_x},
        evaluation={"x": ev_x},
        metric="accuracy",
        evaluate=evaluate,
        labels=labels,
        notes="rendered text lines 3x48x192, half rotated 180 degrees; true accuracy",
    )


def _text_free_photos(count: int, seed: int, width: int, height: int) -> np.ndarray:
    """Crops of the evaluation photos (no text), resized to ``width`` x ``height``, normalized
    as RapidOCR does ([N, 3, height, width])."""
    from PIL import Image

    _, eval_photos = photo_split(distinct_photos())
    crops = crops_of(eval_photos, count, seed=seed, size=max(width, height))
    resized = [np.asarray(Image.fromarray(c).resize((width, height))) for c in crops]
    return normalize_pages(resized)


def ocr_det_photos(cal: int, ev: int, seed: int) -> RealModel:
    """The detector calibrated on pages, evaluated on text-free photo crops (out of domain)."""
    base = ocr_det(cal, 1, seed)
    return replace(
        base,
        key="ocr_det_photos",
        title="PP-OCRv4 detector on text-free photos",
        evaluation={"x": _text_free_photos(min(ev, 32), seed + 1, 640, 640)},
        in_domain=False,
        notes="calibrated on rendered pages; evaluated on 640x640 crops of scikit-image photos "
        f"without text (out of domain); text-mask IoU (p > {DET_THRESHOLD}) with FP32",
    )


def ocr_cls_photos(cal: int, ev: int, seed: int) -> RealModel:
    """The orientation classifier calibrated on text lines, evaluated on text-free photo crops."""
    base = ocr_cls(cal, 2, seed)

    def evaluate(candidate: Outputs, reference: Outputs) -> dict[str, float]:
        return {"top1_agreement": float(np.mean(_top1(candidate) == _top1(reference)))}

    return replace(
        base,
        key="ocr_cls_photos",
        title="orientation classifier on text-free photos",
        evaluation={"x": _text_free_photos(ev, seed + 1, 192, 48)},
        metric="top1_agreement",
        evaluate=evaluate,
        labels=None,
        in_domain=False,
        notes="calibrated on rendered lines; evaluated on 192x48 crops of scikit-image photos "
        "without text (out of domain, FP32's scores near 50/50); top-1 agreement with FP32",
    )


def efficientnet_lite0(cal: int, ev: int, seed: int) -> RealModel:
    cal_photos, eval_photos = photo_split(distinct_photos())

    def evaluate(candidate: Outputs, reference: Outputs) -> dict[str, float]:
        return {"top1_agreement": float(np.mean(_top1(candidate) == _top1(reference)))}

    return RealModel(
        key="efficientnet_lite0",
        class_scores=True,
        title="EfficientNet-Lite0",
        path=zoo.efficientnet_lite0(),
        calibration={"input": zoo.preprocess_imagenet(crops_of(cal_photos, cal, seed=seed))},
        evaluation={"input": zoo.preprocess_imagenet(crops_of(eval_photos, ev, seed=seed + 1))},
        metric="top1_agreement",
        evaluate=evaluate,
        notes="224x224 crops of scikit-image photos, split by photo; top-1 agreement with FP32",
    )


def minilm(cal: int, ev: int, seed: int) -> RealModel:
    del seed  # fixed sentences

    def evaluate(candidate: Outputs, reference: Outputs) -> dict[str, float]:
        c, r = next(iter(candidate.values())), next(iter(reference.values()))
        cos = (c * r).sum(-1) / np.maximum(
            np.linalg.norm(c, axis=-1) * np.linalg.norm(r, axis=-1), 1e-12
        )
        return {"cosine": float(cos.mean()), "min_cosine": float(cos.min())}

    return RealModel(
        key="minilm",
        title="all-MiniLM-L6-v2",
        path=zoo.minilm(),
        calibration=zoo.minilm_inputs(CALIBRATION_SENTENCES[:cal]),
        evaluation=zoo.minilm_inputs(zoo.SENTENCES[:ev]),
        metric="cosine",
        evaluate=evaluate,
        notes=f"{min(cal, len(CALIBRATION_SENTENCES))} calibration sentences (bench/common.py), "
        f"{min(ev, len(zoo.SENTENCES))} zoo.SENTENCES; embedding cosine with FP32",
    )


def fashion_cnn(cal: int, ev: int, seed: int) -> RealModel:
    del seed  # the first images of each split
    train, _ = zoo.fashion_mnist("train")
    test, test_labels = zoo.fashion_mnist("test")
    ev = max(ev, 2000)  # 1 point of accuracy needs more than 128 images to be visible
    labels = test_labels[:ev]

    def evaluate(candidate: Outputs, reference: Outputs) -> dict[str, float]:
        pred = _top1(candidate)
        return {
            "accuracy": float(np.mean(pred == labels)),
            "top1_agreement": float(np.mean(pred == _top1(reference))),
        }

    return RealModel(
        key="fashion_cnn",
        class_scores=True,
        title="Fashion-MNIST CNN",
        path=zoo.fashion_cnn(),
        calibration={"image": np.ascontiguousarray(train[:cal])},
        evaluation={"image": np.ascontiguousarray(test[:ev])},
        metric="accuracy",
        evaluate=evaluate,
        batch_size=64,
        labels=labels,
        notes=f"first {cal} training images; first {ev} test images, labelled accuracy",
    )


MODELS: dict[str, Callable[[int, int, int], RealModel]] = {
    "ocr_rec": ocr_rec,
    "ocr_det": ocr_det,
    "ocr_cls": ocr_cls,
    "efficientnet_lite0": efficientnet_lite0,
    "minilm": minilm,
    "fashion_cnn": fashion_cnn,
    "ocr_det_photos": ocr_det_photos,
    "ocr_cls_photos": ocr_cls_photos,
}
IN_DOMAIN = ("ocr_rec", "ocr_det", "ocr_cls", "efficientnet_lite0", "minilm", "fashion_cnn")
"""The models of the issue's acceptance table (the default of the benches)."""


def load(key: str, *, calibration: int = 64, evaluation: int = 128, seed: int = 0) -> RealModel:
    """Model ``key`` (one of :data:`MODELS`) with ``calibration`` and ``evaluation`` samples."""
    if key not in MODELS:
        raise SystemExit(f"unknown model {key!r}; choose from {', '.join(MODELS)}")
    return MODELS[key](calibration, evaluation, seed)


def run_fp32(model: RealModel, *, threads: int = 2) -> dict[str, np.ndarray]:
    """FP32 outputs of ``model`` on its evaluation set (ONNX Runtime, CPU)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model.path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, model.evaluation_count, model.batch_size):
        feeds = {k: v[start : start + model.batch_size] for k, v in model.evaluation.items()}
        for name, value in zip(names, session.run(None, feeds), strict=True):
            parts[name].append(np.asarray(value))
    return {n: np.concatenate(v) for n, v in parts.items()}


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="FP32 task metric of each real model")
    parser.add_argument("--models", nargs="+", default=list(IN_DOMAIN), choices=list(MODELS))
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--evaluation", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    for key in args.models:
        model = load(key, calibration=args.calibration, evaluation=args.evaluation)
        out = run_fp32(model, threads=args.threads)
        scores = model.evaluate(out, out)
        shapes = {k: list(v.shape) for k, v in model.evaluation.items()}
        print(f"{key}: {model.calibration_count} cal, {shapes} eval; FP32 {scores}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
