"""Image datasets read from disk a batch at a time: nothing but the labels is held in memory.

Why grain's random-access model: the loops address every batch by its step (`data.BatchStream.batch_at(step)` ->
rows -> `split.take(rows)`), so a run resumed at step s must be able to read exactly the rows an uninterrupted run
reads at step s, without replaying the steps before it (the project's determinism rule). A random-access source
(`grain.MapDataset` over a file list, or over TFDS's `tfds.data_source` on array_record files) answers "example i"
directly; tf.data's sequential iterators can only get there by reading everything before it.

A `StreamSplit` answers the `data.Split` questions (`len`, `.labels`, `.take(rows)`), so `BatchStream.of`,
`data.head`, `data.chunks`, `data.concat`, the loops, evaluation and export use it unchanged. `take` reads the
encoded images of the rows, decodes them with Pillow (PNG, JPEG, BMP, GIF, WebP, TIFF, PPM), converts them to the
configured channel count (grey is replicated to RGB; RGB becomes grey by ITU-R 601 luma; alpha is dropped;
palette images are expanded), resizes them to the configured (H, W) with Pillow's bilinear filter (a triangle filter
widened by the scale factor, so antialiased when shrinking, like `jax.image.resize(..., "linear")` of the in-memory
path; JPEGs at least twice the target size are first decoded at 1/2, 1/4 or 1/8 scale by libjpeg) and returns
float32 in [0, 1]. Decoding runs on grain's thread pool (`ReadOptions.num_threads`, default: the usable cores up
to 8): Pillow releases the GIL while it decodes and resizes, so a second core helps when it is free (on a machine
whose cores are busy with other work it cannot; benchmarks/streaming.py records which). 16- and 32-bit images are
refused.
`prefetch(stream, start_step, depth)` decodes the next steps' batches on a background thread while the current
step trains, and yields exactly what `stream.batch_at(step)` returns.

Sources (`load(name, ...)`, the names `data.load_dataset` hands over):
  - `folder:<dir>`: one sub-directory of images per class, class index = position in the sorted sub-directory
    names; files with other extensions and hidden entries are ignored. With top-level `train/` (and optionally
    `val/` or `validation/`, `test/`) sub-directories, each holding the class sub-directories, those are the splits;
    a missing one is carved from train. Carving follows `data`'s digits rule, stratified by class: 15% test with a
    fixed seed (the same test images for every run), then `val_fraction` of the rest as validation with `seed`.
    `image_size` and `channels` default to the first training image's size and (grey or RGB) channel count.
  - `vww`: Visual Wake Words as MLPerf Tiny prepares it, a folder `vw_coco2014_96/` with `non_person/` and
    `person/` (96x96 RGB JPEGs; so classes 0 = non_person, 1 = person, as Keras' `flow_from_directory` orders
    them) inside `data_dir`; read as `folder:` above at 96x96x3 unless configured otherwise, with flips on.
  - `tfds_stream:<builder>`: a TFDS image builder prepared in array_record format
    (`tfds build <builder> --file_format=array_record --data_dir=<dir>`), read through TFDS's random-access data
    source (`builder.as_data_source`, what `tfds.data_source` returns) with the image feature left encoded; nothing
    is downloaded. Splits as `tfds:<builder>` makes them (val carved from `train` by a permutation seeded by `seed`,
    test = `test` or else `validation`), in the same row order, so the two give the same batches. Labels are read
    once with the images left undecoded (about 50 us an example on 2 CPU cores, benchmarks/streaming.py: 2-3 s for
    CIFAR-10's 50,000) and cached in `$EDGENAS_CACHE_DIR` (default `~/.cache/edgenas`) under `tfds_labels/`,
    keyed by the builder directory and the size and time of its files. Reading imports no TensorFlow (TFDS needs
    it only to prepare).
Augmentation stays `data.augment`: streamed batches are numpy arrays like in-memory ones.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import os
import queue
import threading
from typing import Any, Callable, Sequence

import grain
import numpy as np
from PIL import Image

from edgenas import data

FOLDER_PREFIX, TFDS_STREAM_PREFIX, VWW = data.FOLDER_PREFIX, data.TFDS_STREAM_PREFIX, data.VWW
is_streamed = data.is_streamed
VWW_DIR = "vw_coco2014_96"
VWW_CLASSES = ("non_person", "person")
VWW_SIZE = (96, 96)
VWW_URL = "https://www.silabs.com/public/files/github/machine_learning/benchmarks/datasets/vw_coco2014_96.tar.gz"
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
SPLIT_DIRS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
TEST_FRACTION = data.DIGITS_TEST_FRACTION
TEST_SEED = data.DIGITS_TEST_SEED
_MAX_THREADS = 8
_CHUNKS_PER_THREAD = 4  # grain work items per thread and batch: amortises grain's per-item cost, still balances
_GREY_MODES = frozenset({"1", "L", "LA", "La"})


def load(name: str, data_dir: str | None = None, val_fraction: float = 0.1, seed: int = 0,
         image_size: tuple[int, int] | int | None = None, channels: int | None = None,
         flip_invariant: bool | None = None, num_threads: int | None = None) -> data.Dataset:
  """The streamed dataset `name` (`vww`, `folder:<dir>`, `tfds_stream:<builder>`; see the module docstring).

  A relative `folder:` directory is taken inside `data_dir` when one is given. `channels` (1 or 3) and
  `image_size` ((H, W) or an int) default per source; `flip_invariant` None keeps the source's default.
  """
  if name == VWW:
    return load_vww(data_dir, image_size=image_size or VWW_SIZE, channels=channels or 3,
                    val_fraction=val_fraction, seed=seed, num_threads=num_threads)
  if name.startswith(FOLDER_PREFIX) and len(name) > len(FOLDER_PREFIX):
    path = name[len(FOLDER_PREFIX):]
    if data_dir and not os.path.isabs(path):
      path = os.path.join(data_dir, path)
    return load_folder(path, image_size=image_size, channels=channels, val_fraction=val_fraction, seed=seed,
                       flip_invariant=bool(flip_invariant), num_threads=num_threads, name=name)
  if name.startswith(TFDS_STREAM_PREFIX) and len(name) > len(TFDS_STREAM_PREFIX):
    return load_tfds_stream(name[len(TFDS_STREAM_PREFIX):], data_dir, image_size=image_size, channels=channels,
                            val_fraction=val_fraction, seed=seed, flip_invariant=flip_invariant,
                            num_threads=num_threads)
  raise data.DataError(f"unknown streamed dataset '{name}': use '{VWW}', '{FOLDER_PREFIX}<dir>' or "
                       f"'{TFDS_STREAM_PREFIX}<builder>'")


# --------------------------------------------------------------------------------------------------------------
# Decoding


@dataclasses.dataclass(frozen=True)
class ImageFormat:
  """What every decoded image becomes."""
  height: int
  width: int
  channels: int  # 1 (grey) or 3 (RGB)

  @property
  def shape(self) -> tuple[int, int, int]:
    return self.height, self.width, self.channels


def decode_image(encoded: bytes, fmt: ImageFormat, name: str) -> np.ndarray:
  """One encoded image as uint8 [H, W, C] in `fmt`; `name` (a file, an example) is what an error names."""
  mode = "L" if fmt.channels == 1 else "RGB"
  try:
    with Image.open(io.BytesIO(encoded)) as image:
      if image.mode.startswith(("I", "F")):
        raise data.DataError(f"image {name} is {image.mode} (16/32-bit); only 8-bit images are supported")
      # JPEG only: a reduced DCT scale that still covers the size. The colour space stays (no mode), so grey is
      # always Pillow's luma of the decoded RGB, for JPEGs as for every other format.
      image.draft(None, (fmt.width, fmt.height))
      if image.mode == "P":
        image = image.convert("RGBA")  # palette (and its transparency) to plain colours first
      image = image.convert(mode)
      if image.size != (fmt.width, fmt.height):
        image = image.resize((fmt.width, fmt.height), Image.Resampling.BILINEAR)
      pixels = np.asarray(image, np.uint8)
  except data.DataError:
    raise
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise data.DataError(f"cannot decode image {name}: {e}") from None
  return pixels[..., None] if fmt.channels == 1 else pixels


class FileSource:
  """Random access to the encoded bytes of image files (the grain source of a folder)."""

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> bytes:
    try:
      with open(self.paths[index], "rb") as f:
        return f.read()
    except OSError as e:
      raise data.DataError(f"cannot read image {self.paths[index]}: {e.strerror or e}") from None

  def describe(self, index: int) -> str:
    return self.paths[index]


class TfdsImageSource:
  """Random access to the encoded image of each example of a TFDS array_record split (image left undecoded)."""

  def __init__(self, source, image_key: str, where: str):
    self.source, self.image_key, self.where = source, image_key, where

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> bytes:
    return self.source[int(index)][self.image_key]

  def describe(self, index: int) -> str:
    return f"{self.where} example {index}"


def default_threads() -> int:
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    cores = os.cpu_count() or 1
  return max(1, min(_MAX_THREADS, cores))


class StreamSplit:
  """A split whose images stay on disk: `source[indices[row]]` is the encoded image of `row`, decoded by `take`.

  Only `labels` (int32 [N]) and `indices` are in memory. `take` is thread-safe and deterministic: the same rows
  give the same arrays whatever the thread count.
  """

  def __init__(self, source, indices: np.ndarray, labels: np.ndarray, fmt: ImageFormat,
               num_threads: int | None = None, classes: Sequence[str] = ()):
    self.source, self.fmt, self.classes = source, fmt, tuple(classes)
    self.indices = np.asarray(indices, np.int64)
    self.labels = np.asarray(labels, np.int32)
    if self.indices.shape != self.labels.shape:
      raise data.DataError(f"indices and labels differ in shape: {self.indices.shape} vs {self.labels.shape}")
    self.num_threads = default_threads() if num_threads is None else int(num_threads)

  def __len__(self) -> int:
    return len(self.labels)

  def __repr__(self) -> str:
    return f"StreamSplit({len(self)} images as {self.fmt.shape}, {self.num_threads} threads)"

  @property
  def input_shape(self) -> tuple[int, int, int]:
    return self.fmt.shape

  def take(self, rows) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(rows, slice):
      rows = np.arange(len(self))[rows]
    rows = np.asarray(rows, np.int64).reshape(-1)
    labels = self.labels[rows]  # also the bounds check
    images = self._decode(self.indices[rows]).astype(np.float32)
    images /= 255.0  # in place: one float32 copy of the batch, not two
    return images, labels

  def _decode(self, indices: np.ndarray) -> np.ndarray:
    """uint8 [n, H, W, C]: grain work items of a few images each, every item writing its own rows."""
    pixels = np.empty((len(indices), *self.fmt.shape), np.uint8)
    if not len(indices):
      return pixels

    def decode_part(part: np.ndarray) -> int:
      for row in part:
        pixels[row] = decode_image(self.source[indices[row]], self.fmt, self.source.describe(indices[row]))
      return len(part)  # not None: grain drops None items and warns when most are

    parts = np.array_split(np.arange(len(indices)), min(len(indices), max(1, self.num_threads) * _CHUNKS_PER_THREAD))
    dataset = grain.MapDataset.source(parts).map(decode_part)
    if self.num_threads <= 1:
      for i in range(len(dataset)):
        dataset[i]  # pylint: disable=pointless-statement  # decodes the part into `pixels`
      return pixels
    iterator = iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=self.num_threads,
                                                              prefetch_buffer_size=len(parts))))
    try:
      for _ in iterator:
        pass
    finally:
      iterator.close()
    return pixels


# --------------------------------------------------------------------------------------------------------------
# Prefetch


class Prefetcher:
  """Iterates `stream.batch_at(step)` (then `transform(step, batch)` if given) for step = start_step, +1, ...,
  computed by one background thread at most `depth` steps ahead of the consumer.

  The thread reads a shallow copy of the stream, so the caller may keep using the stream itself. An error at a
  step is raised by the `next` that would have returned that step. `close()` (or leaving a `with` block) stops it.
  """

  def __init__(self, stream, start_step: int = 0, depth: int = 1,
               transform: Callable[[int, Any], Any] | None = None):
    if depth < 1:
      raise data.DataError(f"prefetch depth must be >= 1, got {depth}")
    stream.position(start_step)  # a bad step fails here, not in the thread
    self.next_step = start_step
    self._ready: queue.Queue = queue.Queue()
    self._slots = threading.Semaphore(depth)
    self._stop = threading.Event()
    # The thread holds no reference to self, so an abandoned Prefetcher is collected and closes its thread.
    self._thread = threading.Thread(target=_prefetch_worker, name="edgenas-prefetch", daemon=True,
                                    args=(copy.copy(stream), start_step, transform, self._ready, self._slots,
                                          self._stop))
    self._thread.start()

  def __iter__(self) -> "Prefetcher":
    return self

  def __next__(self):
    while True:
      if self._stop.is_set():
        raise StopIteration
      try:
        ok, value = self._ready.get(timeout=1.0)
        break
      except queue.Empty:
        if not self._thread.is_alive() and self._ready.empty():
          raise RuntimeError("the prefetch thread stopped without a result") from None
    self._slots.release()
    if not ok:
      self.close()
      raise value
    self.next_step += 1
    return value

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=30)

  def __enter__(self) -> "Prefetcher":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    stop = getattr(self, "_stop", None)  # absent when __init__ failed
    if stop is not None:
      stop.set()


def _prefetch_worker(stream, step, transform, ready, slots, stop) -> None:
  while not stop.is_set():
    if not slots.acquire(timeout=0.1):
      continue
    try:
      batch = stream.batch_at(step)
      ready.put((True, batch if transform is None else transform(step, batch)))
    except Exception as e:  # pylint: disable=broad-except  # handed to the consumer at the step that failed
      ready.put((False, e))
      return
    step += 1


def prefetch(stream, start_step: int = 0, depth: int = 1,
             transform: Callable[[int, Any], Any] | None = None) -> Prefetcher:
  """`stream.batch_at(start_step)`, `stream.batch_at(start_step + 1)`, ... decoded ahead on a background thread,
  so reading the next batch overlaps the current train step (see `Prefetcher`)."""
  return Prefetcher(stream, start_step, depth, transform)


# --------------------------------------------------------------------------------------------------------------
# Image folders


def _channels(name: str, channels) -> int | None:
  if channels is None or channels == 0:
    return None
  if channels not in (1, 3):
    raise data.DataError(f"dataset '{name}': channels must be 1 (grey) or 3 (RGB), got {channels!r}")
  return int(channels)


def _visible_dirs(path: str) -> list[str]:
  return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _images_under(path: str) -> list[str]:
  found = []
  for root, dirs, files in os.walk(path):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    found.extend(os.path.join(root, f) for f in sorted(files)
                 if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
  return found


def _read_classes(name: str, path: str, classes: Sequence[str] | None) -> tuple[list[str], np.ndarray, list[str]]:
  """(paths, labels, class names) of `path`/<class>/...; with `classes` given, the sub-directories must be those."""
  found = _visible_dirs(path)
  if not found:
    raise data.DataError(f"dataset '{name}': {path} has no class sub-directories (expected one directory of images "
                         f"per class, e.g. {os.path.join(path, 'cat', '0001.png')})")
  if classes is None:
    classes = found
  else:
    unknown = sorted(set(found) - set(classes))
    if unknown:
      raise data.DataError(f"dataset '{name}': {path} has class directories {unknown} that are not among the "
                           f"classes {list(classes)}")
  paths, labels = [], []
  for index, cls in enumerate(classes):
    images = _images_under(os.path.join(path, cls)) if cls in found else []
    paths.extend(images)
    labels.extend([index] * len(images))
  return paths, np.asarray(labels, np.int32), list(classes)


def _carve(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(kept, carved) positions, sorted: `fraction` of each class carved by a permutation seeded by `seed`."""
  rng = np.random.default_rng(seed)
  carved = [np.zeros(0, np.int64)]
  for cls in np.unique(labels):
    members = np.flatnonzero(labels == cls)
    carved.append(rng.permutation(members)[:int(np.floor(fraction * len(members) + 0.5))])
  carved = np.sort(np.concatenate(carved))
  return np.setdiff1d(np.arange(len(labels)), carved), carved


