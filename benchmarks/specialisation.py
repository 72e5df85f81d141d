"""Does the platform change the answer? The same search space searched for each MCU platform at the same λ, and
every derived network priced on every platform (a specialisation matrix, as in ProxylessNAS and FBNet).

  python -m benchmarks.specialisation [--config=digits|kws] [--lam=0.3] [--epochs=30] [--out=FILE]
      [--retrain_epochs=4 --seeds=3] [--workdir=DIR]

Each platform's lookup table comes from its own target's emulated counts (edgenas.energy.counts) and its cycle
model; the search is the experiment config (experiments/digits.py or experiments/kws.py) with `cost.platform`
set. Writes benchmarks/results/specialisation.json (specialisation_kws.json for --config=kws): matrix[searched_for][priced_on] = {energy_uj, latency_ms}, and per
platform whether its own network is the cheapest of them all on it.

A search at a fixed λ trades accuracy for relative energy, so a platform's own network need not be the cheapest
there: it may have bought accuracy that its platform sells cheaply. With --retrain_epochs, every distinct network
is retrained from scratch (QAT off, --seeds seeds, `benchmarks.random_search.retrain_accuracy`) and the file also
says, per platform, whether its own network is on that platform's accuracy/energy front among the searched
networks (no other is cheaper there and at least as accurate, mean test accuracy). --workdir reuses finished
searches (their arch.json), so a retrain can follow a recorded search without searching again.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from edgenas import architecture as arch_lib
from edgenas import rundir
from edgenas import search as search_lib
from edgenas.energy import estimate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results", "specialisation.json")
PLATFORMS = ("stm32l4r5_tflm", "stm32h7a3_xcubeai", "andes_d45_tflm", "efr32mg24_tflm")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lam", type=float, default=None, help="λ of the additive penalty (default: the config's)")
  parser.add_argument("--epochs", type=int, default=None)
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--config", default="digits", choices=("digits", "kws"))
  parser.add_argument("--out", default=None, help="default: benchmarks/results/specialisation[_kws].json")
  parser.add_argument("--retrain_epochs", type=int, default=0, help="retrain every distinct network (0: no)")
  parser.add_argument("--seeds", type=int, default=3, help="retrain seeds per network")
  args = parser.parse_args()
  import importlib
  from launch import common
  experiment = importlib.import_module(f"experiments.{args.config}")
  out_path = args.out or (RESULTS if args.config == "digits" else RESULTS.replace(".json", f"_{args.config}.json"))
  common.enable_compilation_cache()
  workdir = args.workdir or tempfile.mkdtemp(prefix="edgenas-specialisation-")
  t0 = time.time()
  archs, searches = {}, {}
  for p in PLATFORMS:
    config = experiment.get_config()
    config.cost.platform = p
    if args.lam is not None:
      config.cost.lam = args.lam
    if args.epochs is not None:
      config.search.epochs = args.epochs
    t = time.time()
    reused = os.path.exists(os.path.join(workdir, p, search_lib.ARCH_FILE))
    result = search_lib.run_search(config, os.path.join(workdir, p))
    archs[p] = arch_lib.Architecture.load(os.path.join(workdir, p, search_lib.ARCH_FILE))
    searches[p] = dict(arch_hash=result["arch_hash"], layers=result["arch"]["layers"],
                       val_acc_supernet=result["val_acc_supernet"], gate_closure=result.get("gate_closure"),
                       seconds=None if reused else round(time.time() - t, 1), reused_finished_search=reused)
  matrix = {s: {p: {k: estimate.estimate_architecture(archs[s], p)[k] for k in ("energy_uj", "latency_ms")}
                for p in PLATFORMS} for s in PLATFORMS}
  # ties count: two platforms that derive the same network both have the cheapest one
  own_cheapest = {p: matrix[p][p]["energy_uj"] <= min(matrix[s][p]["energy_uj"] for s in PLATFORMS) * (1 + 1e-9)
                  for p in PLATFORMS}
  relative = {p: {s: round(matrix[s][p]["energy_uj"] / matrix[p][p]["energy_uj"], 4) for s in PLATFORMS}
              for p in PLATFORMS}
  retrained, own_on_front = None, None
  if args.retrain_epochs:
    from benchmarks.random_search import mean_std, retrain_accuracy
    rc = experiment.get_config()
    rc.retrain.qat_epochs = 0
    rc.retrain.epochs = args.retrain_epochs
    rc.retrain.warmup_epochs = min(rc.retrain.warmup_epochs, args.retrain_epochs // 2)
    retrained = {}
    for a in {a.hash(): a for a in archs.values()}.values():
      accs = [retrain_accuracy(rc, a, os.path.join(workdir, "retrain", a.hash(), f"seed{seed}"), seed)
              for seed in range(args.seeds)]
      retrained[a.hash()] = dict(layers=a.summary()["layers"],
                                 test_acc_float=mean_std(accs), per_seed=[round(x, 4) for x in accs])
    acc = {p: retrained[archs[p].hash()]["test_acc_float"]["mean"] for p in PLATFORMS}
    own_on_front = {p: not any(matrix[s][p]["energy_uj"] < matrix[p][p]["energy_uj"] * (1 - 1e-9) and acc[s] >= acc[p]
                               for s in PLATFORMS) for p in PLATFORMS}
  out = dict(config=f"experiments/{args.config}.py", dataset=config.dataset, lam=config.cost.lam, epochs=config.search.epochs, relaxation=config.search.relaxation,
             searches=searches, matrix=matrix, energy_relative_to_own=relative, own_is_cheapest=own_cheapest,
             retrained=retrained, retrain=dict(epochs=args.retrain_epochs, qat_epochs=0, seeds=args.seeds)
             if args.retrain_epochs else None, own_on_accuracy_energy_front=own_on_front,
             distinct_architectures=len({a.hash() for a in archs.values()}), seconds=round(time.time() - t0, 1),
             machine="2-core x86-64, other work running (wall times are upper bounds)")
  rundir.atomic_write_json(out_path, out)
  print(json.dumps(dict(own_is_cheapest=own_cheapest, relative=relative, searches=searches), indent=1))


if __name__ == "__main__":
  main()
