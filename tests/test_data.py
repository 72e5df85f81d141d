"""Datasets (embedded digits and an offline TFDS directory), deterministic sharded batches, augmentation."""
import os
import subprocess
import sys

import numpy as np
import pytest

from edgenas import data
from conftest import TINY_TFDS_TEST, TINY_TFDS_TRAIN, tiny_image_builder


@pytest.fixture(scope="module")
def digits():
  return data.load_dataset("digits", seed=0)


def _rows(split):
  """Every example as one sortable row (pixels then label), sorted: a multiset of the split's content."""
  flat = np.concatenate([split.images.reshape(len(split), -1), split.labels[:, None].astype(np.float32)], axis=1)
  return flat[np.lexsort(flat.T[::-1])]


def test_digits_splits_sizes_types_and_ranges(digits):
  assert (len(digits.train), len(digits.val), len(digits.test)) == (1374, 153, 270)
  assert digits.input_shape == (8, 8, 1) and digits.num_classes == 10 and not digits.flip_invariant
  for split in (digits.train, digits.val, digits.test):
    assert split.images.dtype == np.float32 and split.labels.dtype == np.int32
    assert split.images.shape[1:] == (8, 8, 1)
    assert split.images.min() >= 0.0 and split.images.max() <= 1.0
  assert digits.train.images.max() == 1.0  # 16/16: scaled, not left in 0..16
  # Stratified: every class holds about 15% of its images in test.
  test_share = np.bincount(digits.test.labels, minlength=10) / np.bincount(
      np.concatenate([digits.train.labels, digits.val.labels, digits.test.labels]), minlength=10)
  np.testing.assert_allclose(test_share, 0.15, atol=0.01)


def test_digits_splits_partition_the_dataset(digits):
  from sklearn import datasets as sk_datasets
  raw = sk_datasets.load_digits()
  everything = data.Split(raw.images[..., None].astype(np.float32) / 16.0, raw.target.astype(np.int32))
  union = data.Split(np.concatenate([digits.train.images, digits.val.images, digits.test.images]),
                     np.concatenate([digits.train.labels, digits.val.labels, digits.test.labels]))
  np.testing.assert_array_equal(_rows(union), _rows(everything))


def test_digits_split_is_deterministic_and_test_is_seed_independent(digits):
  again = data.load_dataset("digits", seed=0)
  np.testing.assert_array_equal(again.train.images, digits.train.images)
  np.testing.assert_array_equal(again.val.labels, digits.val.labels)
  other = data.load_dataset("digits", seed=1)
  np.testing.assert_array_equal(other.test.images, digits.test.images)
  assert not np.array_equal(_rows(other.val), _rows(digits.val))


def test_digits_resize(digits):
  big = data.load_dataset("digits", image_size=16)
  assert big.input_shape == (16, 16, 1) and big.train.images.shape[1:] == (16, 16, 1)
  assert big.train.images.dtype == np.float32
  np.testing.assert_array_equal(big.train.labels, digits.train.labels)
  # Bilinear upsampling keeps the picture: the mean brightness barely moves.
  np.testing.assert_allclose(big.train.images.mean(axis=(1, 2, 3)), digits.train.images.mean(axis=(1, 2, 3)),
                             atol=0.03)


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "imagenet"}, "unknown dataset 'imagenet'"),
    ({"name": "digits", "val_fraction": 1.5}, "val_fraction"),
    ({"name": "digits", "image_size": (0, 8)}, "image_size"),
])
def test_bad_dataset_arguments(kwargs, match):
  with pytest.raises(data.DataError, match=match):
    data.load_dataset(**kwargs)


def test_importing_data_and_loading_digits_does_not_import_tensorflow():
  code = ("import sys, edgenas.data as d; d.load_dataset('digits'); "
          "bad = [m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: edgenas importable


# ---------------------------------------------------------------------------------------------------- batches


def _numbered(n):
  """Images whose single pixel is their own index, so a batch tells which examples it holds."""
  return np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1), np.arange(n, dtype=np.int32) % 7


def _ids(batch):
  return batch[0].reshape(-1).astype(int).tolist()


