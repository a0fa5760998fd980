"""Detection methods: the model-specific pieces the shared training loop calls.

A method object provides ``init_variables``, ``trainable_mask``, ``loss`` and
``make_tile_fn`` (see ``retina.RetinaMethod``, and ``p4.P4Method`` for seed
001's dense P4 ResNet); ``build(config)`` picks one by ``config.method``.
"""

from __future__ import annotations


def build(config):
  """The method named by ``config.method``."""
  if config.method == "retinanet":
    from midog_jax.methods.retina import RetinaMethod
    return RetinaMethod(config)
  if config.method == "p4":
    from midog_jax.methods.p4 import P4Method
    return P4Method(config)
  raise ValueError(f"unknown method {config.method!r} (known: retinanet, p4)")
