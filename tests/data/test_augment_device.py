"""Augmentation on the accelerator: every transform, given the same parameters,
gives augment.py's pixels and points; the chain keeps points on their pixels;
keys depend only on (seed, step, example index)."""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midog_jax.data import augment as A
from midog_jax.data import augment_device as D
from midog_jax.data import midog, pipeline, stain

from support import REPO, blob_image, cpu_env, local_max, marked_image

# Jitted once per module (shapes are few), so compilation is paid once.
_d4 = jax.jit(D.d4)
_shift = jax.jit(D.shift, static_argnums=4)
_warp = jax.jit(D.warp)
_rgb = jax.jit(D.rgb_affine)
_od = jax.jit(D.od_affine)


_marked = marked_image  # test_augment's marked image


def _on_marks(img0, pts0, img1, pts1, mask1):
  """Each kept point sits on its own mark, on a pixel centre; nothing else lit."""
  pts1, mask1, img1 = np.asarray(pts1), np.asarray(mask1), np.asarray(img1)
  assert img1.dtype == np.uint8
  kept = pts1[mask1]
  np.testing.assert_allclose(kept, np.round(kept), atol=1e-5)
  assert A.in_bounds(kept, img1.shape).all()
  for (x0, y0), (x1, y1) in zip(pts0[mask1].astype(int), np.round(kept).astype(int)):
    np.testing.assert_array_equal(img1[y1, x1], img0[y0, x0])
  # Marks that stayed inside are exactly the kept points (none lost or copied).
  assert (img1[..., 1] == 255).sum() == mask1.sum()


def test_od_in_jax_matches_stain_numpy():
  every = np.arange(256, dtype=np.uint8).reshape(-1, 1)
  np.testing.assert_array_equal(np.asarray(stain.rgb_to_od_jnp(jnp.asarray(every))),
                                stain.rgb_to_od(every))
  # One-to-one on uint8, as the numpy pair.
  np.testing.assert_array_equal(
      np.asarray(stain.od_to_rgb_jnp(stain.rgb_to_od_jnp(jnp.asarray(every)))), every)
  od = np.random.default_rng(0).uniform(-0.5, 6.0, (1000, 3)).astype(np.float32)
  diff = np.abs(np.asarray(stain.od_to_rgb_jnp(jnp.asarray(od))).astype(int)
                - stain.od_to_rgb(od))
  assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_d4_matches_host_and_moves_points_with_pixels():
  img, pts = _marked(17, 17)
  pts = np.concatenate([pts, [[-3, 5], [17.5, 2]]]).astype(np.float32)  # two outside
  for k in range(8):
    out, p, mask = _d4(img, pts, np.ones(len(pts), bool), k)
    ref, ref_p, keep = A.d4(img, pts, k)
    np.testing.assert_array_equal(np.asarray(out), ref)
    np.testing.assert_array_equal(np.asarray(mask), keep)
    np.testing.assert_allclose(np.asarray(p)[keep], ref_p, atol=1e-5)
    _on_marks(img, pts, out, p, mask)
  assert len({np.asarray(_d4(img, pts, np.ones(len(pts), bool), k)[0]).tobytes()
              for k in range(8)}) == 8
  with pytest.raises(ValueError, match="square"):
    D.d4(jnp.zeros((4, 5, 3), jnp.uint8), jnp.zeros((1, 2)), jnp.ones(1, bool), 0)


def test_shift_matches_host():
  img, pts = _marked(40, 50)
  m = 4
  for seed in range(12):
    ref, ref_p, keep = A.random_shift(img, pts, np.random.default_rng(seed), m)
    offset = np.random.default_rng(seed).integers(0, 2 * m + 1, 2)  # its (oy, ox)
    out, p, mask = _shift(img, pts, np.ones(len(pts), bool), offset, m)
    assert out.shape == (32, 42, 3)
    np.testing.assert_array_equal(np.asarray(out), ref)
    np.testing.assert_array_equal(np.asarray(mask), keep)
    np.testing.assert_array_equal(np.asarray(p)[keep], ref_p)
    _on_marks(img, pts, out, p, mask)
  with pytest.raises(ValueError, match="too large"):
    D.shift(jnp.asarray(img), pts, np.ones(len(pts), bool), (0, 0), 20)


