"""The supported torchvision architectures: where their weights come from,
which of the project's models they fit, and the settings they expect.

Each entry names the torchvision builder and weight enums (the file a user
downloads on a connected machine), the model family (its name mapping in
``mapping``), and the fidelity settings recorded in a converted file's header
as dotted config keys (``model.norm`` ...), which training checks against the
config when the file is loaded (``checkpoint.fidelity_mismatches``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from midog_jax.models import efficientnet as effnet_lib
from midog_jax.models import resnet as resnet_lib
from midog_jax.models import retinanet as retina_lib

# torchvision's ImageNet statistics of [0, 1] RGB pixels (all these weights).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_RATIOS = (0.5, 1.0, 2.0)
TORCHVISION_MIN_SIZE = 800  # GeneralizedRCNNTransform(min_size=800)


@dataclasses.dataclass(frozen=True)
class Arch:
  """One convertible architecture.

  Attributes:
    name: the ``--arch`` value (torchvision's builder name).
    family: "resnet" | "retinanet" | "efficientnet".
    builder: the torchvision builder, e.g. ``torchvision.models.resnet50``.
    weights: {weight enum name: download URL}, e.g.
      ``{"ResNet50_Weights.IMAGENET1K_V2": "https://..."}``.
    parity_tested: whether tests/weights compares it with torchvision.
  """

  name: str
  family: str
  builder: str
  weights: dict
  parity_tested: bool = True

  @property
  def variant(self) -> str:
    """resnet50 -> "resnet50"; efficientnet_b4 -> "b4"; retinanet -> resnet50."""
    if self.family == "efficientnet":
      return self.name.rsplit("_", 1)[1]
    return "resnet50" if self.family == "retinanet" else self.name


_DL = "https://download.pytorch.org/models/"
ARCHS = {a.name: a for a in (
    Arch("resnet18", "resnet", "torchvision.models.resnet18",
         {"ResNet18_Weights.IMAGENET1K_V1": _DL + "resnet18-f37072fd.pth"}),
    Arch("resnet34", "resnet", "torchvision.models.resnet34",
         {"ResNet34_Weights.IMAGENET1K_V1": _DL + "resnet34-b627a593.pth"}),
    Arch("resnet50", "resnet", "torchvision.models.resnet50",
         {"ResNet50_Weights.IMAGENET1K_V1": _DL + "resnet50-0676ba61.pth",
          "ResNet50_Weights.IMAGENET1K_V2": _DL + "resnet50-11ad3fa6.pth"}),
    Arch("retinanet_resnet50_fpn_v2", "retinanet",
         "torchvision.models.detection.retinanet_resnet50_fpn_v2",
         {"RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1":
          _DL + "retinanet_resnet50_fpn_v2_coco-5905b1c5.pth"}),
    Arch("efficientnet_b0", "efficientnet", "torchvision.models.efficientnet_b0",
         {"EfficientNet_B0_Weights.IMAGENET1K_V1":
          _DL + "efficientnet_b0_rwightman-7f5810bc.pth"}),
    Arch("efficientnet_b1", "efficientnet", "torchvision.models.efficientnet_b1",
         {"EfficientNet_B1_Weights.IMAGENET1K_V1":
          _DL + "efficientnet_b1_rwightman-bac287d4.pth",
          "EfficientNet_B1_Weights.IMAGENET1K_V2": _DL + "efficientnet_b1-c27df63c.pth"},
         parity_tested=False),
    Arch("efficientnet_b2", "efficientnet", "torchvision.models.efficientnet_b2",
         {"EfficientNet_B2_Weights.IMAGENET1K_V1":
          _DL + "efficientnet_b2_rwightman-c35c1473.pth"}, parity_tested=False),
    Arch("efficientnet_b3", "efficientnet", "torchvision.models.efficientnet_b3",
         {"EfficientNet_B3_Weights.IMAGENET1K_V1":
          _DL + "efficientnet_b3_rwightman-b3899882.pth"}, parity_tested=False),
    Arch("efficientnet_b4", "efficientnet", "torchvision.models.efficientnet_b4",
         {"EfficientNet_B4_Weights.IMAGENET1K_V1":
          _DL + "efficientnet_b4_rwightman-23ab8bcd.pth"}),
    Arch("efficientnet_b5", "efficientnet", "torchvision.models.efficientnet_b5",
         {"EfficientNet_B5_Weights.IMAGENET1K_V1":
          _DL + "efficientnet_b5_lukemelas-1a07897c.pth"}, parity_tested=False),
    Arch("efficientnet_b6", "efficientnet", "torchvision.models.efficientnet_b6",
         {"EfficientNet_B6_Weights.IMAGENET1K_V1":
          _DL + "efficientnet_b6_lukemelas-24a108a5.pth"}, parity_tested=False),
    Arch("efficientnet_b7", "efficientnet", "torchvision.models.efficientnet_b7",
         {"EfficientNet_B7_Weights.IMAGENET1K_V1":
          _DL + "efficientnet_b7_lukemelas-c5b4e57e.pth"}, parity_tested=False),
)}
NORM_DEFAULT = {
    # torchvision's detection builders wrap an ImageNet backbone in
    # FrozenBatchNorm2d (retinanet_resnet50_fpn, fasterrcnn_*); the v2
    # RetinaNet trains plain BatchNorm2d.
    "resnet": "frozen",
    "retinanet": "batch",
}


def class_heads(family: str) -> tuple[str, ...]:
  """Paths whose shape depends on the class count (re-initialised on load
  when the model's count differs)."""
  return {"resnet": ("params/fc/kernel", "params/fc/bias"),
          "retinanet": ("params/cls_head/out/kernel", "params/cls_head/out/bias"),
          "efficientnet": ("params/classifier/kernel", "params/classifier/bias"),
          }[family]


def counts(arch: Arch, sd: dict[str, np.ndarray]) -> dict:
  """Class and anchor counts read from a state dict (0 where absent)."""
  shape = lambda k: tuple(np.shape(sd[k])) if k in sd else None
  if arch.family == "resnet":
    fc = shape("fc.weight")
    return dict(num_classes=fc[0] if fc else 0)
  if arch.family == "efficientnet":
    fc = shape("classifier.1.weight")
    return dict(num_classes=fc[0] if fc else 0)
  box = shape("head.regression_head.bbox_reg.weight")
  cls = shape("head.classification_head.cls_logits.weight")
  anchors = box[0] // 4 if box else 9
  return dict(num_anchors=anchors, num_classes=cls[0] // anchors if cls else 0)


def expected_shapes(arch: Arch, num_classes: int = 0, num_anchors: int = 9
                    ) -> dict[str, tuple[int, ...]]:
  """Flat variable path -> shape of the project's model for ``arch``.

  ResNets: the bare backbone (``resnet.resnet``) plus ``fc`` when the source
  has a classifier; the RetinaNet: ``models.retinanet.RetinaNet`` as
  torchvision's v2 (ResNet-50, P3-P7, 256-wide FPN, 4-conv GroupNorm heads);
  EfficientNets: ``models.efficientnet.EfficientNet``.
  """
  x = jnp.zeros((1, 64, 64, 3), jnp.float32)
  if arch.family == "resnet":
    model = resnet_lib.resnet(arch.name, norm="batch")
  elif arch.family == "retinanet":
    model = retina_lib.RetinaNet(backbone="resnet50", num_classes=max(num_classes, 1),
                                 num_anchors=num_anchors, norm="batch")
  else:
    model = effnet_lib.EfficientNet(arch.variant, num_classes=num_classes)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  flat = traverse_util.flatten_dict(dict(shapes), sep="/")
  out = {k: tuple(v.shape) for k, v in flat.items()}
  if arch.family == "resnet" and num_classes:
    block, _, width = resnet_lib.SPECS[arch.name]
    c5 = width * 8 * (4 if block == "bottleneck" else 1)
    out["params/fc/kernel"] = (c5, num_classes)
    out["params/fc/bias"] = (num_classes,)
  return out


def fidelity(arch: Arch, norm: str | None = None, resize_to: int | None = None
             ) -> dict:
  """The config settings (dotted keys) under which the source computed.

  ``norm`` overrides the backbone norm ("frozen" | "batch"; ResNets and the
  RetinaNet), ``resize_to`` the RetinaNet's input resize (0 = none).
  """
  out = {"model.input_mean": list(IMAGENET_MEAN),
         "model.input_std": list(IMAGENET_STD)}
  if arch.family in NORM_DEFAULT:
    out["model.norm"] = norm or NORM_DEFAULT[arch.family]
  if arch.family == "retinanet":
    out.update({
        "model.backbone": "resnet50",
        "model.levels": [3, 4, 5, 6, 7],
        "model.anchor_sizes": [],   # () = torchvision's octave sizes
        "model.anchor_ratios": list(TORCHVISION_RATIOS),
        "model.torchvision_anchors": True,
        "model.fpn_channels": 256,
        "model.head_depth": 4,
        "model.head_groups": 32,
        "model.resize_to": TORCHVISION_MIN_SIZE if resize_to is None else int(resize_to),
    })
  return out
