"""Limits derived from the settings."""

from __future__ import annotations

from calibrators.archive import ArchiveLimits
from service.settings import Settings

__all__ = ["archive_limits"]


def archive_limits(settings: Settings) -> ArchiveLimits:
    """Bounds on zip uploads (checked before anything is extracted)."""
    return ArchiveLimits(
        max_members=settings.max_archive_members,
        max_total_bytes=settings.max_archive_bytes,
        max_member_bytes=settings.max_archive_member_bytes,
        max_preprocessed_pixels=settings.max_preprocessed_pixels,
    )
