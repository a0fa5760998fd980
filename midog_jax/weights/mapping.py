"""torchvision state-dict names -> the project's variable paths, per model family.

torch stores convolutions as (out, in, kh, kw) and linear layers as
(out, in); Flax as (kh, kw, in, out) and (in, out). Depthwise convolutions
((C, 1, k, k) in torch) become (k, k, 1, C), the layout of
``nn.Conv(feature_group_count=C)``. BatchNorm weight/bias are parameters,
its running mean/var are ``batch_stats``; ``num_batches_tracked`` (a step
counter torchvision keeps but never uses with momentum set) is dropped.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

# leaf name -> (collection, our leaf name); per module kind.
_LEAVES = {
    "conv": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
    "dense": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
    "gn": {"weight": ("params", "scale"), "bias": ("params", "bias")},
    "bn": {"weight": ("params", "scale"), "bias": ("params", "bias"),
           "running_mean": ("batch_stats", "mean"),
           "running_var": ("batch_stats", "var"),
           "num_batches_tracked": None},
}
IGNORED = "ignored"  # mapping result of arrays deliberately dropped

# A module resolver: the torch module path (without the leaf) -> (our scope
# path, module kind), or None when the name is not part of the architecture.
Resolver = Callable[[list[str]], "tuple[list[str], str] | None"]


def _array(kind: str, leaf: str, x: np.ndarray) -> np.ndarray:
  if leaf == "weight" and kind == "conv":
    return np.transpose(x, (2, 3, 1, 0))
  if leaf == "weight" and kind == "dense":
    return np.transpose(x)
  return x


def map_state_dict(sd: dict[str, np.ndarray], resolve: Resolver
                   ) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
  """Applies ``resolve`` to every array of ``sd``.

  Returns ``(arrays, sources, unknown)``: our flat variable paths ->
  converted float32 arrays, our path -> the torch name it came from (or
  ``IGNORED`` entries keyed by the torch name), and the torch names that
  are not part of the architecture.
  """
  arrays, sources, unknown = {}, {}, []
  for name, x in sd.items():
    *module, leaf = name.split(".")
    got = resolve(module)
    kinds = _LEAVES.get(got[1], {}) if got else {}
    if got is None or leaf not in kinds:
      unknown.append(name)
      continue
    scope, kind = got
    target = kinds[leaf]
    if target is None:
      sources[name] = IGNORED
      continue
    coll, ours = target
    key = "/".join([coll, *scope, ours])
    arrays[key] = np.asarray(_array(kind, leaf, x), np.float32)
    sources[key] = name
  return arrays, sources, unknown


def resnet_resolver(module: list[str]) -> tuple[list[str], str] | None:
  """torchvision ResNet (``conv1``, ``layer2.0.downsample.1``, ``fc``)."""
  if module in (["conv1"], ["bn1"]):
    return module, "conv" if module[0] == "conv1" else "bn"
  if module == ["fc"]:
    return ["fc"], "dense"
  if len(module) >= 3 and re.fullmatch(r"layer[1-4]", module[0]) \
      and module[1].isdigit():
    block = f"{module[0]}_{module[1]}"
    rest = module[2:]
    if rest in (["downsample", "0"], ["downsample", "1"]):
      return ([block, "downsample_conv"], "conv") if rest[1] == "0" \
          else ([block, "downsample_bn"], "bn")
    if len(rest) == 1 and re.fullmatch(r"conv[1-3]", rest[0]):
      return [block, rest[0]], "conv"
    if len(rest) == 1 and re.fullmatch(r"bn[1-3]", rest[0]):
      return [block, rest[0]], "bn"
  return None


def retinanet_resolver(module: list[str]) -> tuple[list[str], str] | None:
  """torchvision ``retinanet_resnet50_fpn(_v2)``: backbone.body/fpn, head."""
  if module[:2] == ["backbone", "body"]:
    got = resnet_resolver(module[2:])
    if got is None or got[0] == ["fc"]:
      return None
    return ["backbone", *got[0]], got[1]
  if module[:2] == ["backbone", "fpn"]:
    rest = module[2:]
    if len(rest) == 3 and rest[0] in ("inner_blocks", "layer_blocks") \
        and rest[1].isdigit() and rest[2] == "0":
      # returned_layers [2, 3, 4]: block i serves C_{i+3}.
      name = "inner" if rest[0] == "inner_blocks" else "layer"
      return ["fpn", f"{name}{int(rest[1]) + 3}"], "conv"
    if rest in (["extra_blocks", "p6"], ["extra_blocks", "p7"]):
      return ["fpn", rest[1]], "conv"
    return None
  heads = {"classification_head": ("cls_head", "cls_logits"),
           "regression_head": ("box_head", "bbox_reg")}
  if len(module) >= 3 and module[0] == "head" and module[1] in heads:
    ours, predictor = heads[module[1]]
    rest = module[2:]
    if rest == [predictor]:
      return [ours, "out"], "conv"
    if len(rest) == 3 and rest[0] == "conv" and rest[1].isdigit():
      if rest[2] == "0":
        return [ours, f"conv{rest[1]}"], "conv"
      if rest[2] == "1":
        return [ours, f"gn{rest[1]}"], "gn"
  return None


def efficientnet_resolver(sd: dict[str, np.ndarray]) -> Resolver:
  """torchvision EfficientNet (``features.S.B.block.I...``, ``classifier.1``).

  Block sub-module indices depend on whether the block has an expansion
  conv (4 parts: expand, depthwise, SE, project; else 3), read from ``sd``.
  """
  parts: dict[tuple[str, str], set[str]] = {}
  stages = set()
  for name in sd:
    p = name.split(".")
    if p[0] == "features" and len(p) > 1 and p[1].isdigit():
      stages.add(int(p[1]))
    if len(p) > 4 and p[0] == "features" and p[3] == "block":
      parts.setdefault((p[1], p[2]), set()).add(p[4])
  last = max(stages) if stages else -1

  def resolve(module: list[str]) -> tuple[list[str], str] | None:
    if module == ["classifier", "1"]:
      return ["classifier"], "dense"
    if len(module) < 3 or module[0] != "features" or not module[1].isdigit():
      return None
    s = int(module[1])
    if s in (0, last) and len(module) == 3 and module[2] in ("0", "1"):
      scope = "stem" if s == 0 else "head"
      return ([f"{scope}_conv"], "conv") if module[2] == "0" \
          else ([f"{scope}_bn"], "bn")
    if len(module) < 5 or module[3] != "block" or not module[2].isdigit():
      return None
    n = len(parts.get((module[1], module[2]), ()))
    order = ("expand", "dw", "se", "project") if n == 4 else ("dw", "se", "project")
    i = int(module[4]) if module[4].isdigit() else len(order)
    if i >= len(order):
      return None
    block = f"stage{s}_{module[2]}"
    role, rest = order[i], module[5:]
    if role == "se":
      se = {"fc1": "se_reduce", "fc2": "se_expand"}
      return ([block, se[rest[0]]], "conv") if rest in (["fc1"], ["fc2"]) else None
    if rest == ["0"]:
      return [block, f"{role}_conv"], "conv"
    if rest == ["1"]:
      return [block, f"{role}_bn"], "bn"
    return None

  return resolve
