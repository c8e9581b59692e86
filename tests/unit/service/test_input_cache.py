"""A remote worker's input cache: bounded, least recently used first, never what a live build
pins; what killed builds left behind goes. Real folders, real processes for the pins."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.store.storage import Storage
from service.worker.input_cache import InputCache
from service.worker.processes import process_tag

_KiB = 1024


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    store = Storage(tmp_path / "worker")
    store.prepare()
    return store


@pytest.fixture
def other_process() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that is not this one (another build of the same worker)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _entry(folder: Path, kib: int, age_s: float) -> Path:
    folder.mkdir(parents=True)
    (folder / "data.bin").write_bytes(b"x" * (kib * _KiB))
    then = time.time() - age_s
    os.utime(folder, (then, then))
    return folder


def _pin_for(storage: Storage, tag: str, *names: str) -> None:
    holder = storage.root / "pins" / tag
    holder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (holder / name).touch()


def test_trim_removes_least_recently_used_inputs_until_the_cache_fits(storage: Storage) -> None:
    old = _entry(storage.model_dir("a" * 64), 40, age_s=300)
    middle = _entry(storage.dataset_dir("b" * 64), 40, age_s=200)
    recent = _entry(storage.model_dir("c" * 64), 40, age_s=100)
    trimmed = InputCache(storage, max_bytes=90 * _KiB).trim()
    assert trimmed.removed == [old]
    assert (trimmed.freed_bytes, trimmed.cached_bytes, trimmed.over_by_pinned) == (
        40 * _KiB,
        80 * _KiB,
        0,
    )
    assert not old.exists() and middle.is_dir() and recent.is_dir()


def test_using_an_entry_makes_it_the_most_recent(storage: Storage) -> None:
    old = _entry(storage.model_dir("a" * 64), 40, age_s=300)
    newer = _entry(storage.model_dir("b" * 64), 40, age_s=100)
    cache = InputCache(storage, max_bytes=50 * _KiB)
    cache.pin(old)
    cache.release()  # the build that used it ended: unpinned, but recently used
    assert cache.trim().removed == [newer]
    assert old.is_dir()


def test_what_a_live_build_pins_stays_even_over_the_bound(
    storage: Storage, other_process: subprocess.Popen[bytes]
) -> None:
    pinned = _entry(storage.model_dir("a" * 64), 40, age_s=300)
    loose = _entry(storage.dataset_dir("b" * 64), 40, age_s=200)
    _pin_for(storage, process_tag(other_process.pid), f"models-{pinned.name}")
    trimmed = InputCache(storage, max_bytes=10 * _KiB).trim()
    assert trimmed.removed == [loose]
    assert pinned.is_dir()
    assert trimmed.over_by_pinned == 30 * _KiB


def test_pins_of_a_process_that_is_gone_count_for_nothing(storage: Storage) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = process_tag(dead.pid)
    entry = _entry(storage.model_dir("a" * 64), 40, age_s=300)
    _pin_for(storage, tag, f"models-{entry.name}", "work-build1")
    work = storage.work_dir("build1")
    work.mkdir()
    trimmed = InputCache(storage, max_bytes=10 * _KiB).trim()
    assert set(trimmed.removed) == {work, entry}
    assert not (storage.root / "pins" / tag).exists()


def test_left_over_work_folders_go_and_a_running_builds_stays(
    storage: Storage, other_process: subprocess.Popen[bytes]
) -> None:
    running, killed = storage.work_dir("running"), storage.work_dir("killed")
    for work in (running, killed):
        (work / "scratch").mkdir(parents=True)
    _pin_for(storage, process_tag(other_process.pid), "work-running")
    cache = InputCache(storage, max_bytes=None)  # no bound: only the work folders are judged
    kept = _entry(storage.model_dir("a" * 64), 40, age_s=300)
    assert cache.trim().removed == [killed]
    assert running.is_dir() and kept.is_dir()


def test_holding_pins_the_work_folder_and_releases_every_pin(storage: Storage) -> None:
    cache = InputCache(storage, max_bytes=0)
    work = storage.work_dir("b1")
    model = storage.model_dir("a" * 64)
    with cache.holding(work):
        work.mkdir()
        _entry(model, 4, age_s=10)
        cache.pin(model)
        assert cache.trim().removed == []  # both in use
    assert not (storage.root / "pins" / process_tag()).exists()
    assert set(cache.trim().removed) == {work, model}


def test_only_cache_entries_and_work_folders_can_be_pinned(storage: Storage) -> None:
    with pytest.raises(ValueError, match="not a cache entry"):
        InputCache(storage, None).pin(storage.blobs_dir / "ab")
