"""Jinja2 rendering of the dashboard pages and HTML reports (autoescaped)."""

from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

__all__ = ["STATIC", "asset", "render", "render_report"]

TEMPLATES = Path(__file__).resolve().parent / "templates"
STATIC = Path(__file__).resolve().parent / "static"


def _number(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.{digits}f}"
    return str(value)


def _bytes(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _fp32_notes(report: dict[str, Any]) -> list[str]:
    """A build report's words against FP32 (:func:`engines.fp32_notes.build_notes`) from its
    JSON: the artifact sidecar's backend and options, the spec's precision."""
    from engines.fp32_notes import Fp32Facts, build_notes

    meta = report.get("artifact_metadata") or {}
    precision = (report.get("spec") or {}).get("precision") or "fp32"
    facts = Fp32Facts.from_sidecar(str(meta.get("backend", "")), precision, meta.get("options"))
    return build_notes(facts)


@functools.cache
def asset(name: str) -> str:
    """The URL of a static file with its content's digest, so browsers that cache it for an
    hour still fetch a changed one at once."""
    digest = hashlib.sha256((STATIC / name).read_bytes()).hexdigest()[:12]
    return f"/static/{name}?v={digest}"


@functools.lru_cache(maxsize=1)
def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = _number
    env.filters["size"] = _bytes
    env.globals["fp32_notes"] = _fp32_notes
    env.globals["asset"] = asset
    return env


def render(template: str, **context: Any) -> str:
    """Render ``templates/<template>`` with ``context``."""
    return _environment().get_template(template).render(**context)


def render_report(report: dict[str, Any]) -> str:
    """A build report (the JSON document) as a standalone HTML page."""
    return render("report.html", report=report)
