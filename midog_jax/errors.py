"""One error type for bad input, always naming the offending file and the problem."""

from __future__ import annotations

import os


class DataError(ValueError):
  """Bad input data: the message names the file and what is wrong with it."""

  def __init__(self, path: str | os.PathLike | None, problem: str):
    self.path = None if path is None else os.fspath(path)
    self.problem = problem
    where = self.path if self.path is not None else "<input>"
    super().__init__(f"{where}: {problem}")
