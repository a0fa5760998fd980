"""The demo runs from a non-editable install of the package, outside the checkout.

The package is installed (pip, not editable) into a fresh virtual environment (its
dependencies come from the project's environment through a ``.pth`` file, so
nothing is downloaded); ``python -m midog_jax.demo`` then runs from a folder
outside the repository, where only the installed package can be imported. An
installed package that needed the repository (the old repo-root ``configs``
import) fails here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from support import REPO, cpu_env

pytestmark = pytest.mark.e2e


def _run(cmd, cwd, env=None, timeout=900):
  r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
  return r


def test_demo_from_an_installed_package(tmp_path):
  # Built from a copy, so the build leaves nothing in the checkout.
  src = tmp_path / "src"
  shutil.copytree(REPO / "midog_jax", src / "midog_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  shutil.copy(REPO / "setup.py", src / "setup.py")
  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
  py = venv / "bin" / "python"
  site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   cwd=tmp_path).stdout.strip())
  # A regular (not editable) install into the new environment's site-packages.
  _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
        "--no-build-isolation", "--target", str(site), str(src)], cwd=tmp_path)
  # Dependencies from the project's environment; a path added by a .pth line
  # does not run the .pth files in it, so the checkout's editable hook stays off.
  (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

  outside = tmp_path / "elsewhere"
  outside.mkdir()
  where = _run([str(py), "-c", "import midog_jax; print(midog_jax.__file__)"],
               cwd=outside).stdout.strip()
  assert Path(where).is_relative_to(site), where  # the installed copy, not the checkout
  _run([str(py), "-m", "midog_jax.demo", "--out", "demo", "--preset", "tiny",
        "--steps", "2"], cwd=outside, env=cpu_env())
  result = json.loads((outside / "demo" / "demo_result.json").read_text())
  # The benchmark's rows: the trained detector and the baseline, with the
  # unseen scanners scored apart from the training scanners' held-out images.
  assert set(result["f1"]) == {"retinanet", "blue_ratio"}
  groups = result["per_group"]["retinanet"]
  assert set(groups) == {"held-out images of the training domains", "unseen domains"}
  assert {"3D Histech", "Zeiss Axioscan Z1"} <= set(result["per_domain"]["retinanet"])
  assert all(0.0 <= v <= 1.0 for v in groups.values())
  assert 0.0 < result["human_f1"] < 1.0
  assert (outside / "demo" / "leaderboard.md").exists()
