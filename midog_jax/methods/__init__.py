"""Detection methods: the model-specific pieces the shared training loop calls.

A method object provides ``init_variables``, ``trainable_mask``, ``loss`` and
``make_tile_fn`` (see ``retina.RetinaMethod``); ``build(config)`` picks one by
``config.method``.
"""

from __future__ import annotations


def build(config):
  """The method named by ``config.method``."""
  if config.method == "retinanet":
    from midog_jax.methods.retina import RetinaMethod
    return RetinaMethod(config)
  raise ValueError(f"unknown method {config.method!r} (known: retinanet)")
