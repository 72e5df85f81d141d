"""User-facing lines on stdout: what the launchers print while they run."""
from __future__ import annotations

import contextlib
import sys
import threading

_thread = threading.local()  # .prefix: what this thread's lines start with


def say(line: str) -> None:
  """Prints `line` on process 0 only (absl INFO is full of orbax's own chatter, so progress does not go there).
  JAX is asked only when it is already imported: a data-generation worker that never uses it does not pay the
  1.5 s and 150 MB of importing it. Inside `prefixed(p)`, every line this thread prints starts with p."""
  jax = sys.modules.get("jax")
  if jax is None or jax.process_index() == 0:
    prefix = getattr(_thread, "prefix", "")
    if prefix:
      line = "\n".join(prefix + part if part else part for part in line.split("\n"))
    print(line, flush=True)


@contextlib.contextmanager
def prefixed(prefix: str):
  """Lines `say` prints from this thread start with `prefix` for the block: a stage that runs beside another
  (the pipeline's baselines) names itself on every progress line."""
  outer = getattr(_thread, "prefix", "")
  _thread.prefix = outer + prefix
  try:
    yield
  finally:
    _thread.prefix = outer