@pytest.mark.parametrize("shape,alpha,sigma", [((40, 56), 3.0, 12.0),
                                               ((33, 20), 1.0, 3.0)])
def test_elastic_field_matches_host_for_the_same_noise(shape, alpha, sigma):
  ref = A.elastic_field(shape, np.random.default_rng(5), alpha, sigma)
  # augment.elastic_field's first draw is its coarse noise.
  noise = np.random.default_rng(5).standard_normal(D.field_shape(shape, sigma))
  got = np.asarray(D.field_from_noise(jnp.asarray(noise, jnp.float32), shape,
                                      alpha, sigma))
  assert got.shape == ref.shape == (2, *shape)
  np.testing.assert_allclose(got, ref, atol=1e-4 * alpha)


def test_elastic_field_amplitude():
  f = jax.jit(D.elastic_field, static_argnums=(1, 2, 3))
  stds = [float(f(jax.random.key(i), (128, 128), 4.0, 8.0).std()) for i in range(10)]
  assert 3.0 < np.mean(stds) < 5.0  # alpha is the RMS displacement


def test_warp_matches_host_and_points_follow_blobs():
  h, w = 96, 96
  g = np.arange(12, 96, 17)
  pts = np.array([(x, y) for x in g for y in g if y < h - 8], np.float32)
  pts += np.random.default_rng(3).uniform(-0.4, 0.4, pts.shape).astype(np.float32)
  img = blob_image(h, w, pts)
  field = A.elastic_field((h, w), np.random.default_rng(4), 3.0, 12.0)
  ref, ref_p, keep = A.warp(img, pts, field)
  out, p, mask = _warp(img, pts, np.ones(len(pts), bool), field)
  out, p, mask = np.asarray(out), np.asarray(p), np.asarray(mask)
  np.testing.assert_array_equal(mask, keep)
  assert np.abs(out.astype(int) - ref).max() <= 1
  np.testing.assert_allclose(p[mask], ref_p, atol=1e-3)
  err = [np.linalg.norm(local_max(out, *q) - q) for q in p[mask]]
  assert max(err) <= 1.5, err
  assert np.linalg.norm(p - pts, axis=1).max() > 3  # the deformation is real
  # Noise pixels and a border that reflects (a strong field at the edges).
  noisy = np.random.default_rng(6).integers(0, 256, (h, w, 3), dtype=np.uint8)
  edge = A.elastic_field((h, w), np.random.default_rng(7), 3.0, 12.0) * 1.5
  ref = A.warp(noisy, pts, edge)[0]
  got = np.asarray(_warp(noisy, pts, np.ones(len(pts), bool), edge)[0])
  assert np.abs(got.astype(int) - ref).max() <= 1


@pytest.mark.parametrize("colour", ["rgb", "od"])
def test_colour_matches_host_for_the_same_map(colour):
  img = np.random.default_rng(7).integers(0, 256, (20, 24, 3), dtype=np.uint8)
  host = dict(rgb=(A.rgb_colour, _rgb, 0.08 * 255), od=(A.od_colour, _od, 0.03))
  fn, dev, bias = host[colour]
  for strength in (0.3, 1.0, 5.0):  # 5: saturates at both ends
    ref = fn(img, np.random.default_rng(9), strength)
    m, b = A._random_linear_map(np.random.default_rng(9), strength, bias=bias)  # pylint: disable=protected-access
    got = np.asarray(dev(img, np.float32(m), np.float32(b)))
    assert got.dtype == np.uint8 and np.abs(got.astype(int) - ref).max() <= 1
  # With jax keys: identity at strength 0, a real and key-dependent change.
  rand = dict(rgb=D.rgb_colour, od=D.od_colour)[colour]
  np.testing.assert_array_equal(np.asarray(rand(jnp.asarray(img), jax.random.key(0), 0.0)),
                                img)
  a = np.asarray(rand(jnp.asarray(img), jax.random.key(1), 1.0))
  b = np.asarray(rand(jnp.asarray(img), jax.random.key(2), 1.0))
  assert np.abs(a.astype(int) - img).mean() > 1.0 and not np.array_equal(a, b)


