"""The hyper-parameter search (midog_jax.search): space syntax, the trial loop, resuming.

The trial loop is tested in-process with a stand-in training function (it
writes validations through the writer the search gives it, as
``train.train_and_evaluate`` does), so pruning, divergence, stops and resumes
are exercised in milliseconds; one end-to-end test runs the real CLI on the
tiny RetinaNet, kills it with SIGKILL in the middle of a trial and reruns it.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from absl import flags
from ml_collections import config_flags

from midog_jax import config_files
from midog_jax.errors import DataError, NonFiniteLossError, Stopped
from midog_jax.search import space as space_lib
from midog_jax.search import study as study_lib
from midog_jax.search.space import UsageError, parse_space
from support import REPO, cpu_env, run_module


@pytest.fixture(scope="module")
def retina():
  return config_files.get_config("retina", "tiny")


@pytest.fixture(scope="module")
def p4():
  return config_files.get_config("p4_resnet", "tiny")


# ---- the space syntax -------------------------------------------------------------


def test_space_kinds_and_types(retina, p4):
  params = parse_space("optimizer.lr=loguniform:1e-6:1e-2, batch_size=choice:8:16,"
                       "data.colour_strength=uniform:0:0.3,optimizer.warmup_steps=int:0:9,"
                       "model.levels=choice:(3,4,5):(3,4),data.d4=choice:true:off", retina)
  by = {p.key: p for p in params}
  assert [p.key for p in params] == ["optimizer.lr", "batch_size", "data.colour_strength",
                                     "optimizer.warmup_steps", "model.levels", "data.d4"]
  assert (by["optimizer.lr"].kind, by["optimizer.lr"].low, by["optimizer.lr"].high) == (
      "loguniform", 1e-6, 1e-2)
  assert by["batch_size"].choices == (8, 16)
  assert by["model.levels"].choices == ((3, 4, 5), (3, 4))  # commas inside a value
  assert by["data.d4"].choices == (True, False)
  assert by["optimizer.warmup_steps"].low == 0 and by["optimizer.warmup_steps"].high == 9
  # The canonical text parses back to the same space.
  assert parse_space(space_lib.space_text(params), retina) == params
  # Every method's config: the P4 ResNet's own keys.
  (plan,) = parse_space("model.plan=choice:tiny:quick", p4)
  assert plan.choices == ("tiny", "quick")


def test_space_from_a_json_file(retina, tmp_path):
  path = tmp_path / "space.json"
  path.write_text(json.dumps({"optimizer.lr": "loguniform:1e-5:1e-3",
                              "batch_size": "choice:2:4"}))
  params = parse_space(str(path), retina)
  assert [(p.key, p.kind) for p in params] == [("optimizer.lr", "loguniform"),
                                               ("batch_size", "choice")]
  (tmp_path / "bad.json").write_text('["optimizer.lr"]')
  with pytest.raises(UsageError, match="JSON object"):
    parse_space(str(tmp_path / "bad.json"), retina)


@pytest.mark.parametrize("text, message", [
    ("optimizer.lrr=loguniform:1e-6:1e-2", "no key 'optimizer.lrr'.*optimizer.lr"),
    ("optimiser.lr=uniform:0:1", "no key 'optimiser.lr'"),
    ("optimizer.foo=uniform:0:1", "no 'foo' in 'optimizer'"),
    ("optimizer=uniform:0:1", "group of keys"),
    ("optimizer.lr=normal:0:1", "unknown kind 'normal'"),
    ("optimizer.lr=uniform:1:0", "must be below"),
    ("optimizer.lr=loguniform:0:1", "positive low bound"),
    ("optimizer.lr=uniform:0", "two bounds"),
    ("optimizer.lr=uniform:a:1", "not a number"),
    ("batch_size=uniform:2:8", "needs a float key"),
    ("batch_size=choice:8:x", "'x' is not a int"),
    ("batch_size=choice:8:8", "repeated"),
    ("data.d4=choice:maybe", "not a bool"),
    ("optimizer.name=int:0:3", "numeric key"),
    ("batch_size=choice:", "needs values"),
    ("optimizer.lr", "expected KEY=KIND:ARGS"),
    ("optimizer.lr=uniform:0:1,optimizer.lr=uniform:0:2", "more than once"),
    ("", "empty"),
])
def test_bad_spaces_are_one_line_usage_errors(retina, text, message):
  with pytest.raises(UsageError, match=message) as e:
    parse_space(text, retina)
  assert "\n" not in str(e.value)


def test_apply_params_sets_keys_on_a_copy(retina):
  out = space_lib.apply_params(retina, {"optimizer.lr": 3e-4, "batch_size": 2,
                                        "model.levels": (3, 4)})
  assert (out.optimizer.lr, out.batch_size, tuple(out.model.levels)) == (3e-4, 2, (3, 4))
  assert retina.optimizer.lr != 3e-4 and retina.batch_size == 4


# ---- best_config.py ---------------------------------------------------------------


def _load_like_main(path: Path):
  """The config main would get from ``--config=PATH`` (absl + config_flags)."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
  fv(["prog", f"--config={path}"])
  return fv.config


