"""A λ sweep on an experiment config: sequential searches against one vectorised population, and (--retrain) the
accuracy/energy front of the retrained members.

Each mode runs `python -m launch.sweep` in its own subprocess with its own, initially empty, JAX compilation cache
(so no mode profits from an earlier one, while the members of the sequential sweep may share programs that do
not depend on λ, as they would for a user). Wall time and peak RSS come from `os.wait4` on that subprocess.
By default the searches are full length (the digits config: 30 epochs, 8 of warm-up); `--epochs` and
`--warmup_epochs` shorten them. Prints one JSON object and writes benchmarks/results/sweep.json.

Modes: `seq` runs the members one after another (`launch.sweep` without --vectorize); `scan` is the vectorised
sweep as a CPU user runs it (`--vectorize --chunk=1`: one compiled program steps the members in turn, so each
member's Gumbel switch runs only its sampled candidate); `vmap` steps every member at once, which is what a GPU or
TPU wants, but on CPU Gumbel's switch becomes a select under vmap and every candidate runs for every member (an
earlier 4-epoch run had not reached step 50 after 1350 s), so it is not in the default modes.

Monotonicity is checked per mode, on the derived architectures' predicted energy and on the expected energy
under the final architecture distribution.

With --retrain every member (and the config's baselines) is retrained by `launch.sweep --retrain`, and each mode
also records the retrained int8 fake-quant test accuracy per λ, whether the front is monotone (accuracy never
rises as λ rises) and the accuracy spread between its largest and smallest member, in points.

Usage: python -m benchmarks.sweep [--config digits|kws] [--epochs 0] [--warmup_epochs -1] [--lambdas 0,0.3,1,3]
       [--modes seq,scan] [--retrain]        # writes benchmarks/results/sweep.json (digits) or sweep_<config>.json
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks import results_file

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {"seq": [], "vmap": ["--vectorize", "--chunk=0"], "scan": ["--vectorize", "--chunk=1"]}
CONFIGS = ("digits", "kws")
CONFIG = """from experiments import {name}


def get_config():
  c = {name}.get_config()
{overrides}  return c
"""


def run_mode(mode: str, config_path: str, lambdas: str, scratch: str, retrain: bool = False) -> dict:
  workdir = os.path.join(scratch, mode)
  env = {**os.environ, "EDGENAS_JAX_CACHE": os.path.join(scratch, f"jax_cache_{mode}"), "JAX_PLATFORMS": "cpu"}
  command = [sys.executable, "-m", "launch.sweep", f"--config={config_path}", f"--workdir={workdir}",
             f"--lambdas={lambdas}", *MODES[mode], *(["--retrain"] if retrain else [])]
  start = time.perf_counter()
  with open(os.path.join(scratch, f"{mode}.log"), "w") as log:
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - start
  if os.waitstatus_to_exitcode(status) != 0:
    raise SystemExit(f"{mode} sweep failed; see {log.name}")
  with open(os.path.join(workdir, "sweep.json")) as f:
    sweep = json.load(f)
  members = sweep["members"]
  energy = {f"{m['lam']:g}": m["energy_uj"] for m in members}
  out = dict(wall_s=round(wall, 1), peak_rss_mb=round(usage.ru_maxrss / 1024, 1),
             search_loop_s=[round(_loop_seconds(workdir, m), 1) for m in members],
             energy_uj_by_lambda=energy, expected_energy_by_lambda={f"{m['lam']:g}": m["expected_cost"]
                                                                   for m in members},
             val_acc_by_lambda={f"{m['lam']:g}": m["val_acc"] for m in members},
             arch_by_lambda={f"{m['lam']:g}": " ".join(m["layers"]) for m in members},
             energy_monotone_non_increasing=_non_increasing([energy[f"{m['lam']:g}"] for m in members]),
             expected_energy_monotone_non_increasing=_non_increasing([m["expected_cost"] for m in members]))
  if retrain:
    out.update(_retrained_front(members, sweep.get("baselines", [])))
  return out


def _retrained_front(members: list, baselines: list) -> dict:
  """The retrained members' accuracy/energy front (members are in λ order, smallest first)."""
  members = sorted(members, key=lambda m: m["lam"])
  acc = [m["test_acc"] for m in members]
  if any(m["test_acc_source"] != "retrained_fake_quant" for m in members):
    raise SystemExit("sweep: not every member was retrained; see the log")
  front = [m for m in members if m.get("on_front")]
  return dict(
      test_acc_source="retrained_fake_quant",
      test_acc_by_lambda={f"{m['lam']:g}": m["test_acc"] for m in members},
      test_acc_float_by_lambda={f"{m['lam']:g}": m["test_acc_float"] for m in members},
      macs_by_lambda={f"{m['lam']:g}": m["macs"] for m in members},
      accuracy_monotone_non_increasing=_non_increasing(acc),
      front_ids=[m["id"] for m in front],
      front_spread_points=round(100 * (max(m["test_acc"] for m in front) - min(m["test_acc"] for m in front)), 2),
      baselines=[dict(name=b["name"], test_acc=b["test_acc"], energy_uj=b["energy_uj"]) for b in baselines])


