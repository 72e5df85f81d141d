"""Do the channel gates learn which channels the task needs? The gate-closure probe on a finished vectorised sweep.

  python -m benchmarks.gate_closure [--sweep=runs/random_search/sweep] [--out=benchmarks/results/gate_closure_kws.json]

Every search records the probe in its search.json (`edgenas.search.gate_closure`): the supernet's validation
accuracy with every gate open, with the gates the search closed closed, and with the quarter of lowest-logit gate
groups of each candidate closed, each rule against as many groups closed at random (4 draws). A sweep searched
before the probe existed lacks it: this restores each population from its final checkpoint (nothing is trained;
the population's configs are checked as on any resume), derives every member again, which rewrites the same
arch.json and a search.json that holds the probe, and collects the members' probes into one results file.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import ml_collections

from edgenas import architecture as arch_lib
from edgenas import population
from edgenas import rundir
from edgenas import search as search_lib
from edgenas import sweep as sweep_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sweep", default=os.path.join(REPO, "runs", "random_search", "sweep"))
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "gate_closure_kws.json"))
  args = parser.parse_args()
  t0 = time.time()
  pop_root = os.path.join(args.sweep, sweep_lib.POPULATION_DIR)
  if not os.path.isdir(pop_root):
    raise SystemExit(f"{args.sweep}: no {sweep_lib.POPULATION_DIR}/ directory: not a vectorised sweep")
  members = []
  for name in sorted(os.listdir(pop_root)):
    pop_dir = os.path.join(pop_root, name)
    recorded = rundir.read_json(os.path.join(pop_dir, rundir.CONFIG_FILE))
    configs = [ml_collections.ConfigDict(c) for c in recorded["configs"]]
    workdirs = recorded["members"]
    before = {w: arch_lib.Architecture.load(os.path.join(w, search_lib.ARCH_FILE)).hash() for w in workdirs}
    results = population.run_population_search(configs, workdirs, pop_dir)
    for c, w, r in zip(configs, workdirs, results):
      if r["arch_hash"] != before[w]:
        raise SystemExit(f"{w}: derived {r['arch_hash']} from the final checkpoint, the sweep derived {before[w]}")
      members.append(dict(lam=float(c.cost.lam), platform=c.cost.platform, arch_hash=r["arch_hash"],
                          layers=r["arch"]["layers"], val_acc_supernet=r["val_acc_supernet"],
                          gate_closure=r["gate_closure"]))
  out = dict(sweep=os.path.relpath(args.sweep, REPO), dataset=configs[0].dataset, members=members,
             rule_fraction=search_lib.GATE_CLOSURE_FRACTION, random_draws=search_lib.GATE_CLOSURE_DRAWS,
             seconds=round(time.time() - t0, 1), cpu_count=os.cpu_count(),
             load_average_at_end=[round(v, 2) for v in os.getloadavg()])
  rundir.atomic_write_json(args.out, out)
  print(json.dumps([dict(lam=m["lam"], layers=m["layers"], **{k: v for k, v in m["gate_closure"].items()})
                    for m in members], indent=1))


if __name__ == "__main__":
  main()
