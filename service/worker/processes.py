"""Telling live processes from dead ones across restarts (pids are reused, so pair them with start times)."""

from __future__ import annotations

import os
import re

import psutil

__all__ = ["process_alive", "process_tag"]

_TAG_RE = re.compile(r"p(\d+)-(\d+)")


def process_tag(pid: int | None = None) -> str:
    """``p<pid>-<start time>``: names one process for as long as the machine runs."""
    pid = os.getpid() if pid is None else pid
    try:
        started = int(psutil.Process(pid).create_time())
    except psutil.Error:
        started = 0
    return f"p{pid}-{started}"


def process_alive(tag: str) -> bool:
    """Whether the process named by ``tag`` (from :func:`process_tag`) still runs on this machine."""
    match = _TAG_RE.fullmatch(tag)
    if match is None:
        return False
    pid = int(match.group(1))
    return psutil.pid_exists(pid) and process_tag(pid) == tag
