"""Accuracy vs predicted energy of searched networks against hand-designed baselines (issue 4's targets).

  python -m benchmarks.tradeoff [--lams=0.3,1,3] [--workdir=DIR] [--config=experiments/digits.py]

For each energy-penalty weight λ: a search (`config.cost.lam = λ`, additive penalty on the platform's energy
model), then a retrain from scratch of the derived network; then the config's baselines retrained with the very
same `config.retrain` budget. Prints JSON and writes benchmarks/results/tradeoff.json: float and fake-quant int8
test accuracy, energy µJ, latency ms, peak SRAM and flash for every network, the energy ratio to MobileNetV2-1.0,
wall times, and how each searched network stands against the targets (reported, never asserted):
  - the retrained searched network reaches >= 97% test accuracy;
  - its fake-quant int8 accuracy is within 0.5 points of float;
  - its energy is <= 25% of MobileNetV2-1.0's with accuracy within 1.5 points of it.
Every λ tried is reported. Workdirs are reused: a finished search or retrain is not run again.
"""
import json
import os
import time

from absl import app, flags
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/digits.py", "Experiment config file.")
_LAMS = flags.DEFINE_list("lams", ["0.3", "1", "3"], "Energy-penalty weights λ to search with.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/edgenas_tradeoff", "Where the runs go (reused when rerun).")
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results", "tradeoff.json"),
                           "JSON result file.")

REFERENCE = "mobilenetv2_1.0"
TARGET_ACC, TARGET_QUANT_GAP, TARGET_ACC_GAP, TARGET_ENERGY_RATIO = 0.97, 0.005, 0.015, 0.25


def network_row(report: dict, platform: str, seconds: float) -> dict:
  costs = report["platforms"][platform]
  return dict(arch_hash=report["arch_hash"], layers=report["arch"]["layers"], macs=report["macs"],
              params=report["params"], test_acc_float=report["test_acc_float"],
              test_acc_fake_quant=report["test_acc_fake_quant"], energy_uj=costs["energy_uj"],
              latency_ms=costs["latency_ms"], peak_sram_bytes=costs["peak_sram_bytes"],
              flash_bytes=costs["flash_bytes"], retrain_seconds=report["seconds"]["train"], wall_seconds=seconds)


def run(config, lams, workdir: str) -> dict:
  from edgenas import architecture as arch_lib
  from edgenas import baselines, search, train
  from edgenas import data as data_lib
  platform = config.cost.platform
  dataset = data_lib.load_data(config)
  rows = {}
  for name in config.baselines:
    t = time.time()
    arch = baselines.baseline_architecture(name, dataset.input_shape, dataset.num_classes)
    rows[name] = network_row(train.run_retrain(config, arch, os.path.join(workdir, name), [platform]), platform,
                             time.time() - t)
  searched = {}
  for lam in lams:
    c = config.copy_and_resolve_references()
    c.cost.lam = float(lam)
    c.cost.penalty = "additive"
    t = time.time()
    result = search.run_search(c, os.path.join(workdir, f"search_lam{lam}"))
    search_seconds = time.time() - t
    arch = arch_lib.Architecture.load(os.path.join(workdir, f"search_lam{lam}", search.ARCH_FILE))
    t = time.time()
    row = network_row(train.run_retrain(c, arch, os.path.join(workdir, f"retrain_lam{lam}"), [platform]), platform,
                      time.time() - t)
    row.update(lam=float(lam), search_seconds=search_seconds, search_seconds_recorded=result["seconds"]["total"],
               val_acc_supernet=result["val_acc_supernet"])
    searched[f"searched_lam{lam}"] = row
  ref = rows.get(REFERENCE)
  for row in list(rows.values()) + list(searched.values()):
    if ref:
      row["energy_ratio_vs_mbv2_1.0"] = row["energy_uj"] / ref["energy_uj"]
      row["acc_gap_vs_mbv2_1.0_points"] = 100 * (ref["test_acc_float"] - row["test_acc_float"])
  for row in searched.values():
    row["targets"] = {
        "acc_at_least_97pct": row["test_acc_float"] >= TARGET_ACC,
        "fake_quant_within_0.5pt": abs(row["test_acc_float"] - row["test_acc_fake_quant"]) <= TARGET_QUANT_GAP,
        "energy_at_most_25pct_of_mbv2_within_1.5pt": bool(ref)
        and row["energy_ratio_vs_mbv2_1.0"] <= TARGET_ENERGY_RATIO
        and ref["test_acc_float"] - row["test_acc_float"] <= TARGET_ACC_GAP}
  # The λ the issue asks about: the cheapest searched network within 1.5 points of MobileNetV2-1.0.
  eligible = [k for k, r in searched.items() if ref and ref["test_acc_float"] - r["test_acc_float"] <= TARGET_ACC_GAP]
  chosen = min(eligible, key=lambda k: searched[k]["energy_uj"]) if eligible else None
  return dict(dataset=config.dataset, platform=platform, retrain_budget=config.retrain.to_dict(),
              search_epochs=config.search.epochs, baselines=rows, searched=searched, chosen=chosen,
              note="accuracies on the dataset's test split; energies, latencies, SRAM and flash are the platform "
                   "energy model's predictions for the int8 network")


def main(argv):
  del argv
  common.enable_compilation_cache()
  t = time.time()
  result = common.run_or_exit(run, _CONFIG.value, _LAMS.value, _WORKDIR.value)
  result["wall_seconds_total_this_invocation"] = time.time() - t
  text = json.dumps(result, indent=2, sort_keys=True, default=str)
  print(text)
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w") as f:
    f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
