"""Strict loading of pretrained files (``midog_jax.pretrained``), without torch.

Every array of the model must come from the file or fall under a named rule:
a backbone-only file in a detector (the rest freshly initialised), the
FrozenBatchNorm layout, class heads of another class count (re-initialised,
named). Anything else is a one-line error naming the arrays; a converted
file's fidelity settings must match the config.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from midog_jax import checkpoint as ckpt_lib
from midog_jax import config_files
from midog_jax import pretrained as pretrained_lib
from midog_jax.errors import DataError
from midog_jax.models import resnet as resnet_lib
from midog_jax.models import retinanet as retina_lib
from midog_jax.weights import io

HEADS = ["params/cls_head/out/kernel", "params/cls_head/out/bias"]


def _init(model, size=32, seed=0):
  x = jnp.zeros((1, size, size, 3))
  return jax.jit(lambda r: model.init(r, x))(jax.random.key(seed))


def _flat(tree):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _write(path, variables, **header):
  io.write_converted(path, _flat(variables), dict(format="test", **header))
  return path


def test_a_head_of_another_class_count_is_reinitialised_and_named(tmp_path):
  src = _init(retina_lib.retinanet_tiny(num_classes=3), seed=1)
  path = _write(tmp_path / "coco.safetensors", src, class_heads=HEADS)
  target = _init(retina_lib.retinanet_tiny(num_classes=1), seed=2)
  m = pretrained_lib.match_pretrained(target, ckpt_lib.load_pretrained(path),
                                      pretrained_lib.pretrained_header(path))
  assert m.ok and sorted(m.reinit) == sorted(HEADS)
  got, want_src, want_own = _flat(m.merged), _flat(src), _flat(target)
  for k in got:
    np.testing.assert_array_equal(got[k], want_own[k] if k in HEADS else want_src[k])
  assert any("re-initialised" in line and HEADS[0] in line for line in m.log_lines())
  # Without the header's rule the same head is an error, not a silent skip.
  plain = pretrained_lib.match_pretrained(target, ckpt_lib.load_pretrained(path), None)
  assert not plain.ok and set(plain.unmatched_file) == set(HEADS)


def test_a_backbone_file_loads_into_a_detector_backbone_in_the_frozen_layout(tmp_path):
  backbone = resnet_lib.resnet("resnet_tiny", norm="batch")
  src = _init(backbone, seed=3)
  flat = _flat(src)
  flat["params/fc/kernel"] = np.ones((64, 10), np.float32)  # an ImageNet classifier
  flat["params/fc/bias"] = np.ones((10,), np.float32)
  path = tmp_path / "r.safetensors"
  io.write_converted(path, flat, dict(backbone=True,
                                      class_heads=["params/fc/kernel", "params/fc/bias"]))
  target = _init(retina_lib.retinanet_tiny(norm="frozen"), seed=4)
  m = pretrained_lib.match_pretrained(target, ckpt_lib.load_pretrained(path),
                                      pretrained_lib.pretrained_header(path))
  assert m.ok, m.problem()
  assert sorted(m.dropped) == ["params/backbone/fc/bias", "params/backbone/fc/kernel"]
  assert m.fresh and all(k.split("/")[1] in ("fpn", "cls_head", "box_head") for k in m.fresh)
  got = _flat(m.merged)
  # The BatchNorm scale (a parameter in the file) is a frozen constant here.
  np.testing.assert_array_equal(got["batch_stats/backbone/bn1/scale"], flat["params/bn1/scale"])
  np.testing.assert_array_equal(got["batch_stats/backbone/layer1_0/bn2/mean"],
                                flat["batch_stats/layer1_0/bn2/mean"])
  np.testing.assert_array_equal(got["params/fpn/inner5/kernel"],
                                _flat(target)["params/fpn/inner5/kernel"])
  assert any("BatchNorm" in r for r in m.rules)


def test_unmatched_arrays_either_way_are_one_line_errors_unless_not_strict(tmp_path):
  cfg = config_files.get_config("retina", "tiny")
  target = _init(retina_lib.retinanet_tiny(), seed=5)
  flat = _flat(target)
  del flat["params/box_head/out/kernel"]          # missing from the file
  flat["params/extra/kernel"] = np.zeros(3, np.float32)  # unknown to the model
  path = tmp_path / "partial.safetensors"
  io.write_converted(path, flat, {})
  with pytest.raises(DataError) as e:
    pretrained_lib.load_into(target, path, cfg)
  msg = str(e.value)
  assert msg.startswith(f"{path}: ") and "\n" not in msg
  assert "1 of" in msg and "match no parameter" in msg and "params/extra/kernel" in msg
  assert "params/box_head/out/kernel" in msg and "init_strict=False" in msg
  cfg.init_strict = False
  merged, notes = pretrained_lib.load_into(target, path, cfg)
  assert any("params/extra/kernel" in n for n in notes)
  np.testing.assert_array_equal(_flat(merged)["params/box_head/out/kernel"],
                                _flat(target)["params/box_head/out/kernel"])


def test_fidelity_settings_of_the_header_are_checked_against_the_config(tmp_path):
  target = _init(retina_lib.retinanet_tiny(), seed=6)
  path = _write(tmp_path / "f.safetensors", target, fidelity={
      "model.norm": "frozen", "model.input_std": [0.229, 0.224, 0.225],
      "model.not_a_key_here": 1})
  cfg = config_files.get_config("retina", "tiny")
  with pytest.raises(DataError) as e:
    pretrained_lib.load_into(target, path, cfg)
  msg = str(e.value)
  assert "--config.model.norm=frozen" in msg and "input_std" not in msg
  assert "init_fidelity=False" in msg and "not_a_key_here" not in msg
  cfg.model.norm = "frozen"
  _, notes = pretrained_lib.load_into(target, path, cfg)
  assert not any("warning" in n for n in notes)
  cfg.model.norm, cfg.init_fidelity = "batch", False
  _, notes = pretrained_lib.load_into(target, path, cfg)
  assert any(n.startswith("warning") and "model.norm=frozen" in n for n in notes)


def test_pretrained_coco_config_sets_every_setting_the_converter_records():
  from midog_jax.weights import archs
  cfg = config_files.get_config("retina", "pretrained=coco")
  header = {"fidelity": archs.fidelity(archs.ARCHS["retinanet_resnet50_fpn_v2"])}
  assert pretrained_lib.fidelity_mismatches(header, cfg) == []
  header = {"fidelity": archs.fidelity(archs.ARCHS["resnet50"])}
  assert pretrained_lib.fidelity_mismatches(
      header, config_files.get_config("retina", "pretrained=imagenet")) == []
  assert [k for k, *_ in pretrained_lib.fidelity_mismatches(
      header, config_files.get_config("retina"))] == ["model.norm"]
