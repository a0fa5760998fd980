"""Converted torchvision ResNets and EfficientNets compute what torchvision does.

Real torchvision models with random weights (``weights=None``) and random
BatchNorm statistics, saved, converted with ``midog_jax.weights`` and loaded
strictly; eval-mode outputs must agree to 1e-4 of their scale in float32.
ResNet-18 also takes one training step: BatchNorm statistics (torch momentum
0.1, unbiased running variance) must move identically.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from weights_helpers import (convert, load, nchw_to_nhwc, randomize_norms, record,
                             rel_err, require_torch)

from midog_jax.models import efficientnet as effnet_lib
from midog_jax.models import resnet as resnet_lib

torch, torchvision = require_torch()
TOL = 1e-4


def _torch_resnet_features(model, x):
  y = model.maxpool(model.relu(model.bn1(model.conv1(x))))
  out = {}
  for i in range(1, 5):
    y = getattr(model, f"layer{i}")(y)
    out[f"C{i + 1}"] = y
  return out


# 72 px: C5 is 3x3 after ceil-halving odd sizes (36, 18, 9, 5, 3).
@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_resnet_features_match_torchvision(arch, tmp_path):
  torch.manual_seed(0)
  tv = getattr(torchvision.models, arch)(weights=None).eval()
  randomize_norms(torch, tv, seed=1)
  path = convert(torch, tv, arch, tmp_path)
  x = torch.randn(2, 3, 72, 72, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    want = _torch_resnet_features(tv, x)
  norms = ["batch", "frozen"] if arch == "resnet18" else ["batch"]
  for norm in norms:
    model = resnet_lib.resnet(arch, norm=norm)
    variables, m = load(path, model, (1, 72, 72, 3))
    assert m.ok and not m.reinit, m.problem()
    # The ImageNet classifier is not part of the backbone: named, not loaded.
    assert sorted(m.dropped) == ["params/fc/bias", "params/fc/kernel"]
    got = jax.jit(lambda v, x: model.apply(v, x, train=False))(
        variables, nchw_to_nhwc(x))
    for level in ("C2", "C3", "C4", "C5"):
      err = rel_err(got[level], nchw_to_nhwc(want[level]))
      record(f"{arch} {level} ({norm} norm)", err)
      assert err <= TOL, (arch, norm, level, err)


def test_resnet18_one_training_step_moves_batchnorm_statistics_as_torch(tmp_path):
  torch.manual_seed(0)
  tv = torchvision.models.resnet18(weights=None)
  randomize_norms(torch, tv, seed=3)
  path = convert(torch, tv, "resnet18", tmp_path)
  model = resnet_lib.resnet("resnet18", norm="batch")
  variables, m = load(path, model, (1, 64, 64, 3))
  assert m.ok
  # Batch 4 at 64 px: layer4 normalises over only 4 * 2 * 2 values per
  # channel, where the unbiased running variance (x 16/15) matters.
  x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(4))
  tv.train()
  with torch.no_grad():
    want = _torch_resnet_features(tv, x)
  got, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, nchw_to_nhwc(x))
  err = rel_err(got["C5"], nchw_to_nhwc(want["C5"]))
  record("resnet18 train-mode C5", err)
  assert err <= TOL
  sd = tv.state_dict()
  header_sources = _sources(path)
  worst, checked = 0.0, 0
  after, before = _flatten(upd["batch_stats"]), _flatten(variables["batch_stats"])
  for ours, theirs in header_sources.items():
    if ours.startswith("batch_stats/"):
      key = ours[len("batch_stats/"):]
      moved = rel_err(before[key], sd[theirs].numpy())
      assert moved > 1e-3, f"{ours} did not move in torch: the test proves nothing"
      worst, checked = max(worst, rel_err(after[key], sd[theirs].numpy())), checked + 1
  record("resnet18 BN running stats after one train step", worst)
  assert checked == 40 and worst <= TOL, (checked, worst)


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = np.asarray(v)
  return out


def _sources(path):
  from midog_jax.pretrained import pretrained_header
  return pretrained_header(path)["sources"]


@pytest.mark.parametrize("variant", ["b0", "b4"])
def test_efficientnet_features_and_logits_match_torchvision(variant, tmp_path):
  arch = f"efficientnet_{variant}"
  torch.manual_seed(0)
  tv = getattr(torchvision.models, arch)(weights=None).eval()
  randomize_norms(torch, tv, seed=5)
  path = convert(torch, tv, arch, tmp_path)
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
  with torch.no_grad():
    feats = torch.flatten(tv.avgpool(tv.features(x)), 1)
    logits = tv(x)
  xs = nchw_to_nhwc(x)
  for num_classes, want in ((0, feats), (1000, logits)):
    model = effnet_lib.EfficientNet(variant, num_classes=num_classes)
    variables, m = load(path, model, (1, 64, 64, 3))
    assert m.ok and not m.reinit, m.problem()
    assert len(m.dropped) == (2 if num_classes == 0 else 0)
    got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, xs)
    assert got.shape == (2, num_classes or effnet_lib.FEATURES[variant])
    err = rel_err(got, want.numpy())
    record(f"{arch} {'logits' if num_classes else 'features'}", err)
    assert err <= TOL, (arch, num_classes, err)
