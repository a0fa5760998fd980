"""Training through the real CLI under faults: SIGKILL + resume, the NaN guard.

Each run is a separate ``python -m midog_jax.main`` process (so emulated
device counts can differ), on the tiny synthetic set with the test-sized
RetinaNet (``configs/retina.py:tiny``). Two files, so the two test workers
take the long runs in parallel.
"""

from __future__ import annotations

import signal
import subprocess
import time

import numpy as np
import pytest

from midog_jax import checkpoint as ckpt_lib
from support import REPO, cpu_env, logged_losses, run_training, train_cmd

pytestmark = pytest.mark.e2e


def test_sigkill_after_checkpoint_then_resume_matches(tiny_dataset, tmp_path):
  common = ["--config.total_steps=8", "--config.checkpoint_every=3"]
  run_training(tiny_dataset, tmp_path / "ref", *common)
  ref = logged_losses(tmp_path / "ref")

  work = tmp_path / "killed"
  # A short sleep per step gives the test time to kill after the first save.
  proc = subprocess.Popen(train_cmd(tiny_dataset, work, *common,
                               "--config.debug_step_sleep=0.5"),
                          cwd=REPO, env=cpu_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while not (work / "checkpoints" / "latest" / "3").is_dir():
      assert proc.poll() is None, "run ended before its first checkpoint"
      assert time.time() < deadline, "no checkpoint appeared"
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL
  assert not (work / "eval" / "summary.json").exists()  # really interrupted
  killed_at = max(logged_losses(work))
  assert killed_at < 8

  r = run_training(tiny_dataset, work, *common)
  assert "resumed from" in r.stdout
  resumed = logged_losses(work)
  assert sorted(resumed) == list(range(1, 9))
  np.testing.assert_allclose([resumed[s] for s in range(1, 9)],
                             [ref[s] for s in range(1, 9)], rtol=1e-5, atol=1e-6)
  assert (work / "eval" / "summary.json").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_dataset, tmp_path):
  work = tmp_path / "nan"
  r = run_training(tiny_dataset, work, "--config.total_steps=30", "--config.checkpoint_every=1",
           "--config.optimizer.lr=1e30", "--config.keep_checkpoints=30", check=False)
  assert r.returncode == 3, r.stderr[-3000:]
  assert "non-finite loss at step" in r.stderr
  bad_step = int(r.stderr.split("non-finite loss at step ")[1].split(";")[0])
  steps = sorted(int(p.name) for p in (work / "checkpoints" / "latest").iterdir()
                 if p.name.isdigit())
  assert steps and max(steps) < bad_step
  # The kept checkpoint still loads.
  variables, meta = ckpt_lib.load_for_inference(work, "latest")
  assert "params" in variables and "config" in meta
