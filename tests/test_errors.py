"""The project's error types: what survives a process boundary."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import pickle

import pytest

from midog_jax.errors import DataError


def test_data_error_crosses_a_process_pool_intact():
  # Workers (the candidate extraction, the generator) raise DataError in a child.
  e = pickle.loads(pickle.dumps(DataError("/x/a.tif", "corrupt TIFF header")))
  assert isinstance(e, DataError) and str(e) == "/x/a.tif: corrupt TIFF header"
  assert e.path == "/x/a.tif" and e.problem == "corrupt TIFF header"
  # spawn: forking a process that runs JAX's threads can deadlock.
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
    with pytest.raises(DataError, match="^/x/b.tif: bad$"):
      pool.submit(_raise_data_error, "/x/b.tif").result()


def _raise_data_error(path):
  raise DataError(path, "bad")
