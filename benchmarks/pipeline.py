"""The README's first command, measured: `launch.pipeline` on the digits default, cold JAX compile cache.

  python -m benchmarks.pipeline [--workdir=DIR] [--keep_cache]

Runs the pipeline in a subprocess (a fresh workdir, EDGENAS_JAX_CACHE pointed at an empty directory unless
--keep_cache), records its wall time and peak RSS, and writes benchmarks/results/pipeline_digits.json: the
pipeline's own summary.json plus the measurement. The searched network's int8 model is copied to
testdata/digits_searched_int8.tflite, which benchmarks/targets.py runs on the emulated cores.
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
RESULTS = os.path.join(REPO, "benchmarks", "results", "pipeline_digits.json")
SEARCHED_MODEL = os.path.join(REPO, "testdata", "digits_searched_int8.tflite")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--keep_cache", action="store_true", help="use the normal compile cache (warm)")
  args = parser.parse_args()
  workdir = args.workdir or os.path.join(tempfile.mkdtemp(prefix="edgenas-pipeline-"), "digits")
  env = dict(os.environ)
  if not args.keep_cache:
    env["EDGENAS_JAX_CACHE"] = tempfile.mkdtemp(prefix="edgenas-cold-cache-")
  command = [sys.executable, "-m", "launch.pipeline", "--config=experiments/digits.py", f"--workdir={workdir}"]
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
      cpu_count=os.cpu_count(), load_average_at_end=[round(v, 2) for v in os.getloadavg()])
  rundir.atomic_write_json(RESULTS, summary)
  shutil.copyfile(summary["files"]["tflite"], SEARCHED_MODEL)
  print(json.dumps({k: summary[k] for k in ("search", "seconds", "measurement")}, indent=1))


if __name__ == "__main__":
  main()
