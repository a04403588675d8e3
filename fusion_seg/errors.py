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
