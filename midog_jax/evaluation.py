"""Evaluating a detector on whole images: validation, final evaluation, ``eval/``.

Shared by training (validation during training and the final evaluation),
prediction and the methods to come, so that every caller tiles, thresholds
and scores images the same way:

  * :class:`Tiler`/:func:`make_tiler`: the one setup of a detector's tile
    function with its tiling (the candidate cut-off, the tile batch rounded to
    the device count, the detector's context);
  * :func:`detect_cases` and :func:`validate` (F1-best threshold on the
    validation images, the organisers' matching);
  * :class:`BestCheckpoint`: the rule that decides whether a validation
    result is the new best (highest F1, or lowest validation loss) and the
    threshold that goes with the best weights;
  * :func:`evaluate_sets`: every evaluation set scored with the best weights,
    written to ``WORKDIR/eval/<set>/`` (metrics, challenge JSON, overlays),
    and :func:`format_table` (the per-domain table ``make demo`` prints).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence


from midog_jax import evaluate as eval_lib
from midog_jax import export, infer, parallel, tta
from midog_jax.data import slides as slides_lib
from midog_jax.detections import Detections
from midog_jax.detectors import interface
from midog_jax.fileio import write_json_atomic


@dataclasses.dataclass
class Tiler:
  """A detector's jitted tile function with the tiling it runs under."""

  tile_cfg: infer.TileConfig
  tile_fn: Any
  variables: Any
  mesh: Any
  tta: bool = False  # D4 test-time augmentation (``tta.py``; 8x the cost)

  def detect(self, source) -> Detections:
    """Candidates of one whole image (``source``: a slide, path or array)."""
    if self.tta:
      return tta.detect(source, self.tile_fn, self.variables, self.tile_cfg, self.mesh)
    return infer.detect(source, self.tile_fn, self.variables, self.tile_cfg, self.mesh)


def make_tiler(detector, variables: dict, config, *, score_thresh: float | None = None,
               mesh=None) -> Tiler:
  """The tile function of ``detector`` with ``variables`` and ``config.eval``.

  Runs on this process's devices (``parallel.local_mesh``) with the weights
  replicated there, so every process of a multi-host run can call it on its
  own. ``score_thresh`` lowers (never raises) ``config.eval.score_thresh``,
  the cut-off for candidates; the tile batch is rounded up to a multiple of
  the device count (tiles are sharded over the devices). ``eval.inference``
  picks tiles (the default: one compiled program for every image size) or
  regions (a few large regions per image, sides a multiple of the detector's
  ``input_multiple``; one program per distinct image size), see ``infer``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  own = interface.hook(detector, "make_tiler")
  if own is not None:
    # A method whose whole images are not tiled (kondo_da: the image's
    # candidates, then their patches): its own object with ``detect``.
    return own(variables, config, score_thresh=score_thresh, mesh=mesh)
  mesh = mesh if mesh is not None else parallel.local_mesh()
  # Regions' sides are rounded to the detector's stride multiple (1: any size).
  multiple = interface.hook(detector, "input_multiple") or 1
  cfg = infer.TileConfig.from_config(config.eval, context=detector.tile_context,
                                     multiple=multiple)
  n_dev = mesh.devices.size
  thresh = cfg.score_thresh if score_thresh is None else min(cfg.score_thresh,
                                                             float(score_thresh))
  cfg = dataclasses.replace(cfg, score_thresh=thresh,
                            tile_batch=-(-cfg.tile_batch // n_dev) * n_dev)
  variables = jax.device_put(parallel.to_host(variables), parallel.replicated(mesh))
  return Tiler(cfg, detector.make_tile_fn(thresh), variables, mesh,
               tta=bool(config.eval.get("tta", False)))


def detect_cases(detector, variables: dict, cases, config) -> dict[int, Detections]:
  """Whole-image candidates (above ``eval.score_thresh``) of each case, by image id."""
  tiler = make_tiler(detector, variables, config)
  return {c.image_id: tiler.detect(slides_lib.open_slide(c.path)) for c in cases}


def validate(detector, variables: dict, cases, config) -> dict:
  """The F1-best threshold on the validation images and the scores at it."""
  if config.eval.max_val_images:
    cases = cases[:config.eval.max_val_images]
  dets = detect_cases(detector, variables, cases, config)
  # Detections are scored as the evaluator scores them: mitotic points only.
  t, _, _ = eval_lib.threshold_sweep(cases, dets)
  at = eval_lib.evaluate_points(cases, dets, threshold=t)
  extra = interface.hook(detector, "extra_validation")  # more scalars (kondo_da's candidate F1)
  return dict(threshold=float(t), f1=float(at["f1"]), precision=float(at["precision"]),
              recall=float(at["recall"]),
              **(extra(variables, cases, config) if extra else {}))


@dataclasses.dataclass
class BestCheckpoint:
  """Which validation result is the best so far, and its threshold.

  ``metric`` "f1" keeps the highest validation F1; "val_loss" the lowest
  validation loss (Lafarge & Koelzer keep the weights of the lowest
  validation loss). Either way the threshold kept with the best weights is the
  F1-best threshold of that same validation. ``threshold`` is the default
  used when nothing was validated (``eval.default_threshold``).
  """

  metric: str = "f1"
  threshold: float = 0.5
  f1: float = -1.0
  step: int | None = None
  val_loss: float | None = None

  METRICS = ("f1", "val_loss")

  def __post_init__(self):
    if self.metric not in self.METRICS:
      raise ValueError(f"best_metric must be one of {self.METRICS}, got {self.metric!r}")

  @property
  def validated(self) -> bool:
    """True once some validation has been recorded."""
    return self.step is not None

  def is_better(self, scalars: dict) -> bool:
    """Whether a validation's scalars (``val_f1``, ``val_loss``) beat the best."""
    if self.metric == "val_loss":
      return scalars["val_loss"] < (math.inf if self.val_loss is None else self.val_loss)
    return scalars["val_f1"] > self.f1

  def update(self, step: int, scalars: dict) -> bool:
    """Records ``scalars`` when they are better; returns whether they were."""
    if not self.is_better(scalars):
      return False
    self.step, self.f1 = int(step), float(scalars["val_f1"])
    self.threshold = float(scalars["val_threshold"])
    self.val_loss = (float(scalars["val_loss"]) if "val_loss" in scalars else None)
    return True

  def to_meta(self) -> dict:
    """The checkpoint meta: the threshold once, and what made the weights best."""
    best = dict(metric=self.metric, f1=self.f1, step=self.step)
    if self.val_loss is not None:
      best["val_loss"] = self.val_loss
    return dict(threshold=self.threshold, best=best)

  @classmethod
  def from_meta(cls, meta: dict, metric: str, default_threshold: float) -> "BestCheckpoint":
    """The rule's state as saved with a checkpoint (the defaults when absent)."""
    best = meta.get("best") or {}
    return cls(metric=metric, threshold=float(meta.get("threshold", default_threshold)),
               f1=float(best.get("f1", -1.0)), step=best.get("step"),
               val_loss=best.get("val_loss"))


