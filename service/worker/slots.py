"""Workers: claim queued builds and run each in its own child process.

One slot per GPU (each child sees only its GPU), or ``cpu_concurrency`` slots without one. A
slot watches its child: a cancel request gives it ``cancel_grace_s`` to stop at the next stage
boundary, then its process group is killed; a build past ``build_timeout_s`` is killed and failed;
a child that dies without recording an outcome fails its build with the exit status. On shutdown
the running builds are killed and put back in the queue without using up an attempt.

The same class runs inside ``trtforge serve`` and as ``trtforge worker`` processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from engines.backends.base import BuildTarget
from engines.backends.registry import local_targets
from service.db import Database
from service.db.models import BuildRow, utcnow
from service.errors import SettingsError
from service.queue.base import Job, JobQueue
from service.schemas import BuildStatus
from service.settings import Settings, hostname
from service.store.storage import Storage
from service.worker.processes import process_tag
from service.worker.recorder import add_log
from service.worker.runner import RunnerInput

__all__ = ["SlotHealth", "Worker", "default_slots", "worker_targets"]

log = logging.getLogger(__name__)


def default_slots(settings: Settings) -> list[int | None]:
    """GPU index per slot (None = CPU slot): one per GPU, else ``cpu_concurrency`` CPU slots."""
    from engines.gpu import discover_gpus

    gpus = discover_gpus()
    count = settings.workers
    if gpus:
        indices: list[int | None] = [g.index for g in gpus]
        return indices if count is None else indices[:count] + [None] * (count - len(indices))
    return [None] * (settings.cpu_concurrency if count is None else count)


def worker_targets(settings: Settings) -> list[BuildTarget]:
    """The targets a worker serves: ``settings.worker_targets`` when configured (a deployment
    that declares them), else what this machine can build for. :class:`SettingsError` when
    that is nothing."""
    targets = (
        list(settings.worker_targets) if settings.worker_targets is not None else local_targets()
    )
    if not targets:
        raise SettingsError(
            "This worker can build for nothing: no backend can run on this machine.",
            hint="Install onnxruntime (or TensorRT with a GPU), or set TRTFORGE_WORKER_TARGETS.",
            field="worker_targets",
        )
    return targets


_MAX_BACKOFF_S = 30.0
_UNHEALTHY_AFTER = 3
"""Consecutive failed rounds after which a slot counts as unhealthy (``/readyz`` says so)."""


@dataclass
class SlotHealth:
    """How one slot is doing: it survives every exception, and says when it keeps failing."""

    failures: int = 0
    """Consecutive rounds that raised (0 after a good round)."""
    last_error: str = ""

    @property
    def healthy(self) -> bool:
        return self.failures < _UNHEALTHY_AFTER


class _Stop(StrEnum):
    CANCEL = "cancel"
    TIMEOUT = "timeout"
    SHUTDOWN = "shutdown"
    DISOWNED = "disowned"
    """The worker was declared dead; recovery owns the build now."""


@dataclass
class _Running:
    job: Job
    process: subprocess.Popen[bytes]
    started: float
    cancel_seen: float | None = None
    stopped_for: _Stop | None = None


class Worker:
    """Runs builds from ``queue``; :meth:`start` / :meth:`stop`, or :meth:`run_forever`."""

    def __init__(
        self,
        settings: Settings,
        db: Database | None,
        storage: Storage,
        queue: JobQueue,
        *,
        slots: list[int | None] | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        """None for a worker on another machine (:class:`service.worker.remote.RemoteWorker`),
        which overrides the methods that read or write builds."""
        self.storage = storage
        self.queue = queue
        self.slots = slots if slots is not None else default_slots(settings)
        self.targets = worker_targets(settings)
        """What this worker builds for: its configuration's ``worker_targets``, else discovered."""
        self.id = f"{hostname()}:{process_tag()}:{uuid.uuid4().hex[:6]}"
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._running: dict[int, _Running] = {}
        self._lock = threading.Lock()
        self.slot_health = [SlotHealth() for _ in self.slots]
        self._slot_threads: dict[int, threading.Thread] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Register, recover the builds of dead workers, and start the slots."""
        self.queue.register_worker(
            self.id, len(self.slots), self.targets, self.settings.worker_labels
        )
        self.recover()
        self._spawn(self._heartbeat_loop, "heartbeat")
        for index in range(len(self.slots)):
            self._start_slot(index)
        log.info(
            "worker %s started with %d slot(s), building for %s%s",
            self.id,
            len(self.slots),
            "; ".join(map(str, self.targets)),
            f" (labels: {', '.join(self.settings.worker_labels)})"
            if self.settings.worker_labels
            else "",
        )

    def _spawn(self, target: object, name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=f"trtforge-{name}", daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)
        return thread

    def _start_slot(self, index: int) -> None:
        gpu = self.slots[index]
        self._slot_threads[index] = self._spawn(
            lambda: self._slot_loop(index, gpu), f"slot-{index}"
        )

    @property
    def healthy(self) -> bool:
        """Every slot thread runs and none keeps failing (``/readyz``)."""
        alive = all(thread.is_alive() for thread in self._slot_threads.values())
        return alive and all(health.healthy for health in self.slot_health)

    def health_detail(self) -> str:
        """One line for ``/readyz``: slots healthy, or which fail and why."""
        bad = [
            f"slot {i}: {h.failures} failed rounds ({h.last_error})"
            for i, h in enumerate(self.slot_health)
            if not h.healthy
        ]
        dead = [
            f"slot {i}: thread dead" for i, th in self._slot_threads.items() if not th.is_alive()
        ]
        problems = dead + bad
        return "; ".join(problems) if problems else f"{len(self.slots)} slot(s) healthy"

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop claiming, kill running builds (they go back to the queue), unregister."""
        self._stopping.set()
        with self._lock:
            running = list(self._running.values())
        for item in running:
            item.stopped_for = _Stop.SHUTDOWN
            _kill_group(item.process)
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()
        self.queue.unregister_worker(self.id)
        log.info("worker %s stopped", self.id)

    def run_forever(self) -> None:
        """Run until SIGINT or SIGTERM (``trtforge worker``)."""
        done = threading.Event()

        def on_signal(signum: int, _frame: object) -> None:
            done.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            done.wait()
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @property
    def running_builds(self) -> list[str]:
        with self._lock:
            return [r.job.build_id for r in self._running.values()]

    # -- loops -------------------------------------------------------------------------------

    def recover(self) -> None:
        """Recover dead workers' builds and remove their scratch files."""
        recovered = self.queue.recover()
        for build_id in recovered.requeued:
            # its next attempt clears the folder when it starts; it may have started already
            log.warning("re-queued build %s of a dead worker", build_id)
        for build_id in recovered.failed:
            self.storage.remove_entry(self.storage.work_dir(build_id))
            log.warning("failed build %s of a dead worker (no attempts left)", build_id)

    def _heartbeat_loop(self) -> None:
        beats = 0
        while not self._stopping.wait(self.settings.heartbeat_s):
            try:
                for index, thread in list(self._slot_threads.items()):
                    if not thread.is_alive() and not self._stopping.is_set():
                        log.error("slot %d of worker %s died: restarting it", index, self.id)
                        self._start_slot(index)
                if not self.queue.heartbeat(self.id):
                    self._rejoin()
                beats += 1
                if beats % 5 == 0:
                    self.recover()
            except Exception:  # a database hiccup must not kill the heartbeat
                log.exception("worker heartbeat failed")

    def _rejoin(self) -> None:
        """This worker was declared dead (its heartbeat went stale, e.g. the database was out of
        reach): recovery has taken its builds. Kill what it still runs without touching those
        builds, and register again under a new id."""
        with self._lock:
            running = list(self._running.values())
        for item in running:
            item.stopped_for = _Stop.DISOWNED
            _kill_group(item.process)
        old, self.id = self.id, f"{hostname()}:{process_tag()}:{uuid.uuid4().hex[:6]}"
        self.queue.register_worker(
            self.id, len(self.slots), self.targets, self.settings.worker_labels
        )
        log.warning(
            "worker %s had been declared dead; its %d running build(s) were left to recovery; "
            "registered again as %s",
            old,
            len(running),
            self.id,
        )

    def _slot_loop(self, index: int, gpu: int | None) -> None:
        """Claim and run builds until the worker stops; survive every exception (log, back off,
        retry), so a database or disk error never leaves the slot dead or a child unwatched."""
        health = self.slot_health[index]
        while not self._stopping.is_set():
            try:
                job = self.queue.claim(self.id, self.targets)
                if job is not None:
                    self._run(job, gpu)
                health.failures, health.last_error = 0, ""
                if job is None:
                    self._stopping.wait(self.settings.poll_interval_s)
            except Exception as exc:
                health.failures += 1
                health.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.exception(
                    "slot %d of worker %s failed (round %d)", index, self.id, health.failures
                )
                backoff = self.settings.poll_interval_s * 2 ** min(health.failures, 8)
                self._stopping.wait(min(_MAX_BACKOFF_S, backoff))

    # -- one job -----------------------------------------------------------------------------

    def _database(self) -> Database:
        if self.db is None:
            raise RuntimeError("this worker has no database: its subclass reads builds")
        return self.db

    def _build_status(self, build_id: str) -> BuildStatus | None:
        """The build's status; None when it is gone."""
        with self._database().session() as session:
            build = session.get(BuildRow, build_id)
            return None if build is None else BuildStatus(build.status)

    def _runner_input(self, job: Job, gpu: int | None) -> RunnerInput:
        """What the build's child process reads on its stdin."""
        return RunnerInput(
            build_id=job.build_id,
            attempt=job.attempt,
            settings=self.settings.model_dump(mode="json"),
            parent_pid=os.getpid(),
            gpu_index=gpu,
        )

    def _run(self, job: Job, gpu: int | None) -> None:
        try:
            status = self._build_status(job.build_id)
            if status is None or status.terminal:
                self._retry(lambda: self.queue.finish(job), "finishing an ended job")
                return
            payload = self._runner_input(job, gpu)
            process = subprocess.Popen(
                [sys.executable, "-m", "service.worker.runner"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
        except Exception:
            # nothing runs for this job: put it back (counted as an attempt) and re-raise
            self._retry(lambda: self.queue.release(job), "releasing an unstarted job")
            raise
        item = _Running(job=job, process=process, started=time.monotonic())
        with self._lock:
            self._running[job.id] = item
        try:
            try:
                assert process.stdin is not None
                process.stdin.write(payload.model_dump_json().encode())
                process.stdin.close()
            except OSError:
                log.exception("could not hand build %s to its process", job.build_id)
                _kill_group(process)
            self._watch(item)
        finally:
            try:
                self._retry(lambda: self._settle(item), f"settling build {job.build_id}")
            finally:
                with self._lock:
                    self._running.pop(job.id, None)

    def _retry(self, action: Callable[[], None], what: str) -> None:
        """Run ``action`` until it succeeds (backing off), or until the worker stops."""
        failures = 0
        while True:
            try:
                action()
                return
            except Exception:
                failures += 1
                log.exception("%s failed (try %d); retrying", what, failures)
                if self._stopping.wait(
                    min(_MAX_BACKOFF_S, self.settings.poll_interval_s * 2**failures)
                ):
                    return

    def _watch(self, item: _Running) -> None:
        while item.process.poll() is None:
            try:
                item.process.wait(self.settings.poll_interval_s)
                break
            except subprocess.TimeoutExpired:
                pass
            if item.stopped_for is not None:
                continue
            now = time.monotonic()
            if now - item.started > self.settings.build_timeout_s:
                item.stopped_for = _Stop.TIMEOUT
                _kill_group(item.process)
            elif self._cancel_requested_safely(item.job.build_id):
                if item.cancel_seen is None:  # ask first: the build records itself cancelled
                    item.cancel_seen = now
                    _signal_group(item.process, signal.SIGTERM)
                elif now - item.cancel_seen > self.settings.cancel_grace_s:
                    item.stopped_for = _Stop.CANCEL  # a native call did not return: kill it
                    _kill_group(item.process)

    def _settle(self, item: _Running) -> None:
        """Give the build an outcome if its process did not record one."""
        _kill_group(item.process)  # anything the build left running in its group
        build_id = item.job.build_id
        if item.stopped_for is _Stop.DISOWNED:
            return  # recovery re-queued or failed it; another worker may run it now
        if item.stopped_for is _Stop.SHUTDOWN:
            self.queue.release(item.job)
            self.storage.remove_entry(self.storage.work_dir(build_id))
            return
        status = self._build_status(build_id) or BuildStatus.FAILED
        if not status.terminal:
            code = item.process.returncode
            if item.stopped_for is _Stop.CANCEL or item.cancel_seen is not None:
                # asked to stop and died before recording it (e.g. SIGTERM during start-up)
                self._end(build_id, BuildStatus.CANCELLED, None, "Build cancelled (killed).")
            elif item.stopped_for is _Stop.TIMEOUT:
                self._fail(
                    build_id,
                    "build_timeout",
                    f"The build ran longer than {self.settings.build_timeout_s:.0f} s and was killed.",
                    "Raise TRTFORGE_BUILD_TIMEOUT_S, or build a smaller model or profile.",
                )
            else:
                how = f"signal {-code}" if code < 0 else f"exit status {code}"
                self._fail(
                    build_id,
                    "build_crashed",
                    f"The build process died ({how}) before recording an outcome.",
                    "Check the server log; out of memory is a common cause.",
                )
        self.storage.remove_entry(self.storage.work_dir(build_id))
        self.queue.finish(item.job)

    def _cancel_requested_safely(self, build_id: str) -> bool:
        """Whether a cancel was asked for; a database error means "not now" (the watch goes on,
        the timeout still applies)."""
        try:
            return self._cancel_requested(build_id)
        except Exception:
            log.exception("checking build %s for a cancel failed", build_id)
            return False

    def _cancel_requested(self, build_id: str) -> bool:
        with self._database().session() as session:
            build = session.get(BuildRow, build_id)
            return bool(build is not None and build.cancel_requested)

    def _fail(self, build_id: str, code: str, message: str, hint: str = "") -> None:
        self._end(build_id, BuildStatus.FAILED, (code, message, hint), f"Build failed: {message}")

    def _end(
        self,
        build_id: str,
        status: BuildStatus,
        error: tuple[str, str, str] | None,
        line: str,
    ) -> None:
        with self._database().session() as session:
            build = session.get(BuildRow, build_id)
            if build is None or BuildStatus(build.status).terminal:
                return
            build.status, build.stage, build.finished_at = status.value, None, utcnow()
            if error is not None:
                build.error_code, build.error_message, build.error_hint = error
            add_log(session, build_id, line, level="error" if error else "warning")
            session.commit()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Send ``sig`` to the child's process group (it is its own session leader)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's process group (it is its own session leader)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            log.error("build process %d did not die after SIGKILL", process.pid)