def _peek(name: str, path: str) -> tuple[tuple[int, int], int]:
  """((H, W), grey-or-RGB channel count) of one image file, from its header only."""
  try:
    with Image.open(path) as image:
      return (image.height, image.width), (1 if image.mode in _GREY_MODES or image.mode.startswith(("I", "F"))
                                           else 3)
  except (OSError, ValueError, SyntaxError) as e:
    raise data.DataError(f"dataset '{name}': cannot read image {path}: {e}") from None


def load_folder(path: str, image_size: tuple[int, int] | int | None = None, channels: int | None = None,
                val_fraction: float = 0.1, seed: int = 0, flip_invariant: bool = False,
                num_threads: int | None = None, name: str | None = None,
                classes: Sequence[str] | None = None) -> data.Dataset:
  """An image folder as a `data.Dataset` of `StreamSplit`s (layout and splits: the module docstring).

  `classes` fixes the class names and their order (the sub-directories must be among them).
  """
  name = name or FOLDER_PREFIX + path
  data.check_val_fraction(name, val_fraction)
  size, channels = data.parse_image_size(name, image_size), _channels(name, channels)
  if not os.path.isdir(path):
    raise data.DataError(f"dataset '{name}': directory {path} does not exist")
  top = _visible_dirs(path)
  split_layout = "train" in top and all(d in SPLIT_DIRS for d in top)
  given = {}
  if split_layout:
    given["train"] = _read_classes(name, os.path.join(path, "train"), classes)
    classes = given["train"][2]
    for d in top:
      if d != "train":
        if SPLIT_DIRS[d] in given:
          raise data.DataError(f"dataset '{name}': both val/ and validation/ in {path}; keep one")
        given[SPLIT_DIRS[d]] = _read_classes(name, os.path.join(path, d), classes)
  else:
    given["train"] = _read_classes(name, path, classes)
    classes = given["train"][2]
  train_root = os.path.join(path, "train") if split_layout else path
  empty = [c for i, c in enumerate(classes) if not np.any(given["train"][1] == i)]
  if empty:
    raise data.DataError(f"dataset '{name}': class directories {empty} in {train_root} hold no images "
                         f"(extensions {sorted(IMAGE_EXTENSIONS)})")

  # One source for every split; each split is a set of positions in it.
  paths, labels, offset, positions = [], [], 0, {}
  for split in ("train", "val", "test"):
    if split in given:
      split_paths, split_labels, _ = given[split]
      paths.extend(split_paths)
      labels.append(split_labels)
      positions[split] = np.arange(offset, offset + len(split_paths))
      offset += len(split_paths)
  labels = np.concatenate(labels)
  if "test" not in positions:
    kept, carved = _carve(labels[positions["train"]], TEST_FRACTION, TEST_SEED)
    positions["test"], positions["train"] = positions["train"][carved], positions["train"][kept]
  if "val" not in positions:
    kept, carved = _carve(labels[positions["train"]], val_fraction, seed)
    positions["val"], positions["train"] = positions["train"][carved], positions["train"][kept]
  for split in ("train", "val", "test"):
    if not len(positions[split]):
      raise data.DataError(f"dataset '{name}': the {split} split is empty ({len(labels)} images in {path}); add "
                           f"images{' or raise val_fraction' if split == 'val' else ''}")

  first_size, first_channels = _peek(name, paths[positions["train"][0]])
  fmt = ImageFormat(*(size or first_size), channels or first_channels)
  source = FileSource(paths)
  splits = {split: StreamSplit(source, rows, labels[rows], fmt, num_threads, classes)
            for split, rows in positions.items()}
  return data.Dataset(name=name, train=splits["train"], val=splits["val"], test=splits["test"],
                      input_shape=fmt.shape, num_classes=len(classes), flip_invariant=flip_invariant)


