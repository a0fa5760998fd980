"""Tissue statistics: coverage by decadic OD, high-frequency energy, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from midog_jax.data.synthetic import stats


def _grey(values) -> np.ndarray:
  """(H, W, 3) uint8 with every channel equal to ``values``."""
  return np.repeat(np.asarray(values, np.uint8)[..., None], 3, axis=-1)


def test_coverage_of_known_dark_fraction():
  img = np.full((40, 50, 3), 255, np.uint8)
  img[:10] = (120, 60, 150)  # H&E-ish purple: dark in every channel
  img[10:12, :25] = 0  # black counts too
  assert stats.tissue_coverage(img) == (10 * 50 + 2 * 25) / (40 * 50)
  # Stained in two channels only (pink, red channel near white): not tissue
  # by this definition, which asks every channel.
  img[20:30] = (250, 100, 150)
  assert stats.tissue_coverage(img) == (10 * 50 + 2 * 25) / (40 * 50)
  assert stats.tissue_coverage(np.full((4, 4, 3), 255, np.uint8)) == 0.0


def test_coverage_uses_decadic_od():
  # I = 176: decadic OD 0.16 (-log10(177/256) = 0.1603, -log10(176/255) =
  # 0.1610); I = 185: 0.14 (0.1387, 0.1394). At od_min 0.15 the first counts
  # and the second does not. Natural-log OD (x ln 10: 0.37 and 0.32) would
  # count both.
  assert stats.tissue_coverage(_grey([[176]])) == 1.0
  assert stats.tissue_coverage(_grey([[185]])) == 0.0
  # The cut at 0.15 falls between 180 (0.1506) and 181 (0.1482), as in
  # Macenko's paper; one channel above it is enough to drop the pixel.
  assert stats.tissue_coverage(_grey([[180, 181]])) == 0.5
  assert stats.tissue_coverage(np.array([[[176, 176, 185]]], np.uint8)) == 0.0
  assert stats.tissue_coverage(_grey([[176, 185]]), od_min=0.13) == 1.0
  assert stats.tissue_coverage(_grey([[176, 185]]), od_min=0.17) == 0.0
  with pytest.raises(ValueError, match="uint8"):
    stats.tissue_coverage(np.zeros((2, 2, 3), np.float32))


def test_high_frequency_energy_by_hand():
  assert stats.high_frequency_energy(np.full((20, 30, 3), 97, np.uint8)) == 0.0
  # A linear ramp is its own 3x3 mean: no high frequency either.
  assert stats.high_frequency_energy(_grey(np.tile(np.arange(30) * 8, (20, 1)))) \
      == pytest.approx(0.0, abs=1e-12)
  # A 0/255 checkerboard: each 3x3 window holds 5 of the centre's value and 4
  # of the other, so the residual is +-(255 - (5*255)/9) = +-4*255/9, mean 0:
  # std 4 * 255 / 9 = 113.33.
  yy, xx = np.mgrid[:16, :17]
  board = _grey(255 * ((yy + xx) % 2))
  assert stats.high_frequency_energy(board) == pytest.approx(4 * 255 / 9)
  # Grey is the channel mean: the same board in one channel is a third.
  one = np.zeros_like(board)
  one[..., 1] = board[..., 1]
  assert stats.high_frequency_energy(one) == pytest.approx(4 * 255 / 27)
  assert np.isnan(stats.high_frequency_energy(np.zeros((2, 5, 3), np.uint8)))


def test_image_stats_array_and_tiff_agree(tmp_path):
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
  img[:, :150] = 255
  path = tmp_path / "img.tiff"
  tifffile.imwrite(path, img, tile=(64, 64), photometric="rgb")
  a, b = stats.image_stats(img), stats.image_stats(path)
  assert a == b
  assert a["windows"] == 1 and (a["height"], a["width"]) == (300, 400)
  assert a["tissue_coverage"] == stats.tissue_coverage(img)
  assert a["high_frequency_energy"] == pytest.approx(stats.high_frequency_energy(img))


def test_large_image_is_sampled_on_a_fixed_grid(monkeypatch):
  # A full-size MIDOG image: nine 1024^2 windows, outer ones at the borders.
  wins = stats._windows(5412, 7215)
  assert len(wins) == 9 and {w[2:] for w in wins} == {(1024, 1024)}
  assert sorted({w[0] for w in wins}) == [0, 3096, 6191]
  assert sorted({w[1] for w in wins}) == [0, 2194, 4388]
  assert stats._windows(2000, 3000) == [(0, 0, 3000, 2000)]  # 6 Mpx: whole
  # The same rule at a tenth of the scale, to keep the test fast: 310 x 310 >
  # nine 100^2 windows, corners at 0, 105 and 210. Left half dark: the
  # windows see 100 + 50 of their 300 columns dark, exactly 1/2.
  monkeypatch.setattr(stats, "WINDOW", 100)
  img = np.full((310, 310, 3), 255, np.uint8)
  img[:, :155] = 60
  img[::7, :155:5] = 0  # texture for the energy, inside the dark half
  wins = stats._windows(310, 310)
  assert wins[:3] == [(0, 0, 100, 100), (105, 0, 100, 100), (210, 0, 100, 100)]
  out = stats.image_stats(img)
  assert out["windows"] == 9 and out["tissue_coverage"] == 0.5
  # The pooled energy is that of the nine windows together.
  res = np.concatenate([stats._residual(img[y:y + h, x:x + w]).ravel()
                        for x, y, w, h in wins])
  assert out["high_frequency_energy"] == pytest.approx(res.std())
  assert out["high_frequency_energy"] != pytest.approx(stats.high_frequency_energy(img))


def test_cli(tmp_path, capsys):
  for i, v in enumerate((60, 255)):
    tifffile.imwrite(tmp_path / f"{i:03d}.tiff", np.full((32, 32, 3), v, np.uint8),
                     photometric="rgb")
  (tmp_path / "notes.txt").write_text("not an image")
  assert stats.main([str(tmp_path)]) == 0
  lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
  assert [x["image"] for x in lines[:2]] == [str(tmp_path / "000.tiff"),
                                             str(tmp_path / "001.tiff")]
  assert lines[2]["summary"]["tissue_coverage"] == {"mean": 0.5, "min": 0.0, "max": 1.0}
  assert lines[2]["summary"]["images"] == 2
  # The module runs as a script.
  r = subprocess.run([sys.executable, "-m", "midog_jax.data.synthetic.stats",
                      str(tmp_path / "000.tiff")], capture_output=True, text=True,
                     check=True)
  assert json.loads(r.stdout.splitlines()[-1])["summary"]["tissue_coverage"]["max"] == 1.0
  empty = tmp_path / "empty"
  empty.mkdir()
  assert stats.main([str(empty)]) == 2
  # An unreadable image: the reader's error, named, not a traceback.
  assert stats.main([str(tmp_path / "notes.txt")]) == 1
  assert "notes.txt: not a readable TIFF" in capsys.readouterr().err
