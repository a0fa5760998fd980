"""``make demo``: synthetic data -> RetinaNet training -> MIDOG evaluation, on a CPU.

1. generates (or reuses) the synthetic ``small`` set in ``OUT/data``;
2. prints its summary and the blue-ratio baseline's score;
3. trains ``configs/retina.py:quick`` in ``OUT/run`` (resuming if interrupted);
4. evaluates on held-out images of the training scanners (``val``) and on the
   held-out scanner (the unlabeled Leica GT450 domain, scored against its truth
   file), printing the per-domain F1 table; predictions (challenge JSON) and
   overlay PNGs are in ``OUT/run/eval/<set>/``.

  python -m midog_jax.demo --out demo [--steps N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="demo")
  p.add_argument("--steps", type=int, default=0, help="override total_steps")
  args = p.parse_args(argv)
  out = Path(args.out)
  t0 = time.perf_counter()

  from midog_jax.data import experiment, midog, summary
  data_dir = experiment.ensure_synthetic(out / "data", "small", seed=0)
  ds = midog.load_midog(data_dir / "MIDOG.json")
  print(summary.format_table(summary.summarize(ds)), flush=True)

  from midog_jax.baselines import blue_ratio
  br = blue_ratio.evaluate(data_dir)
  print(f"blue-ratio baseline (seed 002's candidate step): F1 {br['f1']:.3f} "
        f"(precision {br['precision']:.3f}, recall {br['recall']:.3f})", flush=True)

  import configs.retina
  from midog_jax import train
  config = configs.retina.get_config("quick")
  config.data.root = str(data_dir)
  if args.steps:
    config.total_steps = args.steps
  results = train.train_and_evaluate(config, str(out / "run"))
  minutes = (time.perf_counter() - t0) / 60
  print(f"\ndemo finished in {minutes:.1f} min; outputs in {out / 'run'}")
  (out / "demo_result.json").write_text(json.dumps(dict(
      minutes=minutes, baseline_f1=br["f1"],
      f1={k: v["f1"] for k, v in results.items()},
      per_domain={k: {d: m["f1"] for d, m in v["per_domain"].items()}
                  for k, v in results.items()}), indent=1))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
