"""The search space: parsing ``--space``, checking it against a config, applying a trial's values.

Syntax: comma-separated ``KEY=KIND:ARGS`` items, ``KEY`` a dotted config key
(``optimizer.lr``, ``batch_size``, ``data.colour_strength``)::

  optimizer.lr=loguniform:1e-6:1e-2       a float, log-uniform in [low, high]
  data.colour_strength=uniform:0:0.3      a float, uniform in [low, high]
  optimizer.warmup_steps=int:0:100        an integer in [low, high] (both included)
  batch_size=choice:8:16                  one of the listed values
  model.levels=choice:(3,4,5):(3,4)       choice values are read as the key's type

or the path of a JSON file holding an object with the same items
(``{"optimizer.lr": "loguniform:1e-6:1e-2", "batch_size": "choice:8:16"}``).
Every key must exist in the config; ``uniform``/``loguniform`` need a float
key, ``int`` an int (or float) key; choice values are converted to the key's
type (booleans: true/false, 1/0, yes/no, on/off; tuples as Python literals),
so a value the config could not hold is refused before anything runs.
Problems raise :class:`UsageError` (one line; the CLI exits 2).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import json
import re
from pathlib import Path
from typing import Any

import ml_collections

KINDS = ("uniform", "loguniform", "int", "choice")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
# An item starts where a comma is followed by "key=": commas inside a choice
# value such as (3,4,5) do not split items.
_ITEM_SPLIT = re.compile(r",\s*(?=[A-Za-z_][\w.]*\s*=)")


class UsageError(ValueError):
  """A bad ``--space`` or search flag: one line for the user, exit 2."""


@dataclasses.dataclass(frozen=True)
class Param:
  """One searched config key and its distribution."""

  key: str
  kind: str
  low: float | int | None = None
  high: float | int | None = None
  choices: tuple = ()

  def suggest(self, trial) -> Any:
    """The trial's value of this key (a resumed trial returns its stored value)."""
    if self.kind == "uniform":
      return trial.suggest_float(self.key, self.low, self.high)
    if self.kind == "loguniform":
      return trial.suggest_float(self.key, self.low, self.high, log=True)
    if self.kind == "int":
      return trial.suggest_int(self.key, self.low, self.high)
    encoded = [_encode(c) for c in self.choices]
    return self.choices[encoded.index(trial.suggest_categorical(self.key, encoded))]

  def decode(self, stored: Any) -> Any:
    """The config value of a value optuna stored for this key (``trial.params``)."""
    if self.kind != "choice":
      return stored
    return self.choices[[_encode(c) for c in self.choices].index(stored)]

  def spec(self) -> str:
    """The canonical ``KEY=KIND:ARGS`` text (what the study stores to compare on resume)."""
    if self.kind == "choice":
      return f"{self.key}=choice:" + ":".join(_encode(c, text=True) for c in self.choices)
    return f"{self.key}={self.kind}:{self.low!r}:{self.high!r}"


def _encode(value, text: bool = False):
  """Optuna's categorical values are None/bool/int/float/str: others go as text."""
  if isinstance(value, (bool, int, float, str)) and not text:
    return value
  return str(value).lower() if isinstance(value, bool) else (
      value if isinstance(value, str) else repr(value))


def config_value(config, key: str) -> Any:
  """The value of dotted ``key`` in ``config``; ``KeyError`` naming close keys."""
  node = config
  for i, part in enumerate(key.split(".")):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      prefix = ".".join(key.split(".")[:i])
      keys = all_keys(config)
      close = difflib.get_close_matches(key, keys, n=3)
      hint = f"; did you mean {', '.join(close)}?" if close else ""
      raise KeyError(f"the config has no key {key!r}"
                     f"{f' (no {part!r} in {prefix!r})' if prefix else ''}{hint}")
    node = node[part]
  return node


def all_keys(config, prefix: str = "") -> list[str]:
  """Every dotted leaf key of ``config``."""
  out = []
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.extend(all_keys(v, f"{prefix}{k}."))
    else:
      out.append(f"{prefix}{k}")
  return out


def _number(text: str, key: str, integer: bool):
  try:
    return int(text) if integer else float(text)
  except ValueError:
    raise UsageError(f"{key}: {text!r} is not {'an integer' if integer else 'a number'}"
                     ) from None


