"""The embedded keyword-spotting set (edgenas.kws): cost of making it, and whether it tells architectures apart.

  python -m benchmarks.kws_data [--epochs 12] [--skip_training]

Measures, on this machine:
  - generation cold: the default set made from nothing into a fresh temporary cache (2 workers), then read back
    warm from that cache;
  - throughput in one process: clips synthesised and rendered per second (espeak-ng, backgrounds, room,
    microphone), and MFCC clips per second (edgenas.audio.features);
  - peak RSS of this process and of its worker processes (resource.getrusage);
  - class counts of train / val / test (val_fraction 0.1, seed 0);
  - discrimination: DS-CNN (`baselines.dscnn`, whatever stem it has) and a network with at least 10x fewer MACs
    (the DS-CNN pattern at 16 channels and three blocks), each retrained from scratch with the project's
    retraining (`edgenas.train.run_retrain`: experiments/digits.py's retrain block with max_shift 0 and no QAT,
    as experiments/kws.py retrains) and scored on the test split. The set is tuned for DS-CNN at 85-95% and the
    small network at least 5 points below.
Prints JSON and writes benchmarks/results/kws_data.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

from edgenas import rundir  # json and os only: measuring the generation is not disturbed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results", "kws_data.json")
TARGET_DSCNN = (0.85, 0.95)
MIN_GAP = 0.05
MIN_MAC_RATIO = 10.0


def small_network():
  """DS-CNN's pattern (10x4 stem with stride 2, depthwise-separable blocks) at a quarter of its width, 3 blocks."""
  from edgenas import architecture as arch_lib  # pylint: disable=g-import-not-at-top
  from edgenas import audio  # pylint: disable=g-import-not-at-top
  c = 16
  return arch_lib.Architecture(audio.INPUT_SHAPE, len(audio.LABELS), arch_lib.Stem(c, (10, 4), 2),
                               tuple(arch_lib.Layer(arch_lib.MBCONV, c, c, 1, 3, 1, c) for _ in range(3)), 0,
                               "dscnn_16x3")


def retrain_config(cache_parent: str, epochs: int):
  from experiments import digits  # pylint: disable=g-import-not-at-top
  c = digits.get_config()
  c.name = "kws_data"
  c.dataset = "kws"
  c.data_dir = cache_parent
  c.val_fraction = 0.1
  c.retrain.epochs = epochs
  c.retrain.max_shift = 0  # pixel shifts make no sense on MFCCs; the clips are time-shifted when made
  c.retrain.flip = False
  c.retrain.qat_epochs = 0  # float accuracy is what the data decides; QAT only costs time here
  c.log_every = 500
  c.checkpoint_every = 100_000
  return c


def _rss_mb() -> dict:
  return dict(self=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              workers=round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1))


def measure_generation(cache_parent: str) -> dict:
  from edgenas import kws  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  kws.load_arrays(kws.DEFAULT_PARAMS, cache_parent)
  cold = time.time() - t0
  t0 = time.time()
  dataset = kws.load_embedded(cache_parent, val_fraction=0.1, seed=0)
  warm = time.time() - t0
  with open(os.path.join(kws.dataset_dir(kws.DEFAULT_PARAMS, cache_parent), kws.MANIFEST)) as f:
    manifest = json.load(f)
  counts = {name: dict(zip(_labels(), np.bincount(split.labels, minlength=12).tolist()), total=len(split))
            for name, split in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test))}
  return dict(clips=kws.DEFAULT_PARAMS.num_clips, params_hash=kws.DEFAULT_PARAMS.hash(), cold_s=round(cold, 1),
              warm_load_s=round(warm, 2), workers=manifest["workers"], espeak=manifest["espeak"]["version"],
              cache_mb=round(sum(os.path.getsize(os.path.join(kws.dataset_dir(kws.DEFAULT_PARAMS, cache_parent), f))
                                 for f in os.listdir(kws.dataset_dir(kws.DEFAULT_PARAMS, cache_parent))) / 2**20, 1),
              counts=counts)


def _labels():
  from edgenas import audio  # pylint: disable=g-import-not-at-top
  return audio.LABELS


def measure_throughput(num: int = 960) -> dict:
  from edgenas import audio, kws  # pylint: disable=g-import-not-at-top
  params = kws.DEFAULT_PARAMS
  kws.babble_bank(params)  # made once per process; not part of the per-clip rate
  start = params.num_test  # training-pool clips
  t0 = time.time()
  waves = np.concatenate([kws.make_clips(params, a, min(a + kws.CHUNK_CLIPS, start + num))["waveforms"]
                          for a in range(start, start + num, kws.CHUNK_CLIPS)])
  synth_s = time.time() - t0
  t0 = time.time()
  audio.features(waves)
  mfcc_s = time.time() - t0
  return dict(clips=num, synth_render_clips_per_s=round(num / synth_s, 1), mfcc_clips_per_s=round(num / mfcc_s, 1))


def measure_discrimination(cache_parent: str, epochs: int) -> dict:
  from edgenas import audio, baselines, train  # pylint: disable=g-import-not-at-top
  config = retrain_config(cache_parent, epochs)
  dscnn = baselines.dscnn(audio.INPUT_SHAPE, len(audio.LABELS))
  rows = {}
  for arch in (dscnn, small_network()):
    workdir = tempfile.mkdtemp(prefix=f"edgenas-kws-{arch.name}-")
    t0 = time.time()
    report = train.run_retrain(config, arch, workdir)
    rows[arch.name] = dict(macs=arch.macs(), params=arch.params(), stem=dict(kernel=arch.stem.kernel,
                           stride=arch.stem.stride, channels=arch.stem.channels),
                           test_acc=round(report["test_acc_float"], 4), seconds=round(time.time() - t0, 1))
    shutil.rmtree(workdir, ignore_errors=True)
  big, small = rows[dscnn.name], rows["dscnn_16x3"]
  ratio, gap = big["macs"] / small["macs"], big["test_acc"] - small["test_acc"]
  ok = TARGET_DSCNN[0] <= big["test_acc"] <= TARGET_DSCNN[1] and ratio >= MIN_MAC_RATIO and gap >= MIN_GAP
  return dict(epochs=epochs, retrain=dict(optimizer=config.retrain.optimizer, lr=config.retrain.lr,
                                          batch_size=config.retrain.batch_size, qat_epochs=0, max_shift=0),
              networks=rows, mac_ratio=round(ratio, 1), accuracy_gap=round(gap, 4),
              target=dict(dscnn_test_acc=list(TARGET_DSCNN), min_gap=MIN_GAP, min_mac_ratio=MIN_MAC_RATIO),
              meets_target=bool(ok))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--epochs", type=int, default=12)
  parser.add_argument("--skip_training", action="store_true")
  args = parser.parse_args()
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  cache_parent = tempfile.mkdtemp(prefix="edgenas-kws-cache-")
  try:
    out = dict(benchmark="kws_data", cpu_count=os.cpu_count(), machine=platform.machine(),
               load_average_before=[round(v, 2) for v in os.getloadavg()])
    out["generation"] = measure_generation(cache_parent)
    out["peak_rss_mb_after_generation"] = _rss_mb()
    out["throughput_one_process"] = measure_throughput()
    if not args.skip_training:
      out["discrimination"] = measure_discrimination(cache_parent, args.epochs)
    out["peak_rss_mb"] = _rss_mb()
    out["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
  finally:
    shutil.rmtree(cache_parent, ignore_errors=True)
  print(json.dumps(out, indent=2))
  rundir.atomic_write_json(RESULTS, out)


if __name__ == "__main__":
  main()
