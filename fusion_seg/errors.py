"""User-facing errors.

Every error a user can cause (a bad file, a wrong root, a mismatched cache)
is raised as a :class:`UserError` whose message names the offending file or
setting *and* the fix. The CLI prints these without a traceback; library
callers catch them like any other exception.
"""
from __future__ import annotations


class UserError(Exception):
    """An error caused by input or settings, with a message that says how to fix it."""


class DataError(UserError):
    """A dataset file is missing, unreadable, or inconsistent."""


class CacheError(UserError):
    """A feature store is missing, corrupt, or does not match the request."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, or does not match the request."""


class Failed:
    """A dataset item that could not be made, returned instead of raising.

    DataLoader workers re-raise exceptions wrapped in a worker traceback; returning
    the error as an item lets the main process raise it as the plain one-line
    user error it is, or skip the item (``--skip-bad``) and report why.
    """

    def __init__(self, index: int, error: UserError, **info):
        self.index, self.error, self.info = index, error, info

    def __reduce__(self):  # picklable across worker processes
        return (_rebuild_failed, (self.index, type(self.error), str(self.error), self.info))

    @staticmethod
    def first(items) -> "Failed | None":
        """The first failed item of a batch. Collate functions return it (they run inside the
        worker), and the consumer in the main process raises it with :meth:`check`."""
        return next((item for item in items if isinstance(item, Failed)), None)

    @staticmethod
    def check(batch):
        """Raise the error a collate function returned in place of a batch; else return the batch."""
        if isinstance(batch, Failed):
            raise batch.error
        return batch


def _rebuild_failed(index, error_type, message, info):
    return Failed(index, error_type(message), **info)
