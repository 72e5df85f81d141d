"""The one input pipeline: datasets, the split protocol, deterministic (resumable, shardable) batches, augmentation.

Search and retraining (and export's calibration and test images) read data only through this module: the config
names the dataset, its preprocessing (`image_size`, `channels`; the KWS front-end belongs to the audio datasets)
and the retrain augmentation (`retrain.max_shift`, `retrain.flip`); the loops only call `load_data` and
`BatchStream.batch_at(step)`.

Datasets:
  - `digits`: scikit-learn's handwritten digits (1,797 real 8x8 grey images, 10 classes) that ship inside the
    package, so the default runs anywhere. Split, stratified by class: 15% test with a fixed seed (the same test
    images for every run), then `val_fraction` of the remaining 85% as validation with `seed`; the rest is train.
    With the default val_fraction=0.1 that is 1,374 / 153 / 270 images.
  - `tfds:<builder>` (e.g. `tfds:mnist`, `tfds:cifar10`): read from a TFDS `data_dir` that was prepared beforehand;
    nothing is downloaded at run time. Validation is carved from the `train` split with a permutation seeded by
    `seed`; test is the `test` split (or `validation` when a builder has no `test`).
  - `kws`: the embedded keyword-spotting set, synthesised with espeak-ng and cached (`edgenas.kws`);
    `tfds:speech_commands`: Speech Commands from a prepared TFDS dir (`edgenas.audio`). Both are 49x10x1 MFCCs.
  - `vww`, `folder:<dir>`, `tfds_stream:<builder>`: streamed from disk and decoded per batch (`edgenas.streaming`),
    for sets that do not fit in memory.
Images are float32 NHWC in [0, 1] (int8 export quantises that range directly); labels are int32.

Batches: the order of an epoch is a permutation seeded by (seed, epoch) alone, so a run resumed at any step sees
exactly the batches an uninterrupted run would (`BatchStream.batch_at(step)`), and each process of a multi-host
run takes its own contiguous slice of every global batch (shard_index / num_shards).

TensorFlow Datasets (and with it TensorFlow) is imported only on the `tfds:` path.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator, NamedTuple

import numpy as np

DIGITS = "digits"
KWS = "kws"  # the embedded keyword-spotting set, synthesised with espeak-ng (edgenas.kws)
SPEECH_COMMANDS = "speech_commands"  # TFDS's Speech Commands, through the MFCC front-end (edgenas.audio)
VWW = "vww"  # Visual Wake Words as MLPerf Tiny prepares it (a person/non_person folder), streamed
FOLDER_PREFIX = "folder:"  # an image folder, one sub-directory per class, streamed
TFDS_STREAM_PREFIX = "tfds_stream:"  # a TFDS builder prepared as array_record, streamed
STREAMED_PREFIXES = (FOLDER_PREFIX, TFDS_STREAM_PREFIX)
TFDS_PREFIX = "tfds:"
DIGITS_TEST_FRACTION = 0.15
DIGITS_TEST_SEED = 0  # fixed, so runs with different seeds are scored on the same test images
# TFDS builders whose classes do not change under a left-right mirror; flips stay off for anything else.
FLIP_INVARIANT_TFDS = frozenset({"cifar10", "cifar100", "imagenette", "imagenet2012", "imagenet_resized",
                                 "stl10", "oxford_flowers102", "tf_flowers", "cats_vs_dogs"})
_RESIZE_CHUNK = 4096  # images resized at a time, to bound the float32 working memory


class DataError(ValueError):
  """A dataset that cannot be loaded or batched as asked; the message names the dataset/field/directory."""


class Split(NamedTuple):
  """A split held in memory. Every split, in memory or streamed from disk (`edgenas.streaming`), answers the same
  three questions, and the loops, evaluation and export ask nothing else: `len(split)`, `split.labels` (int32 [N],
  always in memory: labels are small) and `split.take(rows)` -> (images float32 [n, H, W, C], labels)."""
  images: np.ndarray  # float32 [N, H, W, C]
  labels: np.ndarray  # int32 [N]

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, rows) -> tuple[np.ndarray, np.ndarray]:
    return self.images[rows], self.labels[rows]


def head(split, count: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `count` examples (all of them when the split is smaller)."""
  return split.take(np.arange(min(count, len(split))))


