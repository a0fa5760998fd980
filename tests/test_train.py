"""Training through the real CLI: device-count invariance, SIGKILL + resume, NaN guard.

Each run is a separate ``python -m midog_jax.main`` process (so emulated
device counts can differ), on the tiny synthetic set with the test-sized
RetinaNet (``configs/retina.py:tiny``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from midog_jax import checkpoint as ckpt_lib

from support import REPO, cpu_env
# No xdist group: these runs share no module fixture, so the two workers
# take them in parallel.
pytestmark = pytest.mark.e2e


def _cmd(data, workdir, *overrides):
  return [sys.executable, "-m", "midog_jax.main", "--config=configs/retina.py:tiny",
          f"--workdir={workdir}", f"--config.data.root={data}",
          "--config.log_every=1", "--config.eval_every=1000",
          "--config.optimizer.schedule=constant", *overrides]


def _run(data, workdir, *overrides, devices=1, check=True):
  r = subprocess.run(_cmd(data, workdir, *overrides), cwd=REPO, env=cpu_env(devices),
                     capture_output=True, text=True, timeout=600)
  if check and r.returncode != 0:
    raise AssertionError(f"training failed ({r.returncode}):\n{r.stderr[-4000:]}")
  return r


def _losses(workdir) -> dict[int, float]:
  """Last logged loss per step (a resumed run re-logs the steps it redoes)."""
  out = {}
  for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
    m = json.loads(line)
    if "loss" in m:
      out[m["step"]] = m["loss"]
  return out


def test_four_devices_follow_the_one_device_loss_curve(tiny_dataset, tmp_path):
  steps = ["--config.total_steps=4", "--config.checkpoint_every=100",
           "--config.batch_size=4"]
  _run(tiny_dataset, tmp_path / "d1", *steps, devices=1)
  _run(tiny_dataset, tmp_path / "d4", *steps, devices=4)
  one, four = _losses(tmp_path / "d1"), _losses(tmp_path / "d4")
  assert sorted(one) == [1, 2, 3, 4] == sorted(four)
  np.testing.assert_allclose([four[s] for s in one], [one[s] for s in one],
                             rtol=2e-4, atol=1e-5)
  # The losses really move, so agreement is not agreement on constants.
  assert len({round(v, 4) for v in one.values()}) == 4


def test_sigkill_after_checkpoint_then_resume_matches(tiny_dataset, tmp_path):
  common = ["--config.total_steps=8", "--config.checkpoint_every=3"]
  _run(tiny_dataset, tmp_path / "ref", *common)
  ref = _losses(tmp_path / "ref")

  work = tmp_path / "killed"
  # A short sleep per step gives the test time to kill after the first save.
  proc = subprocess.Popen(_cmd(tiny_dataset, work, *common,
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
  killed_at = max(_losses(work))
  assert killed_at < 8

  r = _run(tiny_dataset, work, *common)
  assert "resumed from" in r.stdout
  resumed = _losses(work)
  assert sorted(resumed) == list(range(1, 9))
  np.testing.assert_allclose([resumed[s] for s in range(1, 9)],
                             [ref[s] for s in range(1, 9)], rtol=1e-5, atol=1e-6)
  assert (work / "eval" / "summary.json").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_dataset, tmp_path):
  work = tmp_path / "nan"
  r = _run(tiny_dataset, work, "--config.total_steps=30", "--config.checkpoint_every=1",
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


def test_two_processes_follow_the_one_process_loss_curve(tiny_dataset, tmp_path):
  """A real multi-host run: two local processes joined by jax.distributed (gloo)."""
  steps = ["--config.total_steps=3", "--config.checkpoint_every=3"]
  _run(tiny_dataset, tmp_path / "p1", *steps)
  env = cpu_env()
  env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
  cmd = _cmd(tiny_dataset, tmp_path / "p2", *steps)
  r = subprocess.run(["bash", str(REPO / "launch" / "local_multiprocess.sh"), "2",
                      str(tmp_path / "p2"), cmd[3], *cmd[5:]], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  one, two = _losses(tmp_path / "p1"), _losses(tmp_path / "p2")
  assert sorted(two) == [1, 2, 3]
  np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one],
                             rtol=2e-4, atol=1e-5)
  # Each process saved its own slice of the data-iterator state.
  data_dir = tmp_path / "p2" / "checkpoints" / "latest" / "3" / "data"
  assert {p.name for p in data_dir.glob("process_*")} == {
      "process_0-of-2.json", "process_1-of-2.json"}
