"""Projects: the tenancy unit. Tokens belong to one; models, datasets, calibration tables and
builds are stored in one; every read, write and delete is limited to the caller's project
(admin tokens see all of them, or one with ``?project=``).

With authentication off, everything lives in :data:`DEFAULT_PROJECT`, as before projects
existed.

Content addressing stays, per project: a model's (and a dataset's) id is a digest of its bytes
*and its project* (:func:`scoped_id`). The same bytes uploaded in two projects are two entries
with two ids and two folders, so an upload never answers "these bytes exist" for another
project's data, deleting in one project never touches another's, and every cache keyed by these
ids (builds, calibration tables) is a per-project cache. In the default project the id is the
plain digest, so ids from before projects keep working.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["DEFAULT_PROJECT", "PROJECT_PATTERN", "is_project_name", "scoped_id"]

DEFAULT_PROJECT = "default"
"""Where everything lives when authentication is off, and rows from before projects."""

PROJECT_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
"""Project names: 1-63 lowercase letters, digits, ``_``, ``.`` and ``-``, not starting with a
punctuation mark (they appear in URLs and logs unquoted)."""

_NAME = re.compile(PROJECT_PATTERN)


def is_project_name(name: str) -> bool:
    """Whether ``name`` is a valid project name (:data:`PROJECT_PATTERN`)."""
    return _NAME.fullmatch(name) is not None


def scoped_id(project: str, digest: str) -> str:
    """The id of content ``digest`` (a sha256 hex digest) in ``project``: the digest itself in
    the default project, else sha256 over the project and the digest (module docstring)."""
    if project == DEFAULT_PROJECT:
        return digest
    return hashlib.sha256(f"trtforge-project\n{project}\n{digest}".encode()).hexdigest()
