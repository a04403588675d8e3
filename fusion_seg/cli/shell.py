"""How a command ends: a user's error as one line (exit 2), an interruption as what it leaves (exit 130), a
failed write naming its file."""
from __future__ import annotations

import contextlib
import functools
import sys

import click

from fusion_seg.errors import UserError, os_error_message

# What Ctrl-C leaves behind, by command: each says only what is true of that command.
INTERRUPTED = {
    "extract": "Interrupted. Re-run the same command to resume: the views already written are kept.",
    "train_decoder": "Interrupted. {out}/last.pt holds the last finished epoch: re-run the same command with --resume "
                     "to continue from it (as it was, without --resume, if no epoch had finished).",
    "compare": "Interrupted. Re-run the same command to continue: a decoder already trained is not trained again.",
    "run": "Interrupted. Re-run the same command: stages that finished are skipped, an extraction resumes and a "
           "train stage continues its run.",
    "predict": "Interrupted. predict does not resume: re-running it predicts every image again (the files written "
               "so far are whole).",
}
NOT_RESUMED = "Interrupted. Nothing to resume: re-run the command to start it again."


def user_errors(fn):
    """Print a user's error as one line (exit 2), and what an interruption leaves (exit 130); a failed
    file-system call or a failed allocation that no library check turned into a UserError is one line too."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            fail(str(exc))
        except OSError as exc:
            fail(os_error_message(exc))
        except (MemoryError, RuntimeError) as exc:
            if not out_of_memory(exc):
                raise
            fail(f"{fn.__name__.replace('_', '-')} ran out of memory ({str(exc).splitlines()[0][:160]}): reduce "
                 "--batch-size, --crop or the image size, or run it on a machine with more memory.")
        except KeyboardInterrupt:
            message = INTERRUPTED.get(fn.__name__, NOT_RESUMED)
            click.secho(message.format(out=kwargs.get("out", "OUT")), fg="yellow", err=True)
            sys.exit(130)
    return wrapper


@contextlib.contextmanager
def writing(path, what: str, option: str):
    """A failed write of a file a command writes at its end (``--json`` ...): one line naming it, its option
    and the fix (:func:`fusion_seg.errors.write_error`), where the last-resort OSError line could not name it."""
    from fusion_seg.errors import write_error

    try:
        yield
    except OSError as exc:
        raise write_error(path, exc, what=what, option=option) from None


def out_of_memory(exc: BaseException) -> bool:
    """A failed allocation: Python's MemoryError, torch's CPU allocator ("can't allocate memory") or CUDA's
    out-of-memory error (a RuntimeError whose message says so)."""
    text = str(exc)
    return isinstance(exc, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()


def fail(message: str) -> None:
    click.secho(f"Error: {message}", fg="red", err=True)
    sys.exit(2)
