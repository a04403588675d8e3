"""Progress that shows on a terminal and in a batch job's log alike.

On a terminal (stderr is a TTY) a :class:`Progress` is a tqdm bar. Elsewhere -- under
nohup, SLURM, ``| tee`` -- a bar would be disabled (or would fill the log with carriage
returns), so it prints a plain line instead every ``FUSION_SEG_PROGRESS_SECONDS`` seconds
(default 30; 0 prints a line per update): position, rate and ETA, plus the fields the
caller passes (training: epoch, loss, lr). :meth:`Progress.write` prints a line that
always shows, above the bar on a terminal (per-epoch summaries, the run's settings).

:class:`TensorBoardLog` writes training scalars for TensorBoard, an optional extra
(``pip install 'fusion-seg[tensorboard]'``), imported only when asked for.
"""
from __future__ import annotations

import os
import sys
import time

from fusion_seg.errors import UserError

ENV_SECONDS = "FUSION_SEG_PROGRESS_SECONDS"
DEFAULT_SECONDS = 30.0


def interval_seconds() -> float:
    """Seconds between plain progress lines, from ``FUSION_SEG_PROGRESS_SECONDS`` (default 30)."""
    value = os.environ.get(ENV_SECONDS, "").strip()
    if not value:
        return DEFAULT_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also NaN
        raise UserError(f"{ENV_SECONDS}={value!r}: expected the seconds between progress lines, a number >= 0 "
                        "(e.g. 30, or 0 for a line per update); unset it for the default of 30.")
    return seconds


def format_duration(seconds: float, *, exact: bool = False) -> str:
    """``42s``, ``4m08s``, ``2h05m``; ``exact`` keeps the seconds past an hour: ``2h05m08s``.

    The one duration format of fusion-seg: progress lines and training summaries, ``plan``'s
    table (``exact``) and the bench's tables. ``?`` for NaN or infinity (an unknown ETA).
    """
    if not seconds == seconds or seconds in (float("inf"), float("-inf")):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m" + (f"{s % 60:02d}s" if exact else "")


class Progress:
    """A tqdm bar on a terminal, plain lines at an interval elsewhere, or nothing (``enabled=False``).

    ``update(n, **fields)`` advances it; the fields (already formatted, or numbers) show in the
    bar's postfix and in each plain line, in the order given.
    """

    def __init__(self, total: int, desc: str, unit: str, *, initial: int = 0, enabled: bool = True,
                 stream=None, interval: float | None = None):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.n = self._start_n = self._printed_n = int(initial)
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.fields: dict = {}
        self._bar = None
        self._interval = 0.0
        if not enabled:
            return
        isatty = getattr(self.stream, "isatty", None)
        if isatty is not None and isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, file=self.stream)
        else:
            self._interval = interval_seconds() if interval is None else float(interval)
        self._t0 = self._last = time.perf_counter()

    @property
    def is_bar(self) -> bool:
        return self._bar is not None

    def update(self, n: int = 1, **fields) -> None:
        if not self.enabled:
            return
        self.n += n
        if fields:
            self.fields = fields
        if self._bar is not None:
            if fields:
                self._bar.set_postfix({k: _fmt(v) for k, v in fields.items()}, refresh=False)
            self._bar.update(n)  # draws the bar with these fields
            return
        now = time.perf_counter()
        if n and now - self._last >= self._interval:
            self._print_line(now)

    def line(self, now: float | None = None) -> str:
        """The plain progress line: ``desc: 120/400 views (30%), epoch 2/5, loss 0.43, 4.1 views/s, ETA 1m08s``."""
        now = time.perf_counter() if now is None else now
        elapsed = max(now - self._t0, 1e-9)
        done = self.n - self._start_n
        rate = done / elapsed
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.desc}: {self.unit} {self.n}/{self.total}{pct}" if self.unit == "step"
                 else f"{self.desc}: {self.n}/{self.total} {self.unit}s{pct}"]
        parts += [f"{k} {_fmt(v)}" for k, v in self.fields.items()]
        parts.append(f"{rate:.3g} {self.unit}s/s" if rate >= 1 or not done else f"{1 / rate:.3g} s/{self.unit}")
        if self.n >= self.total:
            parts.append(f"done in {format_duration(elapsed)}")
        else:
            parts.append(f"ETA {format_duration((self.total - self.n) / rate) if rate > 0 else '?'}")
        return ", ".join(parts)

    def _print_line(self, now: float) -> None:
        print(self.line(now), file=self.stream, flush=True)
        self._last, self._printed_n = now, self.n

    def write(self, message: str) -> None:
        """A line that always shows when enabled (above the bar on a terminal)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        """Close the bar; off a terminal, print the last position unless it was just printed (or the
        whole run took less than one interval: a short job's log stays quiet)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            return
        now = time.perf_counter()
        if self.n != self._printed_n and now - self._t0 >= self._interval:
            self._print_line(now)
        self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


TENSORBOARD_INSTALL = "pip install 'fusion-seg[tensorboard]'"


def _import_summary_writer():
    """Import the optional dependency: ``torch.utils.tensorboard.SummaryWriter`` (needs tensorboard).

    The one place it is imported: a test may replace this function to play a missing tensorboard.
    """
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter


def require_tensorboard():
    """``torch.utils.tensorboard.SummaryWriter``, or a one-line :class:`UserError` saying how to install it."""
    try:
        return _import_summary_writer()
    except ImportError as exc:
        raise UserError(f"--tensorboard needs the tensorboard package, which is not installed: "
                        f"{TENSORBOARD_INSTALL} (or leave out --tensorboard; metrics.jsonl has the same numbers).") from exc


class TensorBoardLog:
    """Scalars written to a TensorBoard event file in ``log_dir``, or nothing (``enabled=False``).

    ``purge_step`` (on resume: the first step of the resumed run) tells TensorBoard to drop what an
    interrupted run had logged from that step on, as metrics.jsonl is truncated.
    """

    def __init__(self, log_dir, *, enabled: bool, purge_step: int | None = None):
        self._writer = require_tensorboard()(str(log_dir), purge_step=purge_step, flush_secs=30) if enabled else None

    def add(self, scalars: dict, step: int) -> None:
        if self._writer is None:
            return
        for tag, value in scalars.items():
            if value is not None:
                self._writer.add_scalar(tag, float(value), step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "TensorBoardLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