@pytest.mark.parametrize("name", ["retina", "p4_resnet"])
def test_best_config_file_loads_as_main_loads_configs(tmp_path, name):
  config = config_files.get_config(name, "tiny")
  with config.unlocked():
    config.optimizer.grad_clip = float("inf")  # a literal Python cannot write plainly
  path = tmp_path / "elsewhere" / "best_config.py"
  path.parent.mkdir()
  study_lib.write_best_config(path, config, "a test")
  text = path.read_text()
  imports = [l for l in text.splitlines() if l.startswith(("import", "from"))]
  assert imports == ["import ml_collections"]
  loaded = _load_like_main(path)
  assert loaded.to_dict() == config.to_dict()
  assert json.loads(loaded.to_json_best_effort()) == json.loads(config.to_json_best_effort())


# ---- the trial loop, with a stand-in for training ---------------------------------


class FakeTrain:
  """Writes ``val_f1`` at steps 1..3 through the search's writer, as train does.

  The F1 peaks at lr = 1e-3; ``diverge_above`` raises NonFiniteLossError,
  ``stop_on`` raises errors.Stopped once in the trial with that workdir.
  """

  def __init__(self, diverge_above=math.inf, stop_on=None):
    self.calls, self.diverge_above, self.stop_on = [], diverge_above, stop_on

  def __call__(self, config, workdir, writer):
    self.calls.append(Path(workdir).name)
    lr = config.optimizer.lr
    for step in (1, 2, 3):
      if lr > self.diverge_above:
        raise NonFiniteLossError(f"non-finite loss at step {step}")
      if self.stop_on == Path(workdir).name and step == 2:
        self.stop_on = None
        raise Stopped("SIGTERM", f"stopped at step {step} on SIGTERM")
      f1 = max(0.0, 1 - abs(math.log10(lr) + 3) / 4) * step / 3
      writer.write_scalars(step, {"loss": 1.0, "val_f1": f1})
    writer.close()
    return {}


def _search(study_dir, train_fn, trials=6, space="optimizer.lr=loguniform:1e-6:1e-1",
            config=None, **kw):
  config = config or config_files.get_config("retina", "tiny")
  kw = dict(dict(startup_trials=3, prune_after=2, log=lambda *a: None), **kw)
  return study_lib.run_search(config, parse_space(space, config), trials, study_dir,
                              train_fn=train_fn, **kw)


def _states(study):
  return [(t.number, t.state.name) for t in study.get_trials()]


