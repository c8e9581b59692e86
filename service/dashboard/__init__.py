"""The dashboard: server-rendered pages at ``/`` for people who would rather not use the CLI
(builds, a build's live page, new builds, compare, sweeps, models, datasets, tables, workers),
the HTML build report, and sign-in. See ``routes.py`` for the map."""

from __future__ import annotations

__all__: list[str] = []
