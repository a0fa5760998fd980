"""Counts per domain and class of a MIDOG-format annotation file.

Usage:
  python -m midog_jax.data.summary --annotations ../shared/data/midog/MIDOG.json
  python -m midog_jax.data.summary --annotations DIR/MIDOG.json --images DIR --json
"""

from __future__ import annotations

import argparse
import json
import sys

from midog_jax.data import midog
from midog_jax.errors import DataError


def summarize(dataset: midog.MidogDataset, check_images: bool = False) -> dict:
  """Totals and per-domain counts; with ``check_images`` also verifies the files.

  Image checks open each TIFF header only (no pixels are decoded) and compare
  its size with the annotation file's.
  """
  cases = dataset.cases
  out = dict(
      annotations=str(dataset.annotations), kind=dataset.kind,
      images=len(cases), labeled_images=sum(c.labeled for c in cases),
      mitotic_figures=sum(len(c.mitoses) for c in cases),
      imposters=sum(len(c.imposters) for c in cases),
      domains=len({c.domain for c in cases}),
      per_domain=midog.count_table(cases))
  if dataset.kind == "midogpp":
    out["official_split"] = {
        s: sum(c.official_split == s for c in cases) for s in ("train", "test")}
  if check_images:
    from midog_jax.data import slides  # Imported lazily: heavy (zarr).
    for c in cases:
      with slides.Slide(c.path) as s:
        slides.check_size(s, c.width, c.height, dataset.annotations)
    out["images_checked"] = len(cases)
  return out


def format_table(summary: dict) -> str:
  """Plain-text table of the per-domain counts."""
  rows = [("domain", "images", "labeled", "mitotic", "imposters")]
  for d, r in summary["per_domain"].items():
    rows.append((d, r["images"], r["labeled_images"], r["mitotic_figures"],
                 r["imposters"]))
  rows.append(("total", summary["images"], summary["labeled_images"],
               summary["mitotic_figures"], summary["imposters"]))
  widths = [max(len(f"{r[i]:,}" if isinstance(r[i], int) else str(r[i]))
                for r in rows) for i in range(5)]
  lines = []
  for k, r in enumerate(rows):
    cells = [(f"{v:,}" if isinstance(v, int) else str(v)) for v in r]
    lines.append("  ".join([cells[0].ljust(widths[0])] +
                           [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]))
    if k == 0 or k == len(rows) - 2:
      lines.append("-" * len(lines[-1]))
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--annotations", required=True, help="MIDOG.json or MIDOG++.json")
  p.add_argument("--images", default=None,
                 help="image folder; when given, every image is checked")
  p.add_argument("--domain_key", default=None, choices=midog.DOMAIN_KEYS)
  p.add_argument("--json", action="store_true", help="print JSON only")
  args = p.parse_args(argv)
  try:
    ds = midog.load_midog(args.annotations, args.images, domain_key=args.domain_key,
                          check_images=args.images is not None)
    s = summarize(ds, check_images=args.images is not None)
  except DataError as e:  # a data error: exit 1, as every program
    print(f"error: {e}", file=sys.stderr)
    return 1
  if args.json:
    print(json.dumps(s))
  else:
    print(f"{s['annotations']} ({s['kind']}): {s['images']:,} images, "
          f"{s['mitotic_figures']:,} mitotic figures, {s['imposters']:,} imposters, "
          f"{s['domains']} domains")
    print(format_table(s))
    if "official_split" in s:
      print("official split: " + ", ".join(f"{k} {v}" for k, v in
                                           s["official_split"].items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