def write_eval(workdir: Path, name: str, cases, dets: dict[int, Detections],
               threshold: float, overlays: int) -> dict:
  """``eval/<name>/``: ``metrics.json``, ``predictions/<stem>.json``, overlays."""
  out = Path(workdir) / "eval" / name
  result = eval_lib.evaluate_points(cases, dets, threshold=threshold)
  result["threshold"] = threshold
  for c in cases:
    write_json_atomic(export.to_challenge_json(dets[c.image_id].above(threshold),
                                               c.spacing_um),
                      out / "predictions" / f"{c.stem}.json")
  for c in cases[:overlays]:
    export.overlay_png(slides_lib.open_slide(c.path).read_all(),
                       dets[c.image_id].above(threshold).mitotic(),
                       c.mitoses, c.imposters, out / "overlays" / f"{c.stem}.png",
                       match_radius_px=7.5 / c.spacing_um)
  write_json_atomic(result, out / "metrics.json")
  return result


def evaluate_sets(detector, variables: dict, threshold: float, sets: dict[str, Sequence],
                  config, workdir: str | Path) -> dict:
  """Scores every non-empty evaluation set and writes ``eval/<set>/``."""
  results = {}
  for name, cases in sets.items():
    if not cases:
      continue
    dets = detect_cases(detector, variables, cases, config)
    results[name] = write_eval(Path(workdir), name, cases, dets, threshold,
                               overlays=2 if config.eval.write_overlays else 0)
  return results


def format_table(results: dict) -> str:
  """Per-set and per-domain F1 table (what ``make demo`` prints)."""
  lines = [f"{'set':<16}{'domain':<22}{'F1':>7}{'prec':>7}{'recall':>8}{'TP':>6}{'FP':>6}{'FN':>6}"]
  for name, r in results.items():
    rows = [("all", r)] + sorted(r.get("per_domain", {}).items())
    for dom, m in rows:
      lines.append(f"{name:<16}{dom:<22}{m['f1']:>7.3f}{m['precision']:>7.3f}"
                   f"{m['recall']:>8.3f}{m['tp']:>6}{m['fp']:>6}{m['fn']:>6}")
  return "\n".join(lines)
