"""The error family of every condition a user can meet and fix.

`run.main` catches `SaltjaxError` alone and prints its message (exit 1): a
user's mistake (bad data, bad config, unusable checkpoint, full disk) reads
as one paragraph, while a programming error keeps its traceback.
"""

from __future__ import annotations


class SaltjaxError(Exception):
  """Base of every user-facing error; its message says what to do."""


class ConfigError(SaltjaxError, ValueError):
  """Bad config values; the message names every key at fault."""


class DataError(SaltjaxError, ValueError):
  """A data directory or file that cannot be used; names the files and ids."""


class CheckpointError(SaltjaxError, RuntimeError):
  """A checkpoint that cannot be used: missing, corrupt or from another config."""


class NonFiniteError(SaltjaxError, RuntimeError):
  """Training produced a non-finite loss or gradient."""


class SubmissionError(SaltjaxError, ValueError):
  """A submission that would be rejected: ids or RLE wrong."""


class WorkdirError(SaltjaxError, OSError):
  """The workdir (or cache) cannot be written: read-only, full, or in use."""


class Preempted(SaltjaxError):
  """SIGTERM arrived; the resume point was saved before stopping."""

  exit_code = 143  # 128 + SIGTERM, as a shell reports a process it terminated
