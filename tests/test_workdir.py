"""Workdir guards (workdir.py): the lock and the resume-config check."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from midog_jax.errors import DataError
from midog_jax.workdir import (RESUMABLE_KEYS, WorkdirLock, check_resume_config,
                               config_differences)


def _dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_lock_refuses_a_second_holder_and_is_released(tmp_path):
  with WorkdirLock(tmp_path) as lock:
    assert lock.held and (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
    with pytest.raises(DataError, match=rf"in use by pid {os.getpid()} on"):
      with WorkdirLock(tmp_path):
        pass
    assert (tmp_path / ".lock").exists()  # the refused one did not remove it
  assert not (tmp_path / ".lock").exists()


def test_lock_of_a_dead_run_on_this_host_is_taken_over(tmp_path):
  (tmp_path / ".lock").write_text(f"{_dead_pid()} {socket.gethostname()}\n")
  with WorkdirLock(tmp_path):
    assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())


def test_lock_of_another_host_is_not_taken_over(tmp_path):
  # Its pid cannot be checked from here: refuse and say what to do.
  (tmp_path / ".lock").write_text(f"{_dead_pid()} some-other-host\n")
  with pytest.raises(DataError, match="delete this file"):
    with WorkdirLock(tmp_path):
      pass


def _workdir_with_checkpoint(tmp_path, config):
  (tmp_path / "checkpoints" / "latest" / "3").mkdir(parents=True)
  (tmp_path / "config.json").write_text(json.dumps(config))


def test_resume_with_another_config_is_refused_listing_the_keys(tmp_path):
  old = dict(seed=0, total_steps=10, model=dict(width=16, levels=[3, 4]), optimizer=dict(lr=0.1))
  _workdir_with_checkpoint(tmp_path, old)
  new = dict(old, seed=1, total_steps=20, model=dict(width=16, levels=[3, 4, 5]))
  with pytest.raises(DataError) as e:
    check_resume_config(tmp_path, new)
  msg = str(e.value)
  assert "seed (was 0, now 1)" in msg and "model.levels" in msg
  assert "total_steps" not in msg.split("these may change")[0]  # resumable
  assert "\n" not in msg


def test_resumable_keys_and_fresh_workdirs_pass(tmp_path):
  old = dict(seed=0, total_steps=10, log_every=5, eval=dict(tile_batch=4, tile_size=512))
  new = dict(old, total_steps=99, log_every=1, eval=dict(tile_batch=8, tile_size=512))
  assert config_differences(old, new) == []
  assert "eval.tile_batch" in RESUMABLE_KEYS
  assert config_differences(old, dict(old, eval=dict(tile_batch=4, tile_size=640))) == [
      "eval.tile_size (was 512, now 640)"]
  check_resume_config(tmp_path, dict(seed=5))  # nothing to resume: no check
  (tmp_path / "config.json").write_text(json.dumps(old))
  check_resume_config(tmp_path, dict(seed=5))  # a config but no checkpoint yet


def test_keys_added_later_count_as_their_old_behaviour():
  # A workdir saved before data.augment_on existed trained with host
  # augmentation: resuming it on the host is fine, on the device is not.
  old = {"data": {"patch_size": 256}, "seed": 0}
  same = {"data": {"patch_size": 256, "augment_on": "host"}, "seed": 0}
  other = {"data": {"patch_size": 256, "augment_on": "device"}, "seed": 0}
  assert config_differences(old, same) == []
  assert config_differences(old, other) == ["data.augment_on (was 'host', now 'device')"]
  # Region inference keys: absent means tiles, as before they existed.
  assert config_differences({"eval": {}}, {"eval": {"inference": "regions"}}, resumable=()) == [
      "eval.inference (was 'tiles', now 'regions')"]
  assert config_differences({"eval": {}}, {"eval": {"inference": "tiles"}}, resumable=()) == []
  # A key that is not listed as added stays a difference when absent.
  assert config_differences(old, {"data": {"patch_size": 256, "shift": 8}, "seed": 0}) == [
      "data.shift (was '<absent>', now 8)"]
