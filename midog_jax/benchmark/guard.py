"""The test-folder guard: training and model selection never read the suite's ``test/``.

A benchmark is only honest if nothing that trains a model or chooses its
weights or threshold ever sees a test image or a test label. This is checked,
not promised: each such command runs as a subprocess whose ``PYTHONPATH``
starts with a temporary folder holding a ``sitecustomize.py``. Python imports
``sitecustomize`` at start-up (the ``site`` module), so the hook is in place
before any code of the command runs, and every Python process the command
starts (multiprocessing workers, ``python -m`` children) inherits the
environment and installs it again. The hook (``sys.addaudithook``) sees the
interpreter's audit events ``open`` (``open``, ``io.open``, ``os.open``),
``os.listdir`` and ``os.scandir`` (which ``Path.iterdir``, ``glob`` and
``os.walk`` go through), resolves the path against the working directory,
and when it lies under a guarded folder (as written or with symlinks
resolved) it appends ``pid<TAB>event<TAB>path`` to the log file and refuses
the call (``PermissionError``). The harness reads the log after the command, so a
refusal that the command caught and ignored is still reported.

Two modes: ``images_only=False`` (training: nothing under the folder may be
opened or listed) and ``images_only=True`` (prediction and test-time
adaptation: the test images may be listed and read, every other file, the
annotation JSON and the metadata CSV with the labels, may not).

What it cannot see: files opened by native code without going through
Python (tensorstore, array_record's C++ reader, a non-Python child process),
``os.stat``/``os.path.exists`` (no audit event; they reveal no content),
opens relative to a ``dir_fd``, and Python started with ``-I``/``-E``/``-S``
or with a cleared environment (no ``PYTHONPATH``, so no hook).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

DENY_VAR = "MIDOG_GUARD_DENY"
LOG_VAR = "MIDOG_GUARD_LOG"
ALLOW_VAR = "MIDOG_GUARD_ALLOW"
SYS_PATH_VAR = "MIDOG_GUARD_SYS_PATH"
IMAGE_SUFFIXES = (".tif", ".tiff")

# The sitecustomize.py written into the temporary folder. Self-contained (it
# runs before any package is importable) and cheap on the events it ignores,
# since every audit event of the process passes through it.
HOOK_SOURCE = '''\
"""Benchmark test-folder guard (midog_jax.benchmark.guard): refuses and logs reads."""
import os
import sys
import threading


def _install():
  roots = [p for p in os.environ.get("MIDOG_GUARD_DENY", "").split(os.pathsep) if p]
  # Both spellings of each folder: as given and with symlinks resolved.
  deny = sorted({f(p) for p in roots for f in (os.path.abspath, os.path.realpath)})
  log = os.environ.get("MIDOG_GUARD_LOG", "")
  for p in os.environ.get("MIDOG_GUARD_SYS_PATH", "").split(os.pathsep):
    if p and p not in sys.path:
      sys.path.append(p)  # appended: never shadows an installed module
  if not deny or not log:
    return
  allow = tuple(s.lower() for s in os.environ.get("MIDOG_GUARD_ALLOW", "").split(",") if s)
  events = ("open", "os.listdir", "os.scandir")
  # Per thread: the hook's own log write raises an event too, and a
  # process-wide flag would let another thread's open slip through meanwhile.
  state = threading.local()
  abspath, realpath, fsdecode, sep = os.path.abspath, os.path.realpath, os.fsdecode, os.sep

  def inside(path):
    return any(path == d or path.startswith(d + sep) for d in deny)

  def hook(event, args):
    if event not in events or getattr(state, "busy", False):
      return
    target = args[0] if args else None
    if isinstance(target, int):  # an open file descriptor: its open was checked
      return
    state.busy = True
    try:
      try:
        given = fsdecode("." if target is None else target)
        # A link into the folder resolves there; a link in it to a file
        # elsewhere is still a read through the folder: both count.
        path = realpath(given)
        if not inside(path):
          path = abspath(given)
      except (TypeError, ValueError):
        return
      if not inside(path):
        return
      if allow and (event != "open" or path.lower().endswith(allow)):
        return  # images-only mode: listings (names only) and images pass
      fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
      try:
        os.write(fd, f"{os.getpid()}\\t{event}\\t{path}\\n".encode("utf-8", "surrogateescape"))
      finally:
        os.close(fd)
    finally:
      state.busy = False
    raise PermissionError(13, "benchmark guard: this stage may not read the test folder", path)

  sys.addaudithook(hook)


def _chain():
  """Runs the sitecustomize this one shadows (a later sys.path entry), if any."""
  here = os.path.dirname(os.path.abspath(__file__))
  for entry in sys.path:
    folder = os.path.abspath(entry or ".")
    if folder == here:
      continue
    other = os.path.join(folder, "sitecustomize.py")
    if os.path.isfile(other):
      with open(other, encoding="utf-8") as f:
        code = compile(f.read(), other, "exec")
      exec(code, {"__name__": "sitecustomize", "__file__": other})
      return


_install()
_chain()
'''


class GuardError(RuntimeError):
  """A guarded command read the test folder: the message names the path."""


def write_hook(folder: str | os.PathLike) -> Path:
  """Writes the guard's ``sitecustomize.py`` into ``folder``; returns its path."""
  path = Path(folder) / "sitecustomize.py"
  path.write_text(HOOK_SOURCE, encoding="utf-8")
  return path


