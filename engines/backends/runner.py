"""The base of every runner: :class:`BaseRunner` checks a query's feeds once, then hands them to
the backend's ``_run``; it times queries, closes once and is its own ``with`` block.

A runner implements :class:`engines.backends.base.Runner` (the structural type that the benchmark,
the accuracy comparison and the workflow take). Subclassing :class:`BaseRunner` gives that
protocol's public half for free; a backend writes only the parts that are its own:

- ``inputs`` and ``output_names`` (properties), ``_run(feeds)``, ``_describe()``, ``_close()``;
- ``_timed_run(feeds)`` where it can time better than the host's wall clock around ``_run``
  (TensorRT's CUDA events);
- ``label`` (what error messages call it) and ``input_casting`` (which dtype conversions it
  accepts) where the defaults do not fit.

What :meth:`BaseRunner.run` and :meth:`BaseRunner.timed_run` check, against ``inputs``, before
the backend sees a query (a :class:`engines.errors.RunError` with ``field="inputs"`` and a hint):

- the runner is open;
- every input is fed, and nothing else is;
- each array's dtype is the input's, or converts to it as ``input_casting`` allows (numpy's
  ``np.can_cast`` rules: ``"no"`` asks for the exact dtype, ``"same_kind"`` takes float64 for a
  float32 input and casts it); inputs whose dtype numpy cannot hold (strings, bfloat16) are left
  to the backend;
- each array has the input's rank and its static dims; symbolic and unknown dims take any size
  (a backend's own limits on them, e.g. TensorRT's optimization profile, stay the backend's).

``_run`` receives the feeds in ``inputs`` order, as numpy arrays of the inputs' dtypes.
"""

from __future__ import annotations

import platform
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Self

import numpy as np

from core.tensors import TensorSpec
from engines.backends.base import QueryTiming
from engines.errors import RunError

__all__ = ["BaseRunner", "InputCasting", "host_timing"]

InputCasting = Literal["no", "same_kind"]
"""Which dtype conversions a runner applies to its feeds (numpy's casting rules)."""

Feeds = dict[str, np.ndarray]


def host_timing(ms: float) -> QueryTiming:
    """A query timed on the host: a synchronous run is its own enqueue and compute, and copies
    (if any) are inside it, so ``latency_ms = enqueue_ms = gpu_compute_ms`` and no transfers."""
    return QueryTiming(latency_ms=ms, enqueue_ms=ms, h2d_ms=0.0, gpu_compute_ms=ms, d2h_ms=0.0)


class BaseRunner(ABC):
    """A loaded model that runs queries: validates feeds once, then calls the backend's ``_run``.

    Use it in a ``with`` block; :meth:`close` releases the backend's resources once (later calls
    do nothing) and later queries raise :class:`RunError`. See the module docstring for what is
    checked and what subclasses provide.
    """

    input_casting: InputCasting = "no"
    """Dtype conversions accepted: ``"no"`` (the exact dtype) or ``"same_kind"`` (cast)."""

    _closed: bool = False

    # --- what a backend provides ----------------------------------------------------------------

    @property
    @abstractmethod
    def inputs(self) -> Sequence[TensorSpec]:
        """The inputs a query feeds, in the order ``_run`` receives them."""

    @property
    @abstractmethod
    def output_names(self) -> Sequence[str]:
        """The outputs a query returns."""

    @property
    def label(self) -> str:
        """What error messages call this runner (e.g. the artifact's file name)."""
        return type(self).__name__

    @abstractmethod
    def _run(self, feeds: Feeds) -> dict[str, np.ndarray]:
        """Run one query on validated feeds; every output by name."""

    def _timed_run(self, feeds: Feeds) -> QueryTiming:
        """Run one query on validated feeds and time it: host wall clock around :meth:`_run`."""
        start = time.perf_counter()
        self._run(feeds)
        return host_timing((time.perf_counter() - start) * 1000.0)

    @abstractmethod
    def _describe(self) -> dict[str, str]:
        """The backend's part of :meth:`describe`."""

    @abstractmethod
    def _close(self) -> None:
        """Release the backend's resources; called once, by the first :meth:`close`."""

    # --- the public half ------------------------------------------------------------------------

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one query; returns every output by name."""
        return self._run(self.validate(feeds))

    def timed_run(self, feeds: Mapping[str, np.ndarray]) -> QueryTiming:
        """Run one query and report where the time went (the benchmark's hook); the feeds are
        validated before the clock starts."""
        return self._timed_run(self.validate(feeds))

    def validate(self, feeds: Mapping[str, np.ndarray]) -> Feeds:
        """The feeds as ``_run`` takes them: in ``inputs`` order, each an array of its input's
        dtype; :class:`RunError` when the runner is closed or the feeds do not fit ``inputs``."""
        if self._closed:
            raise RunError(
                f"The runner of {self.label} is closed.",
                hint="Use the runner inside its `with` block.",
            )
        specs = list(self.inputs)
        self._check_names(feeds, specs)
        return {
            spec.name: _conform(spec, feeds[spec.name], self.input_casting, self.label)
            for spec in specs
        }

    def _check_names(self, feeds: Mapping[str, Any], specs: Sequence[TensorSpec]) -> None:
        names = [spec.name for spec in specs]
        missing = [name for name in names if name not in feeds]
        unexpected = sorted(str(name) for name in set(feeds) - set(names))
        if not missing and not unexpected:
            return
        problems = []
        if missing:
            problems.append(f"Missing input(s) {', '.join(missing)}")
        if unexpected:
            what = "unexpected" if problems else "Unexpected"
            problems.append(f"{what} input(s) {', '.join(unexpected)}")
        raise RunError(
            f"{'; '.join(problems)} for {self.label}.",
            hint=f"Feed every model input, and only those: {', '.join(names)}.",
            field="inputs",
        )

    def describe(self) -> dict[str, str]:
        """The measurement environment: backend and version, device, threads, driver, plus the
        platform and Python version."""
        info = self._describe()
        info.setdefault("platform", platform.platform())
        info.setdefault("python", platform.python_version())
        return info

    def close(self) -> None:
        """Release the runner's resources; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _numpy_dtype(name: str) -> np.dtype[Any] | None:
    """The numeric or bool numpy dtype called ``name``; None for what numpy cannot check."""
    try:
        dtype = np.dtype(name)
    except TypeError:
        return None
    return dtype if dtype.kind in "biufc" else None


def _conform(spec: TensorSpec, value: np.ndarray, casting: InputCasting, label: str) -> np.ndarray:
    """``value`` as an array of ``spec``'s dtype, checked against its rank and static dims."""
    array = np.asarray(value)
    wanted = _numpy_dtype(spec.dtype)
    if wanted is not None and array.dtype != wanted:
        if not np.can_cast(array.dtype, wanted, casting=casting):
            allowed = "" if casting == "no" else " (or a dtype of the same kind, which it casts)"
            raise RunError(
                f"Input {spec.name!r} is {array.dtype.name}; {label} takes {wanted.name}{allowed}.",
                hint=f"Convert it first: array.astype(np.{wanted.name}).",
                field="inputs",
            )
        array = array.astype(wanted, casting=casting)
    if spec.shape and (
        array.ndim != len(spec.shape)
        or any(isinstance(d, int) and d != n for d, n in zip(spec.shape, array.shape, strict=True))
    ):
        dims = ", ".join("?" if d is None else str(d) for d in spec.shape)
        raise RunError(
            f"Input {spec.name!r} has shape {list(array.shape)}; {label} takes [{dims}].",
            hint="Match the rank and every numeric dim; named dims (and ?) take any size.",
            field="inputs",
        )
    return array
