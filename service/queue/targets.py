"""Which worker may build what: a build's requested backend and target against a worker's
targets and labels.

A build asks for a backend (``spec.backend``) and, optionally, a :class:`TargetRequest`: a GPU
(``sm_90`` or ``9.0``, matched against the compute capability; anything else, such as ``H100``,
against the GPU's name, case-insensitively), a TensorRT version prefix (by components) and labels.
A worker serves it when it carries every requested label and one of its targets matches every
other field; among those targets the backend is chosen as for an untargeted build
(:func:`engines.backends.registry.choose_target`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from engines.backends.base import BuildTarget
from engines.backends.registry import builds_versioned_by_target, choose_target
from engines.names import BackendName
from service.schemas import TargetRequest

__all__ = ["describe_worker", "serving_target", "target_matches", "wanted_capability"]

_SM = re.compile(r"^sm_?(\d+)(\d)[af]?$", re.IGNORECASE)
_CAPABILITY = re.compile(r"^\d+\.\d+$")


def wanted_capability(gpu: str) -> str | None:
    """The compute capability a GPU request names (``sm_90`` and ``9.0`` -> ``"9.0"``, ``sm_120``
    -> ``"12.0"``), or None when it names a GPU by (part of) its name."""
    if _CAPABILITY.match(gpu):
        return gpu
    sm = _SM.match(gpu)
    return f"{int(sm.group(1))}.{sm.group(2)}" if sm else None


def _version_has_prefix(version: str, prefix: str) -> bool:
    have, want = version.split("."), prefix.split(".")
    return have[: len(want)] == want


def target_matches(request: TargetRequest, target: BuildTarget) -> bool:
    """Whether ``target`` is what ``request`` asks for (labels aside: they are the worker's)."""
    if request.gpu is not None:
        capability = wanted_capability(request.gpu)
        if capability is not None:
            if target.compute_capability != capability:
                return False
        elif request.gpu.casefold() not in target.device.casefold():
            return False
    if request.tensorrt is not None:
        if not builds_versioned_by_target(target.backend):
            return False
        if not _version_has_prefix(target.backend_version, request.tensorrt):
            return False
    return True


def serving_target(
    requested_backend: BackendName | str,
    request: TargetRequest | None,
    targets: Sequence[BuildTarget],
    labels: Sequence[str],
) -> BuildTarget | None:
    """The target of a worker (with ``targets`` and ``labels``) that builds a job asking for
    ``requested_backend`` and ``request``; None when this worker cannot build it."""
    if request is not None:
        if not set(request.labels) <= set(labels):
            return None
        targets = [target for target in targets if target_matches(request, target)]
    return choose_target(requested_backend, targets)


def describe_worker(targets: Sequence[BuildTarget], labels: Sequence[str]) -> str:
    """``tensorrt 10.13.0 (NVIDIA H100, sm 9.0), onnxruntime 1.22.0 (cpu) [labels: a, b]``."""
    text = ", ".join(map(str, targets)) or "no targets"
    return f"{text} [labels: {', '.join(labels)}]" if labels else text
