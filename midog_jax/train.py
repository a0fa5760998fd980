"""The training loop, top to bottom: data, detector, state, resume, steps, evaluation.

One ``jax.jit`` step over a 1-D device mesh: the global batch is sharded on
``data``, parameters and optimizer state are replicated. The workdir receives
``config.json``, ``checkpoints/`` (orbax: latest + best), ``metrics.jsonl``,
TensorBoard events and ``eval/``. Only process 0 writes logs and outputs.
Whole-image validation, the best-checkpoint rule and the final evaluation
are ``evaluation.py``'s; the detector (``detectors/``) supplies the model,
the loss and the tile function.
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from midog_jax import checkpoint as ckpt_lib
from midog_jax import detectors, evaluation, optim, parallel, signals
from midog_jax.detectors import interface
from midog_jax.data import augment_device, experiment, pipeline
from midog_jax.errors import DataError, NonFiniteLossError, Stopped
from midog_jax.fileio import write_json_atomic
from midog_jax.metric_writer import MetricWriter, Progress, accumulate, example_image
from midog_jax.workdir import WorkdirLock, check_resume_config


def train_step(state, batch, *, detector, tx, augment=None):
  """One optimisation step on the global batch.

  ``augment``: ``(step, batch) -> batch``, the device augmentation
  (``config.data.augment_on = "device"``), applied to the raw crops before the
  loss; keyed by the state's step, so a resumed run augments identically.
  """
  if augment is not None:
    batch = augment(state["step"], batch)

  def loss_fn(params):
    return detector.loss(params, state["batch_stats"], batch, train=True)

  (_, (metrics, new_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
  return dict(step=state["step"] + 1, params=params, batch_stats=new_stats,
              opt_state=opt_state), metrics


def eval_loss_step(state, batch, *, detector):
  """The loss metrics of one fixed validation batch (no updates)."""
  _, (metrics, _) = detector.loss(state["params"], state["batch_stats"], batch,
                                  train=False)
  return metrics


@jax.jit
def _all_finite(tree) -> jax.Array:
  """One bool: every leaf of ``tree`` is finite (checked before every save)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def variables_of(state) -> dict:
  """The model variables (``params`` and, if any, ``batch_stats``) of a state."""
  v = {"params": state["params"]}
  if state["batch_stats"]:
    v["batch_stats"] = state["batch_stats"]
  return v


def train_and_evaluate(config, workdir: str, negatives=None, writer=None) -> dict:
  """Trains (resuming from ``workdir`` if it holds checkpoints), then evaluates.

  Args:
    config: the experiment config (``configs/<name>.py``).
    workdir: where checkpoints, logs and ``eval/`` go.
    negatives: optional (N, 3) pool of (case_index, x, y) negative centres
      for the training stream ("balanced" strategy; see ``mining``); its case
      indices refer to ``ExperimentData.pool_cases``.
    writer: a metric writer with ``clu.metric_writers.MetricWriter``'s
      methods (default: :class:`metric_writer.MetricWriter` on ``workdir``).

  Returns:
    Per evaluation set, the metrics of the best weights at their threshold.
  """
  workdir = Path(workdir)
  if jax.process_index() != 0:
    return _train_and_evaluate(config, workdir, negatives, writer)
  # Process 0 guards the workdir: one run at a time, and a resume only with
  # the config it was started with (checked before anything is written).
  with WorkdirLock(workdir):
    check_resume_config(workdir, json.loads(config.to_json_best_effort()))
    return _train_and_evaluate(config, workdir, negatives, writer)