def vww_not_prepared_message(data_dir: str | None) -> str:
  return (f"dataset '{VWW}' needs data_dir holding {VWW_DIR}/ with {VWW_CLASSES[0]}/ and {VWW_CLASSES[1]}/ "
          f"(Visual Wake Words as MLPerf Tiny prepares it); not found in {data_dir or '(no data_dir given)'}. "
          f"Prepare it on a machine with internet: download {VWW_URL} (235 MB), "
          f"`tar -xzf vw_coco2014_96.tar.gz -C <dir>`, copy <dir> here and pass it as data_dir.")


def load_vww(data_dir: str | None, image_size: tuple[int, int] | int | None = VWW_SIZE, channels: int = 3,
             val_fraction: float = 0.1, seed: int = 0, num_threads: int | None = None) -> data.Dataset:
  """Visual Wake Words from `data_dir`/vw_coco2014_96 (or `data_dir` itself when it holds the two classes)."""
  for root in ([os.path.join(data_dir, VWW_DIR), data_dir] if data_dir else []):
    if all(os.path.isdir(os.path.join(root, c)) for c in VWW_CLASSES):
      return load_folder(root, image_size=image_size, channels=channels, val_fraction=val_fraction, seed=seed,
                         flip_invariant=True, num_threads=num_threads, name=VWW, classes=VWW_CLASSES)
  raise data.DataError(vww_not_prepared_message(data_dir))


