"""The README's first commands, measured: `launch.pipeline` on an experiment config, cold.

  python -m benchmarks.pipeline [--config=kws|digits] [--workdir=DIR] [--keep_cache] [--keep_data]

Runs the pipeline in a subprocess (a fresh workdir, EDGENAS_JAX_CACHE and EDGENAS_RETRAIN_CACHE pointed at empty
directories unless --keep_cache; for kws the embedded dataset generated into a fresh directory unless --keep_data, so the first-time
synthesis is inside the measurement), records its wall time and peak RSS, and writes
benchmarks/results/pipeline_<config>.json: the pipeline's own summary.json plus the measurement. The searched
network's int8 model is copied to testdata/<config>_searched_int8.tflite (benchmarks/targets.py runs the digits
one on the emulated cores).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from edgenas import rundir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("kws", "digits")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="kws", choices=CONFIGS)
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--keep_cache", action="store_true", help="use the normal compile cache (warm)")
  parser.add_argument("--keep_data", action="store_true", help="kws: use the normal dataset cache")
  parser.add_argument("--data_dir", default="", help="kws: this dataset cache (e.g. to resume a measured run)")
  args = parser.parse_args()
  workdir = args.workdir or os.path.join(tempfile.mkdtemp(prefix="edgenas-pipeline-"), args.config)
  # A resumed run keeps each finished stage's recorded wall time (edgenas.pipeline), so summary.json's seconds are
  # still the cold run's; process_wall_s is then only the resumed part.
  resumed = os.path.isdir(workdir)
  env = dict(os.environ)
  if not args.keep_cache:
    env["EDGENAS_JAX_CACHE"] = tempfile.mkdtemp(prefix="edgenas-cold-cache-")
    env["EDGENAS_RETRAIN_CACHE"] = tempfile.mkdtemp(prefix="edgenas-cold-retrains-")  # baselines trained, not reused
  command = [sys.executable, "-m", "launch.pipeline", f"--config=experiments/{args.config}.py", f"--workdir={workdir}"]
  cold_data = args.config == "kws" and not args.keep_data and not args.data_dir
  if cold_data:
    command.append(f"--config.data_dir={tempfile.mkdtemp(prefix='edgenas-cold-data-')}")
  elif args.data_dir:
    command.append(f"--config.data_dir={args.data_dir}")
  t0 = time.time()
  proc = subprocess.run(command, cwd=REPO, env=env)
  wall = time.time() - t0
  if proc.returncode != 0:
    sys.exit(f"the pipeline failed with exit status {proc.returncode}")
  summary = rundir.read_json(os.path.join(workdir, "summary.json"))
  summary["measurement"] = dict(
      command=" ".join(["python"] + command[1:]), process_wall_s=round(wall, 1),
      peak_rss_mb=round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
      compile_cache="warm" if args.keep_cache else "cold (EDGENAS_JAX_CACHE pointed at an empty directory)",
      dataset_cache="cold (generated inside the run)" if cold_data else f"as found ({args.data_dir or 'default'})",
      resumed=resumed,
      cpu_count=os.cpu_count(), load_average_at_end=[round(v, 2) for v in os.getloadavg()])
  rundir.atomic_write_json(os.path.join(REPO, "benchmarks", "results", f"pipeline_{args.config}.json"), summary)
  shutil.copyfile(summary["files"]["tflite"], os.path.join(REPO, "testdata", f"{args.config}_searched_int8.tflite"))
  print(json.dumps({k: summary[k] for k in ("search", "seconds", "measurement")}, indent=1))


if __name__ == "__main__":
  main()
