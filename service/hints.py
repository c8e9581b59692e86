"""Hints in the words of the REST API: the errors raised below the service (engines,
calibrators) name the command line's options, which a REST caller never typed.

:func:`rest_hint` rewrites an error's hint as the API answers it (``service/api/errors.py``) and
as a worker records a failed build (``service/worker/pipeline.py``): each option becomes the JSON
field (or form field) that sets the same thing. Options with no REST counterpart (``--threads``,
``--cuda-graph``) are left as they are. Light: ``re`` only.
"""

from __future__ import annotations

import re

__all__ = ["REST_WORDS", "rest_hint"]

REST_WORDS: tuple[tuple[str, str], ...] = (
    # the longest option first: ``--keep`` must not eat ``--keep-fp16``
    (r"--preprocess SPEC\.json", 'the "preprocess" form field of POST /v1/datasets'),
    (r"--preprocess\b", 'the "preprocess" form field of POST /v1/datasets'),
    (r"--keep-fp16 NODE\b", "spec.keep.fp16 [NODE]"),
    (r"--keep-fp16\b", "spec.keep.fp16"),
    (r"--keep NODE\b", "spec.keep.int8 [NODE]"),
    (r"--keep\b", "spec.keep.int8"),
    (r"--gate none\b", 'spec.gate "none"'),
    (r"--gate\b", "spec.gate"),
    (r"--method (\w+)", r'spec.calibration.method "\1"'),
    (r"--method\b", "spec.calibration.method"),
    (r"--accuracy-budget\b", "accuracy_budget"),
    (r"--eval-fraction (\d[\d.]*)", r"accuracy.eval_fraction \1"),
    (r"--eval-fraction\b", "accuracy.eval_fraction"),
    (r"--eval-data\b", "eval_dataset_id"),
    (r"--labels\b", "labels"),
    (r"--shapes NAME:MIN/OPT/MAX", 'spec.profiles {"NAME": {"min": ..., "opt": ..., "max": ...}}'),
    (r"--shapes\b", "spec.profiles"),
    (r"--backend (\w+)", r'spec.backend "\1"'),
    (r"--backend\b", "spec.backend"),
    (r"--mode (\w+)", r'spec.mode "\1"'),
    (r"--precision (\w[\w-]*)", r'spec.precision "\1"'),
    (r"--variants ([\w,:.-]+)", r"variants [\1]"),
    (r"--data DATASET\b", "dataset_id"),
    (r"--data\b", "dataset_id"),
    (r"--table\b", "table_id"),
    (r"--batch-size (\d+)", r"benchmark.batch_size \1"),
    (r"--batch-size\b", "benchmark.batch_size"),
    (r"--duration-s\b", "benchmark.duration_s"),
    (r"--duration\b", "benchmark.duration_s"),
    (r" \(or calibrate first with trtforge calibrate\)", ""),
)
"""(pattern, replacement) in order: a command-line option and the REST field that sets it."""

_COMPILED = tuple((re.compile(pattern), words) for pattern, words in REST_WORDS)


def rest_hint(hint: str) -> str:
    """``hint`` with the command line's options replaced by the REST fields that set them."""
    if "--" not in hint:
        return hint
    for pattern, words in _COMPILED:
        hint = pattern.sub(words, hint)
    return hint
