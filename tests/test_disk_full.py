"""A full disk: one line naming the path and the cause, earlier work intact.

On a real, small tmpfs that fills up (mounting needs root: skipped elsewhere,
saying so), and through the pieces that turn storage errors into that line.
"""

from __future__ import annotations

import errno
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midog_jax import checkpoint as ckpt_lib
from midog_jax import errors, fileio
from midog_jax.data import pipeline
from midog_jax.errors import DataError
from support import fill_disk, run_training, small_filesystem


# --------------------------------------------------------------------------
# Recognising a storage failure.

def test_storage_cause_reads_os_errors_tensorstore_messages_and_chains():
  assert errors.storage_cause(OSError(errno.ENOSPC, "No space left on device")) == (
      "no space left on device")
  assert errors.storage_cause(OSError(errno.EROFS, "x")) == "read-only file system"
  # tensorstore (under orbax) reports the OS error code inside a message.
  ts = ValueError('RESOURCE_EXHAUSTED: Error writing local file "a/b": Failed to write '
                  "54 bytes to file 24: No space left on device [os_error_code='28']")
  assert errors.storage_cause(ts) == "no space left on device"
  # ... wrapped by orbax in another exception.
  try:
    try:
      raise ts
    except ValueError as inner:
      raise RuntimeError("save failed") from inner
  except RuntimeError as outer:
    assert errors.storage_cause(outer) == "no space left on device"
  # Not storage problems: a program error keeps its traceback.
  assert errors.storage_cause(OSError(errno.ENOENT, "No such file")) is None
  assert errors.storage_cause(ValueError("os_error_code='2'")) is None
  assert errors.storage_cause(KeyError("x")) is None


def test_exit_code_turns_a_full_disk_into_one_line(capsys, monkeypatch):
  monkeypatch.delenv("MIDOG_TRACEBACK", raising=False)

  def full():
    raise OSError(errno.ENOSPC, "No space left on device", "/runs/w/config.json")

  assert errors.exit_code(full) == 1
  assert capsys.readouterr().err == "error: /runs/w/config.json: no space left on device\n"

  def other():
    raise OSError(errno.ENOENT, "No such file", "/x")

  with pytest.raises(FileNotFoundError):  # not the storage's fault: a traceback
    errors.exit_code(other)


def test_a_failed_atomic_write_names_the_target_and_leaves_it_untouched(tmp_path, monkeypatch):
  target = tmp_path / "config.json"
  target.write_text("old\n")

  def no_space(fd):
    raise OSError(errno.ENOSPC, "No space left on device")  # as a real flush does: no name

  monkeypatch.setattr(os, "fsync", no_space)
  with pytest.raises(OSError) as info:
    fileio.write_json_atomic({"new": 1}, target)
  assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
  assert target.read_text() == "old\n"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no temp left


# --------------------------------------------------------------------------
# On a disk that really fills up.

def _state(value: float):
  # Random values: a constant array compresses to almost nothing on disk.
  w = np.random.default_rng(int(value)).normal(size=(256, 256)).astype(np.float32)
  return dict(step=jnp.int32(0), params={"w": jnp.asarray(w + value)})


def test_a_checkpoint_save_on_a_full_disk_keeps_the_earlier_ones(tmp_path):
  with small_filesystem(tmp_path / "fs", "4m") as fs:
    it = pipeline.make_iterator(grain.MapDataset.range(10).batch(2))
    ckpts = ckpt_lib.Checkpoints(fs / "w", keep=3)
    ckpts.save(1, _state(1.0), it, {"step": 1})
    ballast = fill_disk(fs, 64 << 10)  # 64 KiB left; a save needs ~300 KiB
    with pytest.raises(DataError) as info:
      ckpts.save(2, _state(2.0), it, {"step": 2})
    msg = str(info.value)
    assert msg.startswith(f"{fs / 'w' / 'checkpoints' / 'latest'}: cannot save the checkpoint "
                          "of step 2: no space left on device")
    assert "steps 1) are intact" in msg and "\n" not in msg
    latest = fs / "w" / "checkpoints" / "latest"
    assert sorted(p.name for p in latest.iterdir()) == ["1"]  # partial folder removed
    ballast.unlink()
    state, meta = ckpts.restore_latest(jax.tree.map(jnp.zeros_like, _state(0.0)), it)
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]),
                                  np.asarray(_state(1.0)["params"]["w"]))
    assert meta["step"] == 1
    ckpts.close()


@pytest.mark.e2e
def test_training_on_a_disk_that_fills_up_stops_with_one_line(tiny_dataset, tmp_path):
  with small_filesystem(tmp_path / "fs", "64m") as fs:
    work = fs / "run"
    run_training(tiny_dataset, work, "--config.total_steps=4", "--config.checkpoint_every=2")
    latest = work / "checkpoints" / "latest"
    assert ckpt_lib.saved_steps(latest) == [2, 4]
    ballast = fill_disk(fs, 300 << 10)  # room for the logs, not for a checkpoint
    r = run_training(tiny_dataset, work, "--config.total_steps=8",
                     "--config.checkpoint_every=2", check=False)
    assert r.returncode == 1, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and len(lines) < 15, r.stderr[-3000:]
    assert lines[-1].startswith(f"error: {latest}: cannot save the checkpoint of step 6: "
                                "no space left on device"), lines[-1]
    assert sorted(p.name for p in latest.iterdir()) == ["2", "4"]
    # With space again, the run resumes from the last good save.
    ballast.unlink()
    r = run_training(tiny_dataset, work, "--config.total_steps=6",
                     "--config.checkpoint_every=2")
    assert "resumed from" in r.stdout and "at step 4" in r.stdout
    assert ckpt_lib.saved_steps(latest)[-1] == 6


@pytest.mark.e2e
def test_training_that_cannot_write_at_start_says_where(tiny_dataset, tmp_path):
  with small_filesystem(tmp_path / "fs", "1m") as fs:
    fill_disk(fs, 0)
    r = run_training(tiny_dataset, fs / "run", "--config.total_steps=2", check=False)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {fs / 'run'}") and last.endswith(
        ": no space left on device"), last
    # No lock file without a holder left behind to block the next run.
    assert not (fs / "run" / ".lock").exists()