def test_batches_deterministic_per_seed_and_epoch():
  images, labels = _numbered(50)
  epoch0 = [_ids(b) for b in data.batches(images, labels, 8, seed=3, epoch=0)]
  assert epoch0 == [_ids(b) for b in data.batches(images, labels, 8, seed=3, epoch=0)]
  assert epoch0 != [_ids(b) for b in data.batches(images, labels, 8, seed=3, epoch=1)]
  assert epoch0 != [_ids(b) for b in data.batches(images, labels, 8, seed=4, epoch=0)]
  assert len(epoch0) == 6 and all(len(b) == 8 for b in epoch0)  # 50 // 8, tail dropped
  seen = sum(epoch0, [])
  assert len(set(seen)) == len(seen) == 48
  for batch_images, batch_labels in data.batches(images, labels, 8, seed=3, epoch=0):
    np.testing.assert_array_equal(batch_labels, batch_images.reshape(-1).astype(int) % 7)  # pairs stay together


def test_batches_without_drop_last_cover_every_example_once():
  images, labels = _numbered(50)
  sizes = [len(b[1]) for b in data.batches(images, labels, 8, seed=0, epoch=2, drop_last=False)]
  assert sizes == [8] * 6 + [2]
  ids = sum((_ids(b) for b in data.batches(images, labels, 8, seed=0, epoch=2, drop_last=False)), [])
  assert sorted(ids) == list(range(50))


@pytest.mark.parametrize("drop_last", [True, False])
def test_shards_concatenate_to_the_global_batch(drop_last):
  images, labels = _numbered(46)
  whole = list(data.batches(images, labels, 12, seed=5, epoch=1, drop_last=drop_last))
  shards = [list(data.batches(images, labels, 12, seed=5, epoch=1, shard_index=i, num_shards=4,
                              drop_last=drop_last)) for i in range(4)]
  assert all(len(s) == len(whole) for s in shards)
  for b, global_batch in enumerate(whole):
    if drop_last or b < len(whole) - 1:
      assert all(len(s[b][1]) == 3 for s in shards)
    np.testing.assert_array_equal(np.concatenate([s[b][0] for s in shards]), global_batch[0])
    np.testing.assert_array_equal(np.concatenate([s[b][1] for s in shards]), global_batch[1])


def test_batch_stream_matches_epochs_and_resumes_exactly():
  images, labels = _numbered(30)
  stream = data.BatchStream(images, labels, 8, seed=9)
  assert stream.steps_per_epoch == 3 and stream.position(7) == (2, 1)
  expected = []
  for epoch in range(4):
    expected += [_ids(b) for b in data.batches(images, labels, 8, seed=9, epoch=epoch)]
  uninterrupted = stream.iterate()
  got = [_ids(next(uninterrupted)) for _ in range(12)]
  assert got == expected
  resumed = data.BatchStream(images, labels, 8, seed=9).iterate(start_step=7)  # a fresh process after step 6
  assert [_ids(next(resumed)) for _ in range(5)] == expected[7:12]
  assert _ids(stream.batch_at(4)) == expected[4]  # random access, also backwards


def test_batch_stream_shards_partition_each_step():
  images, labels = _numbered(40)
  whole = data.BatchStream(images, labels, 16, seed=1)
  parts = [data.BatchStream(images, labels, 16, seed=1, shard_index=i, num_shards=2) for i in range(2)]
  for step in (0, 1, 5):
    assert sum((_ids(p.batch_at(step)) for p in parts), []) == _ids(whole.batch_at(step))


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 10, "num_shards": 4}, "not divisible by num_shards 4"),
    ({"batch_size": 64}, "larger than the split"),
    ({"batch_size": 8, "num_shards": 2, "shard_index": 2}, r"shard_index must be in \[0, 2\)"),
])
def test_bad_batching_is_refused(kwargs, match):
  images, labels = _numbered(20)
  with pytest.raises(data.DataError, match=match):
    data.BatchStream(images, labels, seed=0, **kwargs)


# ----------------------------------------------------------------------------------------------- augmentation


def test_random_shift_moves_content_and_pads_with_zeros():
  images = np.random.default_rng(0).random((16, 6, 5, 2)).astype(np.float32) + 1.0  # never zero
  shifted = data.random_shift(images, np.random.default_rng(1), max_shift=2)
  assert shifted.shape == images.shape and shifted.dtype == images.dtype
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
  offsets = set()
  for n in range(len(images)):
    matches = [(dy, dx) for dy in range(5) for dx in range(5)
               if np.array_equal(padded[n, dy:dy + 6, dx:dx + 5], shifted[n])]
    assert matches, f"image {n} is not a shifted crop"
    offsets.add(matches[0])
  assert len(offsets) > 3  # the offsets really vary from image to image
  np.testing.assert_array_equal(data.random_shift(images, np.random.default_rng(1), 0), images)
  np.testing.assert_array_equal(shifted, data.random_shift(images, np.random.default_rng(1), max_shift=2))


