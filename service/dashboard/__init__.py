"""The minimal dashboard: a page at ``/`` listing builds, plus HTML build reports."""

from __future__ import annotations

__all__: list[str] = []
