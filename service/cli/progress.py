"""Progress bars for the CLI: shown on a TTY, silent otherwise (and always under --json)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engines.stages import Stage

__all__ = ["CliRecorder", "sample_progress", "stage_progress"]


@contextmanager
def sample_progress(
    description: str, *, enabled: bool = True, unit: str = "sample"
) -> Iterator[Callable[[int, int], None]]:
    """Yield a ``progress(done, total)`` callback drawing a bar with rate and ETA on stderr."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda done, total: None
        return
    from tqdm import tqdm

    bar = tqdm(desc=description, unit=unit, file=sys.stderr, dynamic_ncols=True)
    try:

        def update(done: int, total: int) -> None:
            if bar.total != total:
                bar.total = total
            bar.update(done - bar.n)

        yield update
    finally:
        bar.close()


@contextmanager
def stage_progress(
    description: str, *, enabled: bool = True
) -> Iterator[Callable[[str, float], None]]:
    """Yield a ``progress(stage, fraction)`` callback drawing a percentage bar on stderr."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda stage, fraction: None
        return
    from tqdm import tqdm

    bar = tqdm(
        desc=description,
        total=100,
        unit="%",
        file=sys.stderr,
        dynamic_ncols=True,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}",
    )
    try:

        def update(stage: str, fraction: float) -> None:
            bar.set_postfix_str(stage, refresh=False)
            bar.update(max(0, round(fraction * 100) - bar.n))

        yield update
    finally:
        bar.close()


class _BarProgress:
    """One stage's progress callbacks drawn as a percentage bar."""

    def __init__(self, update: Callable[[str, float], None], stage: str) -> None:
        self._update, self._stage = update, stage

    def samples(self, done: int, total: int) -> None:
        self._update(f"{done}/{total} samples", done / total if total else 0.0)

    def message(self, message: str, done: float) -> None:
        self._update(message, done)


class CliRecorder:
    """The workflow's recorder on a terminal: one progress bar per stage on stderr (TTY only),
    warnings printed, nothing under ``--json``."""

    def __init__(self, *, enabled: bool = True) -> None:
        self._enabled = enabled

    @contextmanager
    def stage(self, stage: Stage) -> Iterator[_BarProgress]:
        with stage_progress(_STAGE_WORDS.get(stage.value, stage.value), enabled=self._enabled) as bar:
            yield _BarProgress(bar, stage.value)

    def skip(self, stage: Stage, reason: str) -> None:
        return None

    def log(self, message: str, *, level: str = "info", stage: Stage | None = None) -> None:
        if self._enabled and level in ("warning", "error"):
            print(f"{level}: {message}", file=sys.stderr)


_STAGE_WORDS = {
    "calibrate": "calibrating",
    "build": "building",
    "benchmark": "benchmarking",
    "evaluate": "evaluating",
}
