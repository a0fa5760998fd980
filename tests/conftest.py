"""Shared fixtures: the real annotation files and a generated tiny dataset.

Plain helper functions (subprocess runs) are in ``support.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# One persistent XLA compilation cache for the test session (and the training
# subprocesses it starts): the same tiny programs are compiled once, not in
# every process. Set before anything imports jax.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# One XLA thread per test process (support.ONE_THREAD): two pytest workers
# share two cores.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                      "intra_op_parallelism_threads=1")


def shared_midog_dir() -> Path:
  """Folder with the real MIDOG annotation files (``../shared/data/midog``)."""
  env = os.environ.get("MIDOG_SHARED_DATA")
  return Path(env) if env else REPO.parent / "shared" / "data" / "midog"


@pytest.fixture(scope="session")
def real_midog_dir() -> Path:
  d = shared_midog_dir()
  if not (d / "MIDOG.json").exists():
    pytest.skip(f"real annotation files not found in {d} (set MIDOG_SHARED_DATA)")
  return d


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
  """The synthetic ``tiny`` preset, generated once per test process."""
  from midog_jax.data import synthetic
  out = tmp_path_factory.mktemp("tiny")
  synthetic.generate(out, preset="tiny", seed=0, workers=1)
  return out


# The longest test files (measured), started first.
LONGEST_FIRST = ("test_train_parallel.py", "test_train_resume.py", "test_image_level_cli.py",
                 "test_train_from_converted.py", "test_search.py", "test_installed_demo.py",
                 "test_train_guards.py", "test_disk_full.py", "test_adapt.py")


def pytest_collection_modifyitems(config, items):
  """The longest files first, then the other end-to-end runs, then the rest.

  A stable sort (files stay together). With two xdist workers the long runs
  then start at once and the many short tests fill in around them, instead of
  one long run starting last while the other worker idles.
  """
  del config

  def key(item):
    name = item.path.name
    first = LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    return first, item.get_closest_marker("e2e") is None

  items.sort(key=key)
