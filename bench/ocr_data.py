"""Synthetic OCR data for the real-model benches: rendered text lines and document pages, and
the text metrics (greedy CTC decoding, character accuracy).

Text is drawn with PIL in Debian's DejaVu fonts (package ``fonts-dejavu-core``:
``apt-get install fonts-dejavu-core``). Calibration and evaluation draw words from different
sentence lists (bench/common.py's CALIBRATION_SENTENCES vs zoo.SENTENCES) and pages from
different scikit-image photos, so no evaluation sample repeats a calibration one.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import CALIBRATION_SENTENCES, distinct_photos, photo_split  # noqa: E402
from tests import zoo  # noqa: E402

__all__ = [
    "FONTS",
    "character_accuracy",
    "ctc_greedy_decode",
    "document_pages",
    "normalize_line",
    "normalize_pages",
    "text_lines",
]

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansCondensed.ttf",
    "DejaVuSerifCondensed.ttf",
    "DejaVuSans-Oblique.ttf",
)


# --- text metrics -------------------------------------------------------------------------------


def ctc_greedy_decode(probs: np.ndarray, characters: Sequence[str]) -> list[str]:
    """Best path: argmax per step, repeats collapsed, blanks (class 0) dropped. probs [N, T, C]."""
    best = probs.argmax(axis=-1)
    out = []
    for row in best:
        keep = np.ones(row.shape, bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != 0
        out.append("".join(characters[i] for i in row[keep]))
    return out


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def character_accuracy(predicted: Sequence[str], truth: Sequence[str]) -> float:
    """PaddleOCR's ``norm_edit_dis``: 1 - mean over lines of distance / max(len), spaces ignored."""
    total = 0.0
    for p, t in zip(predicted, truth, strict=True):
        p, t = p.replace(" ", ""), t.replace(" ", "")
        total += _edit_distance(p, t) / max(len(p), len(t), 1)
    return 1.0 - total / max(len(truth), 1)


# --- rendering ----------------------------------------------------------------------------------


def _font(name: str, size: int):  # type: ignore[no-untyped-def]
    from PIL import ImageFont

    path = FONT_DIR / name
    if not path.exists():
        raise SystemExit(f"{path} is missing: apt-get install fonts-dejavu-core (DejaVu fonts)")
    return ImageFont.truetype(str(path), size)


_WORDS_CAL = sorted({w.strip(".,'") for s in CALIBRATION_SENTENCES for w in s.split()} - {""})
_WORDS_EVAL = sorted({w.strip(".,'") for s in zoo.SENTENCES for w in s.split()} - {""})
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _token(rng: np.random.Generator, words: Sequence[str]) -> str:
    kind = rng.random()
    if kind < 0.6:
        word = str(words[int(rng.integers(len(words)))])
        style = rng.random()
        return word.upper() if style < 0.15 else word.capitalize() if style < 0.35 else word
    if kind < 0.75:
        return str(int(rng.integers(0, 10 ** int(rng.integers(1, 7)))))
    if kind < 0.85:
        return f"{int(rng.integers(1, 29)):02d}-{_MONTHS[int(rng.integers(12))]}-{int(rng.integers(1990, 2031))}"
    if kind < 0.95:
        return f"${int(rng.integers(0, 1000))}.{int(rng.integers(0, 100)):02d}"
    return str(rng.choice(["No.", "ID:", "Tel:", "(A)", "#7", "100%", "x2", "A/B"]))


def _line_text(rng: np.random.Generator, words: Sequence[str], max_chars: int) -> str:
    text = _token(rng, words)
    for _ in range(int(rng.integers(0, 3))):
        nxt = _token(rng, words)
        if len(text) + 1 + len(nxt) > max_chars:
            break
        text += " " + nxt
    return text[:max_chars]


