"""Fault injection for the interruption tests: `PREFLOOP_FAULT=iter_2/train` makes the
process SIGKILL itself at the first fault point reached inside that stage (after one
sampling batch, one scoring chunk, or one optimizer step). Unset, it does nothing."""

from __future__ import annotations

import os
import signal

_current_stage = ""


def set_stage(key: str) -> None:
    global _current_stage
    _current_stage = key


def point() -> None:
    """A place where a crash would leave partial work behind; die here if asked to."""
    wanted = os.environ.get("PREFLOOP_FAULT")
    if wanted and wanted == _current_stage:
        os.kill(os.getpid(), signal.SIGKILL)
