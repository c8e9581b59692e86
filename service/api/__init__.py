"""The HTTP API: one router per resource, dependencies in :mod:`.deps`, errors in :mod:`.errors`."""

from __future__ import annotations

__all__: list[str] = []