def guarded_env(hook_folder: str | os.PathLike, deny: Sequence[str | os.PathLike],
                log: str | os.PathLike, *, images_only: bool = False,
                sys_path: Sequence[str | os.PathLike] = (),
                base: dict | None = None) -> dict:
  """The environment of a guarded subprocess (``hook_folder`` first on PYTHONPATH)."""
  env = dict(os.environ if base is None else base)
  old = env.get("PYTHONPATH", "")
  env["PYTHONPATH"] = os.pathsep.join([os.fspath(hook_folder)] + ([old] if old else []))
  env[DENY_VAR] = os.pathsep.join(os.path.realpath(p) for p in deny)
  env[LOG_VAR] = os.path.abspath(log)
  env[ALLOW_VAR] = ",".join(IMAGE_SUFFIXES) if images_only else ""
  env[SYS_PATH_VAR] = os.pathsep.join(os.fspath(p) for p in sys_path)
  return env


@contextlib.contextmanager
def hook_folder() -> Iterator[Path]:
  """A temporary folder holding the guard's ``sitecustomize.py``."""
  with tempfile.TemporaryDirectory(prefix="midog-guard-") as d:
    write_hook(d)
    yield Path(d)


def violations(log: str | os.PathLike) -> list[tuple[str, str]]:
  """``(event, path)`` of every refused read recorded in ``log`` (none if absent)."""
  try:
    text = Path(log).read_text(encoding="utf-8", errors="surrogateescape")
  except FileNotFoundError:
    return []
  out = []
  for line in text.splitlines():
    parts = line.split("\t")
    if len(parts) == 3:
      out.append((parts[1], parts[2]))
  return out


def _wait(proc: subprocess.Popen, stop) -> int:
  """The child's exit code; a SIGTERM the caller received is passed on to it.

  ``stop`` (a ``signals.StopRequest`` or None) holds the caller's signal.
  SIGTERM is forwarded, so a training child saves its checkpoint and exits;
  SIGINT is not (Ctrl-C already reached the whole process group, and a
  second one would make the child stop without saving). Any exception here
  (a second signal) kills the child.
  """
  forwarded = False
  try:
    while True:
      try:
        return proc.wait(timeout=0.5)
      except subprocess.TimeoutExpired:
        pass
      if stop is not None and stop.signal_name == "SIGTERM" and not forwarded:
        proc.send_signal(signal.SIGTERM)
        forwarded = True
  except BaseException:
    proc.kill()
    proc.wait()
    raise


def run_guarded(argv: Sequence[str], *, deny: Sequence[str | os.PathLike],
                log: str | os.PathLike, output: str | os.PathLike, cwd: str | os.PathLike,
                images_only: bool = False, sys_path: Sequence[str | os.PathLike] = (),
                env: dict | None = None, stop=None) -> int:
  """Runs ``argv`` under the guard, its output to the file ``output``.

  Returns the exit code. Raises :class:`GuardError` naming the first path
  read when the log records any refused read (whatever the exit code).
  ``stop``: the caller's ``signals.StopRequest``, whose SIGTERM is passed on.
  """
  log = Path(log)
  log.parent.mkdir(parents=True, exist_ok=True)
  with contextlib.suppress(FileNotFoundError):
    log.unlink()  # only this command's reads count
  Path(output).parent.mkdir(parents=True, exist_ok=True)
  with hook_folder() as folder, open(output, "w", encoding="utf-8") as out:
    genv = guarded_env(folder, deny, log, images_only=images_only, sys_path=sys_path,
                       base=env)
    proc = subprocess.Popen(list(argv), cwd=cwd, env=genv, stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    code = _wait(proc, stop)
  found = violations(log)
  if found:
    event, path = found[0]
    what = "read a file other than an image in" if images_only else "read"
    more = f" (+{len(found) - 1} more in {log})" if len(found) > 1 else ""
    raise GuardError(f"{path}: the guarded command {what} the test folder "
                     f"({event}){more}; see {output}")
  return code


def self_check(test_dir: str | os.PathLike, scratch: str | os.PathLike) -> None:
  """Proves the hook is active in this environment before anything trains.

  A guarded ``python -c`` lists ``test_dir``; the guard must refuse and log
  it. Raises :class:`GuardError` when it did not (say, a Python that ignores
  PYTHONPATH), since every later "no violation" would then mean nothing.
  """
  scratch = Path(scratch)
  log, out = scratch / "guard-self-check.log", scratch / "guard-self-check.out"
  probe = "import os, sys\ntry:\n  os.listdir(sys.argv[1])\nexcept PermissionError:\n  pass\n"
  try:
    run_guarded([sys.executable, "-c", probe, os.fspath(test_dir)], deny=[test_dir], log=log,
                output=out, cwd=scratch)
  except GuardError:
    return
  finally:
    with contextlib.suppress(FileNotFoundError):
      out.unlink()
    with contextlib.suppress(FileNotFoundError):
      log.unlink()
  raise GuardError(f"{test_dir}: the test-folder guard did not fire in a self-check "
                   f"({sys.executable} ignored the sitecustomize hook on PYTHONPATH); "
                   "refusing to train unguarded")
