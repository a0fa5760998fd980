"""P4 rotation-equivariant ResNet (70 layers, RF 78) applied densely (Lafarge & Koelzer, MIDOG 2022).

  python -m midog_jax.main --config=configs/p4_resnet.py:aug=rgb --workdir=runs/p4_rgb \
      --config.data.root=/data/MIDOG
  python -m midog_jax.main --config=configs/p4_resnet.py:aug=od --workdir=runs/p4_od
  python -m midog_jax.main --config=configs/p4_resnet.py:quick,aug=rgb --workdir=runs/p4_quick

Arguments: ``aug=rgb|od`` (CA-RGB or CA-OD colour augmentation: linear colour
transforms in RGB or optical-density space), ``quick`` (a 2-core CPU run of a
few minutes on the synthetic ``small`` set), ``tiny`` (test-sized).

From the paper: P4 group convolutions, ~70 layers, one 2x2 max-pool, 78 px
receptive field (``FULL_PLAN``); patch classification with cross-entropy;
balanced mini-batches of 128; SGD with momentum and a cosine cyclic learning
rate; weight decay; batch norm; shifts, flips, elastic deformation and colour
augmentation; the weights with the LOWEST validation loss are kept
(``best_metric="val_loss"``) and their threshold is the F1-best one on the
validation images; dense application and local maxima at inference. Not in the
paper, so chosen here: width 16, learning rate 0.01 (0.05 collapsed the quick
net to a constant output within 150 steps), momentum 0.9, weight decay
1e-4 (the paper gives no number), 4 cosine cycles of 10k steps, shifts of
+-2 px, elastic alpha 1 px / sigma 16 px, colour strength 1.0 ("aggressive"),
positive radius 8 px, negatives at least 30 px (the 7.5 um matching radius at
0.25 um/px) from every mitotic figure.

``quick`` keeps the receptive field (78) but uses ``QUICK_PLAN`` (22 conv
layers: the same stem and pool, then 8 blocks of two 3x3 convolutions) at
width 2 and batch 32: the 70-layer plan at width 4 took 8.4 s per batch of 64
on the shared 2-core CPU (QUICK_PLAN width 2, batch 32: 1.2 s), and dense
inference of either runs at only ~0.25 Mpx/s there, so evaluation alone takes
a minute or two. See ``midog_jax/detectors/p4`` for the coordinate convention
and the tiling rules (even tile size and overlap, context RF/2 - 1).
"""

from __future__ import annotations

import ml_collections

from configs import common


def model_config(plan: str = "full", width: int = 16) -> ml_collections.ConfigDict:
  m = common.model_config()     # compute_dtype (mixed precision)
  m.plan = plan                 # "full" (70 layers) | "quick" | "tiny"
  m.width = width               # group channels (x4 feature maps) before the pool
  m.pos_radius_px = 8.0         # label 1 iff a mitotic figure is this close to the centre
  m.peak_window = 3             # local maxima over this many map outputs (odd)
  m.topk = 1024                 # candidates kept per tile
  return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, quick=False, tiny=False, aug="rgb")
  if a.aug not in ("rgb", "od"):
    raise ValueError(f"aug must be rgb or od, got {a.aug!r}")
  c = common.base_config()
  c.method = "p4"
  c.model = model_config()
  # 0: the plan's receptive field (78 for "full"), computed by the detector,
  # so each patch gives one output, its logit. The tile context (RF/2 - 1 px
  # per side) is the detector's too.
  c.data.patch_size = 0
  c.batch_size = 128
  c.total_steps = 40_000
  c.best_metric = "val_loss"
  # Negative mining (python -m midog_jax.mining): a pool of random
  # far-from-mitosis centres + imposters, plus residual-stain patches of the
  # unlabeled images (Lafarge & Koelzer); each round keeps the hardest half.
  c.mining = ml_collections.ConfigDict(dict(
      random_per_case=200, min_dist_px=0.0, stain_top_k=8, keep_fraction=0.5,
      score_threshold=-1.0, score_batch=32, score_patch_size=0))
  c.optimizer = common.optimizer_config("sgd", 0.01)
  c.optimizer.momentum = 0.9
  c.optimizer.schedule = "cosine_cyclic"
  c.optimizer.cycle_steps = 10_000
  c.optimizer.warmup_steps = 500
  c.optimizer.weight_decay = 1e-4
  c.eval_every = 2000
  c.checkpoint_every = 2000

  d = c.data
  d.strategy = "balanced"
  d.stratify_domains = True
  d.neg_min_dist_px = 30.0
  d.imposter_fraction = 0.5
  d.shift = 2
  d.d4 = True
  d.elastic_alpha = 1.0
  d.elastic_sigma = 16.0
  d.colour = a.aug
  d.colour_strength = 1.0
  d.val_patches = 1024

  e = c.eval
  e.tile_size = 512
  e.tile_overlap = 32           # even, and >= 4 * (peak_window // 2) + 4
  e.tile_batch = 4
  e.score_thresh = 0.05
  e.merge_radius_px = 25.0

  if a.quick:
    c.model.plan, c.model.width = "quick", 2
    c.batch_size = 32
    c.total_steps = 300
    c.optimizer.cycle_steps = 150  # two cosine cycles, validated at each end
    c.optimizer.warmup_steps = 10
    c.data.val_patches = 64
    c.log_every = 10
    c.eval_every = 150
    c.checkpoint_every = 150
    # Large tiles: fewer overlaps and context borders to recompute.
    c.eval.tile_size = 640
    c.eval.tile_batch = 2
  if a.tiny:
    c.model.plan, c.model.width = "tiny", 2
    c.batch_size = 4
    c.total_steps = 4
    c.optimizer.warmup_steps = 0
    c.optimizer.cycle_steps = 4
    c.data.val_patches = 8
    # The tiny set has 2 images per domain: half go to validation, so the
    # lowest-validation-loss path runs too.
    c.data.val_fraction = 0.5
    # A 12 px patch has no room for elastic warps of a few px: they would
    # carry the centred figure out of the patch.
    c.data.elastic_alpha = 0.0
    c.log_every = 1
    c.eval_every = 4
    c.checkpoint_every = 4
    c.eval.tile_size = 128
    c.eval.tile_overlap = 16
    c.eval.tile_batch = 4
    c.eval.write_overlays = False
  return c