def _render_line(rng: np.random.Generator, text: str) -> np.ndarray:
    """One text line, tightly cropped with a small margin, RGB uint8."""
    from PIL import Image, ImageDraw, ImageFilter

    size = int(rng.integers(28, 44))
    font = _font(FONTS[int(rng.integers(len(FONTS)))], size)
    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = int(rng.integers(2, 10)), int(rng.integers(3, 9))
    width, height = right - left + 2 * pad_x, bottom - top + 2 * pad_y
    paper = rng.integers(190, 256, 3)
    ink = rng.integers(0, 70, 3)
    if rng.random() < 0.15:  # light text on a dark label
        paper, ink = 255 - paper, 255 - ink
    img = Image.new("RGB", (width, height), tuple(int(c) for c in paper))
    ImageDraw.Draw(img).text(
        (pad_x - left, pad_y - top), text, font=font, fill=tuple(int(c) for c in ink)
    )
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.9))))
    arr = np.asarray(img).astype(np.float32)
    arr += rng.normal(0, rng.uniform(0, 8), arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def normalize_line(rgb: np.ndarray, width: int) -> np.ndarray:
    """RapidOCR's resize_norm_img: height 48, aspect kept up to ``width``, BGR, (x/255-0.5)/0.5,
    padded with zeros on the right. [3, 48, width] float32."""
    from PIL import Image

    h, w = rgb.shape[:2]
    new_w = min(width, max(1, math.ceil(48 * w / h)))
    resized = np.asarray(Image.fromarray(rgb).resize((new_w, 48), Image.Resampling.BILINEAR))
    bgr = resized[:, :, ::-1].astype(np.float32).transpose(2, 0, 1) / 255.0
    out = np.zeros((3, 48, width), np.float32)
    out[:, :, :new_w] = (bgr - 0.5) / 0.5
    return out


def text_lines(
    count: int, *, seed: int, evaluation: bool, max_chars: int = 16
) -> tuple[list[str], list[np.ndarray]]:
    """``count`` (text, rendered RGB line) pairs; calibration and evaluation draw different words."""
    rng = np.random.default_rng(seed)
    words = _WORDS_EVAL if evaluation else _WORDS_CAL
    texts = [_line_text(rng, words, max_chars) for _ in range(count)]
    return texts, [_render_line(rng, t) for t in texts]


def _page_background(
    rng: np.random.Generator, photos: Sequence[np.ndarray], size: int
) -> np.ndarray:
    from PIL import Image

    kind = rng.random()
    if kind < 0.35 and photos:
        photo = photos[int(rng.integers(len(photos)))]
        h, w = photo.shape[:2]
        side = int(min(h, w) * rng.uniform(0.5, 1.0))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = np.ascontiguousarray(photo[top : top + side, left : left + side])
        return np.asarray(
            Image.fromarray(crop).resize((size, size), Image.Resampling.BILINEAR)
        ).astype(np.float32)
    base = rng.integers(150, 256, 3).astype(np.float32)
    if kind < 0.7:  # paper with a gradient
        ramp = np.linspace(0, rng.uniform(-60, 60), size, dtype=np.float32)
        grad = ramp[:, None, None] if rng.random() < 0.5 else ramp[None, :, None]
        return np.broadcast_to(base + grad, (size, size, 3)).copy()
    return np.broadcast_to(base, (size, size, 3)).copy()


def document_pages(count: int, *, seed: int, evaluation: bool, size: int = 640) -> list[np.ndarray]:
    """``count`` RGB pages with 3-12 text lines each on paper, gradients or photos."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    cal_photos, eval_photos = photo_split(distinct_photos())
    photos = [p.pixels for p in (eval_photos if evaluation else cal_photos)]
    words = _WORDS_EVAL if evaluation else _WORDS_CAL
    pages = []
    for _ in range(count):
        bg = _page_background(rng, photos, size)
        bg += rng.normal(0, rng.uniform(0, 6), bg.shape)
        img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _line in range(int(rng.integers(3, 13))):
            text = _line_text(rng, words, 28)
            font = _font(FONTS[int(rng.integers(len(FONTS)))], int(rng.integers(14, 48)))
            left, top, right, bottom = font.getbbox(text)
            w, h = right - left, bottom - top
            if w >= size - 8:
                continue
            x = int(rng.integers(4, size - w - 4))
            y = int(rng.integers(4, size - h - 4))
            local = np.asarray(img)[y : y + h, x : x + w].mean()
            if rng.random() < 0.3:  # a label box behind the text
                box = tuple(int(c) for c in rng.integers(200, 256, 3))
                draw.rectangle((x - 4, y - 3, x + w + 4, y + h + 3), fill=box)
                local = float(np.mean(box))
            ink = rng.integers(0, 60, 3) if local > 110 else rng.integers(200, 256, 3)
            draw.text((x - left, y - top), text, font=font, fill=tuple(int(c) for c in ink))
        pages.append(np.asarray(img))
    return pages


def normalize_pages(pages: Sequence[np.ndarray]) -> np.ndarray:
    """RapidOCR's detector preprocessing: BGR, (x/255-0.5)/0.5, NCHW float32."""
    arr = np.stack(pages)[:, :, :, ::-1].astype(np.float32) / 255.0
    return np.ascontiguousarray(((arr - 0.5) / 0.5).transpose(0, 3, 1, 2))
