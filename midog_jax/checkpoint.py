"""Orbax checkpoints: latest and best-by-validation-F1, with the data-iterator state.

Layout under ``workdir/checkpoints``:
  latest/<step>/{state, data, meta}   the last ``keep`` saves (resume point)
  best/<step>/{state, meta}           the save with the best validation F1

``state`` is the train state pytree (params, batch_stats, opt_state, step),
``data`` the grain iterator state of this process, ``meta`` a small JSON dict
(validation F1, the F1-best detection threshold, the config). Orbax writes
each save to a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact.

Resume order: the workdir's latest checkpoint, else
``config.init_from`` (params only: an orbax checkpoint, a workdir, or a
``.safetensors`` file), else scratch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from midog_jax import errors
from midog_jax.errors import DataError


def _manager(directory: Path, keep: int, items: tuple[str, ...]) -> ocp.CheckpointManager:
  handlers = dict(state=ocp.StandardCheckpointHandler(),
                  meta=ocp.JsonCheckpointHandler(),
                  data=grain.checkpoint.CheckpointHandler())
  return ocp.CheckpointManager(
      directory.absolute(),
      item_names=items,
      item_handlers={k: handlers[k] for k in items},
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=True, enable_async_checkpointing=False,
          cleanup_tmp_directories=True))


class Checkpoints:
  """Latest + best checkpoints of one workdir."""

  def __init__(self, workdir: str | os.PathLike, keep: int = 2):
    root = Path(workdir) / "checkpoints"
    self.latest = _manager(root / "latest", keep, ("state", "data", "meta"))
    self.best = _manager(root / "best", 1, ("state", "meta"))

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(self, step: int, state: Any, data_iter: Any, meta: dict) -> None:
    """Saves the resume point (blocking, so a kill after it returns is safe)."""
    with _storage_errors(self.latest.directory, step):
      self.latest.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(data_iter),
          meta=ocp.args.JsonSave(_jsonable(meta))), force=True)
      self.latest.wait_until_finished()

  def save_best(self, step: int, state: Any, meta: dict) -> None:
    """Replaces the best checkpoint, never leaving none behind.

    The new best is written (orbax: to a temporary folder, renamed when
    complete) BEFORE the old ones are deleted, so a kill in between leaves
    two bests and readers take the newest. Only a best at this very step (a
    run resumed from an older "latest" validates step S again) is deleted
    first, since orbax cannot write over a step.
    """
    if step in self.best.all_steps():
      self.best.delete(step)
    with _storage_errors(self.best.directory, step):
      self.best.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          meta=ocp.args.JsonSave(_jsonable(meta))), force=True)
      self.best.wait_until_finished()
    for s in self.best.all_steps():
      if s != step:
        self.best.delete(s)

  def restore_latest(self, abstract_state: Any, data_iter: Any) -> tuple[Any, dict]:
    """Restores state and (in place) the iterator; returns (state, meta).

    A step that cannot be restored (truncated or corrupt arrays, a missing
    manifest, garbled iterator or meta JSON, an empty step folder) is
    reported in one line and the next older one is tried, so one bad folder
    never blocks every resume. Raises ``DataError`` when none restores.
    """
    root = self.latest.directory
    for step in sorted(self.latest.all_steps(), reverse=True):
      try:
        r = self.latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iter),
            meta=ocp.args.JsonRestore()))
        return r["state"], dict(r["meta"])
      except Exception as e:  # orbax, tensorstore and json raise many types
        if jax.process_index() == 0:
          print(f"warning: {root}/{step}: cannot restore this checkpoint ({_first_line(e)}); "
                "trying the one before", file=sys.stderr, flush=True)
    raise DataError(root, "no checkpoint here can be restored (see the warnings above); "
                    "move the folder away to start again")

  def best_meta(self) -> dict | None:
    step = self.best.latest_step()
    if step is None:
      return None
    return dict(self.best.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"])

  def close(self):
    self.latest.close()
    self.best.close()


@contextlib.contextmanager
def _storage_errors(folder: Path, step: int):
  """Turns a save that the storage refused (disk full, ...) into one DataError.

  Orbax writes into ``<step>.orbax-checkpoint-tmp`` and renames it only when
  complete, so the checkpoints already saved are untouched; the partial
  folder is removed so the space it took is given back.
  """
  errors.drop_closed_loop_reports()
  # Orbax's writer threads and asyncio also log the failure, a traceback each.
  loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
  for log in loggers:
    log.addFilter(_drop_storage_failures)
  try:
    yield
  except Exception as e:  # orbax and tensorstore wrap OS errors in many types
    cause = errors.storage_cause(e)
    if cause is None:
      raise
    for tmp in Path(folder).glob(f"{step}.orbax-checkpoint-tmp*"):
      shutil.rmtree(tmp, ignore_errors=True)
    errors.quiet_shutdown()
    kept = saved_steps(folder)
    raise DataError(folder, (
        f"cannot save the checkpoint of step {step}: {cause}; "
        + (f"the checkpoints already saved (steps {', '.join(map(str, kept))}) are intact"
           if kept else "no earlier checkpoint here"))) from e
  # Kept on failure: the threads may still be logging while the program exits.
  for log in loggers:
    log.removeFilter(_drop_storage_failures)


def _drop_storage_failures(record: logging.LogRecord) -> bool:
  """False for log records about a storage failure (reported once, by us)."""
  exc = record.exc_info[1] if record.exc_info else None
  return (errors.storage_cause(Exception(record.getMessage())) is None
          and (exc is None or errors.storage_cause(exc) is None))


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def _jsonable(obj):
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, (np.generic, jax.Array)):
    return np.asarray(obj).item()
  return obj


def saved_steps(folder: str | os.PathLike) -> list[int]:
  """The steps saved in an orbax folder (``checkpoints/latest`` or ``best``), sorted.

  Unfinished saves (orbax's temporary folders) have no plain number as name.
  """
  folder = Path(folder)
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) \
      if folder.is_dir() else []


def newest_step(folder: str | os.PathLike) -> int | None:
  """The most recently written step of ``folder`` (None when it holds none).

  Two bests exist only after a kill inside ``save_best``, and then the newer
  one is the new best even when its step is lower (a resumed run).
  """
  folder = Path(folder)
  steps = saved_steps(folder)
  if not steps:
    return None
  return max(steps, key=lambda st: ((folder / str(st)).stat().st_mtime_ns, st))


def load_for_inference(workdir: str | os.PathLike, which: str = "best"
                       ) -> tuple[dict, dict]:
  """Variables (params, batch_stats) and meta of a trained workdir.

  ``which="best"`` falls back to the latest checkpoint when no best exists
  (a run too short to have validated).
  """
  root = Path(workdir) / "checkpoints"
  for name in ((which, "latest") if which == "best" else (which,)):
    d = root / name
    if not d.exists():
      continue
    mngr = ocp.CheckpointManager(
        d.absolute(), item_names=("state", "meta"),
        item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                           meta=ocp.JsonCheckpointHandler()),
        options=ocp.CheckpointManagerOptions(read_only=True))
    step = newest_step(d)
    if step is None:
      continue
    try:
      r = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax, tensorstore and json raise many types
      raise DataError(d / str(step), f"cannot restore this checkpoint "
                      f"({_first_line(e)})") from None
    state = r["state"]
    variables = {"params": state["params"]}
    if state.get("batch_stats"):
      variables["batch_stats"] = state["batch_stats"]
    return variables, dict(r["meta"])
  raise DataError(root, "no checkpoint found (train first with midog_jax.main)")


def load_pretrained(path: str | os.PathLike) -> dict:
  """Foreign or earlier weights as a nested dict, never through pickle.

  Accepts a ``.safetensors`` file (keys ``a/b/c``), a workdir, or an orbax
  checkpoint step folder.
  """
  p = Path(path)
  if p.suffix == ".safetensors":
    from safetensors.numpy import load_file
    if not p.exists():
      raise DataError(p, "pretrained weights file not found")
    try:
      flat = load_file(str(p))
    except Exception as e:  # safetensors raises several types for bad files
      raise DataError(p, f"not a valid safetensors file ({e})") from None
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
  if (p / "checkpoints").exists():
    variables, _ = load_for_inference(p, "latest")
    return variables
  if (p / "state").exists():
    tree = ocp.StandardCheckpointer().restore((p / "state").absolute())
    return {k: tree[k] for k in ("params", "batch_stats") if k in tree}
  raise DataError(p, "not a .safetensors file, a workdir or an orbax checkpoint")


def merge_pretrained(variables: dict, pretrained: dict) -> tuple[dict, list[str], list[str]]:
  """Copies every pretrained leaf whose path and shape match into ``variables``.

  Returns the merged variables and the lists of loaded and skipped paths, so
  the caller can report what was (not) initialised.
  """
  flat = traverse_util.flatten_dict(variables, sep="/")
  src = traverse_util.flatten_dict(pretrained, sep="/")
  loaded, skipped = [], []
  for k, v in src.items():
    if k in flat and tuple(flat[k].shape) == tuple(np.shape(v)):
      flat[k] = jax.numpy.asarray(v, flat[k].dtype)
      loaded.append(k)
    else:
      skipped.append(k)
  return traverse_util.unflatten_dict(flat, sep="/"), loaded, skipped
