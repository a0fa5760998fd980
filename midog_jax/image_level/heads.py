"""The two round-1 heads on the image vectors, and their ensemble.

From the SOFTEC AIC'24 write-up (Irfan, SPADES team C):

* **Dense head** (their Keras model): Dropout 0.6, Dense 128 ReLU with
  ``l1_l2(l1=0.2, l2=0.03)`` kernel regularisation, Dense 1 sigmoid with
  ``l1_l2(l1=0.0.1, l2=0.01)``. The second L1 value is garbled in the source;
  we read it as **0.01** (a stray dot; the same value as its L2). As in Keras
  the penalties are ``l1 * sum|W| + l2 * sum W^2`` of each kernel added to the
  mean binary cross-entropy, kernels start Glorot-uniform, biases zero, and
  the optimiser is Adam 1e-3. The weights of the epoch with the lowest
  validation cross-entropy are kept (the penalties are left out of that choice:
  they depend on the weights only, not on how they fit the validation set).
* **Random forest**: 900 trees, bootstrap off (scikit-learn, seeded). The fitted
  trees are exported to plain arrays (:class:`Forest`), saved as ``.npz`` and
  evaluated here, so a workdir never holds a pickle.
* **Ensemble**: if both heads agree the answer stands; if they disagree the more
  confident one wins, the dense head's confidence multiplied by ``weight``
  (> 1: the authors trusted the dense head more). See :func:`ensemble`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

# Candidate dense-head weights for the ensemble, chosen on validation; all
# above 1, since the rule trusts the dense head more.
WEIGHT_GRID = (1.1, 1.25, 1.5, 2.0, 3.0)


# ----------------------------------------------------------------------------
# Dense head.


@dataclasses.dataclass(frozen=True)
class DenseConfig:
  """Hyper-parameters of the dense head (the write-up's values by default)."""

  hidden: int = 128
  dropout: float = 0.6
  l1: float = 0.2
  l2: float = 0.03
  out_l1: float = 0.01
  out_l2: float = 0.01
  lr: float = 1e-3
  epochs: int = 30
  batch_size: int = 32
  seed: int = 0

  @classmethod
  def from_config(cls, cfg) -> "DenseConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(cfg).items() if k in names})


class DenseHead(nn.Module):
  """Dropout -> Dense(hidden) ReLU -> Dense(1); returns logits (B,)."""

  hidden: int = 128
  dropout: float = 0.6

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    glorot = nn.initializers.glorot_uniform()
    x = nn.relu(nn.Dense(self.hidden, kernel_init=glorot, name="hidden")(x))
    return nn.Dense(1, kernel_init=glorot, name="out")(x)[:, 0]


def penalty(params: dict, cfg: DenseConfig) -> jax.Array:
  """Keras ``l1_l2`` of both kernels: ``l1 * sum|W| + l2 * sum W^2``."""
  k1, k2 = params["hidden"]["kernel"], params["out"]["kernel"]
  return (cfg.l1 * jnp.abs(k1).sum() + cfg.l2 * jnp.square(k1).sum()
          + cfg.out_l1 * jnp.abs(k2).sum() + cfg.out_l2 * jnp.square(k2).sum())


def bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean binary cross-entropy of logits (numerically stable)."""
  return optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype)).mean()


def standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-feature mean and std of the training vectors (std 1 where constant).

  Not in the write-up (ImageNet features are O(1)); random-weight features
  span orders of magnitude, and Adam on raw ones diverges.
  """
  x = np.asarray(x, np.float64)
  mean, std = x.mean(axis=0), x.std(axis=0)
  std = np.where(std > 1e-6 * max(float(std.max(initial=0.0)), 1e-30), std, 1.0)
  return mean.astype(np.float32), std.astype(np.float32)


def train_dense(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray | None,
                y_val: np.ndarray | None, cfg: DenseConfig,
                log: Callable = lambda *_: None) -> tuple[dict, list[dict]]:
  """Trains the dense head; returns the best epoch's params and the history.

  Without validation data the last epoch is kept.
  """
  model = DenseHead(cfg.hidden, cfg.dropout)
  key = jax.random.key(cfg.seed, impl="rbg")
  params = model.init(key, jnp.zeros((1, x_train.shape[1]), jnp.float32))["params"]
  tx = optax.adam(cfg.lr)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y, rng):
    def loss_fn(p):
      logits = model.apply({"params": p}, x, train=True, rngs={"dropout": rng})
      data = bce(logits, y)
      return data + penalty(p, cfg), data
    (loss, data), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, data

  @jax.jit
  def val_loss(params, x, y):
    return bce(model.apply({"params": params}, x), y)

  n = len(x_train)
  bs = min(cfg.batch_size, n)
  rng = np.random.default_rng(cfg.seed)
  best, best_loss, history = params, np.inf, []
  x_train = np.asarray(x_train, np.float32)
  y_train = np.asarray(y_train, np.float32)
  for epoch in range(1, cfg.epochs + 1):
    order = rng.permutation(n)
    losses = []
    # Full batches only (fixed shapes, one compiled step); the shuffle moves
    # the few left-over examples into other batches every epoch.
    for b in range(max(1, n // bs)):
      idx = order[b * bs:(b + 1) * bs]
      key, sub = jax.random.split(key)
      params, opt_state, loss, data = step(params, opt_state, x_train[idx],
                                           y_train[idx], sub)
      losses.append((float(loss), float(data)))
    row = dict(epoch=epoch, loss=float(np.mean([l for l, _ in losses])),
               bce=float(np.mean([d for _, d in losses])))
    if x_val is not None and len(x_val):
      row["val_bce"] = float(val_loss(params, jnp.asarray(x_val, jnp.float32),
                                      jnp.asarray(y_val, jnp.float32)))
      if row["val_bce"] < best_loss:
        best, best_loss = params, row["val_bce"]
        row["best"] = True
    else:
      best = params
    history.append(row)
    log("dense head " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in row.items()))
  return jax.device_get(best), history


def predict_dense(params: dict, x: np.ndarray, cfg: DenseConfig, batch: int = 256
                  ) -> np.ndarray:
  """Sigmoid probabilities (N,) of the dense head."""
  model = DenseHead(cfg.hidden, cfg.dropout)
  fn = jax.jit(lambda p, x: jax.nn.sigmoid(model.apply({"params": p}, x)))
  out = [np.asarray(fn(params, jnp.asarray(x[i:i + batch], jnp.float32)))
         for i in range(0, len(x), batch)]
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


# ----------------------------------------------------------------------------
# Random forest, as plain arrays.


@dataclasses.dataclass
class Forest:
  """All trees of a fitted forest, concatenated.

  ``left``/``right``: child node ids (-1 at leaves), ``feature``/``threshold``:
  the split (go left when ``x[feature] <= threshold``, x as float32 like
  scikit-learn), ``prob``: P(positive) of the leaf, ``roots``: each tree's
  first node.
  """

  left: np.ndarray
  right: np.ndarray
  feature: np.ndarray
  threshold: np.ndarray
  prob: np.ndarray
  roots: np.ndarray

  def predict(self, x: np.ndarray) -> np.ndarray:
    """P(positive) (N,): the mean over trees of the leaf's class fraction."""
    x = np.asarray(x, np.float32)
    node = np.broadcast_to(self.roots, (len(x), len(self.roots))).copy()
    rows = np.arange(len(x))[:, None]
    while True:
      inner = self.left[node] >= 0
      if not inner.any():
        break
      go_left = x[rows, self.feature[node]] <= self.threshold[node]
      nxt = np.where(go_left, self.left[node], self.right[node])
      node = np.where(inner, nxt, node)
    return self.prob[node].mean(axis=1)

  def save(self, path) -> None:
    """Writes the arrays as ``.npz`` (atomic)."""
    from midog_jax.fileio import atomic_path  # pylint: disable=g-import-not-at-top
    with atomic_path(path) as tmp:
      np.savez(tmp, **dataclasses.asdict(self))

  @classmethod
  def load(cls, path) -> "Forest":
    with np.load(path, allow_pickle=False) as z:
      return cls(**{f.name: z[f.name] for f in dataclasses.fields(cls)})


def train_forest(x: np.ndarray, y: np.ndarray, trees: int = 900, bootstrap: bool = False,
                 seed: int = 0, n_jobs: int = 1, max_features: str = "sqrt"):
  """The fitted scikit-learn forest (900 trees, bootstrap off by default)."""
  from sklearn.ensemble import RandomForestClassifier  # pylint: disable=g-import-not-at-top
  if len(np.unique(y)) < 2:
    raise ValueError("the random forest needs both classes in its training set")
  rf = RandomForestClassifier(n_estimators=trees, bootstrap=bootstrap, random_state=seed,
                              n_jobs=n_jobs, max_features=max_features)
  return rf.fit(np.asarray(x, np.float32), np.asarray(y, np.int64))


def forest_arrays(rf) -> Forest:
  """A fitted ``RandomForestClassifier`` as a :class:`Forest`."""
  pos = int(np.flatnonzero(rf.classes_ == 1)[0])
  parts, offset = [], 0
  for est in rf.estimators_:
    t = est.tree_
    leaf = t.children_left < 0
    value = t.value[:, 0, :].astype(np.float64)
    frac = value[:, pos] / np.maximum(value.sum(axis=1), 1e-300)
    parts.append((np.where(leaf, -1, t.children_left + offset),
                  np.where(leaf, -1, t.children_right + offset),
                  np.where(leaf, 0, t.feature), t.threshold, frac, offset))
    offset += t.node_count
  left, right, feat, thr, prob, roots = zip(*parts)
  return Forest(np.concatenate(left).astype(np.int64), np.concatenate(right).astype(np.int64),
                np.concatenate(feat).astype(np.int64), np.concatenate(thr).astype(np.float64),
                np.concatenate(prob).astype(np.float64), np.asarray(roots, np.int64))


# ----------------------------------------------------------------------------
# Ensemble.


def confidence(p: np.ndarray, threshold: float) -> np.ndarray:
  """How far ``p`` is from the head's threshold, as a fraction of the way to 0 or 1."""
  p = np.asarray(p, np.float64)
  t = float(threshold)
  return np.where(p >= t, (p - t) / max(1.0 - t, 1e-12), (t - p) / max(t, 1e-12))


def recentre(p: np.ndarray, threshold: float) -> np.ndarray:
  """``p`` mapped piecewise-linearly so the head's threshold becomes 0.5."""
  p = np.asarray(p, np.float64)
  return np.where(p >= threshold, 0.5 + 0.5 * confidence(p, threshold),
                  0.5 - 0.5 * confidence(p, threshold))


def ensemble(p_dense: np.ndarray, p_forest: np.ndarray, t_dense: float, t_forest: float,
             weight: float) -> tuple[np.ndarray, np.ndarray]:
  """(score, label) of the write-up's rule; label == (score >= 0.5).

  Each head votes at its own (validation-chosen) threshold. Agreement: that
  label, with the weighted mean of both recentred probabilities as the score.
  Disagreement: the head with the larger confidence (:func:`confidence`; the
  dense head's multiplied by ``weight``, winning ties) gives the label and
  its recentred probability the score.
  """
  vote_d = np.asarray(p_dense) >= t_dense
  vote_f = np.asarray(p_forest) >= t_forest
  s_d, s_f = recentre(p_dense, t_dense), recentre(p_forest, t_forest)
  dense_wins = weight * confidence(p_dense, t_dense) >= confidence(p_forest, t_forest)
  agree = vote_d == vote_f
  score = np.where(agree, (weight * s_d + s_f) / (weight + 1.0),
                   np.where(dense_wins, s_d, s_f))
  label = np.where(agree, vote_d, np.where(dense_wins, vote_d, vote_f))
  # A mean of two scores on the same side of 0.5 stays there, but keep the
  # label and the score consistent to the last bit.
  score = np.where(label, np.maximum(score, 0.5), np.minimum(score, np.nextafter(0.5, 0)))
  return score, label.astype(np.int64)