def _batch(img, pts, n, index=None):
  pad = np.zeros((16, 2), np.float32)
  pad[:len(pts)] = pts
  mask = np.arange(16) < len(pts)
  return dict(image=np.repeat(img[None], n, 0), points=np.repeat(pad[None], n, 0),
              mask=np.repeat(mask[None], n, 0),
              index=np.arange(n, dtype=np.int32) if index is None else index)


_SHIFT_D4 = D.DeviceAugmenter(d4=True, max_shift=6)
_FULL = D.DeviceAugmenter(d4=True, max_shift=6, elastic=(2.0, 8.0), colour="od")


@functools.partial(jax.jit, static_argnums=0)
def _augment(augmenter, seed, step, batch):
  return D.augment_batch(augmenter, seed, step, batch)


def test_chain_keeps_points_on_marks():
  img, pts = _marked(40, 40, seed=11)
  out = _augment(_SHIFT_D4, 0, 0, _batch(img, pts, 24))
  assert out["image"].shape == (24, 28, 28, 3) and out["image"].dtype == jnp.uint8
  mask = np.asarray(out["mask"])
  for k in range(24):
    _on_marks(img, np.pad(pts, ((0, 2), (0, 0))), out["image"][k],
              out["points"][k][:16], mask[k])
  assert (np.asarray(out["points"])[~mask] == 0).all()  # padding as the host's
  assert mask.sum() < 24 * len(pts)  # the shift crop does drop border points
  assert len({np.asarray(i).tobytes() for i in out["image"]}) > 12  # varied draws


def test_full_chain_points_follow_blobs():
  g = np.arange(5, 38, 9)
  pts = np.array([(x, y) for x in g for y in g], np.float32)[:16]
  img = blob_image(40, 40, pts)
  # CA-OD on a grey image is monotone in each channel: the maxima stay put.
  out = _augment(_FULL, 0, 3, _batch(img, pts, 4))
  assert out["image"].shape == (4, 28, 28, 3)
  for k in range(4):
    im, p = np.asarray(out["image"][k]), np.asarray(out["points"][k])
    assert np.asarray(out["mask"][k]).sum() >= 4
    for q in p[np.asarray(out["mask"][k])]:
      assert np.linalg.norm(local_max(im, *q) - q) <= 1.5


def test_keys_depend_on_seed_step_and_example_only():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
  pts = rng.uniform(0, 39, (5, 2)).astype(np.float32)
  batch = _batch(img, pts, 4, index=np.array([7, 8, 9, 10], np.int32))
  a = _augment(_FULL, 0, 5, batch)
  b = _augment(_FULL, 0, 5, batch)
  for k in ("image", "points", "mask"):
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
  for other in (_augment(_FULL, 0, 6, batch), _augment(_FULL, 1, 5, batch)):
    assert not np.array_equal(np.asarray(other["image"][0]), np.asarray(a["image"][0]))
  # Example 9 in another batch position: the same augmentation.
  moved = _augment(_FULL, 0, 5, _batch(img, pts, 4, index=np.array([9, 1, 2, 3],
                                                                   np.int32)))
  np.testing.assert_array_equal(np.asarray(moved["image"][0]), np.asarray(a["image"][2]))
  np.testing.assert_array_equal(np.asarray(moved["points"][0]), np.asarray(a["points"][2]))
  # The batch's other keys pass through; 'index' is required.
  assert a["index"] is not None
  with pytest.raises(ValueError, match="index"):
    D.augment_batch(_FULL, 0, 5, {k: v for k, v in batch.items() if k != "index"})


