"""The one way a benchmark leaves its result: JSON written to benchmarks/results/ (or --out) and printed."""
from __future__ import annotations

import json
import os


def write(path: str, result: dict) -> None:
  """Writes `result` to `path` (creating its directory) and prints the same JSON on stdout."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  text = json.dumps(result, indent=2)
  with open(path, "w") as f:
    f.write(text + "\n")
  print(text)
