"""Direct tests of ``midog_jax/checkpoint.py`` with real orbax checkpoints on disk.

``Checkpoints``: save / restore of the train state, the JSON meta and a real
grain iterator (the restored iterator continues where the saved one was),
``keep`` pruning, the single best checkpoint. ``load_for_inference``: best
with fallback to latest, ``DataError`` without checkpoints.
``load_pretrained``: ``.safetensors`` files (nested dict; a corrupt or
missing file is a one-line ``DataError``), workdirs and orbax step folders.
``merge_pretrained``: name+shape matching, skipped lists, target dtypes kept.
"""

from __future__ import annotations

import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import save_file

from midog_jax import checkpoint as ckpt_lib
from midog_jax import optim
from configs import common
from midog_jax.data import pipeline
from midog_jax.errors import DataError


def _state(seed: float = 0.0, step: int = 7):
  """A train state shaped like the trainer's, with a real Adam opt_state."""
  params = {"conv": {"kernel": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) + seed},
            "dense": {"bias": jnp.full((4,), 0.5 + seed, jnp.float32)}}
  batch_stats = {"bn": {"mean": jnp.array([1.0, 2.0, 3.0]) + seed,
                        "var": jnp.array([4.0, 5.0, 6.0]) * (1 + seed)}}
  tx, _ = optim.make_optimizer(common.optimizer_config("adam", 1e-3), 100)
  opt_state = tx.init(params)
  # A non-trivial optimizer state: one real update.
  grads = jax.tree.map(lambda p: p * 0.1 + 1.0, params)
  _, opt_state = tx.update(grads, opt_state, params)
  return dict(step=jnp.int32(step), params=params, batch_stats=batch_stats,
              opt_state=opt_state)


def _abstract():
  """What the trainer passes to restore: a freshly initialised state."""
  return jax.tree.map(jnp.zeros_like, _state(seed=0.0, step=0))


def _iterator():
  """A real checkpointable grain iterator, built as the trainer builds one."""
  return pipeline.make_iterator(grain.MapDataset.range(100).batch(4))


