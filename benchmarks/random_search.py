"""Does the search beat chance? The searched network at several energy budgets against random networks of the same
space with the same predicted energy, all retrained with one recipe over several seeds (Li & Talwalkar 2019,
"Random Search and Reproducibility for NAS"; Yang et al. 2020, "NAS evaluation is frustratingly hard").

  python -m benchmarks.random_search [--lambdas=0.03,0.3] [--random=8] [--seeds=3] [--retrain_epochs=N]
                                     [--workdir=DIR]

on experiments/kws.py, the task where architectures differ.

1. One vectorised sweep searches every λ at once (`edgenas.sweep`); each derived network's predicted energy on the
   config's platform is its budget E.
2. Random networks are drawn uniformly from the same space (a candidate per layer, then an expanded width in
   multiples of the channel divisor), keeping the first `--random` whose predicted energy is within ±10% of E.
3. Every network, searched or random, is retrained from scratch with `config.retrain` (QAT off: the float test
   accuracy is compared) for each seed; `data_seed` stays fixed, so the spread is the seed's alone.

Writes benchmarks/results/random_search.json (per budget: the searched network's and the random networks' test
accuracy, mean ± std, and every run) and random_search.png (accuracy against energy, both point clouds).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from edgenas import architecture as arch_lib
from edgenas import data as data_lib
from edgenas import rundir
from edgenas import search as search_lib
from edgenas import space as space_lib
from edgenas import sweep as sweep_lib
from edgenas import train as train_lib
from edgenas.console import say
from experiments import kws

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results", "random_search.json")
ENERGY_BAND = 0.10  # a random network counts at a budget when its predicted energy is within ±10%
MAX_DRAWS = 200_000


def random_architecture(space: space_lib.SearchSpace, rng: np.random.Generator) -> arch_lib.Architecture:
  """A uniform draw: a candidate per layer, then (for an expanding one) a width in multiples of the divisor."""
  choices, hidden = [], []
  for slot in space.slots():
    j = int(rng.integers(len(slot.candidates)))
    cand = slot.candidates[j]
    choices.append(j)
    if cand.op == arch_lib.MBCONV and cand.expansion != 1:
      widths = np.arange(space.channel_divisor, slot.hidden_max(cand) + 1, space.channel_divisor)
      hidden.append(int(rng.choice(widths)) if len(widths) else slot.hidden_max(cand))
    else:
      hidden.append(0)
  return space.architecture(choices, hidden, name="random")


def matched_random(space, platform: str, energy_uj: float, count: int, seed: int) -> list[dict]:
  """The first `count` uniform draws whose predicted energy is within ENERGY_BAND of `energy_uj`."""
  rng, found, seen, draws = np.random.default_rng(seed), [], set(), 0
  while len(found) < count:
    draws += 1
    if draws > MAX_DRAWS:
      raise SystemExit(f"only {len(found)} of {count} random networks within ±{ENERGY_BAND:.0%} of {energy_uj:.1f} µJ "
                       f"in {MAX_DRAWS} draws; widen the band or choose another budget")
    arch = random_architecture(space, rng)
    if arch.hash() in seen:
      continue
    e = train_lib.platform_costs(arch, platform)["energy_uj"]
    if abs(e / energy_uj - 1.0) <= ENERGY_BAND:
      seen.add(arch.hash())
      found.append(dict(arch=arch, energy_uj=e))
  say(f"random: {count} networks within ±{ENERGY_BAND:.0%} of {energy_uj:.1f} µJ after {draws} draws")
  return found


def retrain_accuracy(config, arch: arch_lib.Architecture, workdir: str, seed: int) -> float:
  c = config.copy_and_resolve_references()
  c.seed = seed
  return float(train_lib.run_retrain(c, arch, workdir)["test_acc_float"])


def mean_std(values) -> dict:
  return dict(mean=round(float(np.mean(values)), 4), std=round(float(np.std(values)), 4), n=len(values))


def plot(budgets: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for i, b in enumerate(budgets):
    rand_e = [r["energy_uj"] for r in b["random"] for _ in r["test_acc"]]
    rand_a = [a for r in b["random"] for a in r["test_acc"]]
    ax.scatter(rand_e, rand_a, s=14, c="tab:gray", alpha=0.6, label="random, same energy ±10%" if i == 0 else None)
    s = b["searched"]
    ax.scatter([s["energy_uj"]] * len(s["test_acc"]), s["test_acc"], s=30, c="tab:red", marker="D",
               label="searched" if i == 0 else None)
  ax.set_xlabel("predicted energy per inference (µJ)")
  ax.set_ylabel("test accuracy (float, retrained)")
  ax.set_xscale("log")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lambdas", default="0.03,0.3")
  parser.add_argument("--random", type=int, default=8)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--retrain_epochs", type=int, default=0, help="0: the config's")
  parser.add_argument("--search_epochs", type=int, default=0, help="0: the config's (smoke runs only)")
  parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "random_search"))
  parser.add_argument("--out", default=RESULTS, help="results JSON (the plot goes beside it, .png)")
  args = parser.parse_args()
  t0 = time.time()
  config = kws.get_config()
  config.retrain.qat_epochs = 0
  if args.retrain_epochs:
    config.retrain.epochs = args.retrain_epochs
    config.retrain.warmup_epochs = min(config.retrain.warmup_epochs, args.retrain_epochs // 2)
  if args.search_epochs:
    config.search.epochs = args.search_epochs
    config.search.warmup_epochs = min(config.search.warmup_epochs, args.search_epochs / 2)
  lambdas = sweep_lib.parse_values(args.lambdas, "--lambdas")
  platform = config.cost.platform
  sweep = sweep_lib.run_sweep(config, os.path.join(args.workdir, "sweep"), lambdas, vectorize=True)
  dataset = data_lib.load_data(config)
  space = search_lib.check_data(config, dataset)
  # Every network of every budget, then their retrains seed by seed: after the first pass each network has one
  # retrained run (enough for benchmarks/plan_kws.py to plan with), the other seeds follow.
  budgets = []
  for member in sweep["members"]:
    arch = arch_lib.Architecture.load(os.path.join(args.workdir, "sweep", member["workdir"], search_lib.ARCH_FILE))
    energy = train_lib.platform_costs(arch, platform)["energy_uj"]
    say(f"λ={member['lam']}: searched {arch.hash()} {' '.join(arch.summary()['layers'])}, {energy:.1f} µJ")
    randoms = matched_random(space, platform, energy, args.random, seed=int(1e3 * member["lam"]))
    nets = [("searched", arch, energy)] + [(f"random{k}", r["arch"], r["energy_uj"]) for k, r in enumerate(randoms)]
    budgets.append(dict(lam=member["lam"], where=os.path.join(args.workdir, f"lam_{member['lam']}"), nets=nets))
  accs = {}
  for s in range(args.seeds):
    for b in budgets:
      for name, arch, _ in b["nets"]:
        accs[(b["lam"], name, s)] = retrain_accuracy(config, arch, os.path.join(b["where"], name, f"seed{s}"), s)
        say(f"λ={b['lam']}: {name} {arch.hash()} seed {s}: {accs[(b['lam'], name, s)]:.4f}")
  for i, b in enumerate(budgets):
    rows = [dict(arch_hash=arch.hash(), layers=arch.summary()["layers"], macs=arch.macs(), energy_uj=energy,
                 test_acc=[accs[(b["lam"], name, s)] for s in range(args.seeds)]) for name, arch, energy in b["nets"]]
    searched, randoms = rows[0], rows[1:]
    s_stats = mean_std(searched["test_acc"])
    r_stats = mean_std([np.mean(r["test_acc"]) for r in randoms])  # one point per random network
    budgets[i] = dict(lam=b["lam"], searched=searched | dict(summary=s_stats), random=randoms,
                      random_summary=r_stats,
                      searched_beats_random_by_one_std=bool(s_stats["mean"] >= r_stats["mean"] + r_stats["std"]))
  result = dict(config="experiments/kws.py", dataset=config.dataset, platform=platform,
                search=dict(rundir.to_jsonable(config.search), lambdas=lambdas),
                retrain=dict(epochs=config.retrain.epochs, qat_epochs=0, batch_size=config.retrain.batch_size),
                seeds=args.seeds, random_per_budget=args.random, energy_band=ENERGY_BAND, budgets=budgets,
                wall_s=round(time.time() - t0, 1), cpu_count=os.cpu_count(),
                load_average_at_end=[round(v, 2) for v in os.getloadavg()])
  rundir.atomic_write_json(args.out, result)
  plot(budgets, os.path.splitext(args.out)[0] + ".png")
  print(json.dumps([dict(lam=b["lam"], searched=b["searched"]["summary"], random=b["random_summary"],
                         beats=b["searched_beats_random_by_one_std"]) for b in budgets], indent=1))


if __name__ == "__main__":
  main()
