"""Synthetic MIDOG 2021-format data: H&E tissue rendered through Beer-Lambert.

No pixels of the real release can be downloaded here, so this package writes a
data set in EXACTLY the real layout (``MIDOG.json`` + ``NNN.tiff``) that every
code path can run on::

  python -m midog_jax.data.synthetic --out DIR --preset small --seed 0

Layout of ``DIR``:
  * ``MIDOG.json``: the real file's keys (info, licenses, images, categories,
    annotations); ``bbox`` is ``[x1, y1, x2, y2]``, 50x50 px around the cell;
    category 1 = "mitotic figure", 2 = "not mitotic figure" (imposter).
  * ``NNN.tiff``: RGB uint8, tiled 256x256, JPEG (quality, chroma subsampling
    and JPEG colour space differ per scanner), X/YResolution in pixels per
    centimetre (``1e4 / spacing_um``) with ResolutionUnit CENTIMETER.
  * ``MIDOG_unlabeled_truth.json``: the same format, listing only the images of
    the unlabeled domain (Leica GT450, ids 151..) with their true labels; in
    ``MIDOG.json`` those images have no annotations, as in the real release.
  * ``synthetic.json``: manifest {preset, seed, n_images, ids, scale,
    generator_version}, written LAST: its presence marks a complete data set.

Domains follow the MIDOG 2021 id ranges (``midog.MIDOG21_SCANNERS``): ids 1..
Hamamatsu XR (0.23 um/px), 51.. Hamamatsu S360 (0.23), 101.. Aperio CS2
(0.25), 151.. Leica GT450 (0.25, unlabeled). They differ in stain vectors,
stain density, white point, blur, noise and JPEG settings.

Presets:
  * ``tiny``: 4 domains x 2 images (ids 1,2,51,52,101,102,151,152) of about
    512x512 px, 3-5 mitoses each (tests; a few seconds).
  * ``small``: 4 domains x 10 images (ids 1-10, 51-60, 101-110, 151-160) of
    about 1200x1200 px, 8-15 mitoses each (the demo).
  * ``midog21``: the 200 images of the shipped real ``MIDOG.json`` at their
    real sizes, with figures at the REAL annotation positions (ids and boxes
    copied); the GT450 images get random figures written to the truth file.
    Found via ``$MIDOG_SHARED_DATA`` (folder or file) or
    ``<repo>/../shared/data/midog/MIDOG.json``; where neither exists (a bare
    clone, an installed package) the real region sizes with generated
    positions at the real density (manifest ``positions``).
Every preset has about 1.6 imposters per mitotic figure.

Content: stroma (wavy eosin fibres), tumour epithelium (pink cytoplasm, dense
nuclei), lumina (white), normal nuclei (6-10 um, pale to medium chromatin with
texture and nucleoli; ~10% darker), spindle fibroblasts, MITOTIC FIGURES
(prophase: granular clumped chromatin; metaphase: dark "hairy" plate;
anaphase: two parallel hairy bars; telophase: two separated irregular masses;
all with a clear cytoplasm halo) and IMPOSTERS that are as dark
(apoptotic/pyknotic: smooth round, often fragmented, hypereosinophilic
cytoplasm; lymphocytes: small dark round; hyperchromatic large nuclei: dark
but smooth). Sizes are in microns, converted with each scanner's spacing.
What separates the classes is morphology (spiky granular chromatin and a
clear halo versus smooth round dark blobs), so blue-ratio thresholding fails
but a small CNN can learn it.

Determinism: every random stream is seeded from ``(seed, image_id, purpose)``
and every pre-blur pixel is a pure function of its coordinates, so output does
not depend on ``workers`` or on the band size; the same preset and seed give
byte-identical JSON and identical pixels.

Memory: images are rendered in 256-row bands (plus a blur margin) and streamed
to tifffile's tile iterator, so a 7215x5412 image needs a few hundred MB.

Benchmark suites (issue 12; ``--suite midog21|midogpp --preset
tiny|small|full``): data as hard as MIDOG in the ways the real data is hard:
dense crowded tumour with fine texture, scanners and labs with a real colour
shift (two scanners seen only at test time), seven tumour types, look-alikes
that overlap with mitoses in appearance, atypical mitoses, two simulated
raters and a tie-breaker per cell (label noise at the real agreement),
artefacts (ink, pigment, debris, folds, blur, bubbles) and ROI types
(hotspot, random, challenging). Written as ``train/`` + ``test/`` folders in
the MIDOG++ format; see :mod:`.suites` and :mod:`.suite_write`. The legacy
presets above render exactly as before.

Modules: ``plan`` (scanner domains, tissue looks, presets, figure positions),
``fields`` (smooth random fields and seeded random streams), ``cells``
(nucleus, mitosis and imposter templates), ``artefacts``, ``render`` (layout
and Beer-Lambert bands), ``write`` (TIFFs, annotation files, manifest,
``generate`` and the CLI), ``suites`` (the suites' domains and plans),
``raters`` (the label-noise model), ``suite_write`` (writing a suite) and
``stats`` (tissue coverage and high-frequency energy).
"""

from __future__ import annotations

from midog_jax.data.synthetic.cells import (figure_template, imposter,
                                            mitotic_figure, normal_nucleus)
from midog_jax.data.synthetic.plan import (DOMAINS, IMPOSTER_KINDS,
                                           MITOSIS_KINDS, PRESETS, Domain,
                                           Figure, Plan, domain_of, plan_image,
                                           preset_ids)
from midog_jax.data.synthetic.render import (TILE, Layout, build_layout,
                                             render_band, render_image)
from midog_jax.data.synthetic.write import (BOX, GENERATOR_VERSION, MANIFEST,
                                            TRUTH, generate, read_manifest,
                                            shared_midog_json, write_tiff)
from midog_jax.data.synthetic.cli import main
# Private, re-exported for the tests of the domain-balanced subset choice.
from midog_jax.data.synthetic.write import _select  # noqa: F401

__all__ = [
    "BOX", "DOMAINS", "GENERATOR_VERSION", "IMPOSTER_KINDS", "MANIFEST",
    "MITOSIS_KINDS", "PRESETS", "TILE", "TRUTH", "Domain", "Figure", "Layout",
    "Plan", "build_layout", "domain_of", "figure_template", "generate",
    "imposter", "main", "mitotic_figure", "normal_nucleus", "plan_image",
    "preset_ids", "read_manifest", "render_band", "render_image",
    "shared_midog_json", "write_tiff",
]
