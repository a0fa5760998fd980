"""Helpers for tests that run the project's command-line programs in subprocesses.

Importable from every test folder (``pytest.ini`` puts ``tests/`` on the path).
Fixtures live in ``conftest.py``; plain functions live here, so no test
imports ``conftest`` as a module.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_env(devices: int = 1, **extra: str) -> dict:
  """Environment for a CPU subprocess with ``devices`` emulated devices."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
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
