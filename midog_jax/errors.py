"""The project's error types and how command-line programs report them.

Every CLI ends in :func:`exit_code`: bad input (:class:`DataError`) is ONE
line naming the file and the problem (exit 1), a non-finite loss is one line
(exit 3), a run stopped by SIGTERM/SIGINT after saving its work is one line
saying where it stopped (exit 0), and Ctrl-C outside a protected phase is one
line (exit 130). An operating-system error while reading or writing (disk
full, no permission, a read-only file system) is one line naming the path and
the cause (exit 1). Tracebacks only with ``MIDOG_TRACEBACK=1``.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable


class DataError(ValueError):
  """Bad input data: the message names the file and what is wrong with it."""

  def __init__(self, path: str | os.PathLike | None, problem: str):
    self.path = None if path is None else os.fspath(path)
    self.problem = problem
    where = self.path if self.path is not None else "<input>"
    super().__init__(f"{where}: {problem}")

  def __reduce__(self):
    # Pickled with its own arguments, so it crosses process pools intact
    # (the default would call DataError(message) and fail in the parent).
    return DataError, (self.path, self.problem)


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/inf loss or parameters; the last good checkpoint is kept."""


class Stopped(Exception):
  """A run stopped early on a signal, after saving what it had.

  Attributes:
    signal_name: "SIGTERM" or "SIGINT".
    message: one line for the user: where it stopped, how to resume.
  """

  def __init__(self, signal_name: str, message: str):
    super().__init__(message)
    self.signal_name = signal_name
    self.message = message


def _line(e: BaseException) -> str:
  return " ".join(str(e).split())


# Errors of the storage, not of the program: reported as a cause, not a traceback.
_STORAGE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                   errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                   errno.EIO: "input/output error"}
# How tensorstore (under orbax) reports them: the OS error code inside a message.
_TENSORSTORE_CODE = "os_error_code='"


def storage_cause(e: BaseException) -> str | None:
  """The storage problem behind ``e`` ("no space left on device", ...), if any.

  Follows the exception chain (orbax wraps tensorstore's errors in others) and
  reads tensorstore's ``os_error_code`` from messages.
  """
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
      return _STORAGE_ERRNOS[e.errno]
    text = str(e)
    if _TENSORSTORE_CODE in text:
      code = text.split(_TENSORSTORE_CODE, 1)[1].split("'", 1)[0]
      if code.isdigit() and int(code) in _STORAGE_ERRNOS:
        return _STORAGE_ERRNOS[int(code)]
    e = e.__cause__ or e.__context__
  return None


def _is_closed_loop(exc: BaseException | None) -> bool:
  return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def drop_closed_loop_reports() -> None:
  """Stops tensorstore's callbacks into a closed asyncio loop from printing.

  When an orbax save fails (disk full), tensorstore's writer threads still
  call ``loop.call_soon_threadsafe`` on the loop orbax has closed; each
  failure is reported as an unraisable exception, a bare traceback (dozens to
  hundreds of them, before the program's own one-line error). Only that exact
  error is dropped; every other one is reported as before. Idempotent.
  """
  if getattr(sys.unraisablehook, "_drops_closed_loop", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_closed_loop(unraisable.exc_value):
      previous(unraisable)

  hook._drops_closed_loop = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def quiet_shutdown() -> None:
  """Drops the "Exception ignored" reports of orbax's abandoned writes at exit.

  After a failed save, orbax leaves coroutines that fail again while the
  interpreter shuts down (hundreds of lines of "Event loop is closed") and
  would bury the one line that says what went wrong.
  """
  sys.unraisablehook = lambda unraisable: None


def exit_code(fn: Callable[[], object]) -> int:
  """Runs ``fn`` and turns the project's outcomes into one line and an exit code."""
  try:
    fn()
    return 0
  except Stopped as e:
    print(e.message, file=sys.stderr, flush=True)
    return 0
  except NonFiniteLossError as e:
    if os.environ.get("MIDOG_TRACEBACK"):
      raise
    print(f"error: {_line(e)}", file=sys.stderr, flush=True)
    return 3
  except DataError as e:
    if os.environ.get("MIDOG_TRACEBACK"):
      raise
    print(f"error: {_line(e)}", file=sys.stderr, flush=True)
    return 1
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr, flush=True)
    return 130
  except OSError as e:
    cause = storage_cause(e)
    if cause is None or os.environ.get("MIDOG_TRACEBACK"):
      raise
    print(f"error: {e.filename or '(unnamed file)'}: {cause}", file=sys.stderr, flush=True)
    return 1


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every problem as one line and exit 2 (usage).

  For ``app.run(main, flags_parser=parse_flags)``: an unknown config key
  (``--config.total_step=8``: ml_collections says which key was meant), a
  value of the wrong type, a missing config file, a bad config argument.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    rest = flags.FLAGS(argv)
    if "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].using_default_value:
      # Warnings and errors only (absl.app would raise a default to INFO):
      # orbax logs dozens of INFO lines per save, which bury the program's
      # own. ``--verbosity=0`` brings them back.
      flags.FLAGS.verbosity = -1
    if "config" in flags.FLAGS:
      # A config file that failed to load only raises when first used.
      getattr(flags.FLAGS.config, "keys")
    return rest
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    if os.environ.get("MIDOG_TRACEBACK"):
      raise
    raw = str(e)
    if len(raw) > 1 and raw[0] == raw[-1] and raw[0] in "'\"":  # a repr'd message
      raw = raw[1:-1].replace("\\n", "\n").replace("\\'", "'")
    lines = [l.strip() for l in raw.splitlines() if l.strip()]
    # A config file's own error comes wrapped with its traceback: its last line says it.
    text = lines[-1] if any(l.startswith("Traceback") for l in lines) else " ".join(lines)
    print(f"error: bad command line: {text}", file=sys.stderr, flush=True)
    sys.exit(2)