def _assert_same_tree(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.asarray(g).dtype == np.asarray(w).dtype
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _steps_on_disk(folder: Path) -> list[int]:
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


@pytest.fixture
def ckpts(tmp_path):
  c = ckpt_lib.Checkpoints(tmp_path, keep=2)
  yield c
  c.close()


# --------------------------------------------------------------------------
# Checkpoints.


def test_save_then_restore_latest_round_trips_state_meta_and_iterator(tmp_path, ckpts):
  assert ckpts.latest_step() is None
  state = _state(seed=1.0)
  it = _iterator()
  next(it), next(it)                      # consumed batches 0 and 1
  meta = dict(f1=np.float32(0.75), threshold=jnp.float32(0.5), best=dict(step=7),
              levels=(3, 4, 5))
  ckpts.save(7, state, it, meta)
  want_next = [np.asarray(next(it)) for _ in range(2)]   # what the original gives next
  np.testing.assert_array_equal(want_next[0], [8, 9, 10, 11])
  ckpts.close()

  # A new process: fresh Checkpoints, fresh iterator at the start.
  again = ckpt_lib.Checkpoints(tmp_path, keep=2)
  try:
    assert again.latest_step() == 7
    fresh = _iterator()
    restored, got_meta = again.restore_latest(_abstract(), fresh)
  finally:
    again.close()
  _assert_same_tree(restored, state)
  assert int(restored["step"]) == 7
  assert got_meta == dict(f1=0.75, threshold=0.5, best=dict(step=7), levels=[3, 4, 5])
  for w in want_next:
    np.testing.assert_array_equal(np.asarray(next(fresh)), w)


def test_restore_latest_picks_the_newest_save(ckpts):
  it = _iterator()
  for step in (1, 2):
    next(it)
    ckpts.save(step, _state(seed=float(step), step=step), it, dict(step=step))
  restored, meta = ckpts.restore_latest(_abstract(), _iterator())
  assert int(restored["step"]) == 2 and meta == dict(step=2)
  _assert_same_tree(restored["params"], _state(seed=2.0)["params"])


def test_keep_limits_the_latest_steps_on_disk(tmp_path):
  c = ckpt_lib.Checkpoints(tmp_path, keep=2)
  try:
    it = _iterator()
    for step in (10, 20, 30, 40):
      next(it)
      c.save(step, _state(seed=step, step=step), it, {})
    assert c.latest.all_steps() == [30, 40]
    assert _steps_on_disk(tmp_path / "checkpoints" / "latest") == [30, 40]
  finally:
    c.close()
  c1 = ckpt_lib.Checkpoints(tmp_path / "one", keep=1)
  try:
    it = _iterator()
    for step in (1, 2, 3):
      c1.save(step, _state(step=step), it, {})
    assert _steps_on_disk(tmp_path / "one" / "checkpoints" / "latest") == [3]
  finally:
    c1.close()


def test_save_best_keeps_exactly_one_and_replaces_it(tmp_path, ckpts):
  assert ckpts.best_meta() is None
  ckpts.save_best(5, _state(seed=5.0, step=5), dict(f1=0.5))
  ckpts.save_best(8, _state(seed=8.0, step=8), dict(f1=0.7))
  best_dir = tmp_path / "checkpoints" / "best"
  assert _steps_on_disk(best_dir) == [8]
  assert ckpts.best_meta() == dict(f1=0.7)
  variables, meta = ckpt_lib.load_for_inference(tmp_path, "best")
  _assert_same_tree(variables["params"], _state(seed=8.0)["params"])
  assert meta == dict(f1=0.7)
  # After a resume from an earlier latest checkpoint the new best can have a
  # lower step than the old one: it still replaces it.
  ckpts.save_best(6, _state(seed=6.0, step=6), dict(f1=0.9))
  assert _steps_on_disk(best_dir) == [6]
  assert ckpts.best_meta() == dict(f1=0.9)
  # Best saves never touch the latest checkpoints.
  assert ckpts.latest_step() is None


def test_save_best_twice_at_the_same_step_replaces_it(tmp_path, ckpts):
  ckpts.save_best(10, _state(seed=1.0, step=10), dict(f1=0.5))
  ckpts.save_best(10, _state(seed=2.0, step=10), dict(f1=0.6))
  assert _steps_on_disk(tmp_path / "checkpoints" / "best") == [10]
  assert ckpts.best_meta() == dict(f1=0.6)
  variables, _ = ckpt_lib.load_for_inference(tmp_path, "best")
  _assert_same_tree(variables["params"], _state(seed=2.0)["params"])


# --------------------------------------------------------------------------
# load_for_inference.


def test_load_for_inference_best_falls_back_to_latest(tmp_path, ckpts):
  state = _state(seed=3.0)
  ckpts.save(7, state, _iterator(), dict(f1=0.25))
  assert (tmp_path / "checkpoints" / "best").exists()     # created, but empty
  variables, meta = ckpt_lib.load_for_inference(tmp_path, "best")
  assert set(variables) == {"params", "batch_stats"}
  _assert_same_tree(variables["params"], state["params"])
  _assert_same_tree(variables["batch_stats"], state["batch_stats"])
  assert meta == dict(f1=0.25)


def test_load_for_inference_best_falls_back_when_best_folder_is_missing(tmp_path, ckpts):
  import shutil
  state = _state(seed=4.0)
  ckpts.save(7, state, _iterator(), {})
  shutil.rmtree(tmp_path / "checkpoints" / "best")
  variables, _ = ckpt_lib.load_for_inference(tmp_path, "best")
  _assert_same_tree(variables["params"], state["params"])


def test_load_for_inference_chooses_best_or_latest(tmp_path, ckpts):
  ckpts.save(9, _state(seed=9.0, step=9), _iterator(), dict(which="latest"))
  ckpts.save_best(4, _state(seed=4.0, step=4), dict(which="best"))
  best, best_meta = ckpt_lib.load_for_inference(tmp_path, "best")
  latest, latest_meta = ckpt_lib.load_for_inference(tmp_path, "latest")
  _assert_same_tree(best["params"], _state(seed=4.0)["params"])
  _assert_same_tree(latest["params"], _state(seed=9.0)["params"])
  assert best_meta == dict(which="best") and latest_meta == dict(which="latest")
  # The default is "best".
  default, _ = ckpt_lib.load_for_inference(tmp_path)
  _assert_same_tree(default["params"], _state(seed=4.0)["params"])


def test_load_for_inference_without_batch_stats_returns_params_only(tmp_path, ckpts):
  state = dict(_state(), batch_stats={})
  ckpts.save(3, state, _iterator(), {})
  variables, _ = ckpt_lib.load_for_inference(tmp_path, "latest")
  assert set(variables) == {"params"}


def test_load_for_inference_without_checkpoints_raises_data_error(tmp_path):
  root = tmp_path / "checkpoints"
  with pytest.raises(DataError, match="checkpoints") as e:
    ckpt_lib.load_for_inference(tmp_path, "best")
  assert e.value.path == str(root)
  # Empty checkpoint folders (a run killed before its first save) too.
  ckpt_lib.Checkpoints(tmp_path).close()
  for which in ("best", "latest"):
    with pytest.raises(DataError) as e:
      ckpt_lib.load_for_inference(tmp_path, which)
    assert e.value.path == str(root)


# --------------------------------------------------------------------------
# load_pretrained.


def test_load_pretrained_safetensors_gives_the_nested_dict(tmp_path):
  flat = {"params/conv/kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
          "params/dense/bias": np.ones(4, np.float16),
          "batch_stats/bn/mean": np.array([1, 2, 3], np.int32)}
  path = tmp_path / "weights.safetensors"
  save_file(flat, str(path))
  got = ckpt_lib.load_pretrained(path)
  assert set(got) == {"params", "batch_stats"}
  assert set(got["params"]) == {"conv", "dense"}
  np.testing.assert_array_equal(got["params"]["conv"]["kernel"], flat["params/conv/kernel"])
  assert got["params"]["dense"]["bias"].dtype == np.float16
  np.testing.assert_array_equal(got["batch_stats"]["bn"]["mean"], [1, 2, 3])
  # A str path works too.
  assert set(ckpt_lib.load_pretrained(str(path))) == {"params", "batch_stats"}


def test_load_pretrained_corrupt_safetensors_is_a_one_line_data_error(tmp_path):
  path = tmp_path / "broken.safetensors"
  path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all} trailing")
  with pytest.raises(DataError) as e:
    ckpt_lib.load_pretrained(path)
  assert e.value.path == str(path)
  assert str(path) in str(e.value)
  assert "\n" not in str(e.value)
  assert e.value.__cause__ is None and e.value.__suppress_context__


