"""Shared pieces of every experiment config (big_vision style).

Each experiment is ``configs/<name>.py`` with ``get_config(arg)``; ``arg`` is a
comma-separated list of ``key=value`` or bare flags, e.g. ``quick`` or
``aug=od,quick``. Keys every config has (the project's command-line contract): ``data.root``, ``seed``,
``total_steps``, ``batch_size``, ``init_from``; and ``model.compute_dtype`` (mixed precision,
``--config.model.compute_dtype=bfloat16``; see :func:`model_config`).
"""

from __future__ import annotations

import ml_collections


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``"quick,aug=od"`` into a ConfigDict over ``defaults``.

  Bare words set booleans to True; values are cast to the default's type
  (booleans take 1/true/yes/on and 0/false/no/off). Unknown keys, bare words
  for non-boolean keys and unreadable booleans are errors, so a typo cannot
  silently do nothing.
  """
  out = dict(defaults)
  for item in (i for i in (arg or "").split(",") if i.strip()):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in out:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(out)}")
    kind = type(out[key])
    if not sep:
      if kind is not bool:
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
      continue
    if kind is bool:
      word = value.strip().lower()
      if word not in _TRUE + _FALSE:
        raise ValueError(f"config argument {key}={value!r}: expected one of "
                         f"{', '.join(_TRUE + _FALSE)}")
      out[key] = word in _TRUE
    else:
      out[key] = kind(value) if out[key] is not None else value
  return ml_collections.ConfigDict(out)


def base_config() -> ml_collections.ConfigDict:
  """Keys shared by all experiments, with their defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 10_000
  c.batch_size = 30
  c.init_from = ""            # orbax checkpoint dir or a workdir; "" = scratch
  c.init_strict = True        # every array of init_from must match a parameter
  c.log_every = 50
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.keep_checkpoints = 2
  c.num_workers = 0           # grain worker processes
  c.debug_step_sleep = 0.0    # seconds slept per step (interruption tests only)
  c.best_metric = "f1"        # "f1" (highest val F1) | "val_loss" (lowest; Lafarge & Koelzer)
  c.model = model_config()    # each experiment replaces it with its own, built on this
  c.data = data_config()
  c.optimizer = optimizer_config()
  c.eval = eval_config()
  return c


def model_config() -> ml_collections.ConfigDict:
  """Model keys every method has; each config's ``model`` block starts from this."""
  m = ml_collections.ConfigDict()
  # Mixed precision (detectors/interface.compute_dtype): "float32" or
  # "bfloat16". bfloat16 runs the network's convolutions, matmuls and
  # activations in bfloat16; parameters, gradients, optimizer state, BatchNorm
  # statistics, losses and every detector output stay float32. Meant for
  # accelerators with bfloat16 units (GPUs, TPUs). Changes no parameter, so it
  # may change when a run is resumed (workdir.RESUMABLE_KEYS).
  m.compute_dtype = "float32"
  return m


def data_config() -> ml_collections.ConfigDict:
  """Where the data is and how patches are drawn (see data/pipeline.py)."""
  d = ml_collections.ConfigDict()
  d.root = ""                 # folder with MIDOG.json / MIDOG++.json; "" = synthetic small
  d.annotations = ""          # explicit JSON path (default: looked up in root)
  d.synthetic_preset = "small"
  d.synthetic_dir = "data/synthetic_small"
  d.split = "train_val"       # "train_val" | "official" | "lodo:<domain>"
  d.val_fraction = 0.2
  d.split_seed = 0            # fixed, so runs with other seeds share one split
  d.domain_key = ""           # "" = scanner (2021) / tumour type (MIDOG++)
  d.extra_truth = "auto"      # truth of the unlabeled domain ("auto": synthetic's file)
  d.patch_size = 512
  d.strategy = "mitosis_centred"
  d.p_mitosis = 0.5
  d.stratify_domains = False
  d.neg_min_dist_px = 60.0
  d.imposter_fraction = 0.5
  d.max_points = 32
  d.shift = 16
  d.d4 = True
  d.elastic_alpha = 0.0
  d.elastic_sigma = 8.0
  d.colour = "rgb"
  d.colour_strength = 0.1
  # Where training patches are augmented: "host" (numpy in the grain workers,
  # data/augment.py) or "device" (the workers only read uint8 crops with the
  # margin; data/augment_device.py runs the same chain in the jitted train
  # step, keyed by (seed, step, example), for hosts with few cores per
  # accelerator). Patch-pipeline methods only (RetinaNet, P4 ResNet).
  d.augment_on = "host"
  d.val_patches = 64          # fixed validation patches for the validation loss
  return d


def optimizer_config(name: str = "adam", lr: float = 1e-4) -> ml_collections.ConfigDict:
  """Adam 1e-4 (the RetinaNet) or SGD+momentum with cosine cyclic LR (the P4 ResNet)."""
  o = ml_collections.ConfigDict()
  o.name = name               # "adam" | "sgd"
  o.lr = lr
  o.schedule = "constant"     # "constant" | "cosine_cyclic" | "cosine"
  o.cycle_steps = 2000        # cosine_cyclic: length of one cycle
  o.warmup_steps = 0
  o.momentum = 0.9
  o.weight_decay = 0.0
  o.grad_clip = 0.0           # 0 disables global-norm clipping
  return o


def eval_config() -> ml_collections.ConfigDict:
  """Whole-image evaluation settings (infer.py, evaluate.py)."""
  e = ml_collections.ConfigDict()
  e.tile_size = 512
  e.tile_overlap = 64
  # "tiles" (tile_size squares; one compiled program for every image size) or
  # "regions" (a few large regions per image, padded only to the detector's
  # stride multiple: 2.8% extra pixels on 7215x5412 instead of 29%; one
  # compiled program per distinct image size). See infer.py.
  e.inference = "tiles"
  e.region_max_mpx = 12.0     # regions: largest region area in Mpx (bounds memory)
  e.skip_blank = False        # skip tiles/regions without tissue (infer.is_blank)
  e.tile_batch = 8
  e.score_thresh = 0.05       # candidates kept for the threshold sweep
  e.merge_radius_px = 25.0    # distance suppression across tiles
  e.max_val_images = 0        # 0 = all validation images
  e.write_overlays = True
  e.exact_rotation = False    # P4: stride-1 map, rotation-exact for any image size (4x cost)
  e.tta = False               # D4 test-time augmentation, detections merged back (8x cost)
  return e
