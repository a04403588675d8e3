"""A pause point for the project's kill tests: a child process stops at a known place of a real run.

The reliability tests (tests/system/test_reliability.py) SIGKILL real extraction and training
processes and check that nothing is lost. For every kill to land mid-run whatever the machine's
speed, the child is told, through the environment, where to wait:

``FUSION_SEG_TEST_PAUSE_AFTER=KIND:N``
    block at the ``N``-th :func:`checkpoint_reached` call of ``KIND`` made by this process.
    ``view``: a view's write finished (in-process extraction, extract/local.py); ``step``: a
    training step finished (the trainer's step loop).
``FUSION_SEG_TEST_PAUSE_MARKER=FILE``
    written (``"PID KIND N"``, atomically) when the pause begins: the test waits for this file,
    then kills a process that is certainly still running.

The pause ends by itself after :data:`PAUSE_SECONDS`, so a child whose test died is not left
waiting for ever; it then carries on as if never paused.

Nothing here is for users. The variables are read once, when this module is imported; unset
(always, outside these tests), :func:`checkpoint_reached` returns at its first line. This module
imports only the standard library (and, when a pause begins, files.py, which does too).
"""
from __future__ import annotations

import os
import time

PAUSE_AFTER = "FUSION_SEG_TEST_PAUSE_AFTER"
PAUSE_MARKER = "FUSION_SEG_TEST_PAUSE_MARKER"
PAUSE_SECONDS = 600.0
KINDS = ("view", "step")


def _pause_point(value: str | None) -> tuple[str, int] | None:
    """``"view:5"`` -> ``("view", 5)``; None when unset or empty. A malformed value is an error, not ignored."""
    if not value:
        return None
    kind, _, n = value.partition(":")
    if kind not in KINDS or not n.isdigit() or int(n) < 1:
        raise ValueError(f"{PAUSE_AFTER}={value!r}: expected KIND:N with KIND one of {', '.join(KINDS)} and N >= 1")
    return kind, int(n)


_PAUSE = _pause_point(os.environ.get(PAUSE_AFTER))
_counts: dict[str, int] = {}


def checkpoint_reached(kind: str) -> None:
    """One unit of work of ``kind`` is done (see the module docstring); pauses here when a test asked to."""
    if _PAUSE is None:
        return
    _counts[kind] = n = _counts.get(kind, 0) + 1
    if (kind, n) != _PAUSE:
        return
    marker = os.environ.get(PAUSE_MARKER)
    if marker:
        from fusion_seg.files import write_text_atomic  # standard library only, like this module

        write_text_atomic(marker, f"{os.getpid()} {kind} {n}\n")
    time.sleep(PAUSE_SECONDS)
