"""Optimisers and learning-rate schedules from the seeds.

* RetinaNet (Sheta's MIDOG 2021 report): Adam, constant learning rate 1e-4;
* P4 ResNet (Lafarge & Koelzer, MIDOG 2022): SGD with momentum, cosine *cyclic* learning rate (cosine decay
  restarted every ``cycle_steps``), weight decay.
Frozen parameters (``trainable_backbone_layers``) get exactly zero updates
and no optimizer state work through ``optax.multi_transform``.
"""

from __future__ import annotations

from typing import Any

import jax
import optax


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
  """Learning rate per step for ``cfg.schedule``."""
  lr = float(cfg.lr)
  if cfg.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, max(1, total_steps - cfg.warmup_steps))
  elif cfg.schedule == "cosine_cyclic":
    cycle = max(1, int(cfg.cycle_steps))
    main = lambda step: optax.cosine_decay_schedule(lr, cycle)(step % cycle)
  else:
    raise ValueError(f"unknown schedule {cfg.schedule!r} "
                     "(constant | cosine | cosine_cyclic)")
  if cfg.warmup_steps:
    warm = optax.linear_schedule(0.0, lr, cfg.warmup_steps)
    return optax.join_schedules([warm, main], [cfg.warmup_steps])
  return main


def make_optimizer(cfg, total_steps: int, trainable: Any | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax transform and its schedule.

  Args:
    cfg: ``config.optimizer`` (name, lr, schedule, momentum, weight_decay,
      grad_clip, ...).
    total_steps: run length (for decaying schedules).
    trainable: optional pytree of bools matching the params; False leaves
      are frozen.
  """
  schedule = make_schedule(cfg, total_steps)
  parts = []
  if cfg.grad_clip:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  if cfg.name == "adam":
    if cfg.weight_decay:
      parts.append(optax.adamw(schedule, weight_decay=cfg.weight_decay))
    else:
      parts.append(optax.adam(schedule))
  elif cfg.name == "sgd":
    if cfg.weight_decay:
      parts.append(optax.add_decayed_weights(cfg.weight_decay))
    parts.append(optax.sgd(schedule, momentum=cfg.momentum, nesterov=False))
  else:
    raise ValueError(f"unknown optimizer {cfg.name!r} (adam | sgd)")
  tx = optax.chain(*parts)
  if trainable is not None:
    tx = freeze(tx, trainable)
  return tx, schedule


def freeze(tx: optax.GradientTransformation, mask: Any
           ) -> optax.GradientTransformation:
  """``tx`` on the trainable leaves, exactly zero updates on the frozen ones.

  (``optax.masked(tx, mask)`` alone is not enough: it passes the raw gradient
  through as the update of masked-out leaves.)
  """
  labels = jax.tree_util.tree_map(lambda m: "train" if m else "frozen", mask)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               labels)
