"""Atomic file writing (the one implementation every writer uses) and JSON reading.

A file is written to a temporary name in its target's folder, flushed and
fsynced, then renamed over the target (``os.replace`` is atomic on one
filesystem). A crash, a full disk or an exception while writing never leaves
a half-written file under the final name, and an existing file stays intact
until its replacement is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from midog_jax.errors import DataError

# The process's umask, read once at import (reading it means setting it, which
# is not thread-safe to do per write).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "w",
                  **open_kwargs) -> Iterator:
  """Opens a temp file beside ``path``; on success it replaces ``path``.

  On any exception the temp file is removed and ``path`` is left untouched.
  """
  with atomic_path(path) as tmp:
    with open(tmp, mode, **open_kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
  """A temp path beside ``path`` for writers that want a file name (tifffile,
  numpy); it replaces ``path`` when the block finishes without an exception.

  The temp name keeps ``path``'s suffix, so writers that pick a format (or
  append one) by suffix behave as they would for ``path``.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # Same folder as the target so os.replace is an atomic rename (same disk).
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                             suffix=f".tmp{path.suffix}")
  os.close(fd)
  try:
    yield Path(tmp)
    # mkstemp makes the file private (0600); give it the permissions a plain
    # open() would have (0666 less the umask) before it takes the final name.
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)
  except OSError as e:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    if e.filename is None:
      # A failed write or flush (disk full) names no file: name the target.
      raise OSError(e.errno, e.strerror, str(path)) from e
    raise
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def write_json_atomic(obj, path: str | os.PathLike, indent: int | None = 1) -> Path:
  """Writes ``obj`` as JSON to ``path`` atomically; NaN/inf are refused."""
  # Serialise first: an unserialisable object then never touches the disk.
  text = json.dumps(obj, indent=indent, allow_nan=False)
  with atomic_output(path, "w", encoding="utf-8") as f:
    f.write(text + "\n")
  return Path(path)


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
  """The parsed JSON of ``path``; a missing or malformed file is a ``DataError``.

  ``what`` names the file's role in the "not found" message (e.g.
  "annotation file"), so the one-line error says what the user pointed at.
  """
  try:
    with open(path, "rb") as f:
      return json.load(f)
  except FileNotFoundError:
    raise DataError(path, f"{what} not found") from None
  except IsADirectoryError:
    raise DataError(path, f"expected a {what}, got a folder") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(path, f"malformed JSON ({e})") from None
