"""Where a compiled XLA program spends its time: per-operation profile by kind.

Runs a compiled executable under ``jax.profiler`` once, reads the trace back
with ``jax.profiler.ProfileData`` and adds up the duration of every executed
operation (XLA:CPU's thunks: fusions, convolutions, dots, copies), grouped by
what the operation does, which the optimised HLO text (``compiled.as_text()``)
tells:

* ``conv_weight_grad``: convolutions whose window is larger than any real
  kernel (> 7 px): XLA writes the weight gradient of a convolution as a
  convolution of the input with the output gradient as "kernel";
* ``conv``: the other convolutions (forward passes and input gradients);
* ``transpose``: fusions that only move data (layout changes, reversals),
  such as the batch/feature swaps XLA inserts around weight gradients;
* ``reduce``: fusions with a reduction (norm statistics, losses, sums);
* ``dot``: matrix multiplications; ``elementwise``: the other fusions.

Times are thread-seconds (two threads working at once count twice). On CPU
with XLA's own (Eigen) convolutions the convolution thunks finish on the
intra-op pool after their trace event ends, so their time is not seen per
operation; ``unattributed`` (busy thread time minus the operations seen)
holds it, and the printout says so. With XLA's default options (YNNPACK
fusions) every convolution is seen.
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile
from typing import Any, Callable

import jax

_DEF = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+ (\w[\w\-]*)\(")
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")


def _conv_kind(text: str) -> str:
  win = re.search(r"window=\{size=(\d+)x(\d+)", text)
  if win and max(int(win.group(1)), int(win.group(2))) > 7:
    return "conv_weight_grad"
  return "conv"


def categories(hlo_text: str) -> dict[str, str]:
  """Operation name -> kind, from optimised HLO text."""
  comps: dict[str, list[str]] = {}
  cur = None
  for line in hlo_text.splitlines():
    m = _COMP.match(line)
    if m and not line.startswith(" "):
      cur = m.group(1)
      comps[cur] = []
    elif cur is not None:
      comps[cur].append(line)
  kinds = {}
  for lines in comps.values():
    for line in lines:
      m = _DEF.match(line)
      if not m:
        continue
      name, op = m.groups()
      body = line
      if op == "fusion":
        called = re.search(r"calls=%?([\w.\-]+)", line)
        body = "\n".join(comps.get(called.group(1), [])) if called else ""
      if "convolution(" in body or op == "convolution":
        kinds[name] = _conv_kind(body)
      elif " dot(" in body or op == "dot":
        kinds[name] = "dot"
      elif "reduce(" in body or "reduce-window(" in body or op.startswith("reduce"):
        kinds[name] = "reduce"
      elif op in ("transpose", "copy", "reverse") or (
          op == "fusion" and re.search(r" (transpose|copy|reverse)\(", body)
          and not re.search(r" (add|multiply|subtract|divide|maximum|exponential)\(", body)):
        kinds[name] = "transpose"
      else:
        kinds[name] = "elementwise"
  return kinds


def profile(compiled: Any, run: Callable[[], Any]) -> dict:
  """Thread-seconds per kind of one call of ``run`` (which calls ``compiled``).

  ``run`` must block until the result is ready.
  """
  kinds = categories(compiled.as_text())
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    run()
    jax.profiler.stop_trace()
    path = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0]
    data = jax.profiler.ProfileData.from_file(path)
  per = collections.Counter()
  busy = 0.0
  for plane in data.planes:
    for line in plane.lines:
      if "XLAEigen" not in line.name and "PjRtCpuClient" not in line.name:
        continue
      for ev in line.events:
        if ev.name == "ThunkExecutor::Execute":
          busy += ev.duration_ns / 1e9
          continue
        kind = kinds.get(ev.name)
        if kind is not None:
          per[kind] += ev.duration_ns / 1e9
  seen = sum(per.values())
  out = {k: round(v, 4) for k, v in sorted(per.items(), key=lambda kv: -kv[1])}
  out["unattributed"] = round(max(busy - seen, 0.0), 4)
  out["busy_thread_s"] = round(busy, 4)
  return out
