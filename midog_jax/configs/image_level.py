"""Image-level classification (SOFTEC AIC'24 write-up, Irfan, SPADES team C): does a field hold a mitotic figure?

Round 1 (frozen sliding-window EfficientNet-B0 features; a dense head, a
random forest and their ensemble), trained in seconds once the features are
cached:

  python -m midog_jax.main --config=configs/image_level.py --workdir=runs/il1 \
      --config.data.root=/data/MIDOG --config.init_from=weights/efficientnet_b0.safetensors
  python -m midog_jax.main --config=configs/image_level.py:quick --workdir=runs/il1_quick

Round 2 (EfficientNet-B4 fine-tuned end to end on fields rescaled to 512x512,
through the shared training loop): stage ``a`` trains the new head on the
frozen backbone, stage ``b`` unfreezes the backbone at a lower learning rate,
started from stage a's workdir (``init_from``); then both again on a second
dataset (``domains=`` or ``source=csv``):

  python -m midog_jax.main --config=configs/image_level.py:round=2,stage=a --workdir=runs/il2a
  python -m midog_jax.main --config=configs/image_level.py:round=2,stage=b --workdir=runs/il2b \
      --config.init_from=runs/il2a

Arguments: ``round=1|2``, ``stage=a|b`` (round 2), ``source=midog|csv`` (a CSV
``path,label[,domain][,split]`` given as ``--config.image_level.csv``),
``domains=`` (comma-separated MIDOG domains to keep; "" = all), ``quick`` (a
2-core CPU run on the synthetic small set), ``tiny`` (test-sized).
"""

from __future__ import annotations

import ml_collections

from configs import common


def image_level_config() -> ml_collections.ConfigDict:
  """Data, features and heads of the image-level method."""
  i = ml_collections.ConfigDict()
  i.round = 1
  i.source = "midog"            # "midog": fields from the point labels | "csv"
  i.csv = ""                    # path,label[,domain][,split] (source=csv)
  i.scale = "physical"          # csv / classify images: "physical" | "rescale"
  i.domains = ""                # comma-separated MIDOG domains to keep ("" = all)
  i.field_area_mm2 = 0.237      # one high-power field: 486.8 um a side
  i.work_spacing_um = 0.25      # fields are resampled to this many um per pixel
  i.margin_um = 7.5             # a mitotic figure's radius (the labelling rule)
  i.image_px = 0                # side fields are resampled to; 0 = field at work spacing
  # Round 1: sliding windows with 50 % overlap over the field.
  i.window = 224
  i.window_stride = 112
  i.extract_batch = 32          # windows per jitted call
  i.cache_dir = "cache/image_level"   # "" = inside the workdir
  i.bn_calibration = 64         # random weights: BatchNorm statistics of this many windows
  i.dense = ml_collections.ConfigDict(dict(
      hidden=128, dropout=0.6, l1=0.2, l2=0.03, out_l1=0.01, out_l2=0.01,
      lr=1e-3, epochs=30, batch_size=32))
  i.standardize = True          # z-score the dense head's inputs (training mean/std)
  i.forest = ml_collections.ConfigDict(dict(trees=900, bootstrap=False, n_jobs=1,
                                            max_features="sqrt"))
  i.ensemble_weight = 0.0       # dense-head weight; 0 = chosen on validation
  # Round 2 sampling: even examples positive, odd negative.
  i.balanced = True
  i.predict_batch = 16
  return i


def model_config(variant: str) -> ml_collections.ConfigDict:
  m = common.model_config()     # compute_dtype (mixed precision)
  m.variant = variant
  m.dropout = -1.0              # round 2 head dropout; < 0 = the variant's (B4: 0.4)
  m.stochastic_depth = 0.2
  m.train_layers = "head"       # round 2: "head" | "all" | "from:<stage 1-7>"
  m.bn_train = False            # backbone BatchNorm in inference mode (Keras fine-tuning)
  return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, round=1, stage="a", source="midog", domains="", quick=False,
                       tiny=False)
  if a.round not in (1, 2):
    raise ValueError(f"round must be 1 or 2, got {a.round}")
  if a.stage not in ("a", "b"):
    raise ValueError(f"stage must be a or b, got {a.stage!r}")
  c = common.base_config()
  c.method = "image_level"
  c.image_level = image_level_config()
  il = c.image_level
  il.round, il.source, il.domains = a.round, a.source, a.domains
  c.data.val_patches = 0
  c.data.patch_size = 0         # the method's own: the field side (image_px or field at work spacing)
  if a.round == 1:
    c.model = model_config("b0")
    c.total_steps = 1           # unused: round 1 trains its heads in fit(), no model steps
  else:
    c.model = model_config("b4")
    il.image_px = 512           # the write-up's 1600x1600 slices rescaled to 512x512
    c.batch_size = 16
    c.total_steps = 2000 if a.stage == "a" else 4000
    c.best_metric = "f1"
    c.eval_every = c.checkpoint_every = 500
    c.data.val_patches = 64
    if a.stage == "a":          # the new head on the frozen backbone
      c.model.train_layers = "head"
      c.optimizer = common.optimizer_config("adam", 1e-3)
    else:                       # the lower layers too, at a lower learning rate
      c.model.train_layers = "all"
      c.optimizer = common.optimizer_config("adam", 1e-5)
  if a.quick:
    # The synthetic small set on a 2-core CPU: 90 um fields (0.0081 mm^2) at
    # 0.5 um/px (180 px), 3x3 windows of 96 px.
    il.field_area_mm2 = 0.0081
    il.work_spacing_um = 0.5
    il.window, il.window_stride = 96, 42
    il.dense.epochs = 40
    il.forest.n_jobs = 2
    c.log_every = 10
    if a.round == 2:
      c.model.variant = "b0"
      il.image_px = 128
      c.batch_size = 8
      c.total_steps = 150
      c.eval_every = c.checkpoint_every = 50
      c.data.val_patches = 32
      if a.stage == "a":
        c.optimizer.lr = 1e-3
      else:
        c.optimizer.lr = 1e-4
  if a.tiny:
    # Test-sized: 60 um fields at 1 um/px, 2x2 windows of 32 px.
    il.field_area_mm2 = 0.0036
    il.work_spacing_um = 1.0
    il.window, il.window_stride = 32, 28
    il.extract_batch = 8
    il.bn_calibration = 16
    il.dense.epochs = 3
    il.dense.batch_size = 8
    il.forest.trees = 20
    il.cache_dir = ""
    c.model.variant = "b0"
    c.log_every = 1
    if a.round == 2:
      il.image_px = 32
      c.batch_size = 4
      c.total_steps = 2
      c.eval_every = c.checkpoint_every = 2
      c.data.val_patches = 4
  return c
