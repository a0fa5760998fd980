"""Every program, given bad input: one line naming the file, the documented exit code.

The contract (DESIGN.md): 0 done; 1 a data or runtime error, printed as ONE
line naming the file and the problem; 2 a usage error. No traceback unless
``MIDOG_TRACEBACK=1``. Each case is a real subprocess on real bad files.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from midog_jax import checkpoint as ckpt_lib
from support import REPO, cpu_env

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
  d = tmp_path_factory.mktemp("bad")
  (d / "garbled.json").write_text("not json{")
  (d / "empty.json").write_text("")
  (d / "partial.json").write_text('{"images": [{"id": 1}]}')
  (d / "list.json").write_text("[]")
  (d / "bad.tif").write_bytes(b"II*\0garbage")
  (d / "empty_dir").mkdir()
  return d


# (program and arguments with {d} for the bad-files folder, exit code, the
# start of the last line).
CASES = [
    (["midog_jax.evaluate", "--annotations", "{d}/missing.json", "--predictions", "{d}/empty_dir"],
     1, "error: {d}/missing.json: annotation file not found"),
    (["midog_jax.evaluate", "--annotations", "{d}/garbled.json", "--predictions", "{d}/empty_dir"],
     1, "error: {d}/garbled.json: malformed JSON"),
    (["midog_jax.evaluate", "--annotations", "{d}/partial.json", "--predictions", "{d}/empty_dir"],
     1, "error: {d}/partial.json: missing top-level key 'annotations'"),
    (["midog_jax.data.summary", "--annotations", "{d}/list.json"],
     1, "error: {d}/list.json: "),
    (["midog_jax.data.summary", "--annotations", "{d}/empty.json"],
     1, "error: {d}/empty.json: malformed JSON"),
    (["midog_jax.predict", "--workdir", "{d}/nowhere", "--images", "{d}/bad.tif", "--out",
      "{d}/out"], 1, "error: {d}/nowhere: workdir not found"),
    (["midog_jax.predict", "--workdir", "{d}/empty_dir", "--images", "{d}/bad.tif"],
     2, "python -m midog_jax.predict: error: the following arguments are required: --out"),
    (["midog_jax.data.synthetic", "--out", "{d}/garbled.json", "--preset", "tiny"],
     1, "error: {d}/garbled.json: --out exists and is not a folder"),
    (["midog_jax.data.synthetic", "--out", "{d}/syn", "--preset", "nope"],
     2, "python -m midog_jax.data.synthetic: error: argument --preset: invalid choice"),
    (["midog_jax.baselines.blue_ratio", "--data", "{d}/empty_dir"],
     1, "error: {d}/empty_dir: no MIDOG.json or MIDOG++.json in the data root"),
    (["midog_jax.candidates", "--data", "{d}/garbled.json", "--out", "{d}/stores"],
     1, "error: {d}/garbled.json: malformed JSON"),
    (["midog_jax.main", "--config=configs/retina.py:tiny", "--workdir={d}/w",
      "--config.data.root={d}/empty_dir"],
     1, "error: {d}/empty_dir: no MIDOG.json or MIDOG++.json in the data root"),
    (["midog_jax.main", "--config=configs/retina.py:tiny", "--workdir={d}/w",
      "--config.data.annotations={d}/garbled.json"], 1, "error: {d}/garbled.json: malformed JSON"),
    (["midog_jax.main", "--config=configs/retina.py:tiny", "--workdir={d}/w",
      "--config.data.root={tiny}", "--config.init_from={d}/missing.safetensors"],
     1, "error: {d}/missing.safetensors: pretrained weights file not found"),
    (["midog_jax.mining", "--config=configs/p4_resnet.py:tiny", "--workdir={d}/w2",
      "--config.data.root={d}/nowhere"], 1, "error: {d}/nowhere: "),
]


@pytest.mark.parametrize("argv,code,last", CASES, ids=lambda c: c[0] if isinstance(c, list) else None)
def test_bad_input_is_one_line_and_the_documented_exit_code(bad, tiny_dataset, argv, code,
                                                           last):
  argv = [a.format(d=bad, tiny=tiny_dataset) for a in argv]
  r = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=cpu_env(),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == code, r.stderr[-2000:]
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  lines = r.stderr.strip().splitlines()
  assert lines[-1].startswith(last.format(d=bad)), lines[-1]
  if code == 1:  # a data error is exactly one line
    assert len(lines) == 1, r.stderr[-2000:]
  # No checkpoint and no output was written.
  assert ckpt_lib.saved_steps(bad / "w" / "checkpoints" / "latest") == []
  assert not (bad / "out").exists()
