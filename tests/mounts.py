"""Real read-only and full file systems for the tests of write failures (issue 20).

:func:`run_with_mounts` runs a command in a private mount namespace (``unshare -m``) in which each
folder of ``read_only`` is bind-mounted read-only (writes fail with EROFS, even as root, for whom a
chmod 555 folder is still writable) and each folder of ``full`` is a tmpfs of a few KiB (writes fail
with ENOSPC once it fills). Nothing outside the command sees these mounts, and they vanish with it.

It needs the right to make a mount namespace (root in this project's machines and CI). Where that is
missing, :func:`require_mounts` skips the test with the reason.
"""
from __future__ import annotations

import functools
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

FULL_DISK_SIZE = "16k"  # a tmpfs this small holds a lock file or a tiny JSON, never a checkpoint or a PNG


@functools.lru_cache(maxsize=1)
def mounts_available() -> str | None:
    """None when read-only bind mounts work here; else why not."""
    probe = "d=$(mktemp -d) && mount --bind -o ro \"$d\" \"$d\" && ! touch \"$d/x\" 2>/dev/null"
    try:
        done = subprocess.run(["unshare", "-m", "sh", "-c", probe], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare is not available: {exc}"
    return None if done.returncode == 0 else f"cannot make a read-only mount here: {done.stderr.strip()}"


def require_mounts() -> None:
    reason = mounts_available()
    if reason:
        pytest.skip(reason)


def cli(*args) -> list[str]:
    """The fusion-seg command line, run by this interpreter."""
    return [sys.executable, "-m", "fusion_seg", *map(str, args)]


def run_with_mounts(args: list, *, read_only=(), full=(), timeout: float = 600,
                    env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``args`` with each folder of ``read_only`` read-only and each of ``full`` a full disk (see above).

    The folders must exist. Returns the finished process (text output).
    """
    require_mounts()
    steps = [f"mount --bind -o ro {shlex.quote(str(Path(d)))} {shlex.quote(str(Path(d)))}" for d in read_only]
    steps += [f"mount -t tmpfs -o size={FULL_DISK_SIZE} fusion-seg-full {shlex.quote(str(Path(d)))}" for d in full]
    if full:  # fill the tmpfs, leaving a few bytes: the next write of any size fails with ENOSPC
        steps += [f"(head -c 100000 /dev/zero > {shlex.quote(str(Path(d) / '.filler'))}) 2>/dev/null; true"
                  for d in full]
    script = " && ".join(steps + ['exec "$@"'])
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