def chunks(split, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """The split in order, `size` examples at a time (the last chunk may be smaller)."""
  for start in range(0, len(split), size):
    yield split.take(np.arange(start, min(start + size, len(split))))


class ConcatSplit:
  """Two splits read as one (retraining on train + validation) without copying a streamed split into memory."""

  def __init__(self, first, second):
    self.first, self.second = first, second
    self.labels = np.concatenate([first.labels, second.labels])

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, rows) -> tuple[np.ndarray, np.ndarray]:
    rows = np.asarray(rows)
    in_first = rows < len(self.first)
    a, b = self.first.take(rows[in_first]), self.second.take(rows[~in_first] - len(self.first))
    images = np.empty((len(rows),) + a[0].shape[1:], a[0].dtype)
    images[in_first], images[~in_first] = a[0], b[0]
    return images, self.labels[rows]


def concat(first, second):
  """One split of both: in memory when both are, else a `ConcatSplit`."""
  if isinstance(first, Split) and isinstance(second, Split):
    return Split(np.concatenate([first.images, second.images]), np.concatenate([first.labels, second.labels]))
  return ConcatSplit(first, second)


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  train: Split
  val: Split
  test: Split
  input_shape: tuple[int, int, int]
  num_classes: int
  flip_invariant: bool  # whether random horizontal flips are a valid augmentation


# --------------------------------------------------------------------------------------------------------------
# Loading


def load_dataset(name: str, data_dir: str | None = None, val_fraction: float = 0.1, seed: int = 0,
                 image_size: tuple[int, int] | int | None = None, channels: int = 0) -> Dataset:
  """Loads a dataset with train/val/test splits: `digits`, `kws`, `tfds:<builder>` (incl. `tfds:speech_commands`)
  into memory; `vww`, `folder:<dir>` and `tfds_stream:<builder>` streamed from disk (`edgenas.streaming`).

  `image_size` (H, W) or an int resizes every image (bilinear, antialiased when shrinking); `channels` (1 or 3,
  streamed image datasets only) converts grey/RGB.
  """
  check_val_fraction(name, val_fraction)
  size = parse_image_size(name, image_size)
  if is_streamed(name):  # by name: importing streaming pulls in grain
    from edgenas import streaming  # pylint: disable=g-import-not-at-top
    return streaming.load(name, data_dir, val_fraction=val_fraction, seed=seed, image_size=size,
                          channels=channels or None)
  if channels:
    raise DataError(f"dataset '{name}': channels is only for the streamed image datasets ({VWW}, "
                    f"{', '.join(p + '...' for p in STREAMED_PREFIXES)})")
  if name == DIGITS:
    dataset = _load_digits(val_fraction, seed)
  elif name == KWS:
    from edgenas import kws  # pylint: disable=g-import-not-at-top  # espeak-ng and the front-end, only for audio
    dataset = kws.load_embedded(data_dir or None, val_fraction=val_fraction, seed=seed)
  elif name == TFDS_PREFIX + SPEECH_COMMANDS:
    from edgenas import audio  # pylint: disable=g-import-not-at-top
    dataset = audio.load_speech_commands(data_dir, val_fraction=val_fraction, seed=seed)
  elif name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX):
    dataset = _load_tfds(name[len(TFDS_PREFIX):], data_dir, val_fraction, seed)
  else:
    raise DataError(f"unknown dataset '{name}': use '{DIGITS}', '{KWS}', '{VWW}', '{TFDS_PREFIX}<builder>' "
                    f"(e.g. 'tfds:mnist', 'tfds:speech_commands'), 'folder:<dir>' or 'tfds_stream:<builder>'")
  return resize_dataset(dataset, size) if size else dataset


