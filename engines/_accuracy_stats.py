"""Sufficient statistics of one output compared batch by batch (the arithmetic behind
:func:`engines.accuracy.compare`; definitions in :mod:`engines.accuracy`).

Everything is accumulated in float64 sums, maxima and counts, so the results do not depend on the
batch size; per sample only two floats are kept (reference energy and cosine), for the minimum
cosine over the samples that are not negligible, which is only known at the end.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from engines.errors import RunError, SpecError

__all__ = ["OutputStats", "auto_class_axis"]

_REL_FLOOR = 1e-12
NEGLIGIBLE_SAMPLE_DB = 60.0
"""A sample whose reference energy is this far below the mean sample's has no direction worth
a cosine (:mod:`engines.accuracy`)."""


def auto_class_axis(shape: tuple[int, ...], dtype: np.dtype[Any]) -> int | None:
    """The axis holding class scores of a batched output of ``shape``, or None.

    Float outputs only, and the axis must have at least two entries. ``[N, C]`` and
    ``[N, T, C]`` (sequences: CTC, token classification): the last axis. Rank 4 and more: the
    last axis when it is smaller than every other non-batch axis (channels-last maps such as
    ``[N, H, W, C]``); ``[N, C, H, W]`` maps need an explicit ``class_axis``.
    """
    if dtype.kind != "f" or len(shape) < 2 or shape[-1] < 2:
        return None
    if len(shape) <= 3 or all(shape[-1] < d for d in shape[1:-1]):
        return len(shape) - 1
    return None


def _checked_axis(name: str, axis: int, shape: tuple[int, ...], dtype: np.dtype[Any]) -> int:
    """``axis`` normalized, for an output whose class axis was asked for explicitly."""
    rank = len(shape)
    found = axis + rank if axis < 0 else axis
    if not 1 <= found < rank or dtype.kind != "f" or shape[found] < 2:
        raise SpecError(
            f"Output {name!r} ({dtype} {list(shape)}) has no class axis {axis}.",
            hint="Give the axis of the class scores, counted with the batch axis as 0 "
            "(e.g. 1 for [N, C, H, W]); it must have at least two classes.",
            field="class_axis",
        )
    return found


class OutputStats:
    """Sufficient statistics of one output, updated batch by batch.

    ``class_axis``: ``None`` to detect class scores (:func:`auto_class_axis`); an int asks for
    that axis (:class:`SpecError` when the output has no such axis).
    """

    def __init__(
        self, name: str, tolerance: tuple[float, float] | None, class_axis: int | None
    ) -> None:
        self.name = name
        self.tolerance = tolerance
        self.requested_axis = class_axis
        self.sample_shape: tuple[int, ...] | None = None
        self.dtype = ""
        self.class_axis: int | None = None
        self.samples = self.elements = self.nonfinite = self.violations = 0
        self.max_abs = self.sum_abs = self.max_rel = self.sum_rel = 0.0
        self.sum_sq_err = self.sum_sq_ref = self.sum_sq_cand = self.sum_dot = 0.0
        self.sample_energy: list[np.ndarray] = []
        self.sample_cos: list[np.ndarray] = []
        self.positions = self.top1 = self.top5 = 0
        self.top5_possible = True
        self.labelled = self.ref_correct = self.cand_correct = 0

    @property
    def classifier(self) -> bool:
        return self.class_axis is not None

    def label_shape(self) -> tuple[int, ...] | None:
        """Per-sample shape labels of this output have (``()``: one class per sample)."""
        if self.class_axis is None or self.sample_shape is None:
            return None
        dims = list(self.sample_shape)
        del dims[self.class_axis - 1]
        return tuple(dims)

    def update(self, ref: np.ndarray, cand: np.ndarray, labels: np.ndarray | None) -> None:
        if ref.shape != cand.shape:
            raise RunError(
                f"Output {self.name!r} has shape {list(cand.shape)} from the candidate but "
                f"{list(ref.shape)} from the reference.",
                hint="Compare artifacts built from the same model.",
                field="outputs",
            )
        if self.sample_shape is None:
            self._first_batch(ref)
        r = ref.astype(np.float64, copy=False)
        c = cand.astype(np.float64, copy=False)
        rows = r.reshape(r.shape[0], -1) if r.ndim else r.reshape(1, 1)
        self._errors(r, c)
        self._cosines(rows, c.reshape(rows.shape))
        if self.class_axis is not None:
            self._classes(self.class_axis, r, c, labels)
        self.samples += rows.shape[0]

    def _first_batch(self, ref: np.ndarray) -> None:
        self.sample_shape = tuple(ref.shape[1:])
        self.dtype = str(ref.dtype)
        shape = tuple(int(d) for d in ref.shape)
        if self.requested_axis is None:
            self.class_axis = auto_class_axis(shape, ref.dtype)
        else:
            self.class_axis = _checked_axis(self.name, self.requested_axis, shape, ref.dtype)

    def _errors(self, r: np.ndarray, c: np.ndarray) -> None:
        err = np.abs(c - r)
        rel = err / np.maximum(np.abs(r), _REL_FLOOR)
        self.elements += err.size
        self.nonfinite += int(np.count_nonzero(~np.isfinite(c)))
        if err.size:
            self.max_abs = _nanmax(self.max_abs, float(err.max()))
            self.max_rel = _nanmax(self.max_rel, float(rel.max()))
        self.sum_abs += float(err.sum())
        self.sum_rel += float(rel.sum())
        self.sum_sq_err += float(np.square(err).sum())
        if self.tolerance is not None:
            atol, rtol = self.tolerance
            bound = atol + rtol * np.abs(r)
            self.violations += int(np.count_nonzero(~(err <= bound)))  # NaN counts as a violation

    def _cosines(self, r: np.ndarray, c: np.ndarray) -> None:
        dot = np.einsum("ij,ij->i", r, c)
        ref_sq = np.einsum("ij,ij->i", r, r)
        cand_sq = np.einsum("ij,ij->i", c, c)
        self.sum_dot += float(dot.sum())
        self.sum_sq_ref += float(ref_sq.sum())
        self.sum_sq_cand += float(cand_sq.sum())
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = dot / np.sqrt(ref_sq * cand_sq)
        # Undefined where a side is all zeros: 1 when both are, 0 when one is (NaN stays NaN).
        cos = np.where((ref_sq == 0) & (cand_sq == 0), 1.0, cos)
        cos = np.where((ref_sq == 0) ^ (cand_sq == 0), 0.0, cos)
        self.sample_energy.append(ref_sq)
        self.sample_cos.append(cos)

    def _min_cosine(self, whole: float) -> tuple[float, int]:
        """(smallest per-sample cosine over the samples that are not negligible, how many are).

        A sample is negligible when its reference is all zeros or its energy is more than
        ``NEGLIGIBLE_SAMPLE_DB`` below the mean sample's (a detector's empty image, whose
        sigmoid outputs sit at 1e-8: any rounding turns its direction around). Their error
        still counts in the whole-output cosine, the SQNR and the absolute errors. When every
        sample is negligible, the whole-output cosine.
        """
        if not self.sample_energy:
            return whole, 0
        energy = np.concatenate(self.sample_energy)
        cos = np.concatenate(self.sample_cos)
        floor = float(energy.mean()) * 10 ** (-NEGLIGIBLE_SAMPLE_DB / 10)
        live = (energy > 0) & (energy >= floor)
        skipped = int(np.count_nonzero(~live))
        if not np.any(live):
            return whole, skipped
        if np.any(np.isnan(cos[live])):
            return math.nan, skipped
        return float(cos[live].min()), skipped

    def _classes(
        self, axis: int, r: np.ndarray, c: np.ndarray, labels: np.ndarray | None
    ) -> None:
        classes = r.shape[axis]
        r2 = np.moveaxis(r, axis, -1).reshape(-1, classes)
        c2 = np.moveaxis(c, axis, -1).reshape(-1, classes)
        ref_top = r2.argmax(axis=1)
        cand_top = c2.argmax(axis=1)
        self.positions += len(ref_top)
        self.top1 += int(np.count_nonzero(ref_top == cand_top))
        if classes > 5:
            top5 = np.argpartition(-c2, 4, axis=1)[:, :5]
            self.top5 += int(np.count_nonzero((top5 == ref_top[:, None]).any(axis=1)))
        else:
            self.top5_possible = False
        if labels is not None and labels.shape[1:] == self.label_shape():
            flat = labels.reshape(-1)
            valid = flat >= 0  # negative labels (padding, e.g. -100) are not scored
            self.labelled += int(np.count_nonzero(valid))
            self.ref_correct += int(np.count_nonzero((ref_top == flat) & valid))
            self.cand_correct += int(np.count_nonzero((cand_top == flat) & valid))

    def _cosine(self) -> float:
        if math.isnan(self.sum_dot):
            return math.nan
        if self.sum_sq_ref == 0 or self.sum_sq_cand == 0:
            return 1.0 if self.sum_sq_ref == self.sum_sq_cand else 0.0
        return self.sum_dot / math.sqrt(self.sum_sq_ref * self.sum_sq_cand)

    def _sqnr(self) -> float:
        if math.isnan(self.sum_sq_err):
            return math.nan
        if self.sum_sq_err == 0:
            return math.inf
        if self.sum_sq_ref == 0:
            return -math.inf
        return 10.0 * math.log10(self.sum_sq_ref / self.sum_sq_err)

    def _class_fields(self, with_labels: bool) -> dict[str, Any]:
        if self.class_axis is None:
            return {}
        positions = max(self.positions, 1)
        found: dict[str, Any] = {
            "class_axis": self.class_axis,
            "class_positions": self.positions,
            "top1_agreement": self.top1 / positions,
            "top5_agreement": self.top5 / positions if self.top5_possible else None,
        }
        if with_labels and self.labelled:
            ref_acc, cand_acc = self.ref_correct / self.labelled, self.cand_correct / self.labelled
            found |= {
                "labelled_positions": self.labelled,
                "reference_accuracy": ref_acc,
                "candidate_accuracy": cand_acc,
                "accuracy_drop": ref_acc - cand_acc,
            }
        return found

    def fields(self, with_labels: bool) -> dict[str, Any]:
        """The :class:`engines.accuracy.OutputAccuracy` fields (tolerance excepted)."""
        if self.sum_sq_ref > 0:
            rel_l2 = math.sqrt(self.sum_sq_err / self.sum_sq_ref)
        else:
            rel_l2 = 0.0 if self.sum_sq_err == 0 else math.inf
        cosine = self._cosine()
        min_cosine, negligible = self._min_cosine(cosine)
        return {
            "name": self.name,
            "dtype": self.dtype,
            "sample_shape": list(self.sample_shape or ()),
            "samples": self.samples,
            "elements": self.elements,
            "max_abs_error": self.max_abs,
            "mean_abs_error": self.sum_abs / max(self.elements, 1),
            "max_rel_error": self.max_rel,
            "mean_rel_error": self.sum_rel / max(self.elements, 1),
            "rel_l2_error": rel_l2,
            "cosine_similarity": cosine,
            "min_cosine_similarity": min_cosine,
            "negligible_reference_samples": negligible,
            "sqnr_db": self._sqnr(),
            "nonfinite_values": self.nonfinite,
            "classifier": self.classifier,
            "tolerance_violations": self.violations,
            **self._class_fields(with_labels),
        }


def _nanmax(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


