"""``python -m midog_jax.weights``: convert, inspect, list, and refusing bad files.

Sources are real torchvision state dicts (random weights). Every refusal is
one line naming the file, exit code 1: a state dict of another architecture,
a truncated ``.pth`` or ``.safetensors``, a ``.pth`` that needs full
unpickling, and, at load time, a converted file of the wrong architecture or
a truncated one.
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from support import REPO, cpu_env
from weights_helpers import require_torch

from midog_jax import config_files
from midog_jax import pretrained as pretrained_lib
from midog_jax.errors import DataError
from midog_jax.weights import ARCHS
from midog_jax.weights.__main__ import main

torch, torchvision = require_torch()


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
  """A random torchvision ResNet-18 state dict as .pth and as .safetensors."""
  d = tmp_path_factory.mktemp("r18")
  torch.manual_seed(0)
  sd = torchvision.models.resnet18(weights=None).state_dict()
  torch.save(sd, d / "r18.pth")
  save_file({k: v.numpy() for k, v in sd.items()}, str(d / "r18.safetensors"))
  return d


def _run(capsys, *argv):
  rc = main(list(argv))
  out, err = capsys.readouterr()
  return rc, out, err


def _one_line_error(err: str, path) -> str:
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith(f"error: {path}: "), err
  return lines[0]


def test_convert_writes_our_names_and_a_header(r18, tmp_path, capsys):
  out = tmp_path / "r18.safetensors"
  rc, stdout, _ = _run(capsys, "convert", "--arch", "resnet18", "--src",
                       str(r18 / "r18.pth"), "--out", str(out))
  assert rc == 0
  summary = json.loads(stdout)
  sha = hashlib.sha256((r18 / "r18.pth").read_bytes()).hexdigest()
  assert summary["source_sha256"] == sha and summary["arrays"] == 102
  header = pretrained_lib.pretrained_header(out)
  assert header["arch"] == "resnet18" and header["source"]["sha256"] == sha
  assert header["fidelity"]["model.norm"] == "frozen"
  assert header["fidelity"]["model.input_std"] == [0.229, 0.224, 0.225]
  arrays = load_file(str(out))
  sd = torch.load(r18 / "r18.pth", weights_only=True)
  # OIHW -> HWIO; running statistics into batch_stats; the counter dropped.
  np.testing.assert_array_equal(arrays["params/layer2_0/downsample_conv/kernel"],
                                sd["layer2.0.downsample.0.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(arrays["batch_stats/bn1/var"], sd["bn1.running_var"].numpy())
  np.testing.assert_array_equal(arrays["params/fc/kernel"], sd["fc.weight"].numpy().T)
  assert not any("num_batches_tracked" in k for k in arrays)

  rc, stdout, _ = _run(capsys, "inspect", str(out))
  assert rc == 0 and "params/conv1/kernel (7, 7, 3, 64) <- conv1.weight" in stdout
  assert "expects --config.model.norm=frozen" in stdout
  rc, stdout, _ = _run(capsys, "inspect", str(r18 / "r18.pth"), "--arch", "resnet18")
  assert rc == 0
  assert "layer1.0.bn2.running_mean (64,) -> batch_stats/layer1_0/bn2/mean (64,)" in stdout
  assert "bn1.num_batches_tracked () -> (dropped: unused counter)" in stdout


def test_list_names_every_weight_enum_and_its_convert_command(capsys):
  rc, stdout, _ = _run(capsys, "list")
  assert rc == 0
  for name, arch in ARCHS.items():
    for enum, url in arch.weights.items():
      assert enum in stdout and url in stdout
    assert f"convert --arch {name} " in stdout
  assert "RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1" in stdout


def test_a_safetensors_source_converts_without_torch(r18, tmp_path):
  # torch made unimportable in the child: the .safetensors path never needs it.
  import subprocess
  out = tmp_path / "nt.safetensors"
  code = ("import sys; sys.modules['torch'] = None; "
          "from midog_jax.weights.__main__ import main; sys.exit(main(sys.argv[1:]))")
  r = subprocess.run([sys.executable, "-c", code, "convert", "--arch", "resnet18",
                      "--src", str(r18 / "r18.safetensors"), "--out", str(out)],
                     cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  ref = tmp_path / "ref.safetensors"
  assert main(["convert", "--arch", "resnet18", "--src", str(r18 / "r18.pth"),
               "--out", str(ref)]) == 0
  a, b = load_file(str(out)), load_file(str(ref))
  assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_state_dict_of_another_architecture_is_refused(r18, tmp_path, capsys):
  src = r18 / "r18.pth"
  rc, _, err = _run(capsys, "convert", "--arch", "resnet34", "--src", str(src),
                    "--out", str(tmp_path / "x.safetensors"))
  assert rc == 1
  assert "is not a torchvision resnet34 state dict" in _one_line_error(err, src)
  assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_truncated_source_is_refused(r18, tmp_path, capsys, suffix):
  src = tmp_path / f"cut{suffix}"
  src.write_bytes((r18 / f"r18{suffix}").read_bytes()[:100_000])
  rc, _, err = _run(capsys, "convert", "--arch", "resnet18", "--src", str(src),
                    "--out", str(tmp_path / "x.safetensors"))
  assert rc == 1 and "truncated or corrupt" in _one_line_error(err, src)


def test_a_pth_that_needs_full_unpickling_is_refused(tmp_path, capsys):
  src = tmp_path / "whole_model.pth"
  torch.save(torchvision.models.resnet18(weights=None), src)  # a pickled module
  rc, _, err = _run(capsys, "convert", "--arch", "resnet18", "--src", str(src),
                    "--out", str(tmp_path / "x.safetensors"))
  assert rc == 1 and "needs full unpickling" in _one_line_error(err, src)


def test_options_that_do_not_apply_are_usage_errors(r18, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    main(["convert", "--arch", "efficientnet_b0", "--src", str(r18 / "r18.pth"),
          "--out", str(tmp_path / "x.safetensors"), "--norm", "frozen"])
  assert e.value.code == 2


def _retina_config(**model):
  cfg = config_files.get_config("retina", "tiny")
  for k, v in model.items():
    setattr(cfg.model, k, v)
  return cfg


def test_loading_a_converted_file_of_the_wrong_architecture_or_truncated_is_refused(
    r18, tmp_path):
  import jax
  from midog_jax import detectors
  out = tmp_path / "r18.safetensors"
  assert main(["convert", "--arch", "resnet18", "--src", str(r18 / "r18.pth"),
               "--out", str(out)]) == 0
  # A ResNet-18 file into a ResNet-34 RetinaNet backbone.
  cfg = _retina_config(backbone="resnet34", norm="frozen")
  det = detectors.build(cfg)
  variables = jax.eval_shape(det.init_variables, jax.random.key(0))
  with pytest.raises(DataError) as e:
    pretrained_lib.load_into(dict(variables), out, cfg)
  msg = str(e.value)
  assert msg.startswith(f"{out}: ") and "\n" not in msg
  # ResNet-34 has 8 more basic blocks (2 kernels + 2 frozen norms x 4 each).
  assert "80 arrays of the model are not in the file" in msg
  assert "backbone/layer1_2/" in msg
  # Truncated converted file.
  cut = tmp_path / "cut.safetensors"
  cut.write_bytes(out.read_bytes()[:50_000])
  with pytest.raises(DataError) as e:
    pretrained_lib.load_into(dict(variables), cut, cfg)
  assert str(e.value).startswith(f"{cut}: ") and "\n" not in str(e.value)