def load_data(config) -> Dataset:
  """The dataset a run's config names: `dataset`, `data_dir`, `val_fraction`, `data_seed` and `image_size`.

  The validation split is drawn with `data_seed`, not `seed` (which sets the initialisation and the batch order),
  so that runs over several seeds share one split and their spread is the seed's alone. A config without
  `data_seed` (written before it existed) splits with `seed`, as it did then."""
  size = config.get("image_size", 0) or None
  return load_dataset(config.dataset, data_dir=config.get("data_dir") or None, val_fraction=config.val_fraction,
                      seed=config.get("data_seed", config.seed), image_size=size, channels=config.get("channels", 0))


def is_streamed(name: str) -> bool:
  """Whether dataset `name` is read from disk per batch (`edgenas.streaming`) rather than loaded into memory."""
  return name == VWW or any(name.startswith(p) and len(name) > len(p) for p in STREAMED_PREFIXES)


def check_val_fraction(name: str, val_fraction: float) -> None:
  if not 0.0 < val_fraction < 1.0:
    raise DataError(f"dataset '{name}': val_fraction must be in (0, 1), got {val_fraction}")


def parse_image_size(name: str, image_size) -> tuple[int, int] | None:
  """(H, W) of an `image_size` given as an int or a pair; None (or 0) keeps the dataset's size."""
  if image_size is None or (isinstance(image_size, (int, np.integer)) and image_size == 0):
    return None
  size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
    raise DataError(f"dataset '{name}': image_size must be a positive int or (H, W), got {image_size!r}")
  return int(size[0]), int(size[1])


def _load_digits(val_fraction: float, seed: int) -> Dataset:
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  images = (digits.images.astype(np.float32) / 16.0)[..., None]  # pixel values are 0..16
  labels = digits.target.astype(np.int32)
  pool_x, test_x, pool_y, test_y = model_selection.train_test_split(
      images, labels, test_size=DIGITS_TEST_FRACTION, stratify=labels, random_state=DIGITS_TEST_SEED)
  train_x, val_x, train_y, val_y = model_selection.train_test_split(
      pool_x, pool_y, test_size=val_fraction, stratify=pool_y, random_state=seed)
  return Dataset(name=DIGITS, train=Split(train_x, train_y), val=Split(val_x, val_y), test=Split(test_x, test_y),
                 input_shape=images.shape[1:], num_classes=10, flip_invariant=False)


def tfds_not_prepared_message(builder_name: str, data_dir: str | None) -> str:
  where = data_dir or "~/tensorflow_datasets (TFDS's default; pass data_dir to use another)"
  return (f"dataset 'tfds:{builder_name}' is not prepared in data_dir {where}, and edgenas never downloads at "
          f"run time. Prepare it on a machine with internet: `tfds build {builder_name} --data_dir=<dir>` "
          f"(or, for builders that need files you fetch yourself, put them in a directory and pass "
          f"`tfds.download.DownloadConfig(manual_dir=...)` / `tfds build --manual_dir=...`), then copy <dir> here "
          f"and pass it as data_dir.")


