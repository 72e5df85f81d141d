"""Cold start of the default search: seconds from process start to the end of the first step.

  python -m benchmarks.cold_start [--config=digits|kws] [--repeats 1]

Runs `python -m launch.search --config=experiments/<config>.py` in a subprocess with an empty JAX compilation
cache and a fresh workdir, `log_every=1` (so the first step's progress line is printed, and its metrics fetched,
the moment it ends) and `max_steps=3`, and timestamps its output lines as they arrive: the "search:" line (imports,
data and the search space are ready) and the "step 1/" line (initialisation, the weight step's compile and one
step done). Writes benchmarks/results/cold_start.json.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from benchmarks import results_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_run(config: str) -> dict:
  with tempfile.TemporaryDirectory(prefix="edgenas-cold-") as tmp:
    env = dict(os.environ, EDGENAS_JAX_CACHE=os.path.join(tmp, "jax_cache"), JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "launch.search", f"--config=experiments/{config}.py",
               f"--workdir={os.path.join(tmp, 'run')}", "--config.log_every=1", "--config.search.max_steps=3"]
    marks = {}
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
      lines.append(line)
      now = time.perf_counter() - start
      if line.startswith("search:"):
        marks.setdefault("ready_s", round(now, 2))
      if line.startswith("step 1/"):
        marks.setdefault("first_step_s", round(now, 2))
    if proc.wait() != 0 or "first_step_s" not in marks:
      raise SystemExit(f"{' '.join(command)} failed:\n{''.join(lines[-30:])}")
    return dict(marks, process_s=round(time.perf_counter() - start, 2))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="digits", choices=("digits", "kws"))
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--out", default="")
  args = p.parse_args()
  runs = [one_run(args.config) for _ in range(args.repeats)]
  result = dict(benchmark="cold_start", config=f"experiments/{args.config}.py", cpu_count=os.cpu_count(),
                load_avg_1m_at_end=os.getloadavg()[0], runs=runs,
                first_step_s_min=min(r["first_step_s"] for r in runs), target_s=30,
                note="process start to the end of the first search step; empty JAX compilation cache")
  out = args.out or os.path.join(REPO, "benchmarks", "results",
                                 "cold_start.json" if args.config == "digits" else f"cold_start_{args.config}.json")
  results_file.write(out, result)


if __name__ == "__main__":
  main()
