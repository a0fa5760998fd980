"""The adaptation phase of Kondo's detector (MIDOG 2021): source selection and target training.

Source selection (:func:`select_source`): the trained classifier scores the
candidates of the labelled training images; per source domain it keeps the
``mitotic`` mitotic candidates it is most sure are mitotic (highest
P(mitosis) among label 1) and fills up to ``per_domain`` with the
non-mitotic ones it is most sure are not (lowest P(mitosis) among label 0).
The seed: "we select the patches which have high confidence (high
probability) as mitosis or non-mitosis", 10,000 per scanner of which 10
mitotic. When a domain has fewer mitotic candidates than asked, all of them
are taken and the rest are non-mitotic (the counts are recorded). The patches
themselves are kept (``SourceSet``), so adaptation needs no source images.

Target training (:func:`adapt_variables`): the domain head grows by one class
(``models.dann.grow_domain_head``); every target patch is that class. A step
holds ``b_s`` source and ``b_t`` target patches (``b_s + b_t`` = the batch,
in proportion to their numbers, at least one of each); the loss is
``dann_loss`` with the mitosis mask 0 on target patches: mitosis + domain
cross-entropy on the source patches, domain cross-entropy only on the target
ones. The model sees the source and the target patches in two separate
passes, so BatchNorm's batch statistics of one never enter the other's
outputs: the target patches reach the parameters only through the domain
head (and, behind the reversal layer, the backbone). The running BatchNorm
statistics are updated with the batch-size-weighted mean of both passes'
updates (the statistics a mixed batch would give, less the between-domain
term). Adam at a constant learning rate; ``epochs`` passes over source +
target patches.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from midog_jax.models import dann as dann_lib


@dataclasses.dataclass
class SourceSet:
  """Selected source patches: ``patches`` uint8 (N, P, P, 3), ``labels``,
  ``domains`` int32 (N,), ``probs`` float32 (N,), ``indices`` int64 (N,) (store)."""

  patches: np.ndarray
  labels: np.ndarray
  domains: np.ndarray
  probs: np.ndarray
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def counts(self) -> dict[int, dict[str, int]]:
    """Per domain: selected patches and mitotic patches."""
    return {int(d): dict(patches=int((self.domains == d).sum()),
                         mitotic=int(((self.domains == d) & (self.labels == 1)).sum()))
            for d in np.unique(self.domains)}

  def save(self, path) -> None:
    np.savez(path, **dataclasses.asdict(self))

  @classmethod
  def load(cls, path) -> "SourceSet":
    with np.load(path) as z:
      return cls(**{f.name: z[f.name] for f in dataclasses.fields(cls)})


def choose_confident(labels: np.ndarray, domains: np.ndarray, probs: np.ndarray,
                     per_domain: int, mitotic: int) -> np.ndarray:
  """Positions (into the given arrays) of the confident selection, per domain.

  ``mitotic`` label-1 candidates of highest ``probs``, then label-0
  candidates of lowest ``probs`` up to ``per_domain`` in all (ties: the
  earlier candidate first). Label -1 candidates are never chosen.
  """
  if mitotic > per_domain:
    raise ValueError(f"source_mitotic ({mitotic}) > source_per_domain ({per_domain})")
  out = []
  for d in np.unique(domains):
    pos = np.flatnonzero((domains == d) & (labels == 1))
    neg = np.flatnonzero((domains == d) & (labels == 0))
    pos = pos[np.argsort(-probs[pos], kind="stable")][:mitotic]
    neg = neg[np.argsort(probs[neg], kind="stable")][:per_domain - len(pos)]
    out.append(np.concatenate([pos, neg]))
  return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)


def select_source(detector, variables, indices: np.ndarray, per_domain: int,
                  mitotic: int) -> SourceSet:
  """The confident source selection among store candidates ``indices``."""
  store = detector.store
  indices = np.asarray(indices, np.int64)
  probs = detector.score_patches(variables, detector.store_patches(indices))
  pick = choose_confident(store.labels[indices], store.domains[indices], probs,
                          per_domain, mitotic)
  chosen = indices[pick]
  return SourceSet(patches=detector.store_patches(chosen),
                   labels=store.labels[chosen].astype(np.int32),
                   domains=store.domains[chosen].astype(np.int32),
                   probs=probs[pick].astype(np.float32), indices=chosen)


def split_batch(batch_size: int, n_source: int, n_target: int) -> tuple[int, int]:
  """(source, target) patches per step: proportional, at least one of each."""
  if batch_size < 2:
    raise ValueError(f"the adaptation batch needs at least 2 patches, got {batch_size}")
  b_t = int(round(batch_size * n_target / max(n_source + n_target, 1)))
  b_t = min(max(b_t, 1), batch_size - 1)
  return batch_size - b_t, b_t


def adaptation_loss(detector, params, batch_stats, src_images, src_labels, src_domains,
                    tgt_images, lam):
  """(loss, (metrics, new batch_stats)) of one adaptation step.

  Target patches are class ``num_domains - 1`` of the (grown) domain head,
  with the mitosis mask 0.
  """
  (mit_s, dom_s), st_s = detector.apply(params, batch_stats, src_images, lam, True)
  (mit_t, dom_t), st_t = detector.apply(params, batch_stats, tgt_images, lam, True)
  b_s, b_t = src_images.shape[0], tgt_images.shape[0]
  target_class = detector.model.num_domains - 1
  mit = jnp.concatenate([mit_s, mit_t])
  dom = jnp.concatenate([dom_s, dom_t])
  mit_labels = jnp.concatenate([src_labels, jnp.zeros((b_t,), jnp.int32)])
  dom_labels = jnp.concatenate([src_domains, jnp.full((b_t,), target_class, jnp.int32)])
  mit_mask = jnp.concatenate([jnp.ones((b_s,)), jnp.zeros((b_t,))])
  loss, parts = dann_lib.dann_loss(mit, dom, mit_labels, dom_labels, mit_mask,
                                   jnp.ones((b_s + b_t,)))
  w = b_s / (b_s + b_t)
  stats = jax.tree.map(lambda a, b: w * a + (1 - w) * b, st_s, st_t)
  return loss, (dict(parts, loss=loss), stats)


def adapt_variables(detector, variables: dict, source: SourceSet, target_patches: np.ndarray,
                    *, lr: float, batch_size: int, epochs: float, seed: int = 0,
                    log=None):
  """Adapts a trained detector to ``target_patches``; returns (grown detector, variables).

  ``detector``: the trained ``KondoDA``; ``variables``: its weights. The
  result classifies with :meth:`KondoDA.score_patches` of the grown detector.
  """
  if not len(target_patches):
    raise ValueError("no target candidates to adapt to")
  if not len(source):
    raise ValueError("the source selection is empty")
  key = jax.random.key(seed)
  params = dann_lib.grow_domain_head(variables["params"], key)
  stats = variables.get("batch_stats", {})
  lam = float(detector.config.kondo.grl_lambda)
  grown, tx, step = _step_fn(detector, float(lr), lam)
  opt_state = tx.init(params)
  n_s, n_t = len(source), len(target_patches)
  b_s, b_t = split_batch(batch_size, n_s, n_t)
  steps = max(1, math.ceil(epochs * (n_s + n_t) / batch_size))
  rng = np.random.default_rng(seed)
  src_order, tgt_order = _Cycler(n_s, rng), _Cycler(n_t, rng)
  metrics = None
  for i in range(steps):
    s, t = src_order.take(b_s), tgt_order.take(b_t)
    params, stats, opt_state, metrics = step(
        params, stats, opt_state, source.patches[s], source.labels[s],
        source.domains[s], target_patches[t])
    if log and (i + 1 == steps or (i + 1) % 100 == 0):
      m = jax.device_get(metrics)
      log(f"  adapt step {i + 1}/{steps}: mitosis {float(m['mitosis_loss']):.4f} "
          f"domain {float(m['domain_loss']):.4f}")
  out = {"params": params}
  if stats:
    out["batch_stats"] = stats
  return grown, out


def _step_fn(detector, lr: float, lam: float):
  """(grown detector, optimizer, jitted step), kept on ``detector``: one
  compiled program serves every image of a run (per pair of batch shapes)."""
  cache = detector.__dict__.setdefault("_adapt_steps", {})
  if (lr, lam) not in cache:
    grown = detector.with_model(detector.model.grown())
    tx = optax.adam(lr)

    @jax.jit
    def step(params, stats, opt_state, si, sl, sd, ti):
      def loss_fn(p):
        return adaptation_loss(grown, p, stats, si, sl, sd, ti, lam)
      (_, (metrics, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), new_stats, opt_state, metrics

    cache[(lr, lam)] = (grown, tx, step)
  return cache[(lr, lam)]


class _Cycler:
  """Indices of epoch-wise random permutations of ``range(n)``, taken in order."""

  def __init__(self, n: int, rng: np.random.Generator):
    self.n, self.rng, self.buf = n, rng, np.zeros(0, np.int64)

  def take(self, k: int) -> np.ndarray:
    while len(self.buf) < k:
      self.buf = np.concatenate([self.buf, self.rng.permutation(self.n)])
    out, self.buf = self.buf[:k], self.buf[k:]
    return out