# --------------------------------------------------------------------------------------------------------------
# TFDS array_record builders


def cache_dir() -> str:
  """Where derived, re-computable files (label caches) go: $EDGENAS_CACHE_DIR or ~/.cache/edgenas."""
  return os.environ.get("EDGENAS_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "edgenas")


def _labels_cache_path(builder_dir: str, split: str, label_key: str) -> str:
  builder_dir = os.path.realpath(builder_dir)
  stats = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(builder_dir) if e.is_file())
  key = json.dumps([builder_dir, split, label_key, stats])
  return os.path.join(cache_dir(), "tfds_labels", hashlib.sha256(key.encode()).hexdigest()[:32] + ".npy")


def read_labels(source, label_key: str, builder_dir: str, split: str, chunk: int = 4096) -> np.ndarray:
  """All labels of a TFDS data source (images undecoded), cached next to nothing the user owns."""
  path = _labels_cache_path(builder_dir, split, label_key)
  try:
    cached = np.load(path)
    if cached.shape == (len(source),):
      return cached.astype(np.int32)
  except (OSError, ValueError):
    pass
  labels = np.empty(len(source), np.int32)
  for start in range(0, len(source), chunk):
    keys = list(range(start, min(start + chunk, len(source))))
    labels[start:start + len(keys)] = [int(r[label_key]) for r in source.__getitems__(keys)]
  try:  # best effort: without a writable cache the labels are read again next time
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
      np.save(f, labels)
    os.replace(tmp, path)
  except OSError:
    pass
  return labels


