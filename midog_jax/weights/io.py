"""Reading torchvision state dicts and writing converted safetensors files.

A source is a torch ``.pth`` (read with ``torch.load(weights_only=True)``
only: a file that needs full unpickling could run arbitrary code and is
refused) or a ``.safetensors`` file with the same names (read without torch).
torch is imported only when a ``.pth`` is read; it is an optional extra
(``pip install 'midog-jax[torch]'``).

A converted file is a safetensors file whose keys are the project's variable
paths (``params/backbone/conv1/kernel``, ``batch_stats/.../mean``) and whose
metadata holds one JSON header under ``HEADER_KEY`` (see
``checkpoint.pretrained_header``, which reads it back).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np

from midog_jax.pretrained import HEADER_KEY
from midog_jax.errors import DataError
from midog_jax.fileio import atomic_path


def sha256(path: str | os.PathLike) -> str:
  """Hex SHA-256 of a file (recorded so a converted file names its source)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A torch state dict as ``{name: float32 or int numpy array}``.

  Raises ``DataError`` (one line naming the file) for a missing, truncated or
  corrupt file, a ``.pth`` that needs full unpickling, or anything that is
  not a flat mapping of names to tensors.
  """
  p = Path(path)
  if not p.is_file():
    raise DataError(p, "weights file not found")
  if p.suffix == ".safetensors":
    from safetensors.numpy import load_file
    try:
      return dict(load_file(str(p)))
    except Exception as e:  # safetensors raises several types for bad files
      raise DataError(p, f"not a readable safetensors file, truncated or corrupt "
                      f"({_first_line(e)})") from None
  try:
    import torch
  except ImportError:
    raise DataError(p, "reading a torch .pth needs torch (pip install "
                    "'midog-jax[torch]'), or convert a .safetensors copy "
                    "of the state dict instead") from None
  try:
    obj = torch.load(str(p), weights_only=True, map_location="cpu")
  except pickle.UnpicklingError as e:
    if "weights only" in str(e).lower():
      raise DataError(p, "refused: it needs full unpickling (it holds Python "
                      "objects, not only tensors, and could run code); save "
                      "model.state_dict() instead") from None
    raise DataError(p, f"not a readable torch checkpoint, truncated or corrupt "
                    f"({_first_line(e)})") from None
  except Exception as e:  # zip reader, EOF and pickle errors of many types
    raise DataError(p, f"not a readable torch checkpoint, truncated or corrupt "
                    f"({_first_line(e)})") from None
  if not isinstance(obj, dict) or not obj or not all(
      isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
    raise DataError(p, "not a state dict (a mapping of parameter names to "
                    "tensors); save model.state_dict()")
  out = {}
  for k, v in obj.items():
    v = v.detach().cpu()
    if v.is_floating_point():
      v = v.float()
    out[k] = v.numpy()
  return out


def write_converted(path: str | os.PathLike, arrays: dict[str, np.ndarray],
                    header: dict) -> Path:
  """Writes ``arrays`` and the JSON ``header`` atomically to ``path``."""
  from safetensors.numpy import save_file
  p = Path(path)
  if p.suffix != ".safetensors":
    raise DataError(p, "the output must be a .safetensors file")
  tensors = {k: np.ascontiguousarray(v) for k, v in sorted(arrays.items())}
  with atomic_path(p) as tmp:
    save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(header)})
  return p
