"""The training loop, top to bottom: data, model, state, resume, steps, evaluation.

One ``jax.jit`` step over a 1-D device mesh: the global batch is sharded on
``data``, parameters and optimizer state are replicated. The workdir receives
``config.json``, ``checkpoints/`` (orbax: latest + best), ``metrics.jsonl``,
TensorBoard events and ``eval/``. Only process 0 writes logs and outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from midog_jax import checkpoint as ckpt_lib
from midog_jax import evaluate as eval_lib
from midog_jax import export, infer, methods, optim, parallel
from midog_jax.data import experiment, pipeline
from midog_jax.data import slides as slides_lib
from midog_jax.metric_writer import MetricWriter, Progress


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/inf loss; the last good checkpoint is kept."""


def train_step(state, batch, *, method, tx):
  """One optimisation step on the global batch."""
  def loss_fn(params):
    return method.loss(params, state["batch_stats"], batch, train=True)

  (_, (metrics, new_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = dict(metrics, grad_norm=optax.global_norm(grads))
  return dict(step=state["step"] + 1, params=params, batch_stats=new_stats,
              opt_state=opt_state), metrics


def eval_loss_step(state, batch, *, method):
  _, (metrics, _) = method.loss(state["params"], state["batch_stats"], batch,
                                train=False)
  return metrics


def variables_of(state) -> dict:
  v = {"params": state["params"]}
  if state["batch_stats"]:
    v["batch_stats"] = state["batch_stats"]
  return v


def detect_cases(method, variables, cases, config) -> dict[int, export.Detections]:
  """Whole-image detections of each case (candidates above eval.score_thresh).

  Runs on this process's devices with a host copy of the weights, so every
  process can call it on its own (see ``parallel.local_mesh``).
  """
  mesh = parallel.local_mesh()
  variables = parallel.to_host(variables)
  tcfg = infer.TileConfig.from_config(config.eval)
  tcfg = dataclasses.replace(tcfg, tile_batch=-(-tcfg.tile_batch // mesh.devices.size)
                             * mesh.devices.size)
  tile_fn = method.make_tile_fn(variables, tcfg.tile_size, tcfg.score_thresh,
                                tcfg.merge_radius)
  return {c.image_id: infer.detect(slides_lib.open_slide(c.path), tile_fn, tcfg, mesh)
          for c in cases}


def _as_preds(dets: dict[int, export.Detections]) -> dict:
  return {k: (d.xy[d.classes == export.MITOTIC], d.scores[d.classes == export.MITOTIC])
          for k, d in dets.items()}


def validate(method, state, cases, config) -> dict:
  """F1-best threshold on validation images and the scores it gives."""
  if config.eval.max_val_images:
    cases = cases[:config.eval.max_val_images]
  dets = detect_cases(method, variables_of(state), cases, config)
  t, f1, curve = eval_lib.threshold_sweep(cases, _as_preds(dets))
  at = eval_lib.evaluate_points(cases, _as_preds(dets), threshold=t)
  return dict(threshold=float(t), f1=float(at["f1"]), precision=float(at["precision"]),
              recall=float(at["recall"]), dets=dets)


def write_eval(workdir: Path, name: str, cases, dets, threshold: float,
               overlays: int) -> dict:
  """eval/<name>/: metrics.json, predictions/<stem>.json, overlays/<stem>.png."""
  out = workdir / "eval" / name
  result = eval_lib.evaluate_points(cases, _as_preds(dets), threshold=threshold)
  result["threshold"] = threshold
  for c in cases:
    d = dets[c.image_id]
    keep = d.scores >= threshold
    kept = export.Detections(d.xy[keep], d.scores[keep], d.classes[keep])
    export.write_json_atomic(export.to_challenge_json(kept, c.spacing_um),
                             out / "predictions" / f"{c.stem}.json")
  for c in cases[:overlays]:
    d = dets[c.image_id]
    keep = (d.scores >= threshold) & (d.classes == export.MITOTIC)
    export.overlay_png(slides_lib.open_slide(c.path).read_all(),
                       export.Detections(d.xy[keep], d.scores[keep]),
                       c.mitoses, c.imposters, out / "overlays" / f"{c.stem}.png",
                       match_radius_px=7.5 / c.spacing_um)
  export.write_json_atomic(result, out / "metrics.json")
  return result


def _example_image(batch, dets_fn=None) -> np.ndarray:
  """A few training patches side by side with their labels drawn (TensorBoard)."""
  imgs = np.asarray(batch["image"][:4]).copy()
  for k in range(len(imgs)):
    for (x, y), c, m in zip(batch["points"][k], batch["classes"][k], batch["mask"][k]):
      if not m:
        continue
      colour = (0, 255, 0) if c == 1 else (0, 0, 255)
      xi, yi = int(round(x)), int(round(y))
      h, w = imgs[k].shape[:2]
      imgs[k, max(yi - 1, 0):min(yi + 2, h), max(xi - 12, 0):min(xi + 13, w)] = colour
      imgs[k, max(yi - 12, 0):min(yi + 13, h), max(xi - 1, 0):min(xi + 2, w)] = colour
  return np.concatenate(list(imgs), axis=1)


def train_and_evaluate(config, workdir: str, negatives=None) -> dict:
  """Trains (resuming from ``workdir`` if it holds checkpoints), then evaluates.

  ``negatives``: optional (N, 3) pool of (case_index, x, y) negative centres
  for the training stream ("balanced" strategy; see ``mining.py``). Its case
  indices refer to the training cases followed by the unlabeled cases.
  """
  workdir = Path(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    export.write_json_atomic(json.loads(config.to_json_best_effort()),
                             workdir / "config.json")
  writer = MetricWriter(workdir, enabled=is_main)
  log = print if is_main else (lambda *a, **k: None)

  # Data.
  data = experiment.load_experiment(config.data)
  log(f"data: {data.describe()}")
  patch_cfg = pipeline.PatchConfig.from_config(config.data)
  # A mined pool may point into the unlabeled images (seed 001's stain-mined
  # negatives); they carry no mitoses, so they only ever give pool negatives.
  train_cases = data.train + data.unlabeled if negatives is not None else data.train
  train_ds = pipeline.make_dataset(
      train_cases, patch_cfg, seed=config.seed, batch_size=config.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      negatives=negatives)
  train_iter = pipeline.make_iterator(train_ds, num_workers=config.num_workers)
  val_loss_ds = None
  if data.val and config.data.val_patches:
    val_loss_ds = pipeline.make_dataset(
        data.val, patch_cfg, seed=config.seed + 1, batch_size=config.batch_size,
        augment=False, num_examples=config.data.val_patches,
        process_index=jax.process_index(), process_count=jax.process_count())
  # Which validation result picks the "best" checkpoint: the highest F1, or
  # (seed 001) the lowest validation loss. Either way the threshold stored
  # with it is the F1-best threshold of that same validation.
  best_metric = config.get("best_metric", "f1")
  if best_metric not in ("f1", "val_loss"):
    raise ValueError(f"best_metric must be 'f1' or 'val_loss', got {best_metric!r}")
  if best_metric == "val_loss" and (val_loss_ds is None or not data.val or
                                    config.data.val_patches < config.batch_size):
    raise ValueError("best_metric 'val_loss' needs validation images and "
                     "data.val_patches >= batch_size")

  # Model, optimizer, state.
  mesh = parallel.make_mesh()
  method = methods.build(config)
  # "rbg" keys: the default threefry makes XLA compile a ResNet's
  # initialiser for tens of seconds on a CPU.
  variables = method.init_variables(jax.random.key(config.seed, impl="rbg"),
                                    config.data.patch_size)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps,
                                      method.trainable_mask(params))
  state = dict(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
               opt_state=tx.init(params))
  ckpts = ckpt_lib.Checkpoints(workdir, keep=config.keep_checkpoints)
  best = dict(f1=-1.0, threshold=0.5)
  if ckpts.latest_step() is not None:
    state, meta = ckpts.restore_latest(state, train_iter)
    best = meta.get("best", best)
    log(f"resumed from {workdir}/checkpoints at step {int(state['step'])}")
  elif config.init_from:
    merged, loaded, skipped = ckpt_lib.merge_pretrained(
        variables, ckpt_lib.load_pretrained(config.init_from))
    state.update(params=merged["params"],
                 batch_stats=merged.get("batch_stats", batch_stats))
    state["opt_state"] = tx.init(state["params"])
    log(f"initialised {len(loaded)} arrays from {config.init_from} "
        f"({len(skipped)} skipped: shape or name mismatch)")
  state = parallel.replicate(state, mesh)
  repl, data_sh = parallel.replicated(mesh), parallel.data_sharding(mesh)
  step_fn = jax.jit(functools.partial(train_step, method=method, tx=tx),
                    in_shardings=(repl, data_sh), out_shardings=(repl, repl),
                    donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_loss_step, method=method),
                    in_shardings=(repl, data_sh), out_shardings=repl)

  def meta_now():
    return dict(best=best, threshold=best["threshold"], config=config.to_dict())

  def evaluate_now(step):
    nonlocal best
    scalars = {}
    if val_loss_ds is not None:
      losses = [jax.device_get(eval_fn(state, parallel.global_batch(b, mesh)))
                for b in val_loss_ds]
      scalars["val_loss"] = float(np.mean([l["loss"] for l in losses]))
    if data.val:
      # Every process validates (identically), so all agree on saving "best".
      v = validate(method, state, data.val, config)
      scalars.update(val_f1=v["f1"], val_precision=v["precision"],
                     val_recall=v["recall"], val_threshold=v["threshold"])
      if best_metric == "val_loss":
        better = scalars["val_loss"] < best.get("val_loss", math.inf)
      else:
        better = v["f1"] > best["f1"]
      if better:
        best = dict(f1=v["f1"], threshold=v["threshold"], step=int(step))
        if best_metric == "val_loss":
          best["val_loss"] = scalars["val_loss"]
        ckpts.save_best(step, state, meta_now())  # every process: orbax syncs them
    if scalars:
      writer.scalars(step, scalars)
      log(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in scalars.items()))
    return scalars

  # Train.
  start = int(state["step"])
  progress = Progress(config.total_steps, start, enabled=is_main)
  t_start = time.perf_counter()
  pending = []
  for step in range(start + 1, config.total_steps + 1):
    batch = next(train_iter)
    if config.debug_step_sleep:
      time.sleep(config.debug_step_sleep)  # lets tests interrupt a run mid-way
    if step == start + 1 and is_main:
      writer.images(step, {"train/examples": _example_image(batch)})
    state, metrics = step_fn(state, parallel.global_batch(batch, mesh))
    pending.append(metrics)
    last = step == config.total_steps
    if step % config.log_every == 0 or step % config.checkpoint_every == 0 or last:
      # One host sync per log interval; a NaN anywhere in it stops the run
      # before anything is saved, so the last checkpoint stays good.
      got = jax.device_get(pending)
      pending = []
      bad = [s for s, m in zip(range(step - len(got) + 1, step + 1), got)
             if not math.isfinite(float(m["loss"]))]
      if bad:
        raise NonFiniteLossError(
            f"non-finite loss at step {bad[0]}; stopped without saving. The last "
            f"good checkpoint (step {ckpts.latest_step()}) in {workdir}/checkpoints "
            "is intact; lower the learning rate or enable optimizer.grad_clip.")
      for s, m in zip(range(step - len(got) + 1, step + 1), got):
        scalars = {k: float(v) for k, v in m.items()}
        scalars["lr"] = float(schedule(s - 1))
        writer.scalars(s, scalars)
      progress.line(step, {"loss": float(got[-1]["loss"])})
    if step % config.eval_every == 0 or last:
      evaluate_now(step)
    if step % config.checkpoint_every == 0 or last:
      ckpts.save(step, state, train_iter, meta_now())
  train_seconds = time.perf_counter() - t_start
  writer.flush()

  # Final evaluation with the best weights and their threshold.
  results = {}
  if is_main:
    results = final_evaluation(method, config, workdir, data, state, best)
    writer.scalars(config.total_steps, {f"test/{k}_f1": v["f1"] for k, v in results.items()})
    export.write_json_atomic(dict(results=results, train_seconds=train_seconds,
                                  best=best), workdir / "eval" / "summary.json")
  writer.close()
  ckpts.close()
  return results


def final_evaluation(method, config, workdir, data, state, best) -> dict:
  """Scores every evaluation set with the best checkpoint and its threshold."""
  if (Path(workdir) / "checkpoints" / "best").exists() and best["f1"] >= 0:
    variables, meta = ckpt_lib.load_for_inference(workdir, "best")
    threshold = float(meta["threshold"])
  else:
    # No validation images: the final weights and the configured threshold.
    print("no validation images: evaluating the final weights at threshold "
          f"{best['threshold']}")
    variables, threshold = variables_of(state), float(best["threshold"])
  sets = dict(val=data.val, **data.heldout)
  results = {}
  for name, cases in sets.items():
    if not cases:
      continue
    dets = detect_cases(method, variables, cases, config)
    results[name] = write_eval(Path(workdir), name, cases, dets, threshold,
                               overlays=2 if config.eval.write_overlays else 0)
  print(format_table(results))
  return results


def format_table(results: dict) -> str:
  """Per-set and per-domain F1 table (what ``make demo`` prints)."""
  lines = [f"{'set':<16}{'domain':<22}{'F1':>7}{'prec':>7}{'recall':>8}{'TP':>6}{'FP':>6}{'FN':>6}"]
  for name, r in results.items():
    rows = [("all", r)] + sorted(r.get("per_domain", {}).items())
    for dom, m in rows:
      lines.append(f"{name:<16}{dom:<22}{m['f1']:>7.3f}{m['precision']:>7.3f}"
                   f"{m['recall']:>8.3f}{m['tp']:>6}{m['fp']:>6}{m['fn']:>6}")
  return "\n".join(lines)