def test_load_pretrained_missing_safetensors_is_a_data_error(tmp_path):
  path = tmp_path / "absent.safetensors"
  with pytest.raises(DataError, match="not found") as e:
    ckpt_lib.load_pretrained(path)
  assert e.value.path == str(path)


@pytest.mark.parametrize("kind", ["empty_dir", "npz_file", "missing_dir"])
def test_load_pretrained_unsupported_path_is_a_data_error(tmp_path, kind):
  path = {"empty_dir": tmp_path, "npz_file": tmp_path / "w.npz",
          "missing_dir": tmp_path / "nope"}[kind]
  if kind == "npz_file":
    np.savez(path, a=np.ones(3))
  with pytest.raises(DataError) as e:
    ckpt_lib.load_pretrained(path)
  assert e.value.path == str(path)


def test_load_pretrained_from_a_workdir_and_a_step_folder(tmp_path, ckpts):
  state = _state(seed=2.0)
  ckpts.save(7, state, _iterator(), {})
  from_workdir = ckpt_lib.load_pretrained(tmp_path)
  from_step = ckpt_lib.load_pretrained(tmp_path / "checkpoints" / "latest" / "7")
  for got in (from_workdir, from_step):
    assert "opt_state" not in got and "step" not in got
    _assert_same_tree(got["params"], state["params"])
    _assert_same_tree(got["batch_stats"], state["batch_stats"])


# --------------------------------------------------------------------------
# merge_pretrained.


def _target():
  return {"params": {"conv": {"kernel": jnp.zeros((2, 3), jnp.float32)},
                     "dense": {"bias": jnp.zeros((4,), jnp.float32)},
                     "half": {"w": jnp.zeros((2,), jnp.bfloat16)}},
          "batch_stats": {"bn": {"mean": jnp.zeros((3,), jnp.float32)}}}


def test_merge_pretrained_copies_matching_leaves_and_reports_the_rest():
  target = _target()
  pretrained = {
      "params": {"conv": {"kernel": np.arange(6, dtype=np.float64).reshape(2, 3)},
                 "dense": {"bias": np.ones((5,), np.float32)},          # shape mismatch
                 "head": {"w": np.ones((1,), np.float32)},              # unknown name
                 "half": {"w": np.array([1.5, -2.0], np.float32)}},
      "batch_stats": {"bn": {"mean": np.array([1, 2, 3], np.float16)}}}
  merged, loaded, skipped = ckpt_lib.merge_pretrained(target, pretrained)

  assert sorted(loaded) == ["batch_stats/bn/mean", "params/conv/kernel", "params/half/w"]
  assert sorted(skipped) == ["params/dense/bias", "params/head/w"]
  # Same tree as the target: nothing added, nothing removed, dtypes kept.
  assert jax.tree.structure(merged) == jax.tree.structure(target)
  for m, t in zip(jax.tree.leaves(merged), jax.tree.leaves(target)):
    assert m.dtype == t.dtype and m.shape == t.shape
  np.testing.assert_array_equal(merged["params"]["conv"]["kernel"],
                                np.arange(6).reshape(2, 3))
  np.testing.assert_array_equal(merged["params"]["half"]["w"].astype(np.float32),
                                [1.5, -2.0])
  np.testing.assert_array_equal(merged["batch_stats"]["bn"]["mean"], [1, 2, 3])
  # Skipped leaves keep the target's values.
  np.testing.assert_array_equal(merged["params"]["dense"]["bias"], np.zeros(4))
  # The caller's target is not modified.
  np.testing.assert_array_equal(target["params"]["conv"]["kernel"], np.zeros((2, 3)))


