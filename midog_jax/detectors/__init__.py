"""Detectors: one module (or package) per method behind ``interface.Detector``.

``build(config)`` imports ``midog_jax.detectors.<config.method>`` and calls
its ``DETECTOR`` class with the config, so adding a detector is writing one
module that defines ``DETECTOR`` plus one config (``docs/architecture.md``).

  * ``retinanet``: RetinaNet, ResNet-50 FPN with torchvision v2 heads, focal
    loss (Lin et al. 2017; as applied to MIDOG by Sheta's MIDOG 2021 report).
  * ``p4``: dense P4 rotation-equivariant ResNet patch classifier (Lafarge &
    Koelzer, MIDOG 2022).
"""

from __future__ import annotations

import importlib
import pkgutil

from midog_jax.detectors.interface import Detector


def available() -> list[str]:
  """Names of the detector modules in this package (``config.method`` values)."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__)
                if m.name != "interface")


def build(config) -> Detector:
  """The detector named by ``config.method``, built from ``config``."""
  name = str(config.method)
  known = available()
  if name not in known:
    raise ValueError(f"unknown method {name!r} (known: {', '.join(known)})")
  module = importlib.import_module(f"{__name__}.{name}")
  detector = module.DETECTOR(config)
  if not isinstance(detector, Detector):
    raise TypeError(f"{module.__name__}.DETECTOR does not implement "
                    "midog_jax.detectors.interface.Detector")
  return detector
