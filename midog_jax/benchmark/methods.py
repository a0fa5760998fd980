"""The benchmark's methods: one declared interface, every method of the codebase registered.

A :class:`Method` says how one (method, seed) run is trained and how it
predicts on the test images, as command lines (the same programs a user
runs: ``main``, ``mining``, ``predict``, ``adapt``, ...), so the leaderboard
can print the exact commands behind every number. Training commands run
under the test-folder guard in its strict mode, prediction commands in its
images-only mode (``guard.py``).

Every detector module in ``midog_jax/detectors/`` must be trained by some
registered method (``tests/test_benchmark.py`` checks it through each
method's config), so a method that lands later has to register here.

Predictions are written at a low score threshold (:data:`LOW_THRESHOLD`, or
the model's own threshold when that is lower) so that average precision and
FROC see the whole ranking; F1 is computed at the operating threshold the
run chose on its validation images (``WORKDIR/eval/summary.json``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Callable

from midog_jax.benchmark import suite as suite_lib
from midog_jax.errors import DataError
from midog_jax.fileio import read_json

DETECTOR, IMAGE_LEVEL, BASELINE, REFERENCE = "detector", "image_level", "baseline", "reference"
KINDS = (DETECTOR, IMAGE_LEVEL, BASELINE, REFERENCE)
BUDGETS = ("quick", "full", "tiny")
LOW_THRESHOLD = 0.01
MINING_ROUNDS = {"tiny": 2, "quick": 3, "full": 3}


@dataclasses.dataclass(frozen=True)
class Command:
  """One program run: ``argv``, its stage ("train" or "predict") and guard mode."""

  argv: tuple[str, ...]
  stage: str

  @property
  def images_only(self) -> bool:
    """Prediction may read the test images (never their labels); training nothing."""
    return self.stage == "predict"


@dataclasses.dataclass(frozen=True)
class Context:
  """What one (method, seed) run's commands depend on."""

  suite: suite_lib.Suite
  protocol: str
  budget: str
  seed: int
  out: Path                      # the benchmark folder (DIR)
  config_dir: str                # "configs" (run from the checkout) or an absolute path
  method: str = ""               # the method whose run this is
  python: str = sys.executable
  cases: tuple = ()              # the scored test cases (prediction commands only)
  steps: int = 0                 # > 0: overrides every training's total_steps

  def run_dir(self, method: str) -> Path:
    return self.out / "runs" / method / f"seed{self.seed}"

  def workdir(self, method: str) -> Path:
    return self.run_dir(method) / "work"

  @property
  def cache(self) -> Path:
    return self.out / "cache"

  def config(self, name: str, *args: str) -> str:
    """``--config=configs/<name>.py[:args]`` with the budget's argument first."""
    budget = {"quick": ["quick"], "full": [], "tiny": ["quick", "tiny"]}[self.budget]
    arg = ",".join(budget + [a for a in args if a])
    return f"--config={self.config_dir}/{name}.py" + (f":{arg}" if arg else "")

  def data_flags(self) -> list[str]:
    """The flags that put every training on the same data, split and seed."""
    return [f"--config.seed={self.seed}",
            f"--config.data.root={self.suite.train_dir}",
            f"--config.data.split={suite_lib.training_split(self.protocol)}",
            f"--config.data.domain_key={self.suite.domain_key}",
            "--config.data.extra_truth="] + (
                [f"--config.total_steps={self.steps}"] if self.steps else [])


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the leaderboard and how to produce it.

  Attributes:
    name: the ``--methods`` name.
    kind: DETECTOR and BASELINE rows are on the detection table,
      IMAGE_LEVEL on the image-level table, REFERENCE is the human ceiling.
    title: what it is, with the paper.
    config: ``configs/<config>.py`` trained by the method ("" for none); its
      ``config.method`` is the detector it covers.
    config_args: extra config arguments (``aug=od``).
    needs: methods whose trained runs (same seed) this one uses.
    seeded: False for deterministic methods (run once, not per seed).
    train: the training commands of a run.
    predict: the prediction commands (after training).
    operating: (predictions folder, threshold) that F1 is computed from.
    note: how it is trained and scored, for the report.
    threshold_label: shown instead of the operating threshold when that is
      not one number (the ensemble: each member's own).
  """

  name: str
  kind: str
  title: str
  config: str = ""
  config_args: tuple[str, ...] = ()
  needs: tuple[str, ...] = ()
  seeded: bool = True
  train: Callable[[Context], list[Command]] = lambda ctx: []
  predict: Callable[[Context], list[Command]] = lambda ctx: []
  operating: Callable[[Context], tuple[Path, float]] | None = None
  note: str = ""
  threshold_label: str = ""


# ----------------------------------------------------------------------------
# Where a trained run keeps its weights and threshold.


def summary_threshold(workdir: Path) -> float:
  """The validation-chosen threshold of a trained workdir (``eval/summary.json``)."""
  summary = read_json(workdir / "eval" / "summary.json", "training summary")
  if not isinstance(summary, dict) or "threshold" not in summary:
    raise DataError(workdir / "eval" / "summary.json", "no 'threshold' in the training summary")
  return float(summary["threshold"])


def best_round(workdir: Path) -> Path:
  """The workdir of the best mining round (``mining.json``'s ``best_round``)."""
  mining = read_json(workdir / "mining.json", "mining summary")
  k = mining.get("best_round") if isinstance(mining, dict) else None
  if k is None:
    raise DataError(workdir / "mining.json", "no best round recorded")
  return workdir / f"round_{int(k)}"


def _low(threshold: float) -> str:
  return f"{min(LOW_THRESHOLD, threshold):.6g}"


def _py(ctx: Context, module: str, *args: str, stage: str) -> Command:
  return Command((ctx.python, "-m", module) + tuple(args), stage)


# ----------------------------------------------------------------------------
# Command builders.


def _main(config: str, *args: str, extra: Callable[[Context], list[str]] = lambda c: []):
  """Training through ``python -m midog_jax.main`` (one workdir)."""
  def train(ctx: Context) -> list[Command]:
    return [_py(ctx, "midog_jax.main", ctx.config(config, *args),
                f"--workdir={ctx.workdir(ctx.method)}", *ctx.data_flags(), *extra(ctx),
                stage="train")]
  return train


def _predict_single(weights: Callable[[Context], Path]):
  """``python -m midog_jax.predict`` on the test folder, at a low threshold."""
  def predict(ctx: Context) -> list[Command]:
    w = weights(ctx)
    t = summary_threshold(w)
    return [_py(ctx, "midog_jax.predict", f"--workdir={w}", f"--images={ctx.suite.test_dir}",
                f"--out={ctx.run_dir(ctx.method) / 'preds'}", f"--threshold={_low(t)}",
                stage="predict")]
  return predict


def _operating_single(weights: Callable[[Context], Path]):
  def operating(ctx: Context) -> tuple[Path, float]:
    return ctx.run_dir(ctx.method) / "preds", summary_threshold(weights(ctx))
  return operating


def _own(ctx: Context) -> Path:
  return ctx.workdir(ctx.method)


def _p4_best(method: str) -> Callable[[Context], Path]:
  return lambda ctx: best_round(ctx.workdir(method))


def _mining(aug: str):
  def train(ctx: Context) -> list[Command]:
    return [_py(ctx, "midog_jax.mining", ctx.config("p4_resnet", f"aug={aug}"),
                f"--workdir={ctx.workdir(ctx.method)}", f"--rounds={MINING_ROUNDS[ctx.budget]}",
                *ctx.data_flags(), stage="train")]
  return train


def _kondo_flags(ctx: Context) -> list[str]:
  # The scanner head has one class per training domain; candidate stores are
  # shared by every run of the benchmark (keyed by images and settings).
  n = len(suite_lib.training_domains(ctx.suite, ctx.protocol))
  return [f"--config.model.num_domains={n}",
          f"--config.kondo.store_dir={ctx.cache / 'candidates'}"]


def _image_level_flags(ctx: Context) -> list[str]:
  return [f"--config.image_level.cache_dir={ctx.cache / 'image_level'}"]


def _ensemble_predict(ctx: Context) -> list[Command]:
  """Agreement of the CA-RGB and CA-OD P4 models (Lafarge & Koelzer's submission).

  Twice: at each member's own threshold (the method's output, for F1) and
  with every member at the low threshold (the ranking, for AP and FROC).
  """
  members = [f"--workdir={best_round(ctx.workdir(m))}" for m in ("p4", "p4_od")]
  rd = ctx.run_dir(ctx.method)
  low = _low(min(summary_threshold(best_round(ctx.workdir(m))) for m in ("p4", "p4_od")))
  return [_py(ctx, "midog_jax.predict", *members, f"--images={ctx.suite.test_dir}",
              f"--out={rd / 'preds_op'}", stage="predict"),
          _py(ctx, "midog_jax.predict", *members, f"--images={ctx.suite.test_dir}",
              f"--out={rd / 'preds'}", f"--threshold={low}", stage="predict")]


def _adapt_predict(ctx: Context) -> list[Command]:
  """Kondo's adaptation phase on each test domain's images (their labels never read)."""
  w = ctx.workdir("kondo_da")
  low = _low(summary_threshold(w))
  out = ctx.run_dir(ctx.method) / "preds"
  return [_py(ctx, "midog_jax.adapt", f"--workdir={w}", "--images",
              *[str(c.path) for c in cases], f"--out={out}", "--per=domain",
              f"--threshold={low}", stage="predict")
          for cases in suite_lib.by_domain(ctx.cases).values()]


def _fields_predict(weights: Callable[[Context], Path]):
  def predict(ctx: Context) -> list[Command]:
    return [_py(ctx, "midog_jax.benchmark.fields", f"--workdir={weights(ctx)}",
                f"--images={ctx.suite.test_dir}",
                f"--out={ctx.run_dir(ctx.method) / 'preds' / 'fields.json'}", stage="predict")]
  return predict


def _il2_train(ctx: Context) -> list[Command]:
  """Round 2: stage a (the head on the frozen backbone), then b (unfrozen), from a."""
  w = ctx.workdir(ctx.method)
  a = _py(ctx, "midog_jax.main", ctx.config("image_level", "round=2", "stage=a"),
          f"--workdir={w / 'a'}", *ctx.data_flags(), *_image_level_flags(ctx), stage="train")
  b = _py(ctx, "midog_jax.main", ctx.config("image_level", "round=2", "stage=b"),
          f"--workdir={w / 'b'}", *ctx.data_flags(), *_image_level_flags(ctx),
          f"--config.init_from={w / 'a'}", stage="train")
  return [a, b]


def _blue_ratio_predict(ctx: Context) -> list[Command]:
  return [_py(ctx, "midog_jax.benchmark.blue_ratio", f"--images={ctx.suite.test_dir}",
              f"--out={ctx.run_dir(ctx.method) / 'preds'}", stage="predict")]


def _fixed(threshold: float):
  return lambda ctx: (ctx.run_dir(ctx.method) / "preds", threshold)


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("retinanet", DETECTOR, "RetinaNet, ResNet FPN, focal loss (Sheta, MIDOG 2021 report)",
           config="retina", train=_main("retina"), predict=_predict_single(_own),
           operating=_operating_single(_own),
           note="`main` (best-validation-F1 checkpoint and its threshold), then `predict`"),
    Method("p4", DETECTOR, "P4 rotation-equivariant ResNet, CA-RGB, hard-negative mining "
           "(Lafarge & Koelzer, MIDOG 2022)", config="p4_resnet", config_args=("aug=rgb",),
           train=_mining("rgb"), predict=_predict_single(_p4_best("p4")),
           operating=_operating_single(_p4_best("p4")),
           note="`mining` rounds (stain-mined negatives from the unlabeled images of train/); "
           "the best round's weights and threshold, then `predict`"),
    Method("p4_od", DETECTOR, "P4 ResNet, CA-OD colour augmentation, hard-negative mining "
           "(Lafarge & Koelzer, MIDOG 2022)", config="p4_resnet", config_args=("aug=od",),
           train=_mining("od"), predict=_predict_single(_p4_best("p4_od")),
           operating=_operating_single(_p4_best("p4_od")),
           note="as p4 with optical-density colour augmentation"),
    Method("ensemble", DETECTOR, "agreement ensemble of p4 and p4_od (Lafarge & Koelzer, "
           "MIDOG 2022)", needs=("p4", "p4_od"), predict=_ensemble_predict,
           operating=lambda ctx: (ctx.run_dir(ctx.method) / "preds_op", 0.0),
           note="no training of its own: `predict` with both workdirs; F1 at each member's "
           "own threshold, AP/FROC from the members at the low threshold",
           threshold_label="members' own"),
    Method("kondo_da", DETECTOR, "blue-ratio candidates + domain-adversarial ResNet-18 "
           "(Kondo, MIDOG 2021), no adaptation", config="kondo_da",
           train=_main("kondo_da", extra=_kondo_flags), predict=_predict_single(_own),
           operating=_operating_single(_own),
           note="`main`, then `predict` (the source model as trained)"),
    Method("kondo_adapt", DETECTOR, "kondo_da + test-time domain adaptation on each test "
           "domain's unlabeled images (Kondo, MIDOG 2021)", needs=("kondo_da",),
           predict=_adapt_predict,
           operating=_operating_single(lambda ctx: ctx.workdir("kondo_da")),
           note="kondo_da's weights, then `adapt --per domain` on each test domain's "
           "images (labels never read)"),
    Method("image_level", IMAGE_LEVEL, "image-level classifier, round 1: frozen EfficientNet "
           "features, dense head + random forest (Irfan, SOFTEC AIC'24)", config="image_level",
           train=_main("image_level", extra=_image_level_flags),
           predict=_fields_predict(_own),
           note="`main`; test fields scored by `python -m midog_jax.benchmark.fields`"),
    Method("image_level_ft", IMAGE_LEVEL, "image-level classifier, round 2: EfficientNet "
           "fine-tuned, head then all layers (Irfan, SOFTEC AIC'24)", config="image_level",
           config_args=("round=2",), train=_il2_train,
           predict=_fields_predict(lambda ctx: ctx.workdir(ctx.method) / "b"),
           note="`main` stage a, then stage b from a; test fields as image_level"),
    Method("blue_ratio", BASELINE, "blue-ratio candidates as detections (Kondo's candidate "
           "step; no training)", seeded=False, predict=_blue_ratio_predict,
           operating=_fixed(0.0),
           note="no training, no scores (every candidate scores 1)"),
    Method("human", REFERENCE, "human agreement: rater 1 vs rater 2 on the test labels",
           seeded=False, note="the per-rater `labels` of test/MIDOG++.json; no commands"),
)}


