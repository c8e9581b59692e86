"""Progress bars for the CLI: shown on a TTY, silent otherwise (and always under --json)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["sample_progress", "stage_progress"]


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
