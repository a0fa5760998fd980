"""TFDS builder for MIDOG 2021 and MIDOG++ patches, stored as ``array_record``.

Whole MIDOG regions of interest are ~7000x5400 px (39 Mpx), too big to be one
example, so each example is one square patch of a regular grid over a case,
with the labels of the points that fall inside it, in patch coordinates (a
point belongs to each patch that holds its pixel: ``sampling.points_in_window``,
the rule the training pipeline uses too). The files are ``array_record``, read
by random access (grain) without TensorFlow: images are handed to TFDS as
already-encoded PNG bytes, so TFDS never needs TF to encode or decode them.

Build (the images are downloaded by hand, see ``MANUAL_DOWNLOAD_INSTRUCTIONS``)::

  import tensorflow_datasets as tfds
  from midog_jax.data import tfds_midog  # registers "midog_patches"

  builder = tfds.builder("midog_patches/midog21", data_dir="~/tfds",
                         file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir="/data/midog21"))  # MIDOG.json + 001.tiff .. 200.tiff

  # Other patch sizes: a config of your own (its name is the folder name).
  cfg = tfds_midog.patch_config("midogpp", patch_size=256, stride=128)
  tfds.builder("midog_patches", config=cfg, data_dir="~/tfds").download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir="/data/midogpp"))

  source = tfds_midog.load_patches("~/tfds", "midog_patches/midog21", "train")
  ds = grain.MapDataset.source(source).shuffle(seed=0)

Splits: MIDOG 2021 gives "train"/"val" (``midog.split_train_val``, domain
stratified, seed 0) and "unlabeled" (the Leica GT450 cases, no labels);
MIDOG++ gives the official "train"/"test". Empty splits are left out.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from midog_jax.data import midog, sampling, slides, tiff_meta
from midog_jax.errors import DataError

log = logging.getLogger(__name__)

BUILDER_NAME = "midog_patches"
# Padding for patches of images smaller than one patch (white background).
PAD_VALUE = 255

_ANNOTATIONS = {"midog21": "MIDOG.json", "midogpp": "MIDOG++.json"}

_INSTRUCTIONS = """\
Download the images yourself and put the annotation file and the TIFFs
together in one folder, then pass it as `manual_dir`:

* MIDOG 2021 (config `midog21`): the training set of the MIDOG 2021 challenge
  (https://imig.science/midog2021/download-dataset/, Zenodo record
  10.5281/zenodo.4643381): `MIDOG.json` and `001.tiff` .. `200.tiff`
  (151-200 are the unlabeled Leica GT450 cases).
