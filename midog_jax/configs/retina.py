"""RetinaNet as in Sheta's MIDOG 2021 report: ResNet-50 FPN (v2 heads), 512 px patches, batch 30, Adam 1e-4.

  python -m midog_jax.main --config=configs/retina.py --workdir=runs/retina \
      --config.data.root=/data/MIDOG
  python -m midog_jax.main --config=configs/retina.py:quick --workdir=runs/quick

Arguments: ``quick`` (a small model and short run for a 2-core CPU), ``tiny``
(test-sized; combine as ``quick,tiny``),
``imposters=background|class|ignore``, ``backbone=resnet18|resnet34|resnet50``,
``pretrained=coco|imagenet``: the settings converted torchvision weights
expect (``python -m midog_jax.weights list``), applied last, so
``tiny,pretrained=coco`` is the COCO architecture on test-sized data:

  python -m midog_jax.main --config=configs/retina.py:pretrained=coco \
      --workdir=runs/coco --config.init_from=r50_coco.safetensors
"""

from __future__ import annotations

import ml_collections

from configs import common


def model_config() -> ml_collections.ConfigDict:
  m = common.model_config()     # compute_dtype (mixed precision)
  m.backbone = "resnet50"
  m.backbone_width = 0          # 0 = the architecture's own width (64)
  m.trainable_backbone_layers = 5   # the report: all five layers unfrozen
  m.levels = (3, 4, 5, 6, 7)
  m.anchor_sizes = ()           # () = torchvision's octave scales per level
  m.anchor_ratios = (1.0,)      # MIDOG labels are squares
  m.fpn_channels = 256
  m.head_depth = 4
  m.head_groups = 32
  m.norm = "batch"               # "frozen": torchvision's FrozenBatchNorm2d
  m.input_mean = (0.485, 0.456, 0.406)  # ImageNet statistics of [0, 1] pixels
  m.input_std = (0.229, 0.224, 0.225)
  m.resize_to = 0               # >0: scale inputs by resize_to / patch_size
  m.torchvision_anchors = False  # torchvision's rounded anchors, integer strides
  m.imposters = "background"
  m.box_size = 50.0             # MIDOG boxes are 50x50 px around the cell
  m.box_loss = "giou"           # torchvision v2
  m.box_weight = 1.0
  m.focal_alpha = 0.25
  m.focal_gamma = 2.0
  m.topk = 300
  return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, quick=False, tiny=False, imposters="background",
                       backbone="resnet50", pretrained="")
  c = common.base_config()
  # Converted weights record the settings they expect; a config that differs
  # is refused at load time unless this is False (then it is only logged).
  c.init_fidelity = True
  c.method = "retinanet"
  c.model = model_config()
  c.model.imposters = a.imposters
  c.model.backbone = a.backbone
  c.batch_size = 30
  c.total_steps = 40_000
  c.optimizer = common.optimizer_config("adam", 1e-4)
  c.data.patch_size = 512
  c.data.strategy = "mitosis_centred"
  c.data.p_mitosis = 0.5
  c.eval.tile_size = 512
  if a.quick:
    # A 2-core CPU run: narrow ResNet-18, three pyramid levels (cells are
    # ~50 px, P6/P7 see nothing useful), 256 px patches, short schedule.
    c.model.backbone = "resnet18"
    c.model.backbone_width = 16
    c.model.levels = (3, 4, 5)
    c.model.fpn_channels = 64
    c.model.head_depth = 2
    c.model.head_groups = 16
    c.batch_size = 8
    c.total_steps = 1000
    c.optimizer = common.optimizer_config("adam", 1e-3)
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 50
    c.data.patch_size = 256
    c.data.p_mitosis = 0.7
    c.data.val_patches = 32
    c.log_every = 25
    c.eval_every = 500
    c.checkpoint_every = 500
    c.eval.tile_size = 512
    c.eval.tile_overlap = 64
    c.eval.tile_batch = 4
  if a.tiny:
    # Test-sized: the smallest network and patches that exercise every path.
    c.model.backbone = "resnet_tiny"
    c.model.backbone_width = 0
    c.model.levels = (3, 4, 5)
    c.model.fpn_channels = 16
    c.model.head_depth = 1
    c.model.head_groups = 8
    c.batch_size = 4
    c.data.patch_size = 96
    c.data.val_patches = 0
    c.eval.tile_size = 128
    c.eval.tile_overlap = 32
    c.eval.tile_batch = 4
    c.eval.write_overlays = False
    c.log_every = 1
  if a.pretrained == "coco":
    # torchvision retinanet_resnet50_fpn_v2 (COCO_V1): its architecture,
    # 9 anchors per location exactly as its AnchorGenerator, BatchNorm2d, and
    # its transform's 512 -> 800 px resize.
    m = c.model
    m.backbone, m.backbone_width, m.levels = "resnet50", 0, (3, 4, 5, 6, 7)
    m.anchor_sizes, m.anchor_ratios = (), (0.5, 1.0, 2.0)
    m.torchvision_anchors = True
    m.fpn_channels, m.head_depth, m.head_groups = 256, 4, 32
    m.norm, m.resize_to = "batch", 800
  elif a.pretrained == "imagenet":
    # An ImageNet ResNet backbone (resnet18/34/50 files): torchvision's
    # detection builders freeze its BatchNorm.
    c.model.norm = "frozen"
  elif a.pretrained:
    raise ValueError(f"pretrained must be coco or imagenet, got {a.pretrained!r}")
  return c
