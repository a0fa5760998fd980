"""Atomic writes (fileio.py): all or nothing, the old file kept, usual permissions."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from midog_jax.fileio import atomic_output, atomic_path, write_json_atomic


def test_atomic_write_leaves_no_temp_files(tmp_path):
  target = tmp_path / "m.json"
  write_json_atomic({"a": 1}, target)
  assert json.loads(target.read_text()) == {"a": 1}
  # A failing write (NaN is not JSON) leaves the old file and no debris.
  with pytest.raises(ValueError):
    write_json_atomic({"a": float("nan")}, target)
  # A failure half-way through writing leaves the old file and no debris.
  with pytest.raises(RuntimeError):
    with atomic_output(target) as f:
      f.write('{"half": ')
      raise RuntimeError("disk full")
  assert json.loads(target.read_text()) == {"a": 1}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_atomic_path_for_writers_that_want_a_file_name(tmp_path):
  target = tmp_path / "sub" / "pool.npz"
  with atomic_path(target) as tmp:
    np.savez(tmp, x=np.arange(3))
  with np.load(target) as z:
    np.testing.assert_array_equal(z["x"], [0, 1, 2])
  # The temp name keeps the suffix (numpy would append ".npz" otherwise and
  # the rename would move an empty file).
  with atomic_path(tmp_path / "a.npz") as tmp:
    assert tmp.suffix == ".npz" and tmp.parent == tmp_path
    np.savez(tmp, y=np.ones(2))
  assert (tmp_path / "a.npz").stat().st_size > 0
  with pytest.raises(KeyError):
    with atomic_path(tmp_path / "b.npz") as tmp:
      np.savez(tmp, y=np.ones(2))
      raise KeyError("interrupted")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "sub"]


def test_files_get_the_permissions_of_a_plain_open(tmp_path):
  # mkstemp creates 0600 files; outputs must be readable like any other file.
  plain = tmp_path / "plain.txt"
  plain.write_text("x")
  write_json_atomic({}, tmp_path / "atomic.json")
  mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)
  assert mode(tmp_path / "atomic.json") == mode(plain)