def _loop_seconds(workdir: str, member: dict) -> float:
  with open(os.path.join(workdir, member["workdir"], "search.json")) as f:
    return json.load(f)["seconds"]["loop"]


def _non_increasing(values) -> bool:
  return all(b <= a * (1 + 1e-9) for a, b in zip(values, values[1:]))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="digits", choices=CONFIGS)
  parser.add_argument("--epochs", type=int, default=0, help="0: the config's own")
  parser.add_argument("--warmup_epochs", type=float, default=-1, help="negative: the config's own")
  parser.add_argument("--lambdas", default="0,0.3,1,3")
  parser.add_argument("--modes", default="seq,scan")
  parser.add_argument("--retrain", action="store_true", help="retrain every member and record the front")
  parser.add_argument("--out", default="", help="default: benchmarks/results/sweep.json, or sweep_<config>.json")
  args = parser.parse_args()
  name = "sweep" if args.config == "digits" else f"sweep_{args.config}"
  out_path = args.out or os.path.join(REPO_ROOT, "benchmarks", "results", f"{name}.json")
  lambdas = sorted(float(v) for v in args.lambdas.split(","))
  lambda_text = ",".join(f"{v:g}" for v in lambdas)
  with tempfile.TemporaryDirectory(prefix="sweep_bench_") as scratch:
    config_path = os.path.join(scratch, "config.py")
    with open(config_path, "w") as f:
      overrides = (f"  c.search.epochs = {args.epochs}\n" if args.epochs > 0 else "") + (
          f"  c.search.warmup_epochs = {args.warmup_epochs}\n" if args.warmup_epochs >= 0 else "")
      f.write(CONFIG.format(name=args.config, overrides=overrides))
    modes = {m: run_mode(m, config_path, lambda_text, scratch, args.retrain) for m in args.modes.split(",")}
  seq = modes.get("seq")
  default = importlib.import_module(f"experiments.{args.config}").get_config().search
  result = dict(
      benchmark="sweep", lambdas=lambdas, config=f"experiments/{args.config}.py", retrain=args.retrain,
      epochs=args.epochs if args.epochs > 0 else default.epochs,
      warmup_epochs=args.warmup_epochs if args.warmup_epochs >= 0 else default.warmup_epochs,
      cpu_count=os.cpu_count(), load_avg_1m_at_end=os.getloadavg()[0],
      modes=modes,
      speedup_vs_sequential={m: round(seq["wall_s"] / r["wall_s"], 2) for m, r in modes.items() if seq and m != "seq"},
      note=("seq: members one after another; scan: --vectorize --chunk=1, members stepped in turn inside one "
            "compiled program; vmap: every member stepped at once (Gumbel's switch becomes select: all candidates "
            "run). Each mode has its own fresh JAX compilation cache."))
  results_file.write(out_path, result)


if __name__ == "__main__":
  main()