def get(name: str) -> Method:
  return REGISTRY[name]


def parse_methods(text: str) -> list[str]:
  """``--methods`` as registered names (``all`` = every method), deduplicated.

  Raises ValueError listing the registered names for an unknown one.
  """
  names = [n.strip() for n in text.split(",") if n.strip()]
  if names == ["all"]:
    return list(REGISTRY)
  unknown = [n for n in names if n not in REGISTRY]
  if unknown or not names:
    raise ValueError(f"unknown method {', '.join(unknown) or repr(text)}; registered: "
                     f"{', '.join(REGISTRY)} (or all)")
  return list(dict.fromkeys(names))


def with_needs(names: list[str]) -> list[str]:
  """``names`` preceded by every method they need (trained first)."""
  out: list[str] = []

  def add(n: str) -> None:
    for m in REGISTRY[n].needs:
      add(m)
    if n not in out:
      out.append(n)

  for n in names:
    add(n)
  return out


def config_dir() -> tuple[str, Path]:
  """(``--config`` folder, working directory) for the training commands.

  From a checkout: ``configs`` relative to the repository root, the form the
  README uses. From an installed package: the absolute path inside it (the
  guard's ``sitecustomize`` puts the package folder on ``sys.path`` so the
  configs' ``from configs import common`` resolves).
  """
  from midog_jax import config_files  # pylint: disable=g-import-not-at-top
  repo = config_files.ROOT.parent
  if (repo / "configs").is_dir() and (repo / "setup.py").is_file():
    return "configs", repo
  return os.fspath(config_files.ROOT / "configs"), config_files.ROOT.parent