def _load_tfds(builder_name: str, data_dir: str | None, val_fraction: float, seed: int) -> Dataset:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # pulls in TensorFlow
  if data_dir is not None and not os.path.isdir(data_dir):
    raise DataError(f"data_dir {data_dir} does not exist. " + tfds_not_prepared_message(builder_name, data_dir))
  try:
    builder = tfds.builder(builder_name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(tfds_not_prepared_message(builder_name, data_dir)) from None
  if not builder.is_prepared():
    raise DataError(tfds_not_prepared_message(builder_name, data_dir))

  splits = builder.info.splits
  test_split = next((s for s in ("test", "validation") if s in splits), None)
  if "train" not in splits or test_split is None:
    raise DataError(f"dataset 'tfds:{builder_name}' in {builder.data_dir}: needs a 'train' split and a 'test' or "
                    f"'validation' split, has {sorted(splits)}")
  image_key, label_key = _image_label_keys(builder, builder_name)
  label_feature = builder.info.features[label_key]
  num_classes = getattr(label_feature, "num_classes", None)
  if not num_classes:
    raise DataError(f"dataset 'tfds:{builder_name}': feature '{label_key}' is not a ClassLabel with num_classes")

  def read(split):
    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    return _to_float_images(arrays[image_key], builder_name), np.asarray(arrays[label_key], np.int32)

  train_x, train_y = read("train")
  test_x, test_y = read(test_split)
  if len(train_y) < 2:
    raise DataError(f"dataset 'tfds:{builder_name}': the train split has {len(train_y)} examples; need >= 2")
  order = np.random.default_rng(seed).permutation(len(train_y))
  num_val = min(max(1, int(round(val_fraction * len(train_y)))), len(train_y) - 1)
  val_idx, train_idx = order[:num_val], order[num_val:]
  return Dataset(name=f"{TFDS_PREFIX}{builder_name}", train=Split(train_x[train_idx], train_y[train_idx]),
                 val=Split(train_x[val_idx], train_y[val_idx]), test=Split(test_x, test_y),
                 input_shape=tuple(int(d) for d in train_x.shape[1:]), num_classes=int(num_classes),
                 flip_invariant=builder_name.split("/")[0].split(":")[0] in FLIP_INVARIANT_TFDS)


def _image_label_keys(builder, builder_name: str) -> tuple[str, str]:
  keys = builder.info.supervised_keys
  if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys):
    return keys
  features = builder.info.features
  if "image" in features and "label" in features:
    return "image", "label"
  raise DataError(f"dataset 'tfds:{builder_name}': cannot tell images from labels: no (image, label) "
                  f"supervised_keys and no 'image'/'label' features (features: {sorted(features)})")


def _to_float_images(images: np.ndarray, builder_name: str) -> np.ndarray:
  if images.ndim == 3:  # some builders store grey images without a channel axis
    images = images[..., None]
  if images.ndim != 4:
    raise DataError(f"dataset 'tfds:{builder_name}': expected images [N, H, W, C], got shape {images.shape}")
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  return images.astype(np.float32)


def resize_dataset(dataset: Dataset, size: tuple[int, int]) -> Dataset:
  """The same dataset with every image resized to `size` (H, W)."""
  if tuple(dataset.input_shape[:2]) == tuple(size):
    return dataset
  resized = {name: Split(resize_images(split.images, size), split.labels)
             for name, split in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test))}
  return dataclasses.replace(dataset, **resized, input_shape=(size[0], size[1], dataset.input_shape[2]))


def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  import jax  # pylint: disable=g-import-not-at-top  # only resizing needs it
  n, _, _, c = images.shape
  chunks = [np.asarray(jax.image.resize(images[i:i + _RESIZE_CHUNK], (len(images[i:i + _RESIZE_CHUNK]),
                                                                       *size, c), "linear"))
            for i in range(0, n, _RESIZE_CHUNK)]
  return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, *size, c), np.float32)


# --------------------------------------------------------------------------------------------------------------
# Batches


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The example order of one epoch: a function of (seed, epoch) only."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def shard_slice(global_batch: int, shard_index: int, num_shards: int) -> slice:
  """The rows of a global batch that process `shard_index` of `num_shards` reads (contiguous, in order)."""
  if not 0 <= shard_index < num_shards:
    raise DataError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
  bounds = np.linspace(0, global_batch, num_shards + 1).round().astype(int)
  return slice(int(bounds[shard_index]), int(bounds[shard_index + 1]))


def _check_batching(images, labels, batch_size, num_shards, drop_last) -> None:
  if len(images) != len(labels):
    raise DataError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
  _check_sizes(len(labels), batch_size, num_shards, drop_last)


def _check_sizes(num_examples, batch_size, num_shards, drop_last) -> None:
  if batch_size < 1 or num_shards < 1:
    raise DataError(f"batch_size and num_shards must be >= 1, got {batch_size} and {num_shards}")
  if batch_size % num_shards:
    raise DataError(f"global batch_size {batch_size} is not divisible by num_shards {num_shards}")
  if drop_last and num_examples < batch_size:
    raise DataError(f"batch_size {batch_size} is larger than the split ({num_examples} examples) with drop_last; "
                    f"lower the batch size or the validation fraction")