def _train_and_evaluate(config, workdir: Path, negatives, writer) -> dict:
  """The body of :func:`train_and_evaluate`, on every process."""
  is_main = jax.process_index() == 0
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(json.loads(config.to_json_best_effort()), workdir / "config.json")
  writer = writer or MetricWriter(workdir, enabled=is_main)
  log = print if is_main else (lambda *a, **k: None)
  detector = detectors.build(config)
  # A method's optional hooks (detectors/interface.HOOKS), else the defaults.
  fit = interface.hook(detector, "fit")
  if fit is not None:  # trained outside this loop (image-level round 1)
    return fit(workdir, writer=writer, log=log) if is_main else {}
  scoring = interface.hook(detector, "evaluation") or evaluation
  make_dataset = interface.hook(detector, "make_dataset") or pipeline.make_dataset
  load_data = interface.hook(detector, "load_data")

  # Data.
  data = load_data() if load_data is not None else experiment.load_experiment(config.data)
  log(f"data: {data.describe()}")
  patch_cfg = pipeline.PatchConfig.from_config(config.data,
                                               patch_size=detector.patch_size)
  augment = None
  if patch_cfg.augment_on == "device":
    if make_dataset is not pipeline.make_dataset:
      raise DataError(None, f"data.augment_on='device' needs the patch pipeline; method "
                      f"{config.method!r} builds its own datasets: use 'host'")
    augment = functools.partial(augment_device.augment_batch,
                                augment_device.DeviceAugmenter.from_patch_config(patch_cfg),
                                config.seed)
  shard = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_ds = make_dataset(
      data.pool_cases if negatives is not None else data.train, patch_cfg,
      seed=config.seed, batch_size=config.batch_size, negatives=negatives, **shard)
  train_iter = pipeline.make_iterator(train_ds, num_workers=config.num_workers)
  val_loss_ds = None
  if data.val and config.data.val_patches:
    val_loss_ds = make_dataset(
        data.val, patch_cfg, seed=config.seed + 1, batch_size=config.batch_size,
        augment=False, num_examples=config.data.val_patches, **shard)
  best = evaluation.BestCheckpoint(metric=config.get("best_metric", "f1"))
  if best.metric == "val_loss" and (val_loss_ds is None or
                                    config.data.val_patches < config.batch_size):
    raise ValueError("best_metric 'val_loss' needs validation images and "
                     "data.val_patches >= batch_size")

  # Model, optimizer, state.
  mesh = parallel.make_mesh()
  # "rbg" keys: the default threefry makes XLA compile a ResNet's
  # initialiser for tens of seconds on a CPU.
  variables = detector.init_variables(jax.random.key(config.seed, impl="rbg"))
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps,
                                      detector.trainable_mask(params))
  state = dict(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
               opt_state=tx.init(params))
  ckpts = ckpt_lib.Checkpoints(workdir, keep=config.keep_checkpoints)
  if ckpts.latest_step() is not None:
    state, meta = ckpts.restore_latest(state, train_iter)
    best = evaluation.BestCheckpoint.from_meta(meta, best.metric, best.threshold)
    log(f"resumed from {workdir}/checkpoints at step {int(state['step'])}")
  else:
    writer.write_hparams(config.to_dict())
    if config.init_from:
      # Strict: every array matched or covered by a named rule, and a
      # converted file's settings checked against the config (pretrained.py).
      from midog_jax import pretrained as pretrained_lib
      merged, notes = pretrained_lib.load_into(variables, config.init_from, config)
      state.update(params=merged["params"],
                   batch_stats=merged.get("batch_stats", batch_stats))
      state["opt_state"] = tx.init(state["params"])
      for line in notes:
        log(f"init_from {config.init_from}: {line}")
  state = parallel.replicate(state, mesh)
  repl, data_sh = parallel.replicated(mesh), parallel.data_sharding(mesh)
  # On CPU with XLA's own convolutions (parallel.CPU_COMPILER_OPTIONS: faster
  # than YNNPACK's for these networks, forward and backward).
  opts = parallel.compiler_options()
  step_fn = jax.jit(functools.partial(train_step, detector=detector, tx=tx,
                                      augment=augment),
                    in_shardings=(repl, data_sh), out_shardings=(repl, repl),
                    donate_argnums=0, compiler_options=opts)
  eval_fn = jax.jit(functools.partial(eval_loss_step, detector=detector),
                    in_shardings=(repl, data_sh), out_shardings=repl,
                    compiler_options=opts)

  def meta_now():
    return dict(best.to_meta(), config=config.to_dict())

  def check_finite(step):
    """Refuses to validate or save non-finite parameters."""
    if not bool(_all_finite(state["params"])):
      raise NonFiniteLossError(
          f"non-finite parameters at step {step}; nothing saved. The last good "
          f"checkpoint (step {ckpts.latest_step()}) in {workdir}/checkpoints is "
          "intact; lower the learning rate or enable optimizer.grad_clip.")

  def validate(step):
    """Validation loss and whole-image F1; saves the best checkpoint."""
    scalars = {}
    if val_loss_ds is not None:
      got = [jax.device_get(eval_fn(state, parallel.global_batch(b, mesh)))
             for b in val_loss_ds]
      scalars["val_loss"] = accumulate(got)["loss"]
    if data.val:
      # Every process validates (identically), so all agree on saving "best".
      v = scoring.validate(detector, variables_of(state), data.val, config)
      scalars.update({f"val_{k}": float(x) for k, x in v.items()})  # f1, threshold, ...
      if best.update(step, scalars):
        ckpts.save_best(step, state, meta_now())  # every process: orbax syncs them
    if scalars:
      writer.write_scalars(step, scalars)
      log(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in scalars.items()))

  # Train. A SIGTERM/SIGINT only sets a flag: the current step finishes, a
  # checkpoint is saved and the run stops (errors.Stopped).
  start = int(state["step"])
  progress = Progress(config.total_steps, start, enabled=is_main)
  t_start = time.perf_counter()
  pending = []
  with signals.StopRequest("the current step") as stop:
    for step in range(start + 1, config.total_steps + 1):
      batch = next(train_iter)
      if config.debug_step_sleep:
        time.sleep(config.debug_step_sleep)  # lets tests interrupt a run mid-way
      if step == start + 1:
        writer.write_images(step, {"train/examples": example_image(batch)})
      state, metrics = step_fn(state, parallel.global_batch(batch, mesh))
      pending.append(metrics)
      last = step == config.total_steps
      stopping = parallel.any_process(stop.requested)
      evaluate_now = (step % config.eval_every == 0 or last) and not stopping
      save_now = step % config.checkpoint_every == 0 or last or stopping
      if step % config.log_every == 0 or evaluate_now or save_now:
        # One host sync per interval; a NaN anywhere in it stops the run
        # before anything is validated or saved, so the last checkpoint stays good.
        got, pending = jax.device_get(pending), []
        first = step - len(got) + 1
        bad = [first + i for i, m in enumerate(got) if not math.isfinite(float(m["loss"]))]
        if bad:
          raise NonFiniteLossError(
              f"non-finite loss at step {bad[0]}; stopped without saving. The last "
              f"good checkpoint (step {ckpts.latest_step()}) in {workdir}/checkpoints "
              "is intact; lower the learning rate or enable optimizer.grad_clip.")
        scalars = dict(accumulate(got), lr=float(schedule(step - 1)))
        writer.write_scalars(step, scalars)
        progress.line(step, {"loss": scalars["loss"]})
      if evaluate_now or save_now:
        check_finite(step)  # before validating: broken weights give no result
      if evaluate_now:
        validate(step)
      if save_now:
        ckpts.save(step, state, train_iter, meta_now())
      if stopping:
        writer.close()
        ckpts.close()
        raise Stopped(stop.signal_name, (
            f"stopped at step {step} of {config.total_steps} on {stop.signal_name}: "
            f"checkpoint saved in {workdir}/checkpoints; run the same command again "
            "to resume"))
  train_seconds = time.perf_counter() - t_start
  writer.flush()

  # Final evaluation with the best weights and their threshold.
  results = {}
  if is_main:
    if best.validated and (workdir / "checkpoints" / "best").exists():
      variables, meta = ckpt_lib.load_for_inference(workdir, "best")
      threshold = float(meta["threshold"])
    else:
      log(f"no validation images: evaluating the final weights at threshold "
          f"{best.threshold}")
      variables, threshold = variables_of(state), best.threshold
    results = scoring.evaluate_sets(detector, variables, threshold,
                                    dict(val=data.val, **data.heldout), config, workdir)
    log(scoring.format_table(results))
    writer.write_scalars(config.total_steps,
                         {f"test/{k}_f1": v["f1"] for k, v in results.items()})
    summary = best.to_meta()
    write_json_atomic(dict(results=results, train_seconds=train_seconds,
                           threshold=summary["threshold"],
                           best=dict(summary["best"], threshold=summary["threshold"])),
                      workdir / "eval" / "summary.json")
  writer.close()
  ckpts.close()
  return results
