"""Direct tests of the experiment configs: ``configs/common.parse_arg`` and ``get_config``.

``parse_arg``: bare words set booleans, ``key=value`` is cast to the
default's type, unknown keys are errors, ``""``/``None`` give the defaults.
Every documented argument of ``retina.py`` and ``p4_resnet.py`` builds a
config with the keys of the command-line contract that ``detectors.build``
accepts, and the config modules import without jax (or any package code).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from configs import common, image_level, kondo_da, p4_resnet, retina

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------
# parse_arg.


def test_bare_words_set_booleans_true():
  a = common.parse_arg("quick", quick=False, tiny=False, aug="rgb")
  assert isinstance(a, ml_collections.ConfigDict)
  assert a.quick is True and a.tiny is False and a.aug == "rgb"
  b = common.parse_arg("quick,tiny", quick=False, tiny=False)
  assert b.quick is True and b.tiny is True


def test_spaces_around_items_are_ignored():
  a = common.parse_arg(" quick, aug=od", quick=False, aug="rgb")
  assert a.quick is True and a.aug == "od"


@pytest.mark.parametrize("default,raw,want", [
    (1, "5", 5),
    (1, "-12", -12),
    (0.5, "0.25", 0.25),
    (0.5, "3", 3.0),
    (0.5, "1e-3", 1e-3),
    ("rgb", "od", "od"),
    ("rgb", "12", "12"),
    ("a", "", ""),
])
def test_values_are_cast_to_the_defaults_type(default, raw, want):
  a = common.parse_arg(f"k={raw}", k=default)
  assert a.k == want
  assert type(a.k) is type(default)


@pytest.mark.parametrize("raw", ["true", "True", "TRUE", "1", "yes", "on", "On"])
@pytest.mark.parametrize("default", [False, True])
def test_bool_values_true(raw, default):
  assert common.parse_arg(f"flag={raw}", flag=default).flag is True


@pytest.mark.parametrize("raw", ["false", "False", "0", "no", "off", "OFF"])
@pytest.mark.parametrize("default", [False, True])
def test_bool_values_false(raw, default):
  assert common.parse_arg(f"flag={raw}", flag=default).flag is False


def test_invalid_bool_value_raises():
  with pytest.raises(ValueError, match="ture"):
    common.parse_arg("quick=ture", quick=False)


def test_bad_number_raises_value_error():
  with pytest.raises(ValueError):
    common.parse_arg("n=many", n=3)
  with pytest.raises(ValueError):
    common.parse_arg("n=1.5", n=3)


@pytest.mark.parametrize("arg", ["quik", "quick,colour=od", "Quick"])
def test_unknown_key_raises_value_error_naming_it(arg):
  bad = [item.partition("=")[0] for item in arg.split(",")][-1]
  with pytest.raises(ValueError, match=repr(bad)):
    common.parse_arg(arg, quick=False, aug="rgb")


@pytest.mark.parametrize("arg", ["", None, ",", ",,"])
def test_empty_arg_gives_the_defaults(arg):
  a = common.parse_arg(arg, quick=False, n=3, aug="rgb", x=None)
  assert a.to_dict() == dict(quick=False, n=3, aug="rgb", x=None)


def test_none_default_takes_the_raw_string():
  a = common.parse_arg("x=12", x=None, y=None)
  assert a.x == "12" and isinstance(a.x, str)
  assert a.y is None


def test_value_may_contain_equals_signs():
  assert common.parse_arg("path=a=b", path="").path == "a=b"


def test_defaults_are_not_mutated():
  defaults = dict(quick=False, n=3)
  common.parse_arg("quick,n=4", **defaults)
  assert defaults == dict(quick=False, n=3)


# --------------------------------------------------------------------------
# Experiment configs.

CONFIGS = [
    (retina, ""), (retina, "quick"), (retina, "tiny"), (retina, "quick,tiny"),
    (retina, "imposters=class"), (retina, "imposters=ignore"),
    (retina, "backbone=resnet34"),
    (p4_resnet, ""), (p4_resnet, "aug=rgb"), (p4_resnet, "aug=od"),
    (p4_resnet, "quick"), (p4_resnet, "tiny"), (p4_resnet, "quick,aug=od"),
    (kondo_da, ""), (kondo_da, "quick"), (kondo_da, "tiny"), (kondo_da, "sampling=uniform"),
    (kondo_da, "grl=constant"),
    (image_level, ""), (image_level, "quick"), (image_level, "tiny"), (image_level, "round=2"),
    (image_level, "round=2,tiny"),
]
IDS = [f"{m.__name__.rsplit('.', 1)[-1]}:{a or '-'}" for m, a in CONFIGS]


@pytest.mark.parametrize("module,arg", CONFIGS, ids=IDS)
def test_config_has_the_command_line_contract_keys(module, arg):
  c = module.get_config(arg)
  assert isinstance(c.data.root, str) and c.data.root == ""
  assert isinstance(c.seed, int)
  assert isinstance(c.total_steps, int) and c.total_steps > 0
  assert isinstance(c.batch_size, int) and c.batch_size > 0
  assert isinstance(c.init_from, str) and c.init_from == ""
  assert c.method in ("retinanet", "p4", "kondo_da", "image_level")
  # Keys the trainer reads directly.
  for key in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
              "optimizer", "eval", "model", "best_metric"):
    assert key in c, key
  # The command-line override syntax works on the contract keys.
  c.data.root = "/data/MIDOG"
  c.total_steps = 3
  with pytest.raises(TypeError):
    c.total_steps = "many"


@pytest.mark.parametrize("module,arg", CONFIGS, ids=IDS)
def test_detectors_build_accepts_every_config(module, arg):
  from midog_jax import detectors
  c = module.get_config(arg)
  det = detectors.build(c)
  assert det.name == c.method
  if c.data.patch_size:
    assert det.patch_size == c.data.patch_size


def test_get_config_without_argument_equals_empty_argument():
  for module in (retina, p4_resnet, kondo_da, image_level):
    assert module.get_config().to_dict() == module.get_config("").to_dict()


def test_retina_arguments_change_the_config():
  full, quick, tiny = (retina.get_config(a) for a in ("", "quick", "tiny"))
  both = retina.get_config("quick,tiny")
  assert full.method == "retinanet" and full.model.backbone == "resnet50"
  assert full.optimizer.name == "adam" and full.optimizer.lr == 1e-4
  assert quick.model.backbone == "resnet18" and quick.total_steps < full.total_steps
  assert tiny.model.backbone == "resnet_tiny" and tiny.data.patch_size < quick.data.patch_size
  # tiny applies on top of quick: quick's schedule, tiny's network.
  assert both.model.backbone == "resnet_tiny" and both.total_steps == quick.total_steps
  assert retina.get_config("imposters=class").model.imposters == "class"
  assert retina.get_config("backbone=resnet34").model.backbone == "resnet34"


def test_p4_arguments_change_the_config():
  rgb, od = p4_resnet.get_config("aug=rgb"), p4_resnet.get_config("aug=od")
  assert rgb.method == "p4" and rgb.data.colour == "rgb" and od.data.colour == "od"
  assert p4_resnet.get_config("").data.colour == "rgb"
  assert rgb.optimizer.name == "sgd" and rgb.optimizer.schedule == "cosine_cyclic"
  assert rgb.best_metric == "val_loss"
  quick, tiny = p4_resnet.get_config("quick"), p4_resnet.get_config("tiny")
  assert quick.model.plan == "quick" and quick.total_steps < rgb.total_steps
  assert tiny.model.plan == "tiny" and tiny.batch_size < quick.batch_size
  assert p4_resnet.get_config("quick,aug=od").data.colour == "od"


@pytest.mark.parametrize("arg", ["aug=xyz", "aug=RGB", "aug="])
def test_p4_unknown_aug_raises(arg):
  with pytest.raises(ValueError, match="aug"):
    p4_resnet.get_config(arg)


@pytest.mark.parametrize("module", [retina, p4_resnet])
def test_unknown_argument_raises(module):
  with pytest.raises(ValueError, match="qiuck"):
    module.get_config("qiuck")


def test_get_config_returns_independent_configs():
  a = retina.get_config("tiny")
  a.data.root = "/elsewhere"
  a.model.levels = (3,)
  b = retina.get_config("tiny")
  assert b.data.root == "" and tuple(b.model.levels) == (3, 4, 5)


def test_config_modules_do_not_import_jax_or_package_code():
  # As --config=configs/<name>.py loads them: from the repository root.
  code = ("import configs.retina, configs.p4_resnet, sys; "
          "print('jax' in sys.modules); "
          "print(sorted(m for m in sys.modules if m.startswith('midog_jax')))")
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  jax_loaded, modules = r.stdout.strip().splitlines()
  assert jax_loaded == "False"
  assert modules == "[]"


def test_config_files_load_from_anywhere(tmp_path):
  # From another folder (as a script in benchmarks/ or an installed package
  # runs) configs is not importable by itself; config_files makes it so.
  code = ("import sys; from midog_jax import config_files; "
          "c = config_files.get_config('retina', 'tiny'); "
          "print(c.method, c.data.patch_size, config_files.module('common').__name__)")
  r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert r.stdout.split() == ["retinanet", "96", "configs.common"]


def test_bare_word_for_a_valued_key_and_blank_items():
  with pytest.raises(ValueError, match="needs a value"):
    common.parse_arg("imposters", imposters="background")
  assert common.parse_arg("quick, ", quick=False).quick is True


@pytest.mark.parametrize("args, says", [
    (["--config=configs/retina.py:tiny", "--config.total_step=8"],
     "'total_step' Did you mean \"total_steps\""),
    (["--config=configs/nope.py"], "No such file or directory: 'configs/nope.py'"),
    (["--config=configs/retina.py:tiny", "--config.total_steps=abc"],
     "invalid literal for int()"),
    (["--config=configs/retina.py:quick,foo"], "unknown config argument 'foo'"),
])
def test_bad_command_lines_are_one_line_and_exit_2(args, says, tmp_path):
  from support import run_module
  r = run_module("midog_jax.main", *args, f"--workdir={tmp_path / 'w'}", check=False)
  assert r.returncode == 2
  lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and lines[0].startswith("error: bad command line: ")
  assert says in lines[0] and "Traceback" not in r.stderr
  assert not (tmp_path / "w").exists()  # nothing written
