"""Command line: ``python -m midog_jax.weights convert|inspect|list``.

  convert --arch ARCH --src FILE.pth|FILE.safetensors --out OUT.safetensors
          [--norm frozen|batch] [--resize-to N]
  inspect FILE [--arch ARCH]
  list

``convert`` prints one JSON summary line. Exit codes: 0 done, 1 a bad input
file (one line naming it), 2 usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from midog_jax import errors
from midog_jax.weights import archs as archs_lib
from midog_jax.weights import converter as convert_lib


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m midog_jax.weights",
                               description=__doc__.splitlines()[0])
  sub = ap.add_subparsers(dest="command", required=True)
  c = sub.add_parser("convert", help="torchvision state dict -> project safetensors")
  c.add_argument("--arch", required=True, choices=list(archs_lib.ARCHS))
  c.add_argument("--src", required=True, help="torch .pth or .safetensors state dict")
  c.add_argument("--out", required=True, help="output .safetensors file")
  c.add_argument("--norm", choices=("frozen", "batch"), default=None,
                 help="backbone norm to record (ResNets: frozen, RetinaNet v2: batch)")
  c.add_argument("--resize-to", type=int, default=None,
                 help="RetinaNet input resize to record (default 800; 0: none)")
  i = sub.add_parser("inspect", help="arrays, shapes and what they map to")
  i.add_argument("file")
  i.add_argument("--arch", choices=list(archs_lib.ARCHS), default=None,
                 help="for a source state dict: show its mapping for this arch")
  sub.add_parser("list", help="supported architectures and their weights")
  args = ap.parse_args(argv)  # usage errors: argparse prints them, exit 2

  if args.command == "convert":
    if not args.out.endswith(".safetensors"):
      ap.error("--out must end in .safetensors")
    try:  # option combinations that do not apply to the arch: usage errors
      run = lambda: print(json.dumps(convert_lib.convert(
          args.arch, args.src, args.out, norm=args.norm, resize_to=args.resize_to)),
          flush=True)
      return errors.exit_code(run)
    except ValueError as e:
      ap.error(str(e))
  if args.command == "inspect":
    return errors.exit_code(
        lambda: print("\n".join(convert_lib.inspect_lines(args.file, args.arch)),
                      flush=True))
  print("\n".join(convert_lib.list_lines()), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
