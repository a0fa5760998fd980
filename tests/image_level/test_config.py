"""configs/image_level.py: the contract keys, every documented argument builds its method."""

from __future__ import annotations

import pytest

from midog_jax import config_files, detectors
from midog_jax.image_level.finetune import Finetune
from midog_jax.image_level.round1 import Round1

ARGS = ["", "quick", "tiny", "quick,tiny", "round=2", "round=2,stage=b", "round=2,quick",
        "round=2,stage=b,tiny", "source=csv", "domains=Aperio CS2"]


@pytest.mark.parametrize("arg", ARGS)
def test_every_argument_builds_the_method(arg):
  c = config_files.get_config("image_level", arg)
  assert c.method == "image_level" and c.data.root == "" and c.init_from == ""
  assert isinstance(c.total_steps, int) and c.total_steps > 0 and c.batch_size > 0
  for key in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
              "optimizer", "eval", "model", "best_metric"):
    assert key in c, key
  det = detectors.build(c)
  assert det.name == "image_level"
  assert isinstance(det, Round1 if c.image_level.round == 1 else Finetune)


def test_seed_defaults():
  r1 = config_files.get_config("image_level", "")
  il = r1.image_level
  assert r1.model.variant == "b0" and il.field_area_mm2 == 0.237
  assert (il.window, il.window_stride) == (224, 112)
  assert dict(il.dense) == dict(hidden=128, dropout=0.6, l1=0.2, l2=0.03, out_l1=0.01,
                                out_l2=0.01, lr=1e-3, epochs=30, batch_size=32)
  assert il.forest.trees == 900 and il.forest.bootstrap is False
  a = config_files.get_config("image_level", "round=2")
  b = config_files.get_config("image_level", "round=2,stage=b")
  assert a.model.variant == "b4" and a.image_level.image_px == 512
  assert (a.model.train_layers, b.model.train_layers) == ("head", "all")
  assert b.optimizer.lr < a.optimizer.lr


@pytest.mark.parametrize("arg", ["round=3", "stage=c", "qiuck"])
def test_bad_arguments_raise(arg):
  with pytest.raises(ValueError):
    config_files.get_config("image_level", arg)


def test_domains_restrict_training_and_validation_only(tiny_dataset):
  from midog_jax.errors import DataError
  from midog_jax.image_level import datasets
  sets = datasets.load_sets(_with_root("tiny,domains=Aperio CS2", tiny_dataset))
  assert {it.domain for it in sets.train} == {"Aperio CS2"}
  assert {it.domain for it in sets.heldout["heldout_domain"]} == {"Leica GT450"}
  every = datasets.load_sets(_with_root("tiny", tiny_dataset))
  assert len(every.train) > len(sets.train)
  with pytest.raises(DataError, match="Nowhere"):
    datasets.load_sets(_with_root("tiny,domains=Nowhere", tiny_dataset))


def _with_root(arg, root):
  c = config_files.get_config("image_level", arg)
  c.data.root = str(root)
  return c
