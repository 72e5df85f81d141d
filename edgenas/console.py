"""User-facing lines on stdout: what the launchers print while they run."""
from __future__ import annotations

import jax


def say(line: str) -> None:
  """Prints `line` on process 0 only (absl INFO is full of orbax's own chatter, so progress does not go there)."""
  if jax.process_index() == 0:
    print(line, flush=True)
