"""The benchmark harness and leaderboard (issue 12): every method on the same splits and seeds.

  python -m midog_jax.benchmark --suite midog21 --methods retinanet,p4,blue_ratio,human \\
      --seeds 3 --budget quick --out bench/midog21

Modules by concern: ``cli`` (the command line), ``suite`` (the suite folder,
protocols, the scored test cases), ``methods`` (the registry: how each method
is trained and predicts, as commands), ``guard`` (training never reads the
test folder, checked by an audit hook in every training process), ``runner``
(resumable runs), ``scoring`` and ``leaderboard`` (numbers per run and over
seeds, bootstrap intervals), ``report`` and ``charts`` (markdown, JSON, PNG),
and two prediction programs the registry runs: ``blue_ratio`` (the baseline's
detections as challenge JSON) and ``fields`` (image-level field scores).
Importing the package loads none of them.
"""
