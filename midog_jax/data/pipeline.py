"""grain input pipeline: deterministic, checkpointable streams of patch batches.

The stream is a ``grain.MapDataset`` over global example indices. Example ``i``
is a pure function of ``(seed, i)``: its own ``np.random.Generator`` picks the
case and the patch window (``sampling.py``), the window is read lazily
(``slides.py``) with a margin for shifts and elastic warps, and augmented
(``augment.py``, whose random shift crops the margin off again). With
``augment_on = "device"`` training examples stay the uint8 crop with its
margin, points in crop coordinates and the example's ``index``;
``augment_device.augment_batch`` augments them in the jitted train step. Because
examples are made *before* the stream is sliced per process, the set of
examples in global batch ``s`` does not depend on the number of processes
(hosts): process ``p`` of ``P`` takes examples ``p, p + P, ...``. Batches have
fixed shapes; point labels are padded to ``max_points`` with a mask.

Worker processes (``num_workers > 0``) pickle the example maker; slides hold
no open handles when pickled and are reopened in each worker. Scripts using
workers need an ``if __name__ == "__main__":`` guard (spawn).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import grain
from absl import flags
import numpy as np

from midog_jax.data import augment as augment_lib
from midog_jax.data import sampling
from midog_jax.data import slides as slides_lib
from midog_jax.data.midog import IMPOSTER, MITOSIS, Case

# Far larger than any run needs; MapDataset is lazy so this costs nothing.
_INFINITE = 2 ** 40
STRATEGIES = ("mitosis_centred", "imposter_centred", "random", "balanced")
AUGMENT_ON = ("host", "device")


@dataclasses.dataclass(frozen=True)
class PatchConfig:
  """How patches are sampled and augmented (mirrors ``config.data``)."""

  patch_size: int = 512
  strategy: str = "mitosis_centred"   # one of STRATEGIES
  p_mitosis: float = 0.5              # Sheta (MIDOG 2021) uses p = 0.5
  stratify_domains: bool = False      # equal numbers of patches per domain
  neg_min_dist_px: float = 60.0       # balanced: negatives this far from mitoses
  imposter_fraction: float = 0.5      # balanced: share of negatives on imposters
  max_points: int = 32
  shift: int = 16                     # random shift (px) of the crop
  d4: bool = True
  elastic_alpha: float = 0.0          # 0 disables elastic deformation
  elastic_sigma: float = 8.0
  colour: str = "rgb"                 # "rgb" (CA-RGB), "od" (CA-OD) or "none"
  colour_strength: float = 0.1
  augment_on: str = "host"            # "host" (grain workers) | "device" (train step)

  def __post_init__(self):
    if self.strategy not in STRATEGIES:
      raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
    if self.colour not in ("rgb", "od", "none"):
      raise ValueError(f"colour must be rgb, od or none, got {self.colour!r}")
    if self.augment_on not in AUGMENT_ON:
      raise ValueError(f"augment_on must be one of {AUGMENT_ON}, got {self.augment_on!r}")

  @classmethod
  def from_config(cls, cfg: Any, **overrides) -> "PatchConfig":
    """Builds from a ConfigDict (or dict), ignoring keys that are not fields.

    ``overrides`` replace config values computed elsewhere (the detector's
    ``patch_size`` when the config leaves it 0).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    items = cfg.items() if hasattr(cfg, "items") else vars(cfg).items()
    return cls(**{**{k: v for k, v in items if k in names}, **overrides})

  @property
  def margin(self) -> int:
    """Extra pixels read around the patch so shifts and warps need no padding."""
    warp = int(np.ceil(3 * self.elastic_alpha)) if self.elastic_alpha > 0 else 0
    return self.shift + warp


def check_negatives(negatives: Any, num_cases: int) -> np.ndarray:
  """An explicit negative pool as a float64 (N, 3) array of (case, x, y).

  Raises ValueError unless it is a non-empty (N, 3) array of finite numbers
  whose first column holds whole case indices in ``[0, num_cases)``.
  """
  pool = np.asarray(negatives, np.float64)
  if pool.ndim != 2 or pool.shape[1] != 3 or not len(pool):
    raise ValueError(f"negatives must be a non-empty (N, 3) array of (case_index, "
                     f"x, y), got shape {pool.shape}")
  if not np.isfinite(pool).all():
    raise ValueError("negatives hold non-finite values")
  ci = pool[:, 0]
  if (ci != np.round(ci)).any() or ci.min() < 0 or ci.max() >= num_cases:
    raise ValueError(f"negatives: case indices must be integers in [0, {num_cases})"
                     f", got {ci.min():g}..{ci.max():g}")
  return np.ascontiguousarray(pool)


