"""``make demo``: the synthetic midog21 benchmark suite -> RetinaNet -> MIDOG scoring, on a CPU.

1. generates (or reuses) the ``midog21`` suite (``small`` preset) in
   ``OUT/data``: three labelled training scanners and an unlabeled one in
   ``train/``; held-out images of the training scanners and two scanners never
   seen in training in ``test/`` (see ``midog_jax.data.synthetic.suites``);
2. prints its summary;
3. runs the benchmark harness (``python -m midog_jax.benchmark``) on it with
   one seed of ``configs/retina.py:quick`` (trained on ``train/`` only, the
   test folder guarded; resumes if interrupted), the blue-ratio baseline and
   the human-agreement ceiling (rater 1 vs rater 2);
4. prints the F1 table: held-out images of the training scanners, the unseen
   scanners, and every scanner; the full leaderboard (AP, FROC, bootstrap
   intervals, ROI types, charts) is in ``OUT/leaderboard.md``.

  python -m midog_jax.demo --out demo [--preset small|tiny]

Runs from an installed package too (the configs ship inside it).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

METHODS = ("retinanet", "blue_ratio", "human")


def _rows(board: dict) -> list[str]:
  """One line per (method, test subset): F1, precision, recall, AP."""
  from midog_jax.benchmark.suite import GROUPS
  lines = [f"{'method':<12}{'test images':<44}{'F1':>7}{'prec':>7}{'recall':>8}{'AP':>7}"]
  entries = [("human", board.get("human"))] + [
      (n, board["detection"].get(n)) for n in METHODS if n != "human"]
  doms = board["domains"]
  for name, d in entries:
    if not d:
      continue
    s = d["summary"]
    subsets = [("all", s["all"])] + [(g, s["group"][g]) for g in GROUPS if g in s["group"]]
    subsets += [(f"  {dom} ({'unseen' if doms[dom] == GROUPS[1] else 'training'} scanner)",
                 s["domain"][dom]) for dom in doms if dom in s["domain"]]
    for label, m in subsets:
      ap = m["ap"]["mean"]
      lines.append(f"{name:<12}{label:<44}{m['f1']['mean']:>7.3f}"
                   f"{m['precision']['mean']:>7.3f}{m['recall']['mean']:>8.3f}"
                   f"{'     -' if ap is None else f'{ap:>7.3f}'}")
  return lines


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="demo")
  p.add_argument("--preset", default="small", choices=("tiny", "small"),
                 help="suite size (tiny: ~512 px images and the test-sized RetinaNet, "
                 "a smoke run)")
  p.add_argument("--steps", type=int, default=0, help="override total_steps (a smoke run)")
  args = p.parse_args(argv)
  out = Path(args.out)
  t0 = time.perf_counter()
  # Orbax warns on every read-only restore of the final evaluation; errors only.
  logging.getLogger("absl").setLevel(logging.ERROR)

  from midog_jax.data import midog, summary
  from midog_jax.data.synthetic import suite_write
  data = out / "data"
  man = suite_write.read_suite(data)
  if man is None or (man["suite"], man["preset"], man["seed"]) != ("midog21", args.preset, 0):
    print(f"generating the synthetic midog21 suite ({args.preset}) in {data} ...", flush=True)
    suite_write.generate_suite(data, "midog21", args.preset, seed=0, force=man is not None)
    man = suite_write.read_suite(data)
  for sub in ("train", "test"):
    ds = midog.load_midog(data / sub / "MIDOG++.json")
    print(f"\n{sub}/:\n{summary.format_table(summary.summarize(ds))}", flush=True)

  from midog_jax.benchmark import cli
  from midog_jax.fileio import read_json, write_json_atomic
  rc = cli.main(["--suite", "midog21", "--methods", ",".join(METHODS), "--seeds", "1",
                 "--budget", "quick" if args.preset == "small" else "tiny",
                 "--data", str(data), "--out", str(out), "--steps", str(args.steps)])
  if rc != 0:
    return rc
  board = read_json(out / "leaderboard.json")
  print("\n" + "\n".join(_rows(board)))
  minutes = (time.perf_counter() - t0) / 60
  print(f"\ndemo finished in {minutes:.1f} min; leaderboard in {out / 'leaderboard.md'}, "
        f"runs in {out / 'runs'}")
  det = board["detection"]
  write_json_atomic(dict(
      minutes=minutes,
      f1={n: det[n]["summary"]["all"]["f1"]["mean"] for n in det},
      per_group={n: {g: m["f1"]["mean"] for g, m in det[n]["summary"]["group"].items()}
                 for n in det},
      per_domain={n: {d: m["f1"]["mean"] for d, m in det[n]["summary"]["domain"].items()}
                  for n in det},
      human_f1=(board.get("human") or {}).get("summary", {}).get("all", {}).get(
          "f1", {}).get("mean")), out / "demo_result.json")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