_SHARDED = r"""
import json, sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from midog_jax.data import augment_device as D
aug = D.DeviceAugmenter(d4=True, max_shift=6, elastic=(2.0, 8.0), colour="od")
sh = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
batch = {k: jax.device_put(v, sh) for k, v in np.load(sys.argv[1]).items()}
out = jax.jit(lambda b: D.augment_batch(aug, 0, 5, b))(batch)
assert len(out["image"].sharding.device_set) == jax.device_count() == 2
np.savez(sys.argv[2], **{k: np.asarray(v) for k, v in out.items()})
"""


def test_same_augmentation_on_one_and_two_devices(tmp_path):
  assert _FULL == D.DeviceAugmenter(d4=True, max_shift=6, elastic=(2.0, 8.0),
                                    colour="od")  # the script's
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
  batch = _batch(img, rng.uniform(0, 39, (5, 2)).astype(np.float32), 4,
                 index=np.array([7, 8, 9, 10], np.int32))
  one = _augment(_FULL, 0, 5, batch)  # this process: one device
  np.savez(tmp_path / "in.npz", **batch)
  r = subprocess.run([sys.executable, "-c", _SHARDED, str(tmp_path / "in.npz"),
                      str(tmp_path / "out.npz")], cwd=REPO, env=cpu_env(2),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  two = np.load(tmp_path / "out.npz")
  for k in ("image", "points", "mask"):
    np.testing.assert_array_equal(two[k], np.asarray(one[k]), err_msg=k)


def test_pipeline_device_mode_reads_crops_with_margin(tiny_dataset):
  cases = midog.load_midog(tiny_dataset / "MIDOG.json").labeled
  cfg = pipeline.PatchConfig(patch_size=64, max_points=8, shift=6, elastic_alpha=1.0,
                             elastic_sigma=6.0, colour="od", augment_on="device")
  light = dataclasses.replace(cfg, elastic_alpha=0.0, colour="none")  # compiles fast
  host = pipeline.PatchMaker(cases, dataclasses.replace(cfg, augment_on="host"), seed=0)
  dev = pipeline.PatchMaker(cases, cfg, seed=0)
  m = cfg.margin
  for i in range(4):
    e = dev(i)
    assert e["image"].shape == (64 + 2 * m, 64 + 2 * m, 3) and int(e["index"]) == i
    # The same window as the host path reads: its (un-augmented) labels,
    # in crop coordinates.
    req = dev.request(i)
    assert (int(e["x0"]), int(e["y0"])) == (req.x0, req.y0)
    pts, _ = pipeline._labels_in_window(cases[req.case_index], req.x0 - m,  # pylint: disable=protected-access
                                        req.y0 - m, 64 + 2 * m)
    got = e["points"][e["mask"]]
    assert len(got) == min(len(pts), 8)
    assert {tuple(p) for p in got} <= {tuple(p) for p in pts}
    assert host(i)["image"].shape == (64, 64, 3) and "index" not in host(i)
  # Validation (augment=False) is unchanged: the patch itself, no index.
  val = pipeline.PatchMaker(cases, cfg, seed=0, augment=False)(0)
  assert val["image"].shape == (64, 64, 3) and "index" not in val
  assert D.DeviceAugmenter.from_patch_config(cfg) == D.DeviceAugmenter(
      d4=True, max_shift=m, elastic=(1.0, 6.0), colour="od", strength=0.1)
  out = _augment(D.DeviceAugmenter.from_patch_config(light), 0, 0,
                 pipeline.make_dataset(cases, light, seed=0, batch_size=2)[0])
  assert out["image"].shape == (2, 64, 64, 3)
  with pytest.raises(ValueError, match="augment_on"):
    pipeline.PatchConfig(augment_on="gpu")