def test_random_flip_mirrors_some_images():
  images = np.random.default_rng(0).random((32, 4, 4, 1)).astype(np.float32)
  flipped = data.augment(images, np.random.default_rng(2), flip=True)
  mirrored = [np.array_equal(f, i[:, ::-1]) for f, i in zip(flipped, images)]
  unchanged = [np.array_equal(f, i) for f, i in zip(flipped, images)]
  assert all(m or u for m, u in zip(mirrored, unchanged))
  assert 4 < sum(mirrored) < 28
  np.testing.assert_array_equal(data.augment(images, np.random.default_rng(2)), images)  # flip off by default


# --------------------------------------------------------------------------------------------- TFDS, offline

_TFDS_TRAIN, _TFDS_TEST = TINY_TFDS_TRAIN, TINY_TFDS_TEST


def _tiny_builder_class():
  return tiny_image_builder("EdgenasTinyShapes")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tfds")
  _tiny_builder_class()(data_dir=str(directory)).download_and_prepare()
  return str(directory)


def _example_ids(split):
  return np.rint(split.images[:, 0, 0, 0] * 255).astype(int)


def test_tfds_prepared_dir_loads_with_val_carved_from_train(tfds_dir):
  ds = data.load_dataset("tfds:edgenas_tiny_shapes", data_dir=tfds_dir, val_fraction=0.25, seed=0)
  assert ds.name == "tfds:edgenas_tiny_shapes" and ds.num_classes == 3 and ds.input_shape == (6, 6, 1)
  assert (len(ds.train), len(ds.val), len(ds.test)) == (30, 10, _TFDS_TEST)
  assert ds.train.images.dtype == np.float32 and ds.train.labels.dtype == np.int32
  assert ds.train.images.max() <= 1.0
  train_ids, val_ids = _example_ids(ds.train), _example_ids(ds.val)
  assert sorted(train_ids.tolist() + val_ids.tolist()) == list(range(_TFDS_TRAIN))
  assert sorted(_example_ids(ds.test).tolist()) == list(range(100, 100 + _TFDS_TEST))
  np.testing.assert_array_equal(ds.train.labels, train_ids % 3)  # labels stay with their images
  again = data.load_dataset("tfds:edgenas_tiny_shapes", data_dir=tfds_dir, val_fraction=0.25, seed=0)
  np.testing.assert_array_equal(_example_ids(again.val), val_ids)
  other = data.load_dataset("tfds:edgenas_tiny_shapes", data_dir=tfds_dir, val_fraction=0.25, seed=1)
  assert set(_example_ids(other.val)) != set(val_ids)


def test_tfds_resize(tfds_dir):
  ds = data.load_dataset("tfds:edgenas_tiny_shapes", data_dir=tfds_dir, image_size=(3, 4))
  assert ds.input_shape == (3, 4, 1) and ds.test.images.shape == (_TFDS_TEST, 3, 4, 1)


def test_tfds_missing_dataset_says_how_to_prepare_it(tfds_dir, tmp_path):
  with pytest.raises(data.DataError, match=rf"'tfds:mnist' is not prepared in data_dir {tfds_dir}.*tfds build mnist"):
    data.load_dataset("tfds:mnist", data_dir=tfds_dir)
  with pytest.raises(data.DataError, match=r"not prepared.*tfds build no_such_builder_anywhere"):
    data.load_dataset("tfds:no_such_builder_anywhere", data_dir=tfds_dir)
  missing = str(tmp_path / "nowhere")
  with pytest.raises(data.DataError, match=rf"data_dir {missing} does not exist"):
    data.load_dataset("tfds:mnist", data_dir=missing)


def test_the_validation_split_follows_data_seed_not_seed():
  from experiments import digits
  c = digits.get_config()
  base = data.load_data(c)
  c.seed = 7  # another initialisation and batch order: the same split
  np.testing.assert_array_equal(data.load_data(c).val.labels, base.val.labels)
  np.testing.assert_array_equal(data.load_data(c).val.images, base.val.images)
  c.data_seed = 3  # another split
  assert not np.array_equal(data.load_data(c).val.images, base.val.images)
  del c.data_seed  # a config from before data_seed splits with seed, as it did then
  np.testing.assert_array_equal(data.load_data(c).val.images,
                                data.load_dataset("digits", val_fraction=0.2, seed=7).val.images)
