"""Streamed image input (edgenas.streaming): decode + resize throughput, prefetch overlap, and peak memory.

On folders of generated JPEGs (2,000 by default, two classes; smooth random images, so file sizes are close to
photos'): images/s decoded and resized to 96x96x3 through `StreamSplit.take`, one epoch of 64-image batches, with
1 and 2 decode threads, for VWW-sized sources (96x96, as MLPerf Tiny's vw_coco2014_96) and camera-sized ones
(240x320, shrunk 2.5x); an epoch with a simulated train step (a sleep, as a step on an accelerator leaves the CPU
free) read directly and through `prefetch`; peak RSS of a subprocess that streams the train split against one that
holds it in memory as a `data.Split`; and, for a TFDS builder of the same JPEGs prepared as array_record, the time
to read the labels (cold and from the cache) and the decode rate. The load average is recorded: on a shared
machine other work competes for the cores.

  python -m benchmarks.streaming [--images 2000] [--repeats 3]

Prints JSON and writes benchmarks/results/streaming.json.
"""
import argparse
import functools
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import grain
import numpy as np
import PIL
from PIL import Image

from edgenas import data
from edgenas import rundir
from edgenas import streaming

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "streaming.json")
_BATCH = 64


def _jpeg(seed: int, shape: tuple[int, int]) -> bytes:
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (shape[0] // 8, shape[1] // 8, 3), dtype=np.uint8)
  pixels = np.asarray(Image.fromarray(small).resize((shape[1], shape[0]), Image.Resampling.BICUBIC), np.int16)
  pixels = np.clip(pixels + rng.integers(-12, 13, pixels.shape), 0, 255).astype(np.uint8)  # some texture
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
  return buffer.getvalue()


def _write_folder(root: str, count: int, shape: tuple[int, int]) -> float:
  """`count` JPEGs in root/{non_person,person}; returns their mean size in bytes."""
  sizes = []
  for i in range(count):
    cls = ("non_person", "person")[i % 2]
    os.makedirs(os.path.join(root, cls), exist_ok=True)
    encoded = _jpeg(i, shape)
    with open(os.path.join(root, cls, f"{i:05d}.jpg"), "wb") as f:
      f.write(encoded)
    sizes.append(len(encoded))
  return float(np.mean(sizes))


def _epoch_seconds(split, repeats: int) -> list[float]:
  stream = data.BatchStream.of(split, _BATCH, seed=0)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for step in range(stream.steps_per_epoch):
      stream.batch_at(step)
    times.append(time.perf_counter() - start)
  return times


def _throughput(root: str, threads: int, repeats: int) -> dict:
  split = streaming.load_folder(root, image_size=96, channels=3, num_threads=threads).train
  images = (len(split) // _BATCH) * _BATCH
  times = _epoch_seconds(split, repeats)
  return {"images": images, "best_images_per_s": round(images / min(times)),
          "median_images_per_s": round(images / float(np.median(times)))}


def _prefetch_overlap(root: str, threads: int) -> dict:
  split = streaming.load_folder(root, image_size=96, channels=3, num_threads=threads).train
  stream = data.BatchStream.of(split, _BATCH, seed=0)
  steps = stream.steps_per_epoch
  decode_s = min(_epoch_seconds(split, 2)) / steps
  step_s = decode_s  # a train step as long as decoding its batch: the case where overlap matters most
  start = time.perf_counter()
  for step in range(steps):
    stream.batch_at(step)
    time.sleep(step_s)
  direct = time.perf_counter() - start
  start = time.perf_counter()
  with streaming.prefetch(stream, 0, depth=2) as batches:
    for _ in range(steps):
      next(batches)
      time.sleep(step_s)
  prefetched = time.perf_counter() - start
  return {"steps": steps, "threads": threads, "decode_ms_per_batch": round(1e3 * decode_s, 1),
          "simulated_step_ms": round(1e3 * step_s, 1), "direct_s": round(direct, 3),
          "prefetched_s": round(prefetched, 3), "ideal_prefetched_s": round(steps * step_s, 3)}


def _child(mode: str, root: str) -> None:
  """Run in a subprocess: read the train split one way, print peak RSS in MB."""
  split = streaming.load_folder(root, image_size=96, channels=3).train
  if mode == "streamed":
    stream = data.BatchStream.of(split, _BATCH, seed=0)
    for step in range(stream.steps_per_epoch):
      stream.batch_at(step)
  elif mode == "in_memory":
    held = data.Split(*data.head(split, len(split)))
    stream = data.BatchStream.of(held, _BATCH, seed=0)
    for step in range(stream.steps_per_epoch):
      stream.batch_at(step)
  print(json.dumps({"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def _peak_rss(root: str) -> dict:
  out = {}
  for mode in ("listing_only", "streamed", "in_memory"):
    result = subprocess.run([sys.executable, "-m", "benchmarks.streaming", "--child", mode, "--dir", root],
                            check=True, capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out[mode] = json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mb"]
  split = streaming.load_folder(root, image_size=96, channels=3).train
  out["train_split_float32_mb"] = round(len(split) * 96 * 96 * 3 * 4 / 2**20, 1)
  return out


@functools.cache
def _builder_class(count: int, root: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # only to prepare the builder

  class EdgenasStreamBench(tfds.core.GeneratorBasedBuilder):
    """The VWW-like JPEGs of the folder as a TFDS builder (test: a tenth of them)."""
    VERSION = tfds.core.Version("1.0.0")
    # TFDS 4.9.10 looks a builder's code up with importlib_resources when its module is in a namespace package
    # (benchmarks/ is one) and that is not installed; a one-part module name makes it skip the look-up.
    __module__ = "edgenas_stream_bench"

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(96, 96, 3), encoding_format="jpeg"),
              "label": tfds.features.ClassLabel(names=["non_person", "person"])}),
          supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(range(count)), "test": self._generate_examples(range(count // 10))}

    def _generate_examples(self, ids):
      for i in ids:
        cls = ("non_person", "person")[i % 2]
        yield i, {"image": os.path.join(root, cls, f"{i:05d}.jpg"), "label": i % 2}

  return EdgenasStreamBench


def _tfds(root: str, count: int, work: str, repeats: int) -> dict:
  data_dir = os.path.join(work, "tfds")
  start = time.perf_counter()
  _builder_class(count, root)(data_dir=data_dir, file_format="array_record").download_and_prepare()
  prepare_s = time.perf_counter() - start
  os.environ["EDGENAS_CACHE_DIR"] = os.path.join(work, "cache")
  start = time.perf_counter()
  ds = streaming.load("tfds_stream:edgenas_stream_bench", data_dir=data_dir)
  cold = time.perf_counter() - start
  start = time.perf_counter()
  streaming.load("tfds_stream:edgenas_stream_bench", data_dir=data_dir)
  cached = time.perf_counter() - start
  records = ds.train.source.source  # the TFDS data source of the train split, images undecoded
  os.environ["EDGENAS_CACHE_DIR"] = os.path.join(work, "cache_again")
  start = time.perf_counter()
  streaming.read_labels(records, "label", os.path.join(data_dir, "edgenas_stream_bench", "1.0.0"), "train")
  labels_s = time.perf_counter() - start
  out = {"examples": count + count // 10, "prepare_s": round(prepare_s, 1), "load_s": round(cold, 3),
         "load_with_cached_labels_s": round(cached, 3), "train_label_read_s": round(labels_s, 3),
         "label_read_us_per_example": round(1e6 * labels_s / len(records), 1)}
  for threads in (1, 2):
    ds.train.num_threads = threads
    times = _epoch_seconds(ds.train, repeats)
    out[f"threads_{threads}_best_images_per_s"] = round((len(ds.train) // _BATCH) * _BATCH / min(times))
  return out


def _spin(_) -> int:
  total = 0
  for i in range(3_000_000):
    total += i
  return total


def _cores_free() -> float:
  """How many cores this process can really use now: the work of 2 processes over its time (2.0 = both free)."""
  import multiprocessing  # pylint: disable=g-import-not-at-top
  times = {}
  for procs in (1, 2):
    with multiprocessing.get_context("fork").Pool(procs) as pool:
      pool.map(_spin, range(procs))  # warm
      start = time.perf_counter()
      pool.map(_spin, range(procs))
      times[procs] = time.perf_counter() - start
  return round(2 * times[1] / times[2], 2)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--images", type=int, default=2000)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no-tfds", action="store_true", help="skip the TFDS array_record part (imports TF)")
  parser.add_argument("--child", choices=("listing_only", "streamed", "in_memory"), help=argparse.SUPPRESS)
  parser.add_argument("--dir", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    _child(args.child, args.dir)
    return
  load_before = [round(v, 2) for v in os.getloadavg()]
  out = {"benchmark": "edgenas.streaming: JPEG folders -> 96x96x3 float32 batches of 64",
         "python": platform.python_version(), "pillow": PIL.__version__, "grain": grain.__version__,
         "cpu_count": os.cpu_count(), "usable_cores": streaming.default_threads(), "repeats": args.repeats,
         "load_average_before": load_before, "cores_free_before": _cores_free()}
  with tempfile.TemporaryDirectory() as work:
    sources = {"vww_like_96x96": (96, 96), "camera_like_240x320": (240, 320)}
    out["folders"] = {}
    for name, shape in sources.items():
      root = os.path.join(work, name)
      mean_bytes = _write_folder(root, args.images, shape)
      result = {"source_images": args.images, "jpeg_mean_bytes": round(mean_bytes)}
      for threads in (1, 2):
        result[f"threads_{threads}"] = _throughput(root, threads, args.repeats)
      out["folders"][name] = result
      print(json.dumps({name: result}), file=sys.stderr, flush=True)
    vww_root = os.path.join(work, "vww_like_96x96")
    out["prefetch"] = _prefetch_overlap(os.path.join(work, "camera_like_240x320"), threads=2)
    out["peak_rss_mb"] = _peak_rss(vww_root)
    if not args.no_tfds:
      out["tfds_array_record_vww_like"] = _tfds(vww_root, args.images, work, args.repeats)
  out["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
  out["cores_free_after"] = _cores_free()
  # The load average lags; two processes' speed says whether both cores were free around the run.
  free = min(out["cores_free_before"], out["cores_free_after"])
  out["machine_state"] = "idle (both cores free before and after)" if free >= 1.8 else (
      f"loaded (as few as {free} of {os.cpu_count()} cores free; 1-min load {load_before[0]} before)")
  print(json.dumps(out, indent=2))
  rundir.atomic_write_json(RESULTS, out)


if __name__ == "__main__":
  main()
