"""Persistence: the schema (:mod:`service.db.models`) and the database handle (:mod:`service.db.engine`)."""

from __future__ import annotations

from service.db.engine import Database

__all__ = ["Database"]
