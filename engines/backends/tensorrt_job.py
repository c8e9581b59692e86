"""The TensorRT build child: its job description, its supervision (subprocess with a timeout, log
capture, progress lines) and the ``reproduce.py`` written beside every engine. No TensorRT here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from calibrators.table import TensorRTAlgorithm
from core.errors import TrtforgeError
from engines.backends.base import ProgressFn
from engines.errors import BackendUnavailableError, BuildError, EngineError, SpecError
from engines.spec import Precision, ShapeProfile, TensorRTMode, TensorRTOptions

__all__ = ["PROGRESS_PREFIX", "BuildJob", "render_reproduce_script", "run_build_process"]


PROGRESS_PREFIX = "TRTFORGE-PROGRESS "
"""Lines the build child prints as ``TRTFORGE-PROGRESS <fraction> <stage>``."""

_LOG_TAIL_LINES = 400
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class BuildJob(BaseModel):
    """Everything the build child needs, as JSON (never pickled). Paths are absolute."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    onnx_path: str
    mode: TensorRTMode
    precision: Precision
    profiles: dict[str, ShapeProfile]
    options: TensorRTOptions
    calibration_cache: str | None = None
    calibrator: TensorRTAlgorithm | None = None
    layer_precisions: dict[str, Literal["float32", "float16"]] = {}
    """Implicit mode: ONNX node name -> the precision its layers are pinned to."""
    engine_path: str
    layers_path: str
    result_path: str
    timing_cache_folder: str | None = None
    gpu_key: str | None = None
    device: int = 0


# -- the build child, supervised ------------------------------------------------------------------

_ERRORS: dict[str, type[TrtforgeError]] = {
    cls.__name__: cls for cls in (EngineError, SpecError, BuildError, BackendUnavailableError)
}


def run_build_process(
    argv: Sequence[str],
    *,
    timeout_s: float,
    log_path: Path,
    result_path: Path,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Run the build child, stream its output to ``log_path``, enforce ``timeout_s``.

    Returns the child's result JSON. A timeout, a crash or a missing result raises
    :class:`BuildError` with the log's tail; an error the child reported is re-raised as its
    own class (SpecError, EngineError, ...). On timeout the child's whole process group is killed.
    """
    tail: deque[str] = deque(maxlen=_LOG_TAIL_LINES)
    timed_out = threading.Event()
    with (
        Path(log_path).open("w", encoding="utf-8") as log_file,
        subprocess.Popen(
            list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, errors="replace", cwd=_PACKAGE_ROOT, start_new_session=True,
        ) as proc,
    ):  # fmt: skip

        def kill() -> None:
            timed_out.set()
            _kill_group(proc.pid)

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log_file.write(line)
                if not _progress_line(line, progress):
                    tail.append(line)
            returncode = proc.wait()
        except BaseException:
            _kill_group(proc.pid)  # e.g. the progress callback raised: do not leave it running
            raise
        finally:
            timer.cancel()
    log = "".join(tail)
    if timed_out.is_set():
        raise BuildError(
            f"The TensorRT build did not finish within {timeout_s:g} s and was stopped.",
            hint="Raise the build timeout, lower the optimization level, or build a smaller model.",
            log=log,
        )
    return _child_result(Path(result_path), returncode, log)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _progress_line(line: str, progress: ProgressFn | None) -> bool:
    """Report a ``TRTFORGE-PROGRESS <fraction> <stage>`` line; False for any other line."""
    if not line.startswith(PROGRESS_PREFIX):
        return False
    fraction, _, stage = line[len(PROGRESS_PREFIX) :].strip().partition(" ")
    try:
        value = float(fraction)
    except ValueError:
        return False
    if progress is not None:
        progress(stage, value)
    return True


def _child_result(path: Path, returncode: int, log: str) -> dict[str, Any]:
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        result = None
    if isinstance(result, dict) and "error" in result:
        cls = _ERRORS.get(str(result["error"]), BuildError)
        error = cls(str(result["message"]), hint=result.get("hint"), field=result.get("field"))
        if isinstance(error, BuildError):
            error.log = log
        raise error
    if returncode != 0 or not isinstance(result, dict):
        if returncode < 0:
            try:
                how = f"crashed ({signal.Signals(-returncode).name})"
            except ValueError:
                how = f"was killed by signal {-returncode}"
        elif returncode == 0:
            how = "exited without writing its result"
        else:
            how = f"failed with exit code {returncode}"
        raise BuildError(f"The TensorRT build process {how}.", hint="See the build log.", log=log)
    return result


_REPRODUCE = (Path(__file__).parent / "reproduce.py.tmpl").read_text()
"""The reproduce.py template (a data file: it is TensorRT code, but not trtforge's)."""

_CALIBRATOR_CLASSES = {
    TensorRTAlgorithm.ENTROPY2: "IInt8EntropyCalibrator2",
    TensorRTAlgorithm.MINMAX: "IInt8MinMaxCalibrator",
    TensorRTAlgorithm.ENTROPY: "IInt8EntropyCalibrator",
}


def render_reproduce_script(
    job: BuildJob, artifact_name: str, *, onnx_name: str | None, cache_name: str | None
) -> str:
    """A standalone script rebuilding the engine with the same settings (no trtforge needed).

    ``onnx_name``/``cache_name`` are the files beside the artifact the script reads (relative,
    so the folder can move); ``onnx_name=None`` points it at the original model's absolute path.
    """
    options = job.options
    return _REPRODUCE.format(
        artifact=artifact_name,
        onnx=f"HERE / {onnx_name!r}" if onnx_name else f"Path({job.onnx_path!r})",
        mode=job.mode.value,
        precision=job.precision.value,
        profiles={n: p.model_dump(mode="json") for n, p in job.profiles.items()},
        workspace=options.workspace_bytes,
        level=options.optimization_level,
        hardware=options.hardware_compatibility,
        version_compatible=options.version_compatible,
        cache=f"HERE / {cache_name!r}" if cache_name else "None",
        pins=dict(job.layer_precisions),
        calibrator_class=_CALIBRATOR_CLASSES.get(
            job.calibrator or TensorRTAlgorithm.ENTROPY2, "IInt8EntropyCalibrator2"
        ),
    )


# -- inference ------------------------------------------------------------------------------------
