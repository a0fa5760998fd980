"""Conversion, inspection and the list of supported architectures.

``convert`` maps every array of a torchvision state dict onto the project's
model for the architecture and refuses anything that does not fit exactly
(unknown or missing names, wrong shapes: a wrong-architecture file), so a
converted file always loads completely into the model it was made for.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from midog_jax import pretrained as pretrained_lib
from midog_jax.errors import DataError
from midog_jax.weights import archs as archs_lib
from midog_jax.weights import io
from midog_jax.weights import mapping

FORMAT = "midog_jax.weights/1"


def _resolver(arch: archs_lib.Arch, sd: dict) -> mapping.Resolver:
  if arch.family == "resnet":
    return mapping.resnet_resolver
  if arch.family == "retinanet":
    return mapping.retinanet_resolver
  return mapping.efficientnet_resolver(sd)


def _names(items, n: int = 4) -> str:
  items = sorted(items)
  return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


def map_arrays(arch: archs_lib.Arch, sd: dict[str, np.ndarray], src: os.PathLike | str
               ) -> tuple[dict[str, np.ndarray], dict[str, str], dict]:
  """(our arrays, our path -> torch name, counts); DataError if ``sd`` does not fit."""
  arrays, sources, unknown = mapping.map_state_dict(sd, _resolver(arch, sd))
  n = archs_lib.counts(arch, sd)
  expected = archs_lib.expected_shapes(arch, **n)
  missing = set(expected) - set(arrays)
  extra = set(arrays) - set(expected)
  wrong = {k for k in set(arrays) & set(expected)
           if tuple(arrays[k].shape) != expected[k]}
  if unknown or missing or extra or wrong:
    parts = []
    if unknown:
      parts.append(f"{len(unknown)} unknown arrays ({_names(unknown)})")
    if missing:
      parts.append(f"{len(missing)} missing ({_names(missing)})")
    if extra or wrong:
      bad = [f"{k} {tuple(arrays[k].shape)} vs {expected.get(k)}"
             for k in sorted(extra | wrong)]
      parts.append(f"{len(bad)} of the wrong shape ({_names(bad, 2)})")
    raise DataError(src, f"is not a torchvision {arch.name} state dict: "
                    + "; ".join(parts))
  return arrays, sources, n


def convert(arch_name: str, src: str | os.PathLike, out: str | os.PathLike,
            norm: str | None = None, resize_to: int | None = None) -> dict:
  """Converts ``src`` (torchvision ``arch_name`` state dict) to ``out``.

  Args:
    arch_name: a key of ``archs.ARCHS``.
    src: ``.pth`` (needs torch) or ``.safetensors`` with torchvision's names.
    out: the ``.safetensors`` file to write.
    norm: backbone norm to record ("frozen" | "batch"; default per family).
    resize_to: RetinaNet input resize to record (default 800, 0 = none).

  Returns:
    A summary (arch, out, arrays, the source's SHA-256, fidelity settings).
  """
  if arch_name not in archs_lib.ARCHS:
    raise ValueError(f"unknown arch {arch_name!r}; expected one of "
                     f"{', '.join(archs_lib.ARCHS)}")
  if norm not in (None, "frozen", "batch"):
    raise ValueError(f"norm must be 'frozen' or 'batch', got {norm!r}")
  arch = archs_lib.ARCHS[arch_name]
  if norm and arch.family not in archs_lib.NORM_DEFAULT:
    raise ValueError(f"--norm applies to ResNets and the RetinaNet, not {arch_name}")
  if resize_to is not None and arch.family != "retinanet":
    raise ValueError(f"--resize-to applies to the RetinaNet, not {arch_name}")
  src = Path(src)
  sd = io.load_state_dict(src)
  arrays, sources, n = map_arrays(arch, sd, src)
  heads = [k for k in archs_lib.class_heads(arch.family) if k in arrays]
  header = {
      "format": FORMAT,
      "arch": arch.name,
      "family": arch.family,
      "source": {"file": src.name, "sha256": io.sha256(src), "arrays": len(sd)},
      "torchvision": {"builder": arch.builder, "weights": list(arch.weights)},
      **n,
      # A backbone's arrays also load into a detector's "backbone" scope.
      "backbone": arch.family in ("resnet", "efficientnet"),
      "class_heads": heads,
      "input": {"pixels": "RGB scaled to [0, 1]", "mean": list(archs_lib.IMAGENET_MEAN),
                "std": list(archs_lib.IMAGENET_STD)},
      "fidelity": archs_lib.fidelity(arch, norm, resize_to),
      "sources": sources,
  }
  io.write_converted(out, arrays, header)
  return dict(arch=arch.name, out=str(out), arrays=len(arrays),
              ignored=sum(v == mapping.IGNORED for v in sources.values()),
              source_sha256=header["source"]["sha256"], fidelity=header["fidelity"])


def inspect_lines(path: str | os.PathLike, arch_name: str | None = None) -> list[str]:
  """Text lines describing ``path``: a converted file (header, arrays and the
  torch names they came from) or a source state dict (arrays and, with
  ``arch_name``, what each maps to)."""
  p = Path(path)
  header = pretrained_lib.pretrained_header(p) if p.suffix == ".safetensors" else None
  lines = []
  if header is not None:
    from safetensors import safe_open
    src = header.get("sources", {})
    lines.append(f"{p}: converted {header.get('arch')} ({header.get('format')}) from "
                 f"{header['source']['file']} sha256 {header['source']['sha256']}")
    for k, v in header.get("fidelity", {}).items():
      lines.append(f"  expects --config.{k}={pretrained_lib.flag_value(v)}")
    if header.get("class_heads"):
      lines.append(f"  class heads (re-initialised when the class count differs): "
                   f"{', '.join(header['class_heads'])}")
    with safe_open(str(p), "np") as f:
      for k in sorted(f.keys()):
        shape = tuple(f.get_slice(k).get_shape())
        lines.append(f"  {k} {shape} <- {src.get(k, '?')}")
    return lines
  sd = io.load_state_dict(p)
  if arch_name is None:
    lines.append(f"{p}: {len(sd)} arrays (not a converted file; add --arch to "
                 "see what each maps to)")
    lines += [f"  {k} {tuple(np.shape(v))}" for k, v in sd.items()]
    return lines
  arch = archs_lib.ARCHS[arch_name]
  arrays, sources, unknown = mapping.map_state_dict(sd, _resolver(arch, sd))
  back = {v: k for k, v in sources.items() if v != mapping.IGNORED}
  lines.append(f"{p}: {len(sd)} arrays as torchvision {arch_name}")
  for k, v in sd.items():
    to = back.get(k) or ("(dropped: unused counter)" if sources.get(k) == mapping.IGNORED
                         else "(not part of the architecture)")
    shape = f" {tuple(arrays[to].shape)}" if to in arrays else ""
    lines.append(f"  {k} {tuple(np.shape(v))} -> {to}{shape}")
  return lines


def list_lines() -> list[str]:
  """The supported architectures, what to download, and how to convert it."""
  lines = [
      "Supported architectures. On a machine with internet access and torchvision,",
      "download the file (or: python -c \"import torchvision; "
      "torchvision.models.get_weight('ENUM').get_state_dict()\" caches it under",
      "~/.cache/torch/hub/checkpoints), copy it here and convert it; torch is needed",
      "only to read a .pth (pip install 'midog-jax[torch]'). Without torch here, save",
      "it as safetensors there: python -c \"import torch; from safetensors.torch import",
      "save_file; save_file(torch.load('F.pth', weights_only=True), 'F.safetensors')\"",
      "",
  ]
  for arch in archs_lib.ARCHS.values():
    tested = "" if arch.parity_tested else "  (converts; parity not tested)"
    lines.append(f"{arch.name}  [{arch.builder}]{tested}")
    for enum, url in arch.weights.items():
      fname = url.rsplit("/", 1)[1]
      lines.append(f"  weights {enum}")
      lines.append(f"    download: {url}")
      lines.append(f"    convert:  python -m midog_jax.weights convert --arch {arch.name} "
                   f"--src {fname} --out {Path(fname).stem}.safetensors")
  return lines
