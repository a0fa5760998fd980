"""The image-level classifier as a method (``config.method = "image_level"``).

``config.image_level.round`` picks the implementation: 1 is
``image_level.round1.Round1`` (frozen sliding-window features, dense head,
random forest, ensemble; trained by its ``fit`` hook), 2 is
``image_level.finetune.Finetune`` (EfficientNet fine-tuned end to end through
the shared loop, with its own data and evaluation hooks). Both follow the
SOFTEC AIC'24 write-up (Irfan, SPADES team C).
"""

from __future__ import annotations


def DETECTOR(config):  # pylint: disable=invalid-name
  """The round-1 or round-2 method of ``config``."""
  rnd = int(config.image_level.round)
  if rnd == 1:
    from midog_jax.image_level.round1 import Round1  # pylint: disable=g-import-not-at-top
    return Round1(config)
  if rnd == 2:
    from midog_jax.image_level.finetune import Finetune  # pylint: disable=g-import-not-at-top
    return Finetune(config)
  raise ValueError(f"image_level.round must be 1 or 2, got {rnd}")