def _convert(text: str, current: Any, key: str) -> Any:
  """A choice value as the type of the config's current value."""
  text = text.strip()
  try:
    if isinstance(current, bool):
      if text.lower() not in _TRUE + _FALSE:
        raise ValueError
      return text.lower() in _TRUE
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
    if isinstance(current, (tuple, list)):
      value = ast.literal_eval(text)
      if not isinstance(value, (tuple, list)):
        value = (value,)
      return type(current)(value)
  except (ValueError, SyntaxError):
    raise UsageError(f"{key}: choice {text!r} is not a {type(current).__name__} "
                     f"(the config's value is {current!r})") from None
  raise UsageError(f"{key}: cannot search a key of type {type(current).__name__}")


def parse_param(item: str, config) -> Param:
  """One ``KEY=KIND:ARGS`` item, checked against ``config``."""
  key, sep, spec = item.partition("=")
  key, spec = key.strip(), spec.strip()
  if not sep or not key or not spec:
    raise UsageError(f"bad space item {item!r}: expected KEY=KIND:ARGS, KIND one of "
                     f"{', '.join(KINDS)} (e.g. optimizer.lr=loguniform:1e-6:1e-2)")
  try:
    current = config_value(config, key)
  except KeyError as e:
    raise UsageError(str(e.args[0])) from None
  if isinstance(current, ml_collections.ConfigDict):
    raise UsageError(f"{key} is a group of keys, not a value: search one of "
                     f"{', '.join(all_keys(current, key + '.')[:6])} ...")
  kind, _, rest = spec.partition(":")
  kind = kind.strip()
  if kind not in KINDS:
    raise UsageError(f"{key}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
  args = rest.split(":") if rest else []
  if kind == "choice":
    if not args or any(not a.strip() for a in args):
      raise UsageError(f"{key}: choice needs values, e.g. {key}=choice:A:B")
    choices = tuple(_convert(a, current, key) for a in args)
    if len(set(map(repr, choices))) != len(choices):
      raise UsageError(f"{key}: repeated choice values {args}")
    return Param(key, kind, choices=choices)
  if len(args) != 2:
    raise UsageError(f"{key}: {kind} needs two bounds, {key}={kind}:LOW:HIGH")
  if kind == "int":
    if isinstance(current, bool) or not isinstance(current, (int, float)):
      raise UsageError(f"{key}: int needs a numeric key (the config's value is {current!r})")
    low, high = (_number(a, key, integer=True) for a in args)
  else:
    if isinstance(current, bool) or not isinstance(current, float):
      raise UsageError(f"{key}: {kind} needs a float key (the config's value is "
                       f"{current!r}; use int:LOW:HIGH or choice for other types)")
    low, high = (_number(a, key, integer=False) for a in args)
  if not low < high:
    raise UsageError(f"{key}: the low bound {low} must be below the high bound {high}")
  if kind == "loguniform" and low <= 0:
    raise UsageError(f"{key}: loguniform needs a positive low bound, got {low}")
  return Param(key, kind, low, high)


def parse_space(text: str, config) -> list[Param]:
  """``--space``: the items of ``text``, or of the JSON file it names."""
  text = (text or "").strip()
  if not text:
    raise UsageError("--space is empty: give KEY=KIND:ARGS items or a JSON file")
  if text.endswith(".json") or ("=" not in text and Path(text).exists()):
    path = Path(text)
    try:
      obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
      raise UsageError(f"--space {path}: cannot read a JSON object ({e})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, str) for v in obj.values()):
      raise UsageError(f"--space {path}: expected a JSON object of "
                       '"KEY": "KIND:ARGS" strings')
    items = [f"{k}={v}" for k, v in obj.items()]
  else:
    items = [i for i in _ITEM_SPLIT.split(text) if i.strip()]
  params = [parse_param(i, config) for i in items]
  keys = [p.key for p in params]
  repeated = sorted({k for k in keys if keys.count(k) > 1})
  if repeated:
    raise UsageError(f"--space names {', '.join(repeated)} more than once")
  return params


def space_text(params: list[Param]) -> str:
  """The canonical text of a parsed space (one item per key, in order)."""
  return ",".join(p.spec() for p in params)


def apply_params(config, values: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of ``config`` with each dotted key of ``values`` set."""
  out = copy.deepcopy(config)
  with out.unlocked():
    for key, value in values.items():
      *parents, leaf = key.split(".")
      node = out
      for p in parents:
        node = node[p]
      node[leaf] = value
  return out