def test_merge_pretrained_with_nothing_matching_returns_the_target():
  target = _target()
  merged, loaded, skipped = ckpt_lib.merge_pretrained(
      target, {"other": {"x": np.ones(2)}})
  assert loaded == [] and skipped == ["other/x"]
  _assert_same_tree(merged, target)


def test_merge_pretrained_from_a_real_checkpoint(tmp_path, ckpts):
  """The trainer's init_from path: a workdir's params into a fresh model."""
  ckpts.save(7, _state(seed=5.0), _iterator(), {})
  fresh = {"params": _abstract()["params"], "batch_stats": _abstract()["batch_stats"]}
  merged, loaded, skipped = ckpt_lib.merge_pretrained(
      fresh, ckpt_lib.load_pretrained(tmp_path))
  assert skipped == [] and len(loaded) == 4
  _assert_same_tree(merged["params"], _state(seed=5.0)["params"])


def test_a_kill_inside_save_best_leaves_the_new_best_readable(tmp_path, ckpts):
  # A kill after the new best is complete but before the old one is deleted
  # leaves both; the newer must be read, even at a lower step (a resumed run).
  ckpts.save_best(8, _state(seed=8.0, step=8), dict(f1=0.7))
  time.sleep(0.01)  # distinct folder times
  best_dir = tmp_path / "checkpoints" / "best"
  keep_all = ckpt_lib._manager(best_dir, None, ("state", "meta"))  # no clean-up
  keep_all.save(6, args=ocp.args.Composite(
      state=ocp.args.StandardSave(_state(seed=6.0, step=6)),
      meta=ocp.args.JsonSave(dict(f1=0.9))), force=True)
  keep_all.wait_until_finished()
  assert _steps_on_disk(best_dir) == [6, 8]
  variables, meta = ckpt_lib.load_for_inference(tmp_path, "best")
  assert meta == dict(f1=0.9)
  _assert_same_tree(variables["params"], _state(seed=6.0)["params"])


def _damage(step_dir: Path, how: str) -> None:
  if how == "arrays":      # truncated array data
    for f in (step_dir / "state").rglob("*"):
      if f.is_file() and f.stat().st_size > 64 and "metadata" not in f.name:
        f.write_bytes(f.read_bytes()[:16])
  elif how == "meta":      # garbled meta JSON
    for f in (step_dir / "meta").rglob("*"):
      if f.is_file():
        f.write_text("{not json")
  elif how == "iterator":  # garbled data-iterator state
    for f in (step_dir / "data").rglob("*.json"):
      f.write_text("{not json")


@pytest.mark.parametrize("how", ["arrays", "meta", "iterator"])
def test_a_damaged_latest_step_falls_back_to_the_one_before(tmp_path, how, capsys):
  c = ckpt_lib.Checkpoints(tmp_path, keep=3)
  it = _iterator()
  c.save(10, _state(seed=10.0, step=10), it, dict(at=10))
  next(it)
  c.save(20, _state(seed=20.0, step=20), it, dict(at=20))
  c.close()
  _damage(tmp_path / "checkpoints" / "latest" / "20", how)
  again = ckpt_lib.Checkpoints(tmp_path, keep=3)
  state, meta = again.restore_latest(_state(), _iterator())
  again.close()
  assert meta == dict(at=10)
  _assert_same_tree(state["params"], _state(seed=10.0)["params"])
  err = capsys.readouterr().err
  assert err.count("cannot restore this checkpoint") == 1
  assert f"{tmp_path / 'checkpoints' / 'latest'}/20: cannot restore" in err


def test_no_restorable_step_is_one_error_and_predict_names_the_checkpoint(tmp_path):
  c = ckpt_lib.Checkpoints(tmp_path, keep=3)
  c.save(10, _state(seed=10.0, step=10), _iterator(), dict(at=10))
  c.close()
  _damage(tmp_path / "checkpoints" / "latest" / "10", "arrays")
  again = ckpt_lib.Checkpoints(tmp_path, keep=3)
  with pytest.raises(DataError, match="no checkpoint here can be restored"):
    again.restore_latest(_state(), _iterator())
  again.close()
  with pytest.raises(DataError) as e:
    ckpt_lib.load_for_inference(tmp_path, "latest")
  assert e.value.path.endswith("latest/10") and "cannot restore" in str(e.value)
  assert "\n" not in str(e.value)
