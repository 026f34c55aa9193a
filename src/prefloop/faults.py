"""Fault injection for the interruption tests.

`PREFLOOP_FAULT=iter_2/train` makes the process signal itself at the first fault point
reached inside that stage (after one sampling batch, one scoring chunk, one optimizer
step, or, for stages without inner points such as `pair`, once the stage's artifact is
written but before the manifest marks it done). `PREFLOOP_FAULT_SIGNAL` picks the signal:
`KILL` (default; nothing runs after it) or `INT` (what Ctrl-C sends; Python raises
KeyboardInterrupt). `PREFLOOP_FAULT_AT=N` signals at the stage's N-th point instead of its
first (to die inside the length guard's second training, say). Unset, it does nothing.
"""

from __future__ import annotations

import os
import signal

_current_stage = ""
_points_passed = 0  # fault points reached so far in the stage named by PREFLOOP_FAULT
SIGNALS = {"KILL": signal.SIGKILL, "INT": signal.SIGINT}


def set_stage(key: str) -> None:
    """Record the stage now running (`iter_t/stage`); fault points and messages use it."""
    global _current_stage, _points_passed
    _current_stage, _points_passed = key, 0


def current_stage() -> str:
    """The stage last started by the loop, `""` outside the loop."""
    return _current_stage


def point() -> None:
    """A place where a crash would leave partial work behind; die here if asked to."""
    global _points_passed
    wanted = os.environ.get("PREFLOOP_FAULT")
    if wanted and wanted == _current_stage:
        _points_passed += 1
        if _points_passed < int(os.environ.get("PREFLOOP_FAULT_AT", "1")):
            return
        name = os.environ.get("PREFLOOP_FAULT_SIGNAL", "KILL").upper()
        if name not in SIGNALS:
            raise ValueError(f"PREFLOOP_FAULT_SIGNAL: {name!r} is not one of {', '.join(SIGNALS)}")
        # fire once: a resumed stage in the same process must not be interrupted again
        os.environ.pop("PREFLOOP_FAULT")
        os.kill(os.getpid(), SIGNALS[name])
