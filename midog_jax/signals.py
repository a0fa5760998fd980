"""Clean stops on SIGTERM and SIGINT: a flag checked between units of work.

Preemptible TPUs and GPUs send SIGTERM about 30 s before the machine goes;
Ctrl-C sends SIGINT. Inside :class:`StopRequest` either signal only sets a
flag: the trainer finishes its current step, saves a checkpoint and stops;
``predict`` finishes the current image. Both then raise
``errors.Stopped``, which the CLIs report in one line. A second signal stops at once
(``KeyboardInterrupt``), for a user who does not want to wait. Outside the
block the previous handlers are back.
"""

from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
  """Context manager: ``requested`` turns True after SIGTERM or SIGINT."""

  def __init__(self, what: str = "the current step"):
    self.what = what
    self.signal_name: str | None = None
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self.signal_name is not None

  def _handle(self, signum, frame):
    del frame
    if self.requested:  # the second one: stop now
      for sig, handler in self._previous.items():
        signal.signal(sig, handler)
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name
    print(f"{self.signal_name} received: stopping after {self.what} "
          "(send it again to stop at once)", file=sys.stderr, flush=True)

  def __enter__(self) -> "StopRequest":
    # Signal handlers can only be set from the main thread; elsewhere (a
    # library call in a worker thread) signals keep their default effect.
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