* MIDOG++ (config `midogpp`): the figshare release of MIDOG++
  (https://doi.org/10.6084/m9.figshare.c.6615571, also listed at
  https://github.com/DeepMicroscopy/MIDOGpp): `MIDOG++.json`,
  `datasets_xvalidation.csv` (or `MIDOGpp_xvalidation.csv`) and `001.tiff` ..
  `553.tiff`.

manual_dir/
  MIDOG.json | MIDOG++.json (+ the xvalidation CSV for MIDOG++)
  001.tiff
  002.tiff
  ...
"""


@dataclasses.dataclass(eq=False)
class MidogPatchConfig(tfds.core.BuilderConfig):
  """Which release, and the patch grid.

  Attributes:
    kind: "midog21" (MIDOG.json) or "midogpp" (MIDOG++.json).
    patch_size: side of the square patches in pixels.
    stride: step between patch origins; the last row/column is moved flush
      with the image border so the grid covers every pixel.
    val_fraction: MIDOG 2021 validation share for ``split_train_val``.
    seed: seed of ``split_train_val``.
  """

  kind: str = "midog21"
  patch_size: int = 512
  stride: int = 512
  val_fraction: float = 0.2
  seed: int = 0


def patch_config(kind: str, patch_size: int = 512, stride: int = 512,
                 name: str | None = None, val_fraction: float = 0.2,
                 seed: int = 0) -> MidogPatchConfig:
  """A config for ``kind`` with another patch grid.

  The default name (``midog21_p256_s128``) keeps datasets with different grids
  in different folders of the same ``data_dir``.
  """
  if kind not in _ANNOTATIONS:
    raise ValueError(f"kind must be one of {sorted(_ANNOTATIONS)}, got {kind!r}")
  if patch_size < 1 or stride < 1:
    raise ValueError(f"patch_size and stride must be >= 1, got {patch_size}, "
                     f"{stride}")
  if name is None:
    name = kind
    if (patch_size, stride) != (512, 512):
      name = f"{kind}_p{patch_size}_s{stride}"
  return MidogPatchConfig(
      name=name, kind=kind, patch_size=patch_size, stride=stride,
      val_fraction=val_fraction, seed=seed,
      description=f"{kind}: {patch_size} px patches every {stride} px")


def _encode_png(patch: np.ndarray) -> bytes:
  # Encoded bytes go into the record unchanged; a numpy array would make TFDS
  # encode it with TensorFlow.
  buf = io.BytesIO()
  Image.fromarray(patch).save(buf, format="PNG", compress_level=3)
  return buf.getvalue()


class MidogPatches(tfds.core.GeneratorBasedBuilder):
  """MIDOG 2021 / MIDOG++ cases cut into a grid of labelled patches."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Patch grid over each case, points in patch coords.",
      "1.1.0": "A point belongs to the patch holding its pixel: patch coords "
               "in [-0.5, size - 0.5) instead of [0, size).",
  }
  BUILDER_CONFIGS = [patch_config("midog21"), patch_config("midogpp")]
  DEFAULT_BUILDER_CONFIG_NAME = "midog21"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file (TFDS looks for an optional ``checksums.tsv`` beside it).

    TFDS's own lookup for builders inside a package touches the
    ``importlib_resources`` backport, which is not a dependency here.
    """
    return epath.Path(__file__)

  def __init__(self, *, file_format: str | None = "array_record", **kwargs):
    """Like any TFDS builder, but writing ``array_record`` by default."""
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    p = self.builder_config.patch_size
    points = tfds.features.Tensor(shape=(None, 2), dtype=np.float32)
    return self.dataset_info_from_configs(
        description=("Square patches of MIDOG regions of interest with the "
                     "mitotic figure and imposter centres inside each patch, "
                     "in patch pixel coordinates (x, y)."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(p, p, 3), dtype=np.uint8,
                                         encoding_format="png"),
            "image_id": np.int32,
            "x0": np.int32,
            "y0": np.int32,
            "domain": tfds.features.Text(),
            "scanner": tfds.features.Text(),
            "tumor_type": tfds.features.Text(),
            "spacing_um": np.float32,
            "mitoses": points,
            "imposters": points,
        }),
        homepage="https://github.com/DeepMicroscopy/MIDOGpp",
        # Examples stay in case / row / column order (useful for stitching
        # whole cases back together); training shuffles in grain anyway.
        disable_shuffling=True,
    )

  def _load_cases(self, manual_dir: Path
                  ) -> tuple[Path, dict[str, list[midog.Case]]]:
    """The annotation file, and split name -> cases (``midog.load_midog``)."""
    cfg = self.builder_config
    annotations = manual_dir / _ANNOTATIONS[cfg.kind]
    if not annotations.exists():
      raise DataError(annotations, f"annotation file not found; config "
                      f"{cfg.name!r} needs it in manual_dir.\n{_INSTRUCTIONS}")
    ds = midog.load_midog(annotations, manual_dir)
    if ds.kind != cfg.kind:
      raise DataError(annotations, f"this is a {ds.kind} file, config "
                      f"{cfg.name!r} expects {cfg.kind}")
    if cfg.kind == "midog21":
      train, val = midog.split_train_val(ds.cases, cfg.val_fraction, cfg.seed)
      splits = {"train": train, "val": val, "unlabeled": ds.unlabeled}
    else:
      try:
        train, test = midog.official_split(ds.cases)
      except ValueError:
        raise DataError(annotations, "no official train/test split: put "
                        "datasets_xvalidation.csv (or MIDOGpp_xvalidation.csv) "
                        "beside it") from None
      splits = {"train": train, "test": test}
    for name, cases in list(splits.items()):
      if not cases:
        log.warning("%s: split %r has no cases; left out", annotations, name)
        del splits[name]
    # Fail before anything is written rather than halfway through a split.
    for cases in splits.values():
      for c in cases:
        if not c.path.exists():
          raise DataError(c.path, f"image file of image id {c.image_id} not "
                          f"found (listed in {annotations.name})")
    return annotations, splits

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    annotations, splits = self._load_cases(Path(os.fspath(dl_manager.manual_dir)))
    return {name: self._generate_examples(cases, annotations)
            for name, cases in splits.items()}

  def _generate_examples(self, cases: Sequence[midog.Case], annotations: Path
                         ) -> Iterator[tuple[str, dict]]:
    size, stride = self.builder_config.patch_size, self.builder_config.stride
    for c in cases:
      with slides.Slide(c.path) as slide:
        slides.check_size(slide, c.width, c.height, annotations)
        # The TIFF's resolution tags win over the scanner's nominal spacing.
        spacing = tiff_meta.check_plausible(slide.spacing_um, c.path) or c.spacing_um
        for y0 in slides.grid_origins(c.height, size, stride):
          for x0 in slides.grid_origins(c.width, size, stride):
            x0, y0 = int(x0), int(y0)
            patch = slide.read(x0, y0, size, size, pad_value=PAD_VALUE)
            mitoses, _ = sampling.points_in_window(c.mitoses, x0, y0, size)
            imposters, _ = sampling.points_in_window(c.imposters, x0, y0, size)
            yield f"{c.image_id:04d}_{y0:06d}_{x0:06d}", {
                "image": _encode_png(patch),
                "image_id": c.image_id,
                "x0": x0,
                "y0": y0,
                "domain": c.domain,
                "scanner": c.scanner,
                "tumor_type": c.tumor_type,
                "spacing_um": np.float32(spacing),
                "mitoses": mitoses,
                "imposters": imposters,
            }


def _builder_dir(data_dir: Path, name: str) -> Path:
  """``data_dir/midog_patches/<config>/<version>`` for ``name``.

  ``name`` is ``"midog_patches/<config>[:<version>]"`` or just ``"<config>"``;
  without a version the newest prepared one is used.
  """
  m = re.fullmatch(r"(?:(\w+)/)?(\w+)(?::([\w.]+))?", name)
  if m is None or (m.group(1) not in (None, BUILDER_NAME)):
    raise ValueError(f"name must look like '{BUILDER_NAME}/<config>[:version]', "
                     f"got {name!r}")
  config_dir = data_dir / BUILDER_NAME / m.group(2)
  if m.group(3):
    version_dirs = [config_dir / m.group(3)]
  else:
    version_dirs = sorted(
        (p for p in config_dir.glob("*.*.*") if p.is_dir()),
        key=lambda p: tuple(int(v) if v.isdigit() else -1
                            for v in p.name.split(".")))[::-1]
  for d in version_dirs:
    if (d / "dataset_info.json").exists():
      return d
  raise DataError(config_dir, f"no prepared dataset {name!r} here (run "
                  "download_and_prepare first)")


def load_patches(data_dir: str | os.PathLike, name: str, split: str):
  """Random-access source of one prepared split, ready for grain.

  Reads the prepared files only (``tfds.builder_from_directory``), so datasets
  built with custom configs load the same way and TensorFlow is never needed.
  Each record is a dict of numpy values: ``image`` (P, P, 3) uint8, ``mitoses``
  / ``imposters`` (N, 2) float32 in patch coordinates, ``x0``/``y0``/``image_id``
  int32, ``spacing_um`` float32, text fields as bytes.

  Args:
    data_dir: the TFDS ``data_dir`` it was prepared into.
    name: ``"midog_patches/<config>"`` (e.g. ``midog_patches/midog21``),
      optionally with ``:<version>``.
    split: "train", "val", "unlabeled" (MIDOG 2021) or "train", "test"
      (MIDOG++).

  Returns:
    A sequence (``__len__``/``__getitem__``) for ``grain.MapDataset.source``.
  """
  builder_dir = _builder_dir(Path(os.path.expanduser(os.fspath(data_dir))), name)
  builder = tfds.builder_from_directory(builder_dir)
  if split not in builder.info.splits:
    raise ValueError(f"{name} has splits {sorted(builder.info.splits)}, not "
                     f"{split!r}")
  return builder.as_data_source(split=split)
