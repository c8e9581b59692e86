"""A remote worker's cache of downloaded inputs, bounded in size.

A worker on another machine keeps the models and datasets it downloads (``models/<id>``,
``datasets/<id>`` of its own data directory) so that later builds of the same inputs skip the
download. Without a bound the disk of a long-lived GPU worker fills up; so:

- **Pins.** Every build process pins what it uses, in ``pins/<process tag>/``: its work folder
  and the entries it reads. A pin lives as long as its process: pins of processes that are gone
  (a build killed by ``kill -9``, a worker that crashed) count for nothing and are removed.
- **Trim.** After a build has its inputs, and when a worker starts, the cache is trimmed: work
  folders no live process pins are removed (what killed builds left behind), then entries no
  live process pins are removed least recently used first until the cache fits
  ``TRTFORGE_WORKER_CACHE_BYTES``. Entries in use are never removed, so a single build whose
  inputs exceed the bound still runs (and says so in its log).

Pinning and trimming take one file lock (``cache.lock``), so a build that pins an entry either
sees it removed before (and downloads it again) or keeps it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from service.store.storage import Storage
from service.worker.processes import process_alive, process_tag

__all__ = ["InputCache", "Trimmed"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trimmed:
    """What one trim removed, and what the cache holds after it."""

    removed: list[Path]
    freed_bytes: int
    cached_bytes: int
    over_by_pinned: int
    """Bytes over the bound that only pinned entries hold (0 when the cache fits)."""


class InputCache:
    """The cache of ``storage``'s models and datasets, bounded to ``max_bytes`` (None: no bound)."""

    def __init__(self, storage: Storage, max_bytes: int | None) -> None:
        self.storage = storage
        self.max_bytes = max_bytes
        self.pins_root = storage.root / "pins"
        self._lock_path = storage.root / "cache.lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.pins_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._lock_path.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _own_pins(self) -> Path:
        return self.pins_root / process_tag()

    def pin(self, folder: Path) -> None:
        """Keep ``folder`` (a model, dataset or work folder of this storage; it may not exist
        yet) while this process lives, and mark it used now."""
        name = _pin_name(self.storage, folder)
        with self._locked():
            own = self._own_pins()
            own.mkdir(mode=0o700, exist_ok=True)
            (own / name).touch()
            if folder.is_dir():
                os.utime(folder)  # least recently used goes first

    def release(self) -> None:
        """Drop this process's pins (its build ended)."""
        with self._locked():
            shutil.rmtree(self._own_pins(), ignore_errors=True)

    @contextlib.contextmanager
    def holding(self, work: Path) -> Iterator[None]:
        """Pin the build's work folder ``work`` for the block; release every pin after it."""
        self.pin(work)
        try:
            yield
        finally:
            self.release()

    def trim(self) -> Trimmed:
        """Remove unpinned work folders, then unpinned entries least recently used first until
        the cache fits its bound (module docstring)."""
        removed: list[Path] = []
        freed = 0
        with self._locked():
            pinned = self._live_pins()
            root = self.storage.work_root
            for work in sorted(root.iterdir()) if root.is_dir() else []:
                if _pin_name(self.storage, work) not in pinned:
                    self.storage.remove_entry(work)
                    removed.append(work)
            entries = [
                (entry.stat().st_mtime, entry, _size(entry))
                for folder in (self.storage.models_dir, self.storage.datasets_dir)
                if folder.is_dir()
                for entry in folder.iterdir()
                if entry.is_dir()
            ]
            total = sum(size for _, _, size in entries)
            if self.max_bytes is not None:
                for _, entry, size in sorted(entries, key=lambda e: e[0]):
                    if total <= self.max_bytes:
                        break
                    if _pin_name(self.storage, entry) in pinned:
                        continue
                    self.storage.remove_entry(entry)
                    removed.append(entry)
                    total -= size
                    freed += size
        over = 0 if self.max_bytes is None else max(0, total - self.max_bytes)
        return Trimmed(removed, freed, total, over)

    def _live_pins(self) -> set[str]:
        """Pin names held by live processes; the pin folders of dead ones are removed."""
        names: set[str] = set()
        for holder in self.pins_root.iterdir():
            if holder.is_dir() and process_alive(holder.name):
                names.update(p.name for p in holder.iterdir())
            else:
                shutil.rmtree(holder, ignore_errors=True)
        return names


def _pin_name(storage: Storage, folder: Path) -> str:
    """``models-<id>``, ``datasets-<id>`` or ``work-<id>``: what a pin file is called."""
    kinds = {storage.models_dir: "models", storage.datasets_dir: "datasets", storage.work_root: "work"}
    kind = kinds.get(folder.parent)
    if kind is None:
        raise ValueError(f"{folder} is not a cache entry or work folder of {storage.root}")
    return f"{kind}-{folder.name}"


def _size(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):  # an incomplete copy being replaced right now
                total += (Path(dirpath) / name).stat().st_size
    return total
