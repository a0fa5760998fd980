"""Training through the real CLI: the guards that stop a run before it does harm.

A NaN loss, non-finite parameters, a second run on a busy workdir and weights
that do not fit the model each stop with one line and the documented exit
code, leaving the workdir as it was.
"""

from __future__ import annotations

import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import save_file

from midog_jax import checkpoint as ckpt_lib
from support import REPO, cpu_env, run_module, run_training, train_cmd

pytestmark = pytest.mark.e2e


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


def test_a_second_run_on_a_busy_workdir_refuses_at_once(tiny_dataset, tmp_path):
  work = tmp_path / "busy"
  first = subprocess.Popen(train_cmd(tiny_dataset, work, "--config.total_steps=50",
                                     "--config.debug_step_sleep=1.0"),
                           cwd=REPO, env=cpu_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    while not (work / ".lock").exists():
      assert first.poll() is None and time.time() < deadline, "the first run never started"
      time.sleep(0.05)
    second = run_training(tiny_dataset, work, "--config.total_steps=50", check=False)
    assert first.poll() is None  # still running, untouched
  finally:
    first.kill()
    first.wait()
  assert second.returncode == 1
  assert second.stderr.strip().splitlines()[-1].startswith(
      f"error: {work}/.lock: the workdir is in use by pid {first.pid} on ")
  assert "Traceback" not in second.stderr


def test_init_from_weights_that_do_not_fit_is_refused(tiny_dataset, tmp_path):
  # A weight file whose names fit no parameter of the model must not
  # silently train from scratch.
  work = tmp_path / "foreign.safetensors"
  save_file({"backbone/conv1/kernel": np.zeros((7, 7, 3, 64), np.float32),
             "fc/bias": np.zeros(1000, np.float32)}, str(work))
  r = run_module("midog_jax.main", "--config=configs/p4_resnet.py:tiny",
                 f"--workdir={tmp_path / 'p4'}", f"--config.data.root={tiny_dataset}",
                 f"--config.init_from={work}", check=False)
  assert r.returncode == 1, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: {work}: ") and "match no parameter" in last
  assert "init_strict=False" in last