class PatchMaker:
  """Example ``i`` -> dict of arrays; picklable (used by grain workers).

  ``negatives`` (optional, "balanced" only): an (N, 3) pool of (case_index,
  x, y) negative centres into ``cases`` (Lafarge & Koelzer's mined negatives,
  MIDOG 2022). Odd examples are then centred (+ the positives' jitter) on a
  pool entry drawn uniformly, instead of on ``sample_balanced``'s imposters
  and random points; positives still come from the cases with mitotic figures
  (with ``stratify_domains``, cycling over the domains that have figures only,
  so unlabeled cases added for their pool entries never take positive slots).
  """

  def __init__(self, cases: Sequence[Case], cfg: PatchConfig, seed: int,
               augment: bool = True, negatives: Any = None):
    if not cases:
      raise ValueError("no cases to sample patches from")
    self.cases = list(cases)
    self.cfg = cfg
    self.seed = int(seed)
    self.augment = augment
    # Training crops left for augment_device (validation is never augmented).
    self.on_device = augment and cfg.augment_on == "device"
    self.negatives = None
    if negatives is not None:
      if cfg.strategy != "balanced":
        # Ignoring a pool silently would train on other negatives than asked.
        raise ValueError(f"a negative pool needs strategy 'balanced', not "
                         f"{cfg.strategy!r}")
      self.negatives = check_negatives(negatives, len(self.cases))
    self.domains = sorted({c.domain for c in self.cases})
    self._domain_ids = {d: k for k, d in enumerate(self.domains)}
    self._by_domain = [[i for i, c in enumerate(self.cases) if c.domain == d]
                       for d in self.domains]
    # Balanced batches draw their positives from cases that have figures.
    self._with_mitoses = [[i for i in members if len(self.cases[i].mitoses)]
                          for members in self._by_domain]
    if cfg.strategy == "balanced" and not any(self._with_mitoses):
      raise ValueError("balanced sampling needs at least one mitotic figure")
    host = augment and not self.on_device
    self.augmenter = augment_lib.Augmenter(
        d4=cfg.d4 and host,
        max_shift=cfg.margin if host else 0,
        elastic=((cfg.elastic_alpha, cfg.elastic_sigma)
                 if host and cfg.elastic_alpha > 0 else None),
        colour=cfg.colour if host else "none",
        strength=cfg.colour_strength)

  def _case_index(self, index: int, rng: np.random.Generator) -> int:
    groups = self._by_domain
    if self.cfg.strategy == "balanced" and index % 2 == 0:
      groups = [g for g in self._with_mitoses if g] if (
          not self.cfg.stratify_domains or self.negatives is not None) \
          else [g or self._by_domain[k] for k, g in enumerate(self._with_mitoses)]
    if self.cfg.stratify_domains:
      # Consecutive examples cycle through the domains, so every batch whose
      # size is a multiple of 2 x the number of domains is exactly balanced.
      members = groups[(index // (2 if self.cfg.strategy == "balanced" else 1))
                       % len(groups)]
    else:
      members = [i for g in groups for i in g]
    return members[int(rng.integers(len(members)))]

  def request(self, index: int) -> sampling.PatchRequest:
    """Which window example ``index`` shows (deterministic in seed, index)."""
    rng = np.random.default_rng([self.seed, index, 0])
    if self.negatives is not None and index % 2 == 1:
      return self._pool_negative(rng)
    ci = self._case_index(index, rng)
    case, size, cfg = self.cases[ci], self.cfg.patch_size, self.cfg
    if cfg.strategy == "mitosis_centred":
      return sampling.sample_mitosis_centred(case, ci, size, rng, p=cfg.p_mitosis)
    if cfg.strategy == "imposter_centred":
      return sampling.sample_imposter_centred(case, ci, size, rng, p=cfg.p_mitosis)
    if cfg.strategy == "random":
      return sampling.sample_random(case, ci, size, rng)
    # balanced (Lafarge & Koelzer): even indices positive, odd negative, so
    # each batch of even size is exactly half and half.
    return sampling.sample_balanced(
        case, ci, size, rng, positive=(index % 2 == 0),
        min_dist_px=cfg.neg_min_dist_px,
        imposter_fraction=cfg.imposter_fraction)

  def _pool_negative(self, rng: np.random.Generator) -> sampling.PatchRequest:
    """A window centred (+ jitter) on a uniformly drawn pool negative."""
    ci, x, y = self.negatives[int(rng.integers(len(self.negatives)))]
    # The same jitter as sample_balanced gives positives, so the precision of
    # the centring does not tell the classes apart.
    return sampling.jittered_request(self.cases[int(ci)], int(ci), (x, y),
                                     self.cfg.patch_size, "negative", rng)

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    req = self.request(index)
    case, cfg = self.cases[req.case_index], self.cfg
    m = cfg.margin if self.augment else 0
    big = cfg.patch_size + 2 * m
    x0, y0 = req.x0 - m, req.y0 - m
    image = slides_lib.open_slide(case.path).read(x0, y0, big, big)
    points, classes = _labels_in_window(case, x0, y0, big)
    extra = dict(domain=self._domain_ids[case.domain], image_id=case.image_id,
                 x0=req.x0, y0=req.y0, positive=int(req.kind == "mitosis"))
    if self.on_device:
      # The crop with its margin; the device's shift crops it. Points of the
      # central patch first, so that _pack's truncation to max_points (stable,
      # mitoses first) drops margin points before those likely to stay.
      centre = sampling.points_in_window(points, m, m, cfg.patch_size)[1]
      order = np.argsort(~centre, kind="stable")
      return _pack(image, points[order], classes[order], cfg.max_points,
                   dict(extra, index=index))
    rng = np.random.default_rng([self.seed, index, 1])
    if self.augment:
      # The augmenter's random shift crops the margin: patch_size comes out.
      image, points, keep = self.augmenter(image, points, rng)
      classes = classes[keep]
    return _pack(image, points, classes, cfg.max_points, extra)


def _labels_in_window(case: Case, x0: int, y0: int, size: int
                      ) -> tuple[np.ndarray, np.ndarray]:
  """The case's points inside the window (window coordinates) and classes."""
  pts = np.concatenate([case.mitoses, case.imposters]).astype(np.float32)
  cls = np.concatenate([np.full(len(case.mitoses), MITOSIS, np.int32),
                        np.full(len(case.imposters), IMPOSTER, np.int32)])
  pts, keep = sampling.points_in_window(pts, x0, y0, size)
  return pts, cls[keep]


def _pack(image, points, classes, max_points, extra) -> dict[str, np.ndarray]:
  # Mitoses first, so truncation (rare: more than max_points figures in one
  # patch) drops imposters before mitotic figures.
  order = np.argsort(classes, kind="stable")[:max_points]
  n = len(order)
  pts = np.zeros((max_points, 2), np.float32)
  cls = np.zeros((max_points,), np.int32)
  mask = np.zeros((max_points,), bool)
  pts[:n], cls[:n], mask[:n] = points[order], classes[order], True
  out = dict(image=np.ascontiguousarray(image, np.uint8), points=pts,
             classes=cls, mask=mask)
  out.update({k: np.asarray(v, np.int32) for k, v in extra.items()})
  return out


def make_dataset(cases: Sequence[Case], cfg: PatchConfig, *, seed: int,
                 batch_size: int, augment: bool = True,
                 num_examples: int | None = None,
                 process_index: int = 0, process_count: int = 1,
                 negatives: Any = None) -> grain.MapDataset:
  """The batched MapDataset of this process.

  Args:
    cases: cases to sample from (labelled, or the unlabeled domain for
      methods that use it).
    cfg: patch sampling and augmentation settings.
    seed: global seed; example ``i`` depends only on ``(seed, i)``.
    batch_size: the GLOBAL batch size; each process gets
      ``batch_size // process_count`` examples per batch.
    augment: False for validation patches (no augmentation, no shift).
    num_examples: a finite stream (e.g. a fixed validation set); default
      infinite.
    process_index, process_count: this process's shard (multi-host).
    negatives: optional (N, 3) pool of (case_index, x, y) negative centres
      into ``cases`` ("balanced" only; see ``PatchMaker``).
  """
  check_global_batch(batch_size, process_count)
  maker = PatchMaker(cases, cfg, seed, augment=augment, negatives=negatives)
  return batched_stream(maker, batch_size=batch_size, num_examples=num_examples,
                        process_index=process_index, process_count=process_count)


def check_global_batch(batch_size: int, process_count: int) -> None:
  """The global batch must split evenly over the processes."""
  if batch_size % process_count:
    raise ValueError(f"global batch {batch_size} is not divisible by "
                     f"{process_count} processes")


def batched_stream(maker: Callable[[int], dict], *, batch_size: int,
                   num_examples: int | None = None, process_index: int = 0,
                   process_count: int = 1) -> grain.MapDataset:
  """Examples ``maker(i)``, ``i = 0, 1, ...``, this process's share, batched.

  The one stream construction of every method's ``make_dataset`` (the patch
  pipeline, Kondo's candidates, image-level fields): example ``i`` depends
  only on ``i`` (and the maker's seed), the processes take interleaved
  shares, each batch holds ``batch_size // process_count`` examples.
  """
  check_global_batch(batch_size, process_count)
  n = _INFINITE if num_examples is None else int(num_examples)
  ds = grain.MapDataset.range(n).map(maker)
  if process_count > 1:
    ds = ds[process_index::process_count]
  return ds.batch(batch_size // process_count, drop_remainder=True)


def make_iterator(dataset: grain.MapDataset, num_workers: int = 0,
                  num_threads: int = 2, prefetch: int = 4):
  """A checkpointable iterator (``get_state``/``set_state``) over batches.

  ``num_workers > 0`` decodes and augments in that many worker processes.
  """
  # grain's worker start-up reads absl flags, which only absl apps parse.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  it = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=prefetch))
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(it)