def batches(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, epoch: int, shard_index: int = 0,
            num_shards: int = 1, drop_last: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One epoch of (images, labels) batches; this process's shard of each global batch of `batch_size`.

  Without drop_last the final global batch is smaller and its shards may differ in size by one.
  """
  _check_batching(images, labels, batch_size, num_shards, drop_last)
  order = epoch_permutation(len(labels), seed, epoch)
  end = len(order) - len(order) % batch_size if drop_last else len(order)
  for start in range(0, end, batch_size):
    rows = order[start:start + batch_size]
    rows = rows[shard_slice(len(rows), shard_index, num_shards)]
    yield images[rows], labels[rows]


class BatchStream:
  """An endless, step-addressable sequence of batches: step s is batch s % steps_per_epoch of epoch
  s // steps_per_epoch, in the order `batches(..., epoch=...)` gives, so a run resumed at step s continues
  exactly as an uninterrupted one. The incomplete tail of each epoch is skipped (drop_last).

  A search draws one train and one validation batch per step from two streams with different seeds, e.g.
  `BatchStream.of(ds.train, 64, seed)` and `BatchStream.of(ds.val, 64, seed + 1)`; each wraps at its own epoch
  length. Any split works (in memory or streamed): only the rows of the batch are read.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, shard_index: int = 0,
               num_shards: int = 1):
    _check_batching(images, labels, batch_size, num_shards, drop_last=True)
    self._init(Split(images, labels), batch_size, seed, shard_index, num_shards)

  @classmethod
  def of(cls, split, batch_size: int, seed: int, shard_index: int = 0, num_shards: int = 1) -> "BatchStream":
    _check_sizes(len(split), batch_size, num_shards, drop_last=True)
    stream = cls.__new__(cls)
    stream._init(split, batch_size, seed, shard_index, num_shards)
    return stream

  def _init(self, split, batch_size, seed, shard_index, num_shards):
    self.split, self.labels = split, split.labels
    self.batch_size, self.seed = batch_size, seed
    self._rows = shard_slice(batch_size, shard_index, num_shards)
    self.steps_per_epoch = len(split) // batch_size
    self._cached_epoch, self._cached_order = None, None

  def position(self, step: int) -> tuple[int, int]:
    """(epoch, batch index within the epoch) of a global step."""
    if step < 0:
      raise DataError(f"step must be >= 0, got {step}")
    return divmod(step, self.steps_per_epoch)

  def batch_at(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    epoch, offset = self.position(step)
    if epoch != self._cached_epoch:
      self._cached_epoch, self._cached_order = epoch, epoch_permutation(len(self.labels), self.seed, epoch)
    rows = self._cached_order[offset * self.batch_size:(offset + 1) * self.batch_size][self._rows]
    return self.split.take(rows)

  def iterate(self, start_step: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    step = start_step
    while True:
      yield self.batch_at(step)
      step += 1


# --------------------------------------------------------------------------------------------------------------
# Augmentation (for retraining; pure numpy given a numpy Generator, e.g. np.random.default_rng([seed, step]))


def random_shift(images: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
  """Each image shifted by up to `max_shift` pixels in each direction: zero-pad, then a random crop."""
  if max_shift <= 0:
    return images
  n, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
  dy = rng.integers(0, 2 * max_shift + 1, size=n)
  dx = rng.integers(0, 2 * max_shift + 1, size=n)
  # Every crop is a window of the padded image; picking one window per image is a single gather
  # (6x faster than indexing pixel by pixel on a CIFAR-sized batch).
  windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(1, 2))  # [N, dy, dx, C, H, W]
  return np.ascontiguousarray(np.moveaxis(windows[np.arange(n), dy, dx], 1, -1))


def random_flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Each image mirrored left-right with probability 1/2."""
  flip = rng.random(len(images)) < 0.5
  flipped = images.copy()
  flipped[flip] = images[flip, :, ::-1]
  return flipped


def augment(images: np.ndarray, rng: np.random.Generator, max_shift: int = 0, flip: bool = False) -> np.ndarray:
  """Random shift, then (when the dataset is `flip_invariant` and `flip` is on) random horizontal flip."""
  images = random_shift(images, rng, max_shift)
  return random_flip(images, rng) if flip else images
