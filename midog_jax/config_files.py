"""The experiment config files and how code outside the command line loads them.

The files are ``configs/<name>.py`` (the repo-root ``configs/`` is a link to
``midog_jax/configs/``, which ships in the package). They import only
``ml_collections`` and ``configs.common`` (``from configs import common``), so
loading a config never pulls in package code; their modules are named
``configs.<name>``, as ``--config=configs/<name>.py`` names them. Run from the
repository root, ``configs`` is importable from the current directory; for
everything else (an installed package, a script in ``benchmarks/``)
:func:`get_config` puts the folder holding ``configs/`` on ``sys.path`` first.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

# The folder that holds configs/ (inside the package, installed or not).
ROOT = Path(__file__).resolve().parent


def module(name: str) -> ModuleType:
  """The config module ``configs.<name>`` (``"common"`` for the shared part)."""
  if str(ROOT) not in sys.path:
    # Appended, not prepended: the package's other modules must not shadow
    # top-level names of anyone else's.
    sys.path.append(str(ROOT))
  loaded = importlib.import_module("configs")
  ours = (ROOT / "configs").resolve()
  if not any(Path(p).resolve() == ours for p in getattr(loaded, "__path__", [])):
    raise ImportError(f"another package named 'configs' is imported ({loaded.__file__}); "
                      f"midog-jax's configs are in {ours}")
  return importlib.import_module(f"configs.{name}")


def get_config(name: str, arg: str | None = None):
  """``configs/<name>.py``'s ``get_config(arg)``, e.g. ``get_config("retina", "quick")``."""
  return module(name).get_config(arg)
