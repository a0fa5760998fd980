"""``make demo``: synthetic data -> RetinaNet training -> MIDOG evaluation, on a CPU.

1. generates (or reuses) the synthetic ``small`` set in ``OUT/data``;
2. prints its summary and the blue-ratio baseline's score;
3. trains ``configs/retina.py:quick`` in ``OUT/run`` (resuming if interrupted);
4. evaluates on held-out images of the training scanners (``val``) and on the
   held-out scanner (the unlabeled Leica GT450 domain, scored against its truth
   file), printing the per-domain F1 table; predictions (challenge JSON) and
   overlay PNGs are in ``OUT/run/eval/<set>/``.

  python -m midog_jax.demo --out demo [--steps N] [--preset small|tiny]

Runs from an installed package too (the configs ship inside it).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="demo")
  p.add_argument("--steps", type=int, default=0, help="override total_steps")
  p.add_argument("--preset", default="small", choices=("tiny", "small"),
                 help="synthetic set (tiny: 8 images of ~512 px and the test-sized "
                 "RetinaNet, a smoke run)")
  args = p.parse_args(argv)
  out = Path(args.out)
  t0 = time.perf_counter()
  # Orbax warns on every read-only restore of the final evaluation; errors only.
  logging.getLogger("absl").setLevel(logging.ERROR)

  from midog_jax.data import experiment, midog, summary
  data_dir = experiment.ensure_synthetic(out / "data", args.preset, seed=0)
  ds = midog.load_midog(data_dir / "MIDOG.json")
  print(summary.format_table(summary.summarize(ds)), flush=True)

  from midog_jax.baselines import blue_ratio
  br = blue_ratio.evaluate(data_dir)
  print(f"blue-ratio baseline (Kondo's candidate step): F1 {br['f1']:.3f} "
        f"(precision {br['precision']:.3f}, recall {br['recall']:.3f})", flush=True)

  from midog_jax import config_files, train
  # The tiny preset is a smoke run: test-sized data and the test-sized model.
  config = config_files.get_config("retina", "quick,tiny" if args.preset == "tiny" else "quick")
  config.data.root = str(data_dir)
  if args.steps:
    config.total_steps = args.steps
  results = train.train_and_evaluate(config, str(out / "run"))
  minutes = (time.perf_counter() - t0) / 60
  print(f"\ndemo finished in {minutes:.1f} min; outputs in {out / 'run'}")
  from midog_jax.fileio import write_json_atomic
  write_json_atomic(dict(
      minutes=minutes, baseline_f1=br["f1"],
      f1={k: v["f1"] for k, v in results.items()},
      per_domain={k: {d: m["f1"] for d, m in v["per_domain"].items()}
                  for k, v in results.items()}), out / "demo_result.json")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
