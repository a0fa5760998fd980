"""Shared pieces of the pretrained-weights tests: torch on demand, random
torchvision models, conversion and loading, the parity measure.

torch is an optional extra: without it these tests skip, unless
``MIDOG_REQUIRE_TORCH=1`` (set by ``make test``, i.e. CI), where a missing
torch is a failure, so the parity tests can never silently stop running.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from midog_jax import checkpoint as ckpt_lib
from midog_jax import pretrained as pretrained_lib
from midog_jax import weights


def require_torch():
  """(torch, torchvision), one CPU thread; skip or fail when not installed."""
  try:
    import torch
    import torchvision
  except ImportError as e:
    if os.environ.get("MIDOG_REQUIRE_TORCH") == "1":
      pytest.fail(f"MIDOG_REQUIRE_TORCH=1 but torch/torchvision do not import ({e}); "
                  "pip install -e '.[torch]'", pytrace=False)
    pytest.skip("torch/torchvision not installed (pip install -e '.[torch]')",
                allow_module_level=True)
  torch.set_num_threads(1)
  return torch, torchvision


def randomize_norms(torch, model, seed: int = 0) -> None:
  """Random affine and running statistics in every BatchNorm/GroupNorm, so
  a converter that mixed them up (or dropped them) shows in the outputs."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for mod in model.modules():
      if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
        n = mod.weight.shape[0]
        mod.weight.copy_(0.5 + torch.rand(n, generator=g))
        mod.bias.copy_(0.2 * torch.randn(n, generator=g))
      if isinstance(mod, torch.nn.BatchNorm2d):
        n = mod.running_mean.shape[0]
        mod.running_mean.copy_(0.3 * torch.randn(n, generator=g))
        mod.running_var.copy_(0.5 + torch.rand(n, generator=g))


def convert(torch, model, arch: str, tmp_path: Path, **kwargs) -> Path:
  """Saves ``model``'s state dict as a .pth and converts it (the API)."""
  src = tmp_path / f"{arch}.pth"
  torch.save(model.state_dict(), src)
  out = tmp_path / f"{arch}.safetensors"
  weights.convert(arch, src, out, **kwargs)
  return out


def load(path: Path, flax_model, x_shape) -> tuple[dict, pretrained_lib.PretrainedMatch]:
  """A converted file loaded strictly into ``flax_model`` (abstract init)."""
  x = np.zeros(x_shape, np.float32)
  abstract = jax.eval_shape(lambda: flax_model.init(jax.random.key(0), x))
  m = pretrained_lib.match_pretrained(dict(abstract), ckpt_lib.load_pretrained(path),
                                      pretrained_lib.pretrained_header(path))
  return m.merged, m


def rel_err(ours, theirs) -> float:
  """max |ours - theirs| relative to the scale (max |theirs|) of the output."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-12))


def record(name: str, err: float) -> None:
  """Prints a measured parity error (and appends it to $MIDOG_PARITY_LOG)."""
  print(f"parity {name}: {err:.3g}")
  log = os.environ.get("MIDOG_PARITY_LOG")
  if log:
    with open(log, "a") as f:
      f.write(json.dumps({"name": name, "rel_err": err}) + "\n")


def nchw_to_nhwc(t) -> np.ndarray:
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))
