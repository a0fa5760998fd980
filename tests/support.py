"""Helpers for tests that run the project's command-line programs in subprocesses.

Importable from every test folder (``pytest.ini`` puts ``tests/`` on the path).
Fixtures live in ``conftest.py``; plain functions live here, so no test
imports ``conftest`` as a module.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


# Tests run on two pytest workers, each starting programs of its own: one
# XLA thread per program keeps them from fighting over the two cores.
ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def cpu_env(devices: int = 1, **extra: str) -> dict:
  """Environment for a CPU subprocess with ``devices`` emulated devices."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {ONE_THREAD}"
  env["JAX_PLATFORMS"] = "cpu"
  env.update(extra)
  return env


def run_module(module: str, *args: str, devices: int = 1, cwd: Path = REPO,
               timeout: float = 600, check: bool = True, env: dict | None = None
               ) -> subprocess.CompletedProcess:
  """``python -m <module> <args>`` on the CPU; asserts exit 0 when ``check``."""
  r = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd,
                     env=env or cpu_env(devices), capture_output=True, text=True,
                     timeout=timeout)
  if check:
    assert r.returncode == 0, (f"python -m {module} failed ({r.returncode}):\n"
                               f"{r.stderr[-4000:]}")
  return r


def train_workdir(config_arg: str, data: Path, workdir: Path, *overrides: str) -> Path:
  """Trains a workdir through the real CLI (``python -m midog_jax.main``)."""
  run_module("midog_jax.main", f"--config={config_arg}", f"--workdir={workdir}",
             f"--config.data.root={data}", *overrides)
  return workdir


def train_cmd(data, workdir, *overrides):
  """``python -m midog_jax.main`` on the tiny RetinaNet, logging every step."""
  return [sys.executable, "-m", "midog_jax.main", "--config=configs/retina.py:tiny",
          f"--workdir={workdir}", f"--config.data.root={data}",
          "--config.log_every=1", "--config.eval_every=1000",
          "--config.optimizer.schedule=constant", *overrides]


def run_training(data, workdir, *overrides, devices=1, check=True):
  """Runs :func:`train_cmd` on ``devices`` emulated CPU devices."""
  r = subprocess.run(train_cmd(data, workdir, *overrides), cwd=REPO, env=cpu_env(devices),
                     capture_output=True, text=True, timeout=600)
  if check and r.returncode != 0:
    raise AssertionError(f"training failed ({r.returncode}):\n{r.stderr[-4000:]}")
  return r


def logged_losses(workdir) -> dict[int, float]:
  """Last logged loss per step (a resumed run re-logs the steps it redoes)."""
  out = {}
  for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
    m = json.loads(line)
    if "loss" in m:
      out[m["step"]] = m["loss"]
  return out


@contextlib.contextmanager
def small_filesystem(path: Path, size: str = "64m"):
  """A real, size-limited file system (tmpfs) mounted at ``path``.

  Disk-full behaviour is tested on a disk that really fills up. Mounting
  needs root (or CAP_SYS_ADMIN); elsewhere the test is skipped, saying why.
  """
  import pytest  # pylint: disable=g-import-not-at-top
  path.mkdir(parents=True, exist_ok=True)
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                     capture_output=True, text=True)
  if r.returncode != 0:
    pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or r.returncode})")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


def fill_disk(folder: Path, leave_bytes: int) -> Path:
  """Fills ``folder``'s file system up to ``leave_bytes`` free; returns the ballast."""
  st = os.statvfs(folder)
  ballast = folder / "ballast"
  free = st.f_bavail * st.f_frsize
  with open(ballast, "wb") as f:
    # tmpfs allocates on write, not on truncate: write real bytes.
    chunk = b"\0" * (1 << 20)
    todo = max(free - leave_bytes, 0)
    while todo > 0:
      n = f.write(chunk[:min(todo, len(chunk))])
      todo -= n
  return ballast


def blob_image(h: int, w: int, pts, s: float = 1.5) -> np.ndarray:
  """(h, w, 3) uint8 grey image: a bright Gaussian blob (sigma ``s``) at each (x, y)."""
  yy, xx = np.mgrid[0:h, 0:w]
  v = np.zeros((h, w), np.float32)
  for x, y in pts:
    v = np.maximum(v, np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s)))
  g = (v * 250).astype(np.uint8)
  return np.stack([g, g, g], -1)


def local_max(img: np.ndarray, x: float, y: float, r: int = 4) -> np.ndarray:
  """Position (x, y) of the brightest pixel within ``r`` of (x, y)."""
  x, y = int(round(x)), int(round(y))
  win = img[max(y - r, 0):y + r + 1, max(x - r, 0):x + r + 1, 0].astype(int)
  j, i = np.unravel_index(np.argmax(win), win.shape)
  return np.array([max(x - r, 0) + i, max(y - r, 0) + j], float)


def marked_image(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Black (h, w, 3) uint8 image with one uniquely coloured pixel per point
  (corners, edges, random interior points), and the points (x, y)."""
  rng = np.random.default_rng(seed)
  pts = [(0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1), (5, 0), (0, 7)]
  while len(pts) < 14:
    p = (int(rng.integers(w)), int(rng.integers(h)))
    if p not in pts:
      pts.append(p)
  img = np.zeros((h, w, 3), np.uint8)
  for i, (x, y) in enumerate(pts):
    img[y, x] = (40 + 15 * i, 255, 255 - 15 * i)
  return img, np.asarray(pts, np.float32)
