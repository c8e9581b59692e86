"""The build child's memory limit: how big it is, and how a build that ran out of it is recorded."""

from __future__ import annotations

import os

from service.settings import Settings

__all__ = [
    "RESOURCE_LIMIT",
    "allocation_failed",
    "memory_limit_bytes",
    "resource_limit_failure",
]


RESOURCE_LIMIT = "resource_limit"


_ALLOCATION_FAILURES = (
    "MemoryError",
    "Unable to allocate",  # numpy
    "Failed to allocate memory",  # ONNX Runtime's arena
    "bad_alloc",  # C++ (TensorRT, ONNX Runtime, protobuf)
    "Cannot allocate memory",  # ENOMEM from the C library
)
"""What an allocation refused under the limit looks like in a recorded failure."""


def memory_limit_bytes(settings: Settings) -> int | None:
    """The data memory a build process may take: ``build_memory_bytes``, by default three
    quarters of this machine's memory; None for no limit."""
    if settings.build_memory_bytes is not None:
        return settings.build_memory_bytes or None
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total * 3 // 4 if total > 0 else None


def resource_limit_failure(reason: str, limit: int | None) -> tuple[str, str, str]:
    """(code, message, hint) of a build that ran out of memory under ``limit``."""
    cap = f"{limit:,} bytes" if limit is not None else "this machine's memory"
    return (
        RESOURCE_LIMIT,
        f"The build ran out of memory (its limit is {cap}): {reason}",
        "Raise TRTFORGE_BUILD_MEMORY_BYTES on the worker, or build with smaller batches "
        "(benchmark.batch_size, calibration.batch_size) or smaller shape profiles.",
    )


def allocation_failed(text: str) -> bool:
    """Whether a failure's text says an allocation was refused (under the build's limit)."""
    return _allocation_failed(text)


def _allocation_failed(text: str) -> bool:
    return any(marker in text for marker in _ALLOCATION_FAILURES)
