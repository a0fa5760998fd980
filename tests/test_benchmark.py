"""The benchmark harness (``python -m midog_jax.benchmark``): guard, report, resume, registry, CLI.

The suite used here follows the suite layout contract (``suite.json``,
``train/`` and ``test/`` in the MIDOG++ format with per-rater ``labels`` and
``roi_type``), re-written from the synthetic ``tiny`` preset so it costs a
few seconds: train/ holds one image of each of three scanners plus an
unlabeled one, test/ a held-out image of each training scanner and one image
of an unseen scanner.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from midog_jax.benchmark import guard, leaderboard, methods, report, runner
from midog_jax.benchmark import suite as suite_lib

REPO = Path(__file__).resolve().parents[1]
TRAIN_IDS, UNLABELED_ID, TEST_IDS, UNSEEN_ID = (1, 51, 101), 151, (2, 52, 102), 152
SCANNER = {1: "Hamamatsu XR", 2: "Hamamatsu XR", 51: "Hamamatsu S360", 52: "Hamamatsu S360",
           101: "Aperio CS2", 102: "Aperio CS2", 151: "Leica GT450", 152: "3D Histech"}
ROIS = ("hotspot", "random", "challenging")


def _write_folder(folder: Path, src: Path, images: list[dict], annotations: list[dict],
                  dataset: dict[int, str]) -> None:
  folder.mkdir(parents=True)
  for im in images:
    shutil.copy(src / im["file_name"], folder / im["file_name"])
  (folder / "MIDOG++.json").write_text(json.dumps(dict(
      images=images, annotations=annotations,
      categories=[{"id": 1, "name": "mitotic figure"}, {"id": 2, "name": "not mitotic figure"}])))
  rows = ["Slide;Dataset;Tumor;Scanner;Origin;Species"] + [
      f"{im['id']};{dataset[im['id']]};human breast cancer;{SCANNER[im['id']]};UMC Utrecht;Human"
      for im in images]
  (folder / "MIDOGpp_xvalidation.csv").write_text("\n".join(rows) + "\n")


def make_suite(out: Path) -> Path:
  """A midog21-style suite from the synthetic tiny preset (see the module docstring)."""
  from midog_jax.data import synthetic
  src = out / "src"
  synthetic.generate(src, preset="tiny", seed=0, workers=1)
  data = json.loads((src / "MIDOG.json").read_text())
  truth = json.loads((src / synthetic.TRUTH).read_text())
  images = {im["id"]: dict(im, tumor_type="human breast cancer",
                           roi_type=ROIS[k % 3]) for k, im in enumerate(data["images"])}
  anns = [a for a in data["annotations"] + truth["annotations"]]
  for k, a in enumerate(anns):
    # Rater 2 disagrees on every third figure; the tie-breaker sides with the consensus.
    other = 3 - a["category_id"]
    a["labels"] = ([a["category_id"], other, a["category_id"]] if k % 3 == 0
                   else [a["category_id"]] * 2)
  root = out / "suite"
  train = [images[i] for i in TRAIN_IDS + (UNLABELED_ID,)]
  test = [images[i] for i in TEST_IDS + (UNSEEN_ID,)]
  _write_folder(root / "train", src, train, [a for a in anns if a["image_id"] in TRAIN_IDS],
                {i: ("unlabeled" if i == UNLABELED_ID else "train") for i in TRAIN_IDS + (151,)})
  test_ids = TEST_IDS + (UNSEEN_ID,)
  _write_folder(root / "test", src, test, [a for a in anns if a["image_id"] in test_ids],
                {i: "test" for i in test_ids})
  (root / "suite.json").write_text(json.dumps(dict(
      suite="midog21", preset="tiny", seed=0, generator_version="test", domain_key="scanner",
      train_domains=["Aperio CS2", "Hamamatsu S360", "Hamamatsu XR"],
      unlabeled_domains=["Leica GT450"], unseen_domains=["3D Histech"],
      human_agreement=dict(target=0.76, f1=0.7))))
  shutil.rmtree(src)
  return root


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory) -> Path:
  return make_suite(tmp_path_factory.mktemp("bench"))


def bench(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "midog_jax.benchmark", *map(str, args)], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------
# (1) The test-folder guard, with real subprocesses.


def _guarded(tmp_path: Path, code: str, test_dir: Path, images_only: bool = False) -> int:
  return guard.run_guarded([sys.executable, "-c", code], deny=[test_dir],
                           log=tmp_path / "guard.log", output=tmp_path / "out.log",
                           cwd=tmp_path, images_only=images_only)


def test_guard_catches_a_read_of_the_test_folder_and_names_the_path(suite_dir, tmp_path):
  test_dir, labels = suite_dir / "test", suite_dir / "test" / "MIDOG++.json"
  # The program swallows the refusal: the log still tells.
  code = f"try:\n  open({str(labels)!r}).read()\nexcept PermissionError:\n  pass\n"
  with pytest.raises(guard.GuardError, match=r"MIDOG\+\+\.json.*test folder \(open\)"):
    _guarded(tmp_path, code, test_dir)
  with pytest.raises(guard.GuardError, match=r"test.*\(os\.listdir\)"):
    _guarded(tmp_path, f"import os\nos.listdir({str(test_dir)!r})", test_dir)
  # A relative path and a symlink into the folder from elsewhere resolve to it.
  (tmp_path / "link.json").symlink_to(labels)
  with pytest.raises(guard.GuardError, match=r"MIDOG\+\+\.json"):
    _guarded(tmp_path, "open('link.json')", test_dir)
  # Reading the training folder (and the rest of the disk) is allowed.
  ok = f"import os\nopen({str(suite_dir / 'train' / 'MIDOG++.json')!r}).read()\nos.listdir('.')"
  assert _guarded(tmp_path, ok, test_dir) == 0
  assert guard.violations(tmp_path / "guard.log") == []


def test_guard_covers_a_grandchild_python_process(suite_dir, tmp_path):
  labels = suite_dir / "test" / "MIDOG++.json"
  # The child starts a grandchild that reads the labels and ignores its failure.
  code = ("import subprocess, sys\n"
          f"r = subprocess.run([sys.executable, '-c', \"open({str(labels)!r})\"])\n"
          "print('grandchild exit', r.returncode)\n")
  with pytest.raises(guard.GuardError, match=r"test/MIDOG\+\+\.json"):
    _guarded(tmp_path, code, suite_dir / "test")
  assert "grandchild exit 1" in (tmp_path / "out.log").read_text()
  # The same program without the guard reads the file fine (the control).
  plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert "grandchild exit 0" in plain.stdout


def test_guard_images_only_mode_lets_prediction_read_images_not_labels(suite_dir, tmp_path):
  test_dir = suite_dir / "test"
  images = f"import os\nfor f in sorted(os.listdir({str(test_dir)!r})):\n" \
           f"  open(os.path.join({str(test_dir)!r}, f), 'rb').read(8) if f.endswith('.tiff') " \
           "else None\n"
  assert _guarded(tmp_path, images, test_dir, images_only=True) == 0
  with pytest.raises(guard.GuardError, match="other than an image"):
    _guarded(tmp_path, f"open({str(test_dir / 'MIDOGpp_xvalidation.csv')!r})", test_dir,
             images_only=True)
  guard.self_check(test_dir, tmp_path)  # the harness's start-up proof passes here


def test_the_runner_fails_a_training_that_opens_the_test_folder(suite_dir, tmp_path,
                                                               monkeypatch):
  # A registered method whose training peeks at the test labels: the run fails
  # with one line naming the file, and nothing of it is recorded as done.
  peek = methods.Method(
      "peek", methods.DETECTOR, "reads the test labels",
      train=lambda ctx: [methods.Command(
          (sys.executable, "-c", f"open({str(ctx.suite.test_dir / 'MIDOG++.json')!r})"),
          "train")])
  monkeypatch.setitem(methods.REGISTRY, "peek", peek)
  r = runner.Runner(runner.Options(suite="midog21", methods=("peek",), seeds=1, budget="quick",
                                   out=tmp_path, data=suite_dir, preset="tiny",
                                   protocol="official"), log=lambda s: None)
  r.prepare_data()
  assert r.run_all() == {"peek": []}
  assert len(r.failures) == 1 and "\n" not in r.failures[0]
  assert f"{suite_dir / 'test' / 'MIDOG++.json'}: the guarded command read" in r.failures[0]
  assert not (tmp_path / "runs" / "peek" / "seed0" / runner.TRAINED).exists()


# ----------------------------------------------------------------------------
# (2) The report from hand-made run results.


def _cases() -> list[suite_lib.ScoredCase]:
  """Four test images of two figures each, 1 mm apart; the last of an unseen domain."""
  out = []
  for k, (domain, roi) in enumerate([("A", "hotspot"), ("A", "random"), ("B", "hotspot"),
                                     ("C", "challenging")]):
    truth = np.array([[0.1, 0.1], [1.1, 0.1]])
    out.append(suite_lib.ScoredCase(
        stem=f"{k:03d}", path=Path(f"{k:03d}.tiff"), domain=domain, roi_type=roi,
        group=suite_lib.UNSEEN if domain == "C" else suite_lib.HELD_OUT, spacing_um=0.25,
        area_mm2=2.0, truth_mm=truth, votes_mm=(truth, truth[:1])))
  return out


def _result(method: str, seed: int, found: list[list[int]], threshold: float,
            score: float = 0.9, fp_score: float | None = None) -> dict:
  """A run's result.json: in case k, the truth figures ``found[k]`` are detected
  (2 um off, at ``score``); ``fp_score``: plus one false positive per case."""
  det = {}
  for k, case in enumerate(_cases()):
    rows = [[case.truth_mm[i, 0] + 0.002, case.truth_mm[i, 1], score, 1] for i in found[k]]
    if fp_score is not None:
      rows.append([0.6, 0.6, fp_score, 1])
    det[case.stem] = rows
  return dict(method=method, seed=seed, kind="detector", threshold=threshold, detections=det,
              predict_commands=[f"predict {method} {seed}"])


def _f1(tp: int, fp: int, fn: int) -> float:
  return (2 * tp + 1e-6) / (2 * tp + fp + fn + 1e-6)


def test_report_means_and_spreads_are_over_seeds_and_both_rankings_are_shown(tmp_path):
  everything, first_two = [[0, 1]] * 4, [[0, 1], [0, 1], [], []]
  results = {
      # The same F1 every seed (0.667), but per image it is 1, 1, 0, 0: a
      # spread over images instead of seeds would not be 0.
      "retinanet": [_result("retinanet", s, first_two, 0.5) for s in range(3)],
      # Seeds differ: all found, half found, nothing found.
      "p4": [_result("p4", 0, everything, 0.5), _result("p4", 1, first_two, 0.5),
             _result("p4", 2, [[]] * 4, 0.5)],
      # A perfect ranking (AP 1) under a threshold that keeps nothing (F1 0).
      "kondo_da": [_result("kondo_da", s, everything, 0.95, fp_score=0.1) for s in range(2)],
      "human": [dict(method="human", seed=0, kind="reference")],
  }
  meta = dict(suite=dict(suite="midog21", preset="tiny", generator_version="t",
                         domain_key="scanner", human_agreement=dict(target=0.76, f1=0.667)),
              protocol="official", budget="quick", seeds=3, n_boot=50, data="suite",
              failures=[], commands=dict(benchmark="python -m midog_jax.benchmark ...",
                                         data=None, train={"p4 seed 0": ["python -m x"]},
                                         predict={"p4 seed 0": ["python -m y"]}))
  board, curves = leaderboard.build(results, _cases(), meta=meta, n_boot=50)
  paths = report.write(tmp_path, board, curves)
  assert sorted(p.name for p in paths) == ["curves.png", "leaderboard.json", "leaderboard.md",
                                           "per_domain.png"]
  for png in ("curves.png", "per_domain.png"):
    assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  saved = json.loads((tmp_path / "leaderboard.json").read_text())

  steady = saved["detection"]["retinanet"]["summary"]["all"]["f1"]
  assert steady["mean"] == pytest.approx(_f1(4, 0, 4)) and steady["std"] == 0.0
  assert steady["n"] == 3
  per_seed = [_f1(8, 0, 0), _f1(4, 0, 4), _f1(0, 0, 8)]
  wobbly = saved["detection"]["p4"]["summary"]["all"]["f1"]
  assert wobbly["mean"] == pytest.approx(np.mean(per_seed))
  assert wobbly["std"] == pytest.approx(np.std(per_seed, ddof=1))
  assert (wobbly["min"], wobbly["max"]) == (pytest.approx(min(per_seed)),
                                            pytest.approx(max(per_seed)))
  # Per group: the unseen domain (case 3) is never found by retinanet.
  groups = saved["detection"]["retinanet"]["summary"]["group"]
  assert groups[suite_lib.UNSEEN]["f1"]["mean"] == pytest.approx(_f1(0, 0, 2))
  assert groups[suite_lib.HELD_OUT]["f1"]["mean"] == pytest.approx(_f1(4, 0, 2))
  assert set(saved["detection"]["p4"]["summary"]["roi_type"]) == {"hotspot", "random",
                                                                  "challenging"}
  # Intervals hold their point estimate; the human ceiling is rater 2 vs rater 1.
  lo, hi, point = saved["detection"]["p4"]["ci"]["f1"]
  assert lo <= point <= hi and point == pytest.approx(np.mean(per_seed))
  assert saved["human"]["summary"]["all"]["f1"]["mean"] == pytest.approx(_f1(4, 0, 4))

  # The rankings disagree, and the markdown shows both.
  assert saved["rankings"]["f1"] == ["retinanet", "p4", "kondo_da"]
  assert saved["rankings"]["ap"][0] == "kondo_da"
  assert saved["detection"]["kondo_da"]["summary"]["all"]["ap"]["mean"] == pytest.approx(1.0)
  md = (tmp_path / "leaderboard.md").read_text()
  assert "Ranked by AP: 1. `kondo_da` (1.000)" in md
  assert "| 1 | 2 | `retinanet` | 0.667 ± 0.000 (0.667-0.667) |" in md
  assert f"{np.mean(per_seed):.3f} ± {np.std(per_seed, ddof=1):.3f}" in md
  for heading in ("F1 per domain", "AP per ROI type", "unseen domains", "Reproduce"):
    assert heading in md
  assert "C (unseen)" in md and "python -m y" in md


# ----------------------------------------------------------------------------
# (3) Resume: finished runs are skipped, finished trainings are not redone.


@pytest.mark.e2e
def test_a_rerun_skips_finished_runs_and_trainings(suite_dir, tmp_path):
  out = tmp_path / "bench"
  args = ["--suite", "midog21", "--methods", "retinanet,blue_ratio", "--seeds", "2",
          "--out", out, "--data", suite_dir, "--dry_run"]
  before = bench(*args)
  assert before.returncode == 0, before.stderr
  assert "--config.seed=0" in before.stdout and "--config.seed=1" in before.stdout

  # retinanet seed 0 finished; seed 1 trained (its threshold chosen) but not predicted.
  seed0, seed1 = (out / "runs" / "retinanet" / f"seed{k}" for k in (0, 1))
  seed0.mkdir(parents=True)
  (seed0 / runner.RESULT).write_text("{}")
  (seed1 / "work" / "eval").mkdir(parents=True)
  (seed1 / "work" / "eval" / "summary.json").write_text(json.dumps({"threshold": 0.4}))
  (seed1 / runner.TRAINED).write_text(json.dumps({"commands": ["python -m midog_jax.main"]}))
  after = bench(*args)
  assert after.returncode == 0, after.stderr
  lines = after.stdout.splitlines()
  assert f"skip retinanet seed 0: done ({seed0 / runner.RESULT})" in lines
  assert not any("seed0/work" in l or "--config.seed=0" in l for l in lines)
  assert f"  train retinanet seed 1: done ({seed1 / runner.TRAINED})" in lines
  assert not any("midog_jax.main" in l for l in lines)  # nothing left to train
  predict = [l for l in lines if l.startswith("  predict retinanet seed 1: ")]
  assert len(predict) == 1 and "--threshold=0.01" in predict[0]
  assert "seed1/work" in predict[0]
  # The unseeded baseline runs once, whatever --seeds says.
  assert [l for l in lines if l.startswith("run blue_ratio")] == ["run blue_ratio seed 0:"]
  # A saved run made with other settings is never reused.
  key = dict(data=str(suite_dir), suite="midog21", preset="tiny", generator_version="test",
             protocol="official", budget="full")
  (seed0 / runner.RESULT).write_text(json.dumps({"key": key}))
  other = bench(*args)
  assert other.returncode == 1 and len(other.stderr.strip().splitlines()) == 1
  assert "made with other settings: budget 'full' (now 'quick'); use another --out" in other.stderr


# ----------------------------------------------------------------------------
# (4) Every detector of the codebase has a benchmark method.


def uncovered_detectors(available: list[str]) -> list[str]:
  """Detector modules no registered method trains (through its config's ``method``)."""
  from midog_jax import config_files
  covered = {config_files.get_config(m.config, ",".join(m.config_args)).method
             for m in methods.REGISTRY.values() if m.config}
  return sorted(set(available) - covered)


def test_every_detector_has_a_benchmark_method():
  from midog_jax import detectors
  assert uncovered_detectors(detectors.available()) == []
  # A detector that lands without registering a method is caught.
  assert uncovered_detectors(detectors.available() + ["newdet"]) == ["newdet"]
  for m in methods.REGISTRY.values():
    assert m.kind in methods.KINDS
    assert all(n in methods.REGISTRY for n in m.needs)
    assert (m.operating is not None) == (m.kind in (methods.DETECTOR, methods.BASELINE))


def test_training_commands_share_data_split_and_seed(suite_dir, tmp_path):
  s = suite_lib.load_suite(suite_dir)
  for protocol, split in (("official", "train_val"), ("lodo:Aperio CS2", "lodo:Aperio CS2")):
    for name, m in methods.REGISTRY.items():
      ctx = methods.Context(suite=s, protocol=protocol, budget="quick", seed=2, out=tmp_path,
                            config_dir="configs", method=name)
      for cmd in m.train(ctx):
        assert cmd.stage == "train" and not cmd.images_only
        argv = list(cmd.argv)
        assert "--config.seed=2" in argv and f"--config.data.split={split}" in argv
        assert f"--config.data.root={s.train_dir}" in argv
        assert "--config.data.domain_key=scanner" in argv
        assert any(a.startswith("--config=configs/") and ":quick" in a for a in argv)
        assert not any(str(s.test_dir) in a for a in argv)
  lodo = methods.Context(suite=s, protocol="lodo:Aperio CS2", budget="full", seed=0,
                         out=tmp_path, config_dir="configs", method="kondo_da")
  assert "--config.model.num_domains=2" in methods.get("kondo_da").train(lodo)[0].argv


# ----------------------------------------------------------------------------
# (5) Command-line errors: one line, the documented exit codes.


@pytest.mark.e2e
def test_cli_errors_are_one_line(tmp_path):
  r = bench("--suite", "midog21", "--methods", "retinanet,yolo", "--out", tmp_path / "b")
  assert r.returncode == 2 and r.stdout == ""
  assert len(r.stderr.strip().splitlines()) == 1
  assert "unknown method yolo; registered: retinanet, p4," in r.stderr
  r = bench("--suite", "midog21", "--methods", "blue_ratio", "--out", tmp_path / "b",
            "--data", tmp_path / "nowhere")
  assert r.returncode == 1
  assert r.stderr.strip() == f"error: {tmp_path / 'nowhere'}: data folder not found"
  r = bench("--suite", "midog21", "--methods", "blue_ratio", "--out", tmp_path / "b",
            "--protocol", "loso")
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------
# (6) End to end: the baseline and the human ceiling, no training.


@pytest.mark.e2e
def test_benchmark_end_to_end_blue_ratio_and_human_ceiling(suite_dir, tmp_path):
  from midog_jax import candidates, metrics
  out = tmp_path / "bench"
  args = ["--suite", "midog21", "--methods", "blue_ratio,human", "--seeds", "2", "--out", out,
          "--data", suite_dir, "--n_boot", "200"]
  r = bench(*args)
  assert r.returncode == 0, r.stderr
  for name in ("leaderboard.md", "leaderboard.json", "per_domain.png", "curves.png"):
    assert (out / name).exists()
  board = json.loads((out / "leaderboard.json").read_text())
  # The baseline's F1, recomputed here from the candidates and the test truth.
  cases = suite_lib.load_test_cases(suite_lib.load_suite(suite_dir), "official")
  found = candidates.find_candidates_many([c.path for c in cases], workers=1)
  counts = metrics.pooled(metrics.match(c.truth_mm, xy * c.spacing_um / 1000)[0]
                          for c, xy in zip(cases, found))
  br = board["detection"]["blue_ratio"]
  assert br["summary"]["all"]["f1"]["mean"] == pytest.approx(counts.f1)
  assert br["summary"]["all"]["f1"]["n"] == 1  # deterministic: one run, not one per seed
  assert set(br["summary"]["group"]) == set(suite_lib.GROUPS)
  # The ceiling: rater 2 against rater 1 from the test file's votes.
  anns = json.loads((suite_dir / "test" / "MIDOG++.json").read_text())["annotations"]
  r1 = sum(a["labels"][0] == 1 for a in anns)
  r2 = sum(a["labels"][1] == 1 for a in anns)
  both = sum(a["labels"][0] == a["labels"][1] == 1 for a in anns)
  assert board["human"]["summary"]["all"]["f1"]["mean"] == pytest.approx(_f1(both, r2 - both,
                                                                             r1 - both))
  # Each rater against the consensus (what models are scored on), mean of the two.
  cons = sum(a["category_id"] == 1 for a in anns)
  per_rater = []
  for k in (0, 1):
    rk = sum(a["labels"][k] == 1 for a in anns)
    hit = sum(a["labels"][k] == 1 and a["category_id"] == 1 for a in anns)
    per_rater.append(_f1(hit, rk - hit, cons - hit))
  vs = board["human"]["vs_consensus"]["summary"]["all"]["f1"]
  assert vs["mean"] == pytest.approx(sum(per_rater) / 2) and vs["n"] == 2
  md = (out / "leaderboard.md").read_text()
  assert "python -m midog_jax.benchmark.blue_ratio" in md and "human agreement" in md
  assert "one rater vs the consensus" in md

  # Run again: everything is done, nothing is predicted again.
  log = next((out / "runs" / "blue_ratio" / "seed0" / "logs").iterdir())
  stamp = log.stat().st_mtime_ns
  again = bench(*args)
  assert again.returncode == 0, again.stderr
  assert "blue_ratio seed 0: done earlier" in again.stdout
  assert log.stat().st_mtime_ns == stamp

  # --report_only: the finished rows, the unfinished run listed, nothing trained.
  only = bench("--suite", "midog21", "--methods", "blue_ratio,human,retinanet", "--seeds", "1",
               "--out", out, "--data", suite_dir, "--n_boot", "200", "--report_only")
  assert only.returncode == 0, only.stderr
  assert not (out / "runs" / "retinanet").exists()
  board = json.loads((out / "leaderboard.json").read_text())
  assert board["missing"] == ["retinanet seed 0"] and "retinanet" not in board["detection"]
  assert board["detection"]["blue_ratio"]["summary"]["all"]["f1"]["mean"] == \
      pytest.approx(counts.f1)
  assert "- retinanet seed 0" in (out / "leaderboard.md").read_text()


SLEEPY = '''
import signal, sys, time
from pathlib import Path
from midog_jax.benchmark import cli, methods
# A "training" that behaves as midog_jax.main does on SIGTERM: it saves, says
# so in one line and exits 0.
CHILD = """
import signal, sys, time
from pathlib import Path
def stop(*_):
  Path(sys.argv[1], "child-got-sigterm").touch()
  print("stopped at step 3 of 10 on SIGTERM: checkpoint saved", flush=True)
  sys.exit(0)
signal.signal(signal.SIGTERM, stop)
Path(sys.argv[1], "child-started").touch()
time.sleep(60)
"""
out = Path(sys.argv[1])
methods.REGISTRY["sleepy"] = methods.Method(
    "sleepy", methods.DETECTOR, "sleeps until stopped",
    train=lambda ctx: [methods.Command((sys.executable, "-c", CHILD, str(out)), "train")])
sys.exit(cli.main(["--suite", "midog21", "--methods", "sleepy", "--seeds", "1",
                   "--out", str(out), "--data", sys.argv[2]]))
'''


@pytest.mark.e2e
def test_sigterm_is_passed_to_the_training_which_saves_and_the_run_is_not_done(suite_dir,
                                                                               tmp_path):
  import time
  p = subprocess.Popen([sys.executable, "-c", SLEEPY, str(tmp_path), str(suite_dir)], cwd=REPO,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 60
  while not (tmp_path / "child-started").exists():
    assert p.poll() is None and time.monotonic() < deadline, p.communicate()
    time.sleep(0.05)
  p.terminate()  # SIGTERM to the benchmark only, as a scheduler's preemption would
  stdout, stderr = p.communicate(timeout=60)
  assert p.returncode == 0, stderr
  assert (tmp_path / "child-got-sigterm").exists()
  assert "stopped during sleepy seed 0" in stderr and "run the same command again" in stderr
  assert not (tmp_path / "runs" / "sleepy" / "seed0" / runner.TRAINED).exists()
