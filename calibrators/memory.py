"""The memory a calibration run may spend on activations: micro-batches and groups of tensors.

Collecting exposes every float activation of a model as an output of ONNX Runtime, so one run
holds all of them at once: a 640x640 text detector has 660 MB of activations per sample, 5.3 GB
for a batch of 8. :func:`plan_collection` fits a run into a byte budget two ways, cheapest first:

1. Micro-batches: ONNX Runtime runs as many samples at a time as fit the budget (the batch the
   user asked for stays the unit of the observers that care, tensorrt-mode histograms).
2. Groups: when one sample's activations alone exceed the budget, the tensors are split, in graph
   order, into groups that each fit; every group is its own pass over the data with a session
   exposing only that group (and computing only the nodes it needs). Each group costs a forward
   pass, so groups are as few as the budget allows, and only then is the micro-batch widened.

The budget covers what grows with the samples of a run: the exposed activations, the input batch
and ONNX Runtime's transient working tensors (estimated as twice the largest activation). The
process's fixed cost (Python, ONNX Runtime, numba, the model's weights: a few hundred MB) comes on
top of it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "DEFAULT_MEMORY_LIMIT_BYTES",
    "CollectionPlan",
    "estimate_unknown",
    "format_bytes",
    "parse_byte_size",
    "plan_collection",
]

log = logging.getLogger(__name__)

DEFAULT_MEMORY_LIMIT_BYTES = 1 << 30
"""1 GiB: with the process's fixed cost, a calibration run stays within about 1.5 GB of RSS."""

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tb": 1000**4,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_byte_size(text: str | int) -> int:
    """Bytes from ``"1GiB"``, ``"512MiB"``, ``"1.5GB"``, ``"800M"`` or ``"1073741824"``.

    Binary units (KiB, MiB, GiB, TiB and the one-letter K, M, G, T) are powers of 1024, decimal
    ones (KB, MB, GB, TB) powers of 1000; a bare number is bytes. Raises ValueError otherwise.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = _SIZE.match(str(text))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(
                f"{text!r} is not a size: use a number of bytes or one with a unit "
                "(e.g. 1GiB, 512MiB, 2GB)."
            )
        value, unit = float(match.group(1)), match.group(2).lower()
    size = int(value * _UNITS[unit])
    if size < 1:
        raise ValueError(f"A size must be at least 1 byte, got {text!r}.")
    return size


def format_bytes(size: float) -> str:
    """``size`` in MiB or GiB with one decimal, for messages."""
    if size >= 1 << 30:
        return f"{size / (1 << 30):.1f} GiB"
    return f"{size / (1 << 20):.1f} MiB"


@dataclass(frozen=True)
class CollectionPlan:
    """How a calibration run walks the data within its memory limit."""

    batch_size: int
    """Samples per batch: the unit the observers see as a batch (tensorrt-mode histograms)."""
    micro_batch: int
    """Samples per ONNX Runtime run (at most ``batch_size``)."""
    groups: tuple[tuple[str, ...], ...]
    """Observed tensors per pass set, in graph order; one group when a sample fits the limit."""
    sample_bytes: int
    """Estimated activation bytes of one sample, all observed tensors together."""
    run_bytes: int
    """Estimated bytes a run of the largest group holds (activations, inputs, working tensors)."""
    memory_limit_bytes: int

    @property
    def split_batches(self) -> bool:
        """Whether a batch reaches the observers in several micro-batches."""
        return self.micro_batch < self.batch_size


def plan_collection(
    tensor_bytes: Mapping[str, int],
    *,
    input_bytes: int,
    working_bytes: int,
    memory_limit_bytes: int,
    batch_size: int,
    max_micro_batch: int | None = None,
) -> CollectionPlan:
    """Groups and micro-batch for ``tensor_bytes`` (observed tensor -> bytes per sample, in graph
    order; 0 for graph inputs, which the feed holds anyway) within ``memory_limit_bytes``.

    ``input_bytes`` and ``working_bytes`` are per sample too. ``max_micro_batch`` caps the
    micro-batch (a model whose batch axis is fixed).
    """
    if memory_limit_bytes < 1:
        raise ValueError(f"memory_limit_bytes must be positive, got {memory_limit_bytes}")
    overhead = input_bytes + working_bytes
    capacity = max(memory_limit_bytes - overhead, 1)
    groups: list[list[str]] = [[]]
    sizes = [0]
    for name, size in tensor_bytes.items():
        if groups[-1] and sizes[-1] + size > capacity:
            groups.append([])
            sizes.append(0)
        groups[-1].append(name)
        sizes[-1] += size
        if size > capacity:
            log.warning(
                "tensor %r takes %s per sample, more than the %s memory limit leaves for "
                "activations: it is observed alone, one sample at a time",
                name,
                format_bytes(size),
                format_bytes(memory_limit_bytes),
            )
    per_sample = max(sizes) + overhead
    micro = max(1, min(batch_size, memory_limit_bytes // max(per_sample, 1)))
    if max_micro_batch is not None:
        micro = max(1, min(micro, max_micro_batch))
    plan = CollectionPlan(
        batch_size=batch_size,
        micro_batch=micro,
        groups=tuple(tuple(group) for group in groups),
        sample_bytes=sum(sizes),
        run_bytes=micro * per_sample,
        memory_limit_bytes=memory_limit_bytes,
    )
    if len(groups) > 1 or micro < batch_size:
        log.info(
            "activations take %s per sample: %d sample(s) per run, %d group(s) of tensors "
            "(memory limit %s)",
            format_bytes(plan.sample_bytes),
            micro,
            len(groups),
            format_bytes(memory_limit_bytes),
        )
    return plan


def estimate_unknown(
    known: Mapping[str, int | None], producers: Mapping[str, tuple[str, ...]]
) -> dict[str, int]:
    """Bytes per sample for every tensor of ``known``, in its order: where shape inference could
    not tell (None), the largest size among the tensors its node reads (sizes rarely grow through
    an op), else the largest known size at all."""
    largest = max((size for size in known.values() if size), default=4 << 20)
    out: dict[str, int] = {}
    for name, size in known.items():
        if size is None:
            inputs = [out.get(i, known.get(i)) for i in producers.get(name, ())]
            size = max((s for s in inputs if s), default=largest)
        out[name] = int(size)
    return out