def test_search_prunes_marks_divergence_and_counts_both(tmp_path):
  train = FakeTrain(diverge_above=3e-2)
  study = _search(tmp_path, train, trials=8, seed=1)
  trials = study.get_trials()
  assert len(trials) == 8  # exactly the requested number, all counted
  states = [t.state.name for t in trials]
  assert set(states) <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states
  for t in trials:
    lr = t.params["optimizer.lr"]
    assert ("diverged" in t.user_attrs) == (lr > 3e-2)
    if t.state.name == "COMPLETE":
      assert t.value == pytest.approx(max(0.0, 1 - abs(math.log10(lr) + 3) / 4))
  # A trial worse than the median at step 1 stops there.
  assert any(t.state.name == "PRUNED" and "diverged" not in t.user_attrs
             and max(t.intermediate_values) < 3 for t in trials)
  summary = (tmp_path / "summary.md").read_text()
  assert summary.count("\n| ") == 1 + 8  # header + one row per trial
  assert "(diverged)" in summary or all(t.params["optimizer.lr"] <= 3e-2 for t in trials)
  best = max((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
  loaded = _load_like_main(tmp_path / "best_config.py")
  assert loaded.optimizer.lr == best.params["optimizer.lr"]


def test_stopped_search_resumes_the_running_trial_and_draws_the_same_values(tmp_path):
  ref = _search(tmp_path / "ref", FakeTrain(), trials=5, seed=3)
  train = FakeTrain(stop_on="0003")
  with pytest.raises(Stopped, match="during trial 3"):
    _search(tmp_path / "s", train, trials=5, seed=3)
  assert _states(optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path}/s/study.db")
                 )[-1] == (3, "RUNNING")
  study = _search(tmp_path / "s", train, trials=5, seed=3)
  # Trial 3 ran again in its own workdir (its training resumes there), no trial was added.
  assert train.calls == ["0000", "0001", "0002", "0003", "0003", "0004"]
  assert _states(study) == _states(ref)
  assert [n for n, _ in _states(study)] == list(range(5))
  assert {s for _, s in _states(study)} <= {"COMPLETE", "PRUNED"}
  assert ([t.params for t in study.get_trials()] == [t.params for t in ref.get_trials()])
  # Rerun when done: nothing more is trained.
  _search(tmp_path / "s", train, trials=5, seed=3)
  assert len(train.calls) == 6
  # More trials asked of the same study: it goes on from where it is.
  study = _search(tmp_path / "s", train, trials=6, seed=3)
  assert len(study.get_trials()) == 6 and train.calls[-1] == "0005"


def test_resuming_with_other_settings_is_refused(tmp_path):
  _search(tmp_path, FakeTrain(), trials=1)
  with pytest.raises(DataError, match="space"):
    _search(tmp_path, FakeTrain(), trials=2, space="optimizer.lr=loguniform:1e-5:1e-1")
  other = config_files.get_config("retina", "tiny")
  other.total_steps = 99
  with pytest.raises(DataError, match="total_steps"):
    _search(tmp_path, FakeTrain(), trials=2, config=other)
  other = config_files.get_config("retina", "tiny")
  other.log_every = 99  # how it logs may change
  assert len(_search(tmp_path, FakeTrain(), trials=2, config=other).get_trials()) == 2


def test_a_trial_without_validation_fails_the_search(tmp_path):
  def no_val(config, workdir, writer):
    writer.write_scalars(1, {"loss": 1.0})
    writer.close()

  with pytest.raises(DataError, match="no val_f1"):
    _search(tmp_path, no_val, trials=2)
  assert _states(optuna.load_study(study_name="search",
                                   storage=f"sqlite:///{tmp_path}/study.db")) == [(0, "FAIL")]


# ---- the real command line ---------------------------------------------------------


def _cli(study, data, *extra):
  return [sys.executable, "-m", "midog_jax.search", "--config=configs/retina.py:tiny",
          "--space=optimizer.lr=loguniform:1e-5:1e-2,data.colour_strength=uniform:0:0.2",
          "--trials=3", f"--study={study}", f"--config.data.root={data}",
          "--config.data.extra_truth=", "--config.data.val_fraction=0.5",
          "--config.eval.max_val_images=1", "--config.total_steps=4",
          "--config.eval_every=2", "--config.checkpoint_every=2", *extra]


@pytest.mark.e2e
def test_cli_killed_search_resumes_and_finishes_the_requested_trials(tiny_dataset, tmp_path):
  study = tmp_path / "study"
  proc = subprocess.Popen(_cli(study, tiny_dataset, "--config.debug_step_sleep=0.5"),
                          cwd=REPO, env=cpu_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    ckpt = study / "trials" / "0001" / "checkpoints" / "latest" / "2"
    deadline = time.time() + 300
    while not ckpt.is_dir():
      assert proc.poll() is None, "the search ended before trial 1 saved a checkpoint"
      assert time.time() < deadline, "trial 1 saved no checkpoint"
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
  assert not (study / "trials" / "0002").exists()

  r = subprocess.run(_cli(study, tiny_dataset), cwd=REPO, env=cpu_env(),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resuming trial 1" in r.stdout
  assert f"resumed from {study}/trials/0001/checkpoints at step" in r.stdout
  rows = study_lib.load_summary_rows(study)
  assert [(t["number"], t["state"]) for t in rows] == [(0, "COMPLETE"), (1, "COMPLETE"),
                                                       (2, "COMPLETE")]
  assert all(sorted(t["intermediate"]) == [2, 4] for t in rows)
  summary = (study / "summary.md").read_text()
  assert "3 requested; 3 complete" in summary
  # best_config.py loads as main loads configs and is the best trial's config.
  best = max(rows, key=lambda t: t["value"])
  loaded = _load_like_main(study / "best_config.py")
  assert loaded.optimizer.lr == best["params"]["optimizer.lr"]
  assert loaded.data.colour_strength == best["params"]["data.colour_strength"]
  trained = json.loads((study / best["workdir"] / "config.json").read_text())
  trained.pop("debug_step_sleep")
  got = json.loads(loaded.to_json_best_effort())
  got.pop("debug_step_sleep")
  assert got == trained


@pytest.mark.e2e
def test_cli_usage_errors_exit_2_in_one_line(tmp_path):
  r = run_module("midog_jax.search", "--config=configs/retina.py:tiny",
                 "--space=optimizer.lrr=loguniform:1e-6:1e-2", "--trials=2",
                 f"--study={tmp_path}", check=False, env=cpu_env())
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "optimizer.lrr" in lines[0] and "optimizer.lr" in lines[0]
  assert not (tmp_path / "study.db").exists()
