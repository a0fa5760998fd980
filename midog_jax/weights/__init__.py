"""Pretrained torchvision weights for the project's Flax models (converted offline).

  python -m midog_jax.weights list
  python -m midog_jax.weights convert --arch resnet50 --src resnet50-11ad3fa6.pth \
      --out r50.safetensors
  python -m midog_jax.weights inspect r50.safetensors

Nothing is downloaded at run time (clusters in hospitals are often offline):
``list`` says which torchvision file to fetch on a connected machine, and
``convert`` turns it into a safetensors file in the project's variable naming
(``params/...``, ``batch_stats/...``) with a JSON header (source architecture,
the source file's SHA-256, the expected input normalisation and fidelity
settings). ``config.init_from`` loads such a file strictly
(``checkpoint.match_pretrained``). Modules: ``io`` (reading sources, writing
outputs), ``mapping`` (torchvision names -> ours), ``archs`` (the supported
architectures), ``converter`` (conversion, inspection, the list).
"""

from __future__ import annotations

from midog_jax.weights.archs import ARCHS
from midog_jax.weights.converter import FORMAT, convert

__all__ = ["ARCHS", "FORMAT", "convert"]
