"""What EDGENAS_KEEP_HOST_MEMORY=1 (edgenas/host_memory.py) gains and costs on this machine.

  python -m benchmarks.host_memory [--repeats 1] [--workloads steady,cold]

Two workloads, each run in a subprocess with the variable at 0 (glibc's defaults) and at 1, alternating:
- `steady`: a 3-epoch float retrain of MLPerf Tiny's DS-CNN on the embedded KWS set (486 steps, warm compilation
  cache: a first, unmeasured run fills it), where per-step allocations dominate;
- `cold`: a 20-step KWS search with an empty compilation cache, where compilation dominates.
Records wall seconds and the child's minor page faults (getrusage RUSAGE_CHILDREN), user and system CPU seconds.
Writes benchmarks/results/host_memory.json. Needs the embedded KWS set in its cache (any KWS run makes it).
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

from benchmarks import results_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEADY = ["-m", "launch.retrain", "--baseline=dscnn", "--config=experiments/kws.py", "--config.retrain.epochs=3",
          "--config.retrain.qat_epochs=0"]
COLD = ["-m", "launch.search", "--config=experiments/kws.py", "--config.search.max_steps=20"]


def one_run(args: list[str], keep: bool, jax_cache: str) -> dict:
  with tempfile.TemporaryDirectory(prefix="edgenas-host-memory-") as tmp:
    env = dict(os.environ, EDGENAS_KEEP_HOST_MEMORY="1" if keep else "0", EDGENAS_JAX_CACHE=jax_cache or
               os.path.join(tmp, "jax_cache"), JAX_PLATFORMS="cpu")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, *args, f"--workdir={os.path.join(tmp, 'run')}"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if out.returncode != 0:
    raise SystemExit(f"{' '.join(args)} failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
  return dict(keep_host_memory=keep, wall_s=round(wall, 2), minor_page_faults=after.ru_minflt - before.ru_minflt,
              user_s=round(after.ru_utime - before.ru_utime, 2), system_s=round(after.ru_stime - before.ru_stime, 2),
              last_line=out.stdout.strip().splitlines()[-1][:200])


def _ratio(runs: list[dict], key: str) -> float:
  off = min(r[key] for r in runs if not r["keep_host_memory"])
  on = min(r[key] for r in runs if r["keep_host_memory"])
  return round(off / on, 3)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--workloads", default="steady,cold", help="comma-separated: steady, cold")
  p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "host_memory.json"))
  args = p.parse_args()
  workloads = args.workloads.split(",")
  if not workloads or set(workloads) - {"steady", "cold"}:
    raise SystemExit(f"--workloads: expected a comma-separated list of steady and cold, got {args.workloads!r}")
  result = dict(benchmark="host_memory", cpu_count=os.cpu_count())
  if "steady" in workloads:
    with tempfile.TemporaryDirectory(prefix="edgenas-host-memory-cache-") as warm_cache:
      one_run(STEADY, False, warm_cache)  # fills the compilation cache for the steady runs
      steady = [one_run(STEADY, keep, warm_cache) for _ in range(args.repeats) for keep in (False, True)]
    result["steady"] = dict(command="python " + " ".join(STEADY), runs=steady,
                            speedup_wall_off_over_on=_ratio(steady, "wall_s"))
  if "cold" in workloads:
    cold = [one_run(COLD, keep, "") for _ in range(args.repeats) for keep in (False, True)]
    result["cold"] = dict(command="python " + " ".join(COLD) + " (empty compilation cache)", runs=cold,
                          speedup_wall_off_over_on=_ratio(cold, "wall_s"))
  result.update(load_avg_1m_at_end=os.getloadavg()[0],
                note="speedup: min wall over repeats, off / on; > 1 means EDGENAS_KEEP_HOST_MEMORY=1 is faster")
  results_file.write(args.out, result)


if __name__ == "__main__":
  main()
