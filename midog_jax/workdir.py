"""A training workdir's guards: one run at a time, and resuming only what was started.

* :class:`WorkdirLock`: ``WORKDIR/.lock`` holds the pid and host of the run
  using the workdir; a second run refuses at once (two runs would interleave
  ``metrics.jsonl`` and overwrite each other's checkpoints). A lock left by a
  run that died on this host is taken over; one from another host is not
  (its pid cannot be checked from here): the message says to delete it.
* :func:`check_resume_config`: resuming a workdir with a config that differs
  in anything but :data:`RESUMABLE_KEYS` is refused before anything in the
  workdir is written, with one line listing the keys that differ.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Mapping

from midog_jax.errors import DataError
from midog_jax.fileio import read_json
from midog_jax.metric_writer import flatten

# Keys that may change when a run is resumed: how long it runs, how often it
# logs, validates and saves, and how it reads data; never what it learns.
# The compute dtype (mixed precision) changes no parameter shape or dtype, so
# the checkpoint restores unchanged (e.g. a float32 run continued in bfloat16
# on an accelerator); "model.dtype" is its name in workdirs saved before it was
# "model.compute_dtype", listed so that they still resume. How whole images
# are cut (eval.inference, region_max_mpx, skip_blank) is inference only.
RESUMABLE_KEYS = ("total_steps", "log_every", "eval_every", "checkpoint_every",
                  "keep_checkpoints", "num_workers", "debug_step_sleep",
                  "eval.max_val_images", "eval.write_overlays", "eval.tile_batch",
                  "eval.exact_rotation", "eval.tta", "eval.inference",
                  "eval.region_max_mpx", "eval.skip_blank", "model.compute_dtype",
                  "model.dtype")

# Keys added after workdirs were already saved without them, with the value
# that reproduces what those runs did: a saved config that lacks one of them
# counts as having this value (so an old host-augmented run still resumes,
# and resuming it with device augmentation is refused).
ADDED_KEYS: dict[str, Any] = {"data.augment_on": "host", "eval.inference": "tiles",
                               "eval.region_max_mpx": 12.0, "eval.skip_blank": False}
_ABSENT = "<absent>"


def has_checkpoint(workdir: str | os.PathLike) -> bool:
  """True when the workdir holds a saved training step (a resume)."""
  from midog_jax import checkpoint  # pylint: disable=g-import-not-at-top (orbax)
  return bool(checkpoint.saved_steps(Path(workdir) / "checkpoints" / "latest"))


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any],
                       resumable: tuple[str, ...] = RESUMABLE_KEYS) -> list[str]:
  """``key (was A, now B)`` for every key that differs, ``resumable`` keys aside
  (a key of :data:`ADDED_KEYS` missing from ``old`` counts as its value there)."""
  a, b = flatten(old), flatten(new)
  out = []
  for key in sorted(set(a) | set(b)):
    was = a.get(key, ADDED_KEYS.get(key, _ABSENT))
    now = b.get(key, _ABSENT)
    if key in resumable or was == now:
      continue
    out.append(f"{key} (was {was!r}, now {now!r})")
  return out


def check_resume_config(workdir: str | os.PathLike, config_json: Mapping[str, Any]) -> None:
  """Raises ``DataError`` when resuming ``workdir`` with another config."""
  path = Path(workdir) / "config.json"
  if not (has_checkpoint(workdir) and path.exists()):
    return
  diff = config_differences(read_json(path, "config of the run to resume"), config_json)
  if diff:
    shown = "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
    raise DataError(path, "this workdir was trained with another config, refusing to "
                    f"resume: {shown}. Use a new --workdir, or the same settings "
                    f"(these may change on resume: {', '.join(RESUMABLE_KEYS)})")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


class WorkdirLock:
  """``with WorkdirLock(workdir):`` one run per workdir (see the module doc)."""

  def __init__(self, workdir: str | os.PathLike):
    self.path = Path(workdir) / ".lock"
    self.held = False

  def _holder(self) -> tuple[int, str] | None:
    try:
      pid, _, host = self.path.read_text().strip().partition(" ")
      return int(pid), host
    except (OSError, ValueError):
      return None

  def __enter__(self) -> "WorkdirLock":
    self.path.parent.mkdir(parents=True, exist_ok=True)
    me = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        if holder and holder[1] == socket.gethostname() and not _alive(holder[0]):
          self.path.unlink(missing_ok=True)  # left by a run that died here
          continue
        who = f"pid {holder[0]} on {holder[1]}" if holder else "an unknown process"
        raise DataError(self.path, f"the workdir is in use by {who}; wait for that run, "
                        "or delete this file if it is gone") from None
      try:
        with os.fdopen(fd, "w") as f:
          f.write(me + "\n")
      except OSError as e:
        # A lock without its holder (disk full) would block every later run.
        self.path.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(self.path)) from e
      self.held = True
      return self
    raise DataError(self.path, "could not take the workdir lock")

  def __exit__(self, *exc) -> None:
    if self.held:
      self.path.unlink(missing_ok=True)
      self.held = False
