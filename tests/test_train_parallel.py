"""Training through the real CLI: the same loss curve on 1 or 4 devices and 1 or 2 processes.

Each run is a separate ``python -m midog_jax.main`` process (so emulated
device counts can differ), on the tiny synthetic set with the test-sized
RetinaNet (``configs/retina.py:tiny``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from support import REPO, cpu_env, logged_losses, run_training, train_cmd

pytestmark = pytest.mark.e2e


# Both tests compare against one single-device run of the same schedule.
STEPS = ["--config.total_steps=4", "--config.checkpoint_every=4", "--config.batch_size=4"]


@pytest.fixture(scope="module")
def one_device(tiny_dataset, tmp_path_factory) -> dict[int, float]:
  work = tmp_path_factory.mktemp("d1") / "work"
  run_training(tiny_dataset, work, *STEPS, devices=1)
  losses = logged_losses(work)
  assert sorted(losses) == [1, 2, 3, 4]
  # The losses really move, so agreement is not agreement on constants.
  assert len({round(v, 4) for v in losses.values()}) == 4
  return losses


def test_four_devices_follow_the_one_device_loss_curve(tiny_dataset, tmp_path, one_device):
  run_training(tiny_dataset, tmp_path / "d4", *STEPS, devices=4)
  four = logged_losses(tmp_path / "d4")
  assert sorted(four) == [1, 2, 3, 4]
  np.testing.assert_allclose([four[s] for s in one_device],
                             [one_device[s] for s in one_device], rtol=2e-4, atol=1e-5)


def test_two_processes_follow_the_one_process_loss_curve(tiny_dataset, tmp_path, one_device):
  """A real multi-host run: two local processes joined by jax.distributed (gloo)."""
  env = cpu_env()
  env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
  cmd = train_cmd(tiny_dataset, tmp_path / "p2", *STEPS)
  r = subprocess.run(["bash", str(REPO / "launch" / "local_multiprocess.sh"), "2",
                      str(tmp_path / "p2"), cmd[3], *cmd[5:]], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  two = logged_losses(tmp_path / "p2")
  assert sorted(two) == [1, 2, 3, 4]
  np.testing.assert_allclose([two[s] for s in one_device],
                             [one_device[s] for s in one_device], rtol=2e-4, atol=1e-5)
  # Each process saved its own slice of the data-iterator state.
  data_dir = tmp_path / "p2" / "checkpoints" / "latest" / "4" / "data"
  assert {p.name for p in data_dir.glob("process_*")} == {
      "process_0-of-2.json", "process_1-of-2.json"}