def tfds_stream_not_prepared_message(builder_name: str, data_dir: str | None) -> str:
  where = data_dir or "~/tensorflow_datasets (TFDS's default; pass data_dir to use another)"
  return (f"dataset '{TFDS_STREAM_PREFIX}{builder_name}' is not prepared in data_dir {where}, and edgenas never "
          f"downloads at run time. Prepare it on a machine with internet: `tfds build {builder_name} "
          f"--file_format=array_record --data_dir=<dir>`, then copy <dir> here and pass it as data_dir.")


def load_tfds_stream(builder_name: str, data_dir: str | None = None,
                     image_size: tuple[int, int] | int | None = None, channels: int | None = None,
                     val_fraction: float = 0.1, seed: int = 0, flip_invariant: bool | None = None,
                     num_threads: int | None = None) -> data.Dataset:
  """A TFDS image builder prepared as array_record, as a `data.Dataset` of `StreamSplit`s."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # reading needs no TensorFlow
  name = TFDS_STREAM_PREFIX + builder_name
  data.check_val_fraction(name, val_fraction)
  size, channels = data.parse_image_size(name, image_size), _channels(name, channels)
  if data_dir is not None and not os.path.isdir(data_dir):
    raise data.DataError(f"data_dir {data_dir} does not exist. "
                         + tfds_stream_not_prepared_message(builder_name, data_dir))
  try:
    builder = tfds.builder(builder_name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise data.DataError(tfds_stream_not_prepared_message(builder_name, data_dir)) from None
  if not builder.is_prepared():
    raise data.DataError(tfds_stream_not_prepared_message(builder_name, data_dir))
  formats = {getattr(f, "value", str(f)) for f in builder.info.available_file_formats()}
  if "array_record" not in formats:
    raise data.DataError(
        f"dataset '{name}' in {builder.data_dir} is prepared as {', '.join(sorted(formats)) or 'unknown'} only, "
        f"which has no random access: re-prepare it with `tfds build {builder_name} --file_format=array_record "
        f"--data_dir=<dir>`, or use 'tfds:{builder_name}' to load it into memory if it fits")

  splits = builder.info.splits
  test_split = next((s for s in ("test", "validation") if s in splits), None)
  if "train" not in splits or test_split is None:
    raise data.DataError(f"dataset '{name}' in {builder.data_dir}: needs a 'train' split and a 'test' or "
                         f"'validation' split, has {sorted(splits)}")
  image_key, label_key = data._image_label_keys(builder, builder_name)  # pylint: disable=protected-access
  feature = builder.info.features[image_key]
  if not isinstance(feature, tfds.features.Image):
    raise data.DataError(f"dataset '{name}': feature '{image_key}' is not an encoded image "
                         f"(tfds.features.Image); use 'tfds:{builder_name}' to load it into memory")
  num_classes = getattr(builder.info.features[label_key], "num_classes", None)
  if not num_classes:
    raise data.DataError(f"dataset '{name}': feature '{label_key}' is not a ClassLabel with num_classes")
  height, width, depth = (tuple(feature.shape) + (None,) * 3)[:3]
  if size is None and not (height and width):
    raise data.DataError(f"dataset '{name}': its images have no fixed size (feature shape {feature.shape}); "
                         f"set image_size")
  fmt = ImageFormat(*(size or (height, width)), channels or (1 if depth == 1 else 3))

  def source(split):
    records = builder.as_data_source(split=split, decoders={image_key: tfds.decode.SkipDecoding()},
                                     file_format="array_record")
    return TfdsImageSource(records, image_key, f"{name} ({builder.data_dir}) split '{split}'"), records

  train_source, train_records = source("train")
  test_source, test_records = source(test_split)
  train_y = read_labels(train_records, label_key, builder.data_dir, "train")
  test_y = read_labels(test_records, label_key, builder.data_dir, test_split)
  if len(train_y) < 2 or not len(test_y):
    raise data.DataError(f"dataset '{name}': the train split has {len(train_y)} examples (need >= 2) and the "
                         f"{test_split} split {len(test_y)} (need >= 1)")
  # The carving of data._load_tfds, row for row, so 'tfds:' and 'tfds_stream:' batches are the same.
  order = np.random.default_rng(seed).permutation(len(train_y))
  num_val = min(max(1, int(round(val_fraction * len(train_y)))), len(train_y) - 1)
  val_idx, train_idx = order[:num_val], order[num_val:]
  test_idx = np.arange(len(test_y))
  if flip_invariant is None:
    flip_invariant = builder_name.split("/")[0].split(":")[0] in data.FLIP_INVARIANT_TFDS
  classes = tuple(getattr(builder.info.features[label_key], "names", ()) or ())
  return data.Dataset(
      name=name, train=StreamSplit(train_source, train_idx, train_y[train_idx], fmt, num_threads, classes),
      val=StreamSplit(train_source, val_idx, train_y[val_idx], fmt, num_threads, classes),
      test=StreamSplit(test_source, test_idx, test_y, fmt, num_threads, classes),
      input_shape=fmt.shape, num_classes=int(num_classes), flip_invariant=bool(flip_invariant))
