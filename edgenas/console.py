"""User-facing lines on stdout: what the launchers print while they run."""
from __future__ import annotations

import sys


def say(line: str) -> None:
  """Prints `line` on process 0 only (absl INFO is full of orbax's own chatter, so progress does not go there).
  JAX is asked only when it is already imported: a data-generation worker that never uses it does not pay the
  1.5 s and 150 MB of importing it."""
  jax = sys.modules.get("jax")
  if jax is None or jax.process_index() == 0:
    print(line, flush=True)
