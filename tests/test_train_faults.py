"""Training through the real CLI under faults: SIGKILL, SIGTERM and Ctrl-C + resume, the NaN guard.

Each run is a separate ``python -m midog_jax.main`` process (so emulated
device counts can differ), on the tiny synthetic set with the test-sized
RetinaNet (``configs/retina.py:tiny``). Two files, so the two test workers
take the long runs in parallel.
"""

from __future__ import annotations

import signal
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from midog_jax import checkpoint as ckpt_lib
from support import REPO, cpu_env, logged_losses, run_training, train_cmd

pytestmark = pytest.mark.e2e


COMMON = ["--config.total_steps=8", "--config.checkpoint_every=3"]


@pytest.fixture(scope="module")
def ref(tiny_dataset, tmp_path_factory) -> dict[int, float]:
  """Losses of an uninterrupted run, the reference for every resumed one."""
  work = tmp_path_factory.mktemp("ref") / "work"
  run_training(tiny_dataset, work, *COMMON)
  losses = logged_losses(work)
  assert sorted(losses) == list(range(1, 9))
  return losses


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


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_dataset, tmp_path):
  work = tmp_path / "nan"
  r = run_training(tiny_dataset, work, "--config.total_steps=30",
                   "--config.checkpoint_every=1", "--config.optimizer.lr=1e30",
                   "--config.keep_checkpoints=30", check=False)
  assert r.returncode == 3, r.stderr[-3000:]
  assert "non-finite loss at step" in r.stderr
  bad_step = int(r.stderr.split("non-finite loss at step ")[1].split(";")[0])
  steps = sorted(int(p.name) for p in (work / "checkpoints" / "latest").iterdir()
                 if p.name.isdigit())
  assert steps and max(steps) < bad_step
  # The kept checkpoint still loads.
  variables, meta = ckpt_lib.load_for_inference(work, "latest")
  assert "params" in variables and "config" in meta


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

  r = run_training(tiny_dataset, work, *COMMON)
  assert f"resumed from {work}/checkpoints at step {stopped_at}" in r.stdout
  resumed = logged_losses(work)
  np.testing.assert_allclose([resumed[s] for s in range(1, 9)],
                             [ref[s] for s in range(1, 9)], rtol=1e-5, atol=1e-6)
  assert (work / "eval" / "summary.json").exists()


def _non_finite_checkpoints(work) -> list[str]:
  """The saved checkpoints (latest and best) holding non-finite parameters."""
  bad = []
  for which in ("latest", "best"):
    folder = work / "checkpoints" / which
    for step in (p for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else ():
      tree = ocp.StandardCheckpointer().restore((step / "state").absolute())
      if not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree["params"])):
        bad.append(f"{which}/{step.name}")
  return bad


def test_non_finite_parameters_are_never_saved(tiny_dataset, tmp_path):
  # lr 1e39: the first update overflows the parameters (a float32 holds
  # < 3.4e38) while the loss of that step was still finite, so only a check
  # of the parameters catches it. Validation every step, logging every 10.
  work = tmp_path / "overflow"
  r = run_training(tiny_dataset, work, "--config.total_steps=6", "--config.checkpoint_every=1",
                   "--config.eval_every=1", "--config.log_every=10",
                   "--config.data.val_fraction=0.5", "--config.optimizer.lr=1e39",
                   "--config.keep_checkpoints=10", check=False)
  assert r.returncode == 3, r.stderr[-3000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in r.stderr
  assert "non-finite parameters at step 1" in errors[0]
  assert _non_finite_checkpoints(work) == []
