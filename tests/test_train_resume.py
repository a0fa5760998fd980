"""Training through the real CLI under faults: SIGKILL, SIGTERM and Ctrl-C, then resume.

Each run is a separate ``python -m midog_jax.main`` process on the tiny
synthetic set with the test-sized RetinaNet (``configs/retina.py:tiny``); the
resumed runs are compared with one uninterrupted run.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from support import REPO, cpu_env, logged_losses, run_training, train_cmd

pytestmark = pytest.mark.e2e


COMMON = ["--config.total_steps=8", "--config.checkpoint_every=3"]


@pytest.fixture(scope="module")
def ref_run(tiny_dataset, tmp_path_factory):
  """An uninterrupted run: its workdir and losses (the reference for resumes)."""
  work = tmp_path_factory.mktemp("ref") / "work"
  run_training(tiny_dataset, work, *COMMON)
  losses = logged_losses(work)
  assert sorted(losses) == list(range(1, 9))
  return work, losses


@pytest.fixture(scope="module")
def ref(ref_run) -> dict[int, float]:
  return ref_run[1]


def _wait_for(proc, path, what):
  deadline = time.time() + 300
  while not path.is_dir():
    assert proc.poll() is None, f"run ended before {what}"
    assert time.time() < deadline, f"no {what} appeared"
    time.sleep(0.05)


def test_sigkill_after_checkpoint_then_resume_matches(tiny_dataset, tmp_path, ref):
  common = COMMON

  work = tmp_path / "killed"
  # A short sleep per step gives the test time to kill after the first save.
  proc = subprocess.Popen(train_cmd(tiny_dataset, work, *common,
                                    "--config.debug_step_sleep=0.5"),
                          cwd=REPO, env=cpu_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    _wait_for(proc, work / "checkpoints" / "latest" / "3", "the first checkpoint")
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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_saves_and_resumes_identically(tiny_dataset, tmp_path,
                                                                ref, sig):
  work = tmp_path / "stopped"
  proc = subprocess.Popen(train_cmd(tiny_dataset, work, *COMMON,
                                    "--config.debug_step_sleep=0.5"),
                          cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    # After the first checkpoint (step 3), mid-way to the next one (step 6).
    _wait_for(proc, work / "checkpoints" / "latest" / "3", "the first checkpoint")
    time.sleep(0.6)
    sent = time.time()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err[-3000:]
  assert time.time() - sent < 30  # inside a preemption notice
  name = signal.Signals(sig).name
  lines = [l for l in err.splitlines() if l.startswith("stopped at step")]
  assert len(lines) == 1 and f"on {name}" in lines[0] and "run the same command" in lines[0]
  stopped_at = int(lines[0].split("stopped at step ")[1].split(" ")[0])
  assert 3 < stopped_at < 8
  assert "Traceback" not in err
  # The step it stopped at is saved (with the iterator state); no final evaluation.
  assert (work / "checkpoints" / "latest" / str(stopped_at) / "data").is_dir()
  assert not (work / "eval" / "summary.json").exists()
  if sig != signal.SIGTERM:
    return  # the same code path: one resume comparison is enough

  r = run_training(tiny_dataset, work, *COMMON)
  assert f"resumed from {work}/checkpoints at step {stopped_at}" in r.stdout
  resumed = logged_losses(work)
  np.testing.assert_allclose([resumed[s] for s in range(1, 9)],
                             [ref[s] for s in range(1, 9)], rtol=1e-5, atol=1e-6)
  assert (work / "eval" / "summary.json").exists()


def test_resume_with_a_changed_config_is_refused_before_writing(ref_run, tiny_dataset):
  work, _ = ref_run
  before = (work / "config.json").read_bytes()
  r = run_training(tiny_dataset, work, *COMMON, "--config.seed=5",
                   "--config.optimizer.lr=0.5", check=False)
  assert r.returncode == 1
  lines = r.stderr.strip().splitlines()
  assert lines[-1].startswith(f"error: {work}/config.json: this workdir was trained with "
                              "another config")
  assert "seed (was 0, now 5)" in lines[-1] and "optimizer.lr" in lines[-1]
  assert "Traceback" not in r.stderr
  assert (work / "config.json").read_bytes() == before
  assert not (work / ".lock").exists()


def test_device_augmentation_resumes_identically(tiny_dataset, tmp_path, ref):
  """data.augment_on='device': keys from (seed, step, example), so a run resumed
  from its step-2 checkpoint re-logs the losses of the uninterrupted run (and
  the device path really changes the batches: not the host's losses)."""
  device = ["--config.data.augment_on=device", "--config.checkpoint_every=2",
            "--config.keep_checkpoints=2", "--config.total_steps=4"]
  straight = tmp_path / "straight"
  run_training(tiny_dataset, straight, *device)
  a = logged_losses(straight)
  assert sorted(a) == [1, 2, 3, 4]
  # The same workdir as if the run had been killed after saving step 2
  # (one training process fewer than running to 2 and resuming).
  split = tmp_path / "split"
  shutil.copytree(straight, split)
  shutil.rmtree(split / "checkpoints" / "latest" / "4")
  logged_before = len((split / "metrics.jsonl").read_text().splitlines())
  r = run_training(tiny_dataset, split, *device)
  assert "resumed from" in r.stdout and "at step 2" in r.stdout
  lines = (split / "metrics.jsonl").read_text().splitlines()
  assert sum('"loss"' in line for line in lines[logged_before:]) == 2  # steps 3 and 4 redone
  b = logged_losses(split)  # the last logged loss per step: the resumed run's
  np.testing.assert_allclose([b[s] for s in range(1, 5)], [a[s] for s in range(1, 5)],
                             rtol=1e-5, atol=1e-6)
  assert not np.allclose([a[s] for s in range(1, 5)], [ref[s] for s in range(1, 5)])
