"""Streamed image datasets on real files: an image folder of PNGs and JPEGs written here, and a TFDS builder
prepared here in array_record format, read through the same Split protocol as in-memory data."""
import functools
import os
import re
import tracemalloc

import numpy as np
from PIL import Image
import pytest

from edgenas import data
from edgenas import streaming
from conftest import TINY_TFDS_TEST, TINY_TFDS_TRAIN, tiny_image_builder

_PER_CLASS = 20


def _image(seed: int, shape=(24, 32, 3)) -> np.ndarray:
  """A smooth random image (JPEG keeps it close), distinct per seed."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (shape[0] // 4, shape[1] // 4) + shape[2:], dtype=np.uint8)
  return np.asarray(Image.fromarray(small).resize((shape[1], shape[0]), Image.Resampling.BICUBIC))


def _write_folder(root, classes=("cat", "dog"), per_class=_PER_CLASS, shape=(24, 32, 3), first_seed=0):
  """`root`/<class>/<i>.png|jpg, PNG for even i, JPEG for odd i; returns {path: array written}."""
  written = {}
  for c, cls in enumerate(classes):
    os.makedirs(os.path.join(root, cls), exist_ok=True)
    for i in range(per_class):
      pixels = _image(first_seed + 1000 * c + i, shape)
      path = os.path.join(root, cls, f"{i:03d}.{'png' if i % 2 == 0 else 'jpg'}")
      Image.fromarray(pixels).save(path)
      written[path] = pixels
  return written


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("folder"))
  return root, _write_folder(root)


def _paths(split) -> list[str]:
  return [split.source.paths[i] for i in split.indices]


def test_folder_splits_partition_it_with_a_fixed_test_split(folder):
  root, written = folder
  ds = streaming.load_folder(root, val_fraction=0.25, seed=0)
  assert ds.name == f"folder:{root}" and ds.num_classes == 2 and ds.input_shape == (24, 32, 3)
  assert not ds.flip_invariant and ds.train.classes == ("cat", "dog")
  # Stratified: 15% of each class (3 of 20) is test, then 25% of the remaining 17 (4) is validation.
  assert (len(ds.train), len(ds.val), len(ds.test)) == (26, 8, 6)
  splits = [set(_paths(s)) for s in (ds.train, ds.val, ds.test)]
  assert set.union(*splits) == set(written) and sum(map(len, splits)) == len(written)
  for split in (ds.train, ds.val, ds.test):
    assert split.labels.dtype == np.int32
    np.testing.assert_array_equal(split.labels, [os.path.basename(os.path.dirname(p)) == "dog" for p in _paths(split)])
    assert np.bincount(split.labels).tolist() == [len(split) // 2] * 2
  again = streaming.load_folder(root, val_fraction=0.25, seed=0)
  assert _paths(again.val) == _paths(ds.val) and _paths(again.train) == _paths(ds.train)
  other = streaming.load_folder(root, val_fraction=0.25, seed=1)
  assert _paths(other.test) == _paths(ds.test)  # the same test images whatever the seed
  assert set(_paths(other.val)) != set(_paths(ds.val))


def test_take_decodes_to_float_in_unit_range_and_resizes_like_the_in_memory_path(folder):
  root, written = folder
  ds = streaming.load_folder(root)
  rows = np.arange(len(ds.train))[::-1]
  images, labels = ds.train.take(rows)
  assert images.shape == (len(rows), 24, 32, 3) and images.dtype == np.float32 and labels.dtype == np.int32
  assert 0.0 <= images.min() and images.max() <= 1.0
  np.testing.assert_array_equal(labels, ds.train.labels[rows])
  for image, path in zip(images, np.asarray(_paths(ds.train))[rows]):
    if path.endswith(".png"):  # lossless: exactly the pixels written
      np.testing.assert_array_equal(image, written[path].astype(np.float32) / 255.0)
    else:  # lossy: what libjpeg decodes, and near what was written
      np.testing.assert_array_equal(image * 255, np.asarray(Image.open(path).convert("RGB"), np.float32))
      assert np.abs(image * 255 - written[path]).mean() < 16
  for size in ((12, 16), (48, 64)):  # shrinking (antialiased) and enlarging
    small = streaming.load_folder(root, image_size=size)
    assert small.input_shape == (*size, 3)
    png = [r for r, p in enumerate(_paths(small.train)) if p.endswith(".png")][:4]
    reference = data.resize_images(np.stack([written[_paths(small.train)[r]] for r in png]) / np.float32(255), size)
    np.testing.assert_allclose(small.train.take(png)[0], reference, atol=1.5 / 255)


def test_thread_count_does_not_change_the_pixels(folder):
  root, _ = folder
  one = streaming.load_folder(root, num_threads=1)
  two = streaming.load_folder(root, num_threads=2)
  rows = np.random.default_rng(0).permutation(len(one.train))
  np.testing.assert_array_equal(one.train.take(rows)[0], two.train.take(rows)[0])
  assert one.train.take([])[0].shape == (0, 24, 32, 3)
  np.testing.assert_array_equal(one.train.take(slice(2, 5))[0], two.train.take([2, 3, 4])[0])


def test_mixed_channel_counts_are_converted_to_the_configured_count(tmp_path):
  kinds = {"grey.png": lambda rgb, grey: Image.fromarray(grey), "rgb.jpg": lambda rgb, grey: Image.fromarray(rgb),
           "palette.png": lambda rgb, grey: Image.fromarray(rgb).convert("P"),
           "rgba.png": lambda rgb, grey: Image.fromarray(rgb).convert("RGBA"),
           "grey_alpha.png": lambda rgb, grey: Image.fromarray(grey).convert("LA"),
           "grey.jpg": lambda rgb, grey: Image.fromarray(grey), "rgb.png": lambda rgb, grey: Image.fromarray(rgb)}
  for c, cls in enumerate(("a", "b")):
    (tmp_path / cls).mkdir()
    for i in range(8):
      kind = list(kinds)[(i + c) % len(kinds)]
      kinds[kind](_image(10 * c + i), _image(10 * c + i, (24, 32))).save(tmp_path / cls / f"{i}_{kind}")
  for channels in (3, 1):
    ds = streaming.load_folder(str(tmp_path), channels=channels, val_fraction=0.5)
    split = data.concat(data.concat(ds.train, ds.val), ds.test)
    paths = _paths(ds.train) + _paths(ds.val) + _paths(ds.test)
    images = split.take(np.arange(len(split)))[0]
    assert images.shape == (16, 24, 32, channels)
    for image, path in zip(images, paths):
      original = Image.open(path)
      expected = (original.convert("RGBA") if original.mode == "P" else original).convert("RGB" if channels == 3
                                                                                           else "L")
      expected = (np.asarray(expected, np.float32) / 255.0).reshape(image.shape)
      np.testing.assert_array_equal(image, expected)
      if channels == 3 and "grey" in path:
        np.testing.assert_array_equal(image[..., 0], image[..., 2])  # grey replicated into R, G and B
  # Without a configured count, the first training image decides, and every other image follows it.
  ds = streaming.load_folder(str(tmp_path), val_fraction=0.5)
  first_is_grey = Image.open(_paths(ds.train)[0]).mode in ("L", "LA")
  assert ds.input_shape[2] == (1 if first_is_grey else 3)
  assert ds.train.take(np.arange(len(ds.train)))[0].shape[-1] == ds.input_shape[2]


def test_train_val_test_directories_are_the_splits_and_a_missing_one_is_carved(tmp_path):
  _write_folder(str(tmp_path / "train"), per_class=12)
  test_files = _write_folder(str(tmp_path / "test"), per_class=3, first_seed=500)
  ds = streaming.load_folder(str(tmp_path), val_fraction=0.25, seed=0)
  assert set(_paths(ds.test)) == set(test_files) and len(ds.val) == 6 and len(ds.train) == 18
  assert not set(_paths(ds.val)) & set(_paths(ds.train))
  _write_folder(str(tmp_path / "validation"), classes=("dog",), per_class=2, first_seed=900)
  ds = streaming.load_folder(str(tmp_path))
  assert len(ds.val) == 2 and ds.val.labels.tolist() == [1, 1] and len(ds.train) == 24  # class index from train/


def test_batches_resume_exactly_and_prefetch_gives_what_batch_at_gives(folder):
  root, _ = folder
  ds = streaming.load_folder(root, val_fraction=0.25, seed=0)
  stream = data.BatchStream.of(ds.train, 8, seed=3)  # 3 steps per epoch: 10 steps cross 3 epoch boundaries
  uninterrupted = [stream.batch_at(s) for s in range(10)]
  resumed = data.BatchStream.of(streaming.load_folder(root, val_fraction=0.25, seed=0).train, 8, seed=3)
  for step in (7, 3, 9):
    np.testing.assert_array_equal(resumed.batch_at(step)[0], uninterrupted[step][0])
    np.testing.assert_array_equal(resumed.batch_at(step)[1], uninterrupted[step][1])
  with streaming.prefetch(stream, start_step=4, depth=2) as ahead:
    for step in range(4, 10):
      images, labels = next(ahead)
      np.testing.assert_array_equal(images, uninterrupted[step][0])
      np.testing.assert_array_equal(labels, uninterrupted[step][1])
    assert ahead.next_step == 10
  assert not ahead._thread.is_alive()  # pylint: disable=protected-access

  def augmented(step, batch):  # the retrain augmentation, a function of (seed, step), run on the thread
    return data.augment(batch[0], np.random.default_rng([0, step]), max_shift=2, flip=True), batch[1]

  with streaming.prefetch(stream, start_step=1, depth=1, transform=augmented) as ahead:
    for step in range(1, 5):
      np.testing.assert_array_equal(next(ahead)[0], augmented(step, uninterrupted[step])[0])


def test_prefetch_raises_a_failing_steps_error_at_that_step(tmp_path):
  _write_folder(str(tmp_path), per_class=4)
  ds = streaming.load_folder(str(tmp_path), val_fraction=0.34)
  stream = data.BatchStream.of(ds.train, 2, seed=0)
  bad = _paths(ds.train)[data.epoch_permutation(len(ds.train), 0, 0)[2]]  # the first row of step 1
  with open(bad, "wb") as f:
    f.write(b"not an image")
  ahead = streaming.prefetch(stream, start_step=0, depth=2)
  next(ahead)  # step 0 is fine
  with pytest.raises(data.DataError, match=rf"cannot decode image {re.escape(bad)}"):
    next(ahead)
  with pytest.raises(StopIteration):  # and the prefetcher has stopped
    next(ahead)
  with pytest.raises(data.DataError, match="prefetch depth must be >= 1"):
    streaming.prefetch(stream, depth=0)


def test_streamed_splits_work_with_head_chunks_and_concat(folder):
  root, _ = folder
  ds = streaming.load_folder(root, val_fraction=0.25)
  both = data.concat(ds.train, ds.val)
  assert isinstance(both, data.ConcatSplit) and len(both) == len(ds.train) + len(ds.val)
  rows = np.array([len(ds.train) + 1, 0, len(ds.train), 5])
  images, labels = both.take(rows)
  np.testing.assert_array_equal(images[0], ds.val.take([1])[0][0])
  np.testing.assert_array_equal(images[1], ds.train.take([0])[0][0])
  np.testing.assert_array_equal(labels, np.concatenate([ds.train.labels, ds.val.labels])[rows])
  assert data.head(ds.test, 4)[0].shape == (4, 24, 32, 3) and len(data.head(ds.test, 100)[1]) == len(ds.test)
  assert sum(len(y) for _, y in data.chunks(ds.train, 7)) == len(ds.train)


def _peak_bytes_reading_all(split, chunk: int) -> int:
  tracemalloc.start()
  try:
    for _ in data.chunks(split, chunk):
      pass
    return tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def test_memory_does_not_grow_with_the_number_of_images(tmp_path):
  peaks = {}
  for count in (40, 480):
    root = str(tmp_path / str(count))
    _write_folder(root, classes=("a", "b"), per_class=count // 2, shape=(32, 32, 3))
    split = streaming.load_folder(root, num_threads=2).train
    peaks[count] = _peak_bytes_reading_all(split, chunk=16)
  in_memory = int(0.85 * 0.9 * 480) * 32 * 32 * 3 * 4  # the train split as float32
  assert peaks[480] < 1.3 * peaks[40] + 64 * 1024, peaks
  assert peaks[480] < in_memory / 4, (peaks, in_memory)


# ------------------------------------------------------------------------------------------------- bad input


def test_bad_folders_are_one_line_naming_what_is_wrong(tmp_path):
  with pytest.raises(data.DataError, match=rf"directory {re.escape(str(tmp_path / 'nowhere'))} does not exist"):
    streaming.load_folder(str(tmp_path / "nowhere"))
  (tmp_path / "flat").mkdir()
  Image.fromarray(_image(0)).save(tmp_path / "flat" / "0.png")
  with pytest.raises(data.DataError, match=rf"{re.escape(str(tmp_path / 'flat'))} has no class sub-directories"):
    streaming.load_folder(str(tmp_path / "flat"))
  _write_folder(str(tmp_path / "tiny"), per_class=2)
  with pytest.raises(data.DataError, match=r"the val split is empty \(4 images .*raise val_fraction"):
    streaming.load_folder(str(tmp_path / "tiny"))
  with pytest.raises(data.DataError, match=r"the test split is empty \(4 images .*add images$"):
    streaming.load_folder(str(tmp_path / "tiny"), val_fraction=0.5)
  _write_folder(str(tmp_path / "hollow"), per_class=10)
  (tmp_path / "hollow" / "zebra").mkdir()
  (tmp_path / "hollow" / "zebra" / "notes.txt").write_text("no images here")
  with pytest.raises(data.DataError, match=r"class directories \['zebra'\] in .*hollow hold no images"):
    streaming.load_folder(str(tmp_path / "hollow"))
  with pytest.raises(data.DataError, match="channels must be 1 .* or 3"):
    streaming.load_folder(str(tmp_path / "tiny"), channels=4)
  with pytest.raises(data.DataError, match="image_size must be a positive int"):
    streaming.load_folder(str(tmp_path / "tiny"), image_size=(0, 3))
  with pytest.raises(data.DataError, match="val_fraction must be in"):
    streaming.load_folder(str(tmp_path / "tiny"), val_fraction=1.0)


def test_corrupt_images_name_their_file(tmp_path):
  _write_folder(str(tmp_path), per_class=10)
  ds = streaming.load_folder(str(tmp_path))
  truncated, garbage = _paths(ds.train)[-1], _paths(ds.train)[-2]
  with open(truncated, "rb") as f:
    head = f.read()[:60]
  with open(truncated, "wb") as f:
    f.write(head)
  with open(garbage, "wb") as f:
    f.write(b"\x00" * 100)
  for row, path in ((len(ds.train) - 1, truncated), (len(ds.train) - 2, garbage)):
    with pytest.raises(data.DataError, match=rf"^cannot decode image {re.escape(path)}: "):
      ds.train.take([0, row])
  os.remove(garbage)
  with pytest.raises(data.DataError, match=rf"cannot read image {re.escape(garbage)}"):
    ds.train.take([len(ds.train) - 2])
  wide = tmp_path / "cat" / "wide.png"
  Image.fromarray(np.full((24, 32), 40000, np.uint16)).save(wide)
  with pytest.raises(data.DataError, match=r"wide.png is I.*only 8-bit"):
    streaming.decode_image(wide.read_bytes(), streaming.ImageFormat(24, 32, 1), str(wide))


def test_vww_is_the_mlperf_tiny_folder_or_a_line_saying_how_to_get_it(tmp_path):
  for data_dir in (None, str(tmp_path)):
    with pytest.raises(data.DataError, match=r"'vww' needs data_dir holding vw_coco2014_96/ .*not found in "
                                             r".*vw_coco2014_96.tar.gz"):
      streaming.load("vww", data_dir=data_dir)
  _write_folder(str(tmp_path / "vw_coco2014_96"), classes=("person", "non_person"), per_class=10, shape=(40, 40, 3))
  ds = streaming.load("vww", data_dir=str(tmp_path))
  assert ds.name == "vww" and ds.input_shape == (96, 96, 3) and ds.num_classes == 2 and ds.flip_invariant
  assert ds.train.classes == ("non_person", "person")
  np.testing.assert_array_equal(ds.train.labels, ["/person/" in p for p in _paths(ds.train)])
  assert ds.train.take([0])[0].shape == (1, 96, 96, 3)
  assert streaming.load("vww", data_dir=str(tmp_path), image_size=48, channels=1).input_shape == (48, 48, 1)


def test_load_dispatches_the_streamed_names(folder, tmp_path):
  root, _ = folder
  assert streaming.is_streamed("vww") and streaming.is_streamed("folder:x") and streaming.is_streamed("tfds_stream:y")
  assert not any(map(streaming.is_streamed, ("digits", "tfds:mnist", "folder:", "tfds_stream:")))
  ds = streaming.load(f"folder:{os.path.basename(root)}", data_dir=os.path.dirname(root), image_size=8,
                      flip_invariant=True)
  assert ds.input_shape == (8, 8, 3) and ds.flip_invariant
  with pytest.raises(data.DataError, match="unknown streamed dataset 'folder:'"):
    streaming.load("folder:")


# ------------------------------------------------------------------------------------ TFDS, array_record, offline

_TFDS_TRAIN, _TFDS_TEST = TINY_TFDS_TRAIN, TINY_TFDS_TEST


@functools.cache
def _builder_class():
  return tiny_image_builder("EdgenasStreamShapes")


@pytest.fixture(scope="module")
def tfds_dirs(tmp_path_factory):
  """The same builder prepared twice: as array_record (streamable) and as tfrecord (TFDS's default)."""
  dirs = {}
  for file_format in ("array_record", "tfrecord"):
    dirs[file_format] = str(tmp_path_factory.mktemp(file_format))
    _builder_class()(data_dir=dirs[file_format], file_format=file_format).download_and_prepare()
  return dirs


def test_tfds_array_record_streams_the_batches_the_in_memory_load_gives(tfds_dirs, tmp_path, monkeypatch):
  monkeypatch.setenv("EDGENAS_CACHE_DIR", str(tmp_path / "cache"))
  streamed = streaming.load("tfds_stream:edgenas_stream_shapes", data_dir=tfds_dirs["array_record"],
                            val_fraction=0.25, seed=0)
  in_memory = data.load_dataset("tfds:edgenas_stream_shapes", data_dir=tfds_dirs["tfrecord"], val_fraction=0.25,
                                seed=0)
  assert streamed.name == "tfds_stream:edgenas_stream_shapes" and streamed.input_shape == (6, 6, 1)
  assert streamed.num_classes == 3 and not streamed.flip_invariant
  for split in ("train", "val", "test"):
    ours, theirs = getattr(streamed, split), getattr(in_memory, split)
    assert len(ours) == len(theirs)
    np.testing.assert_array_equal(ours.labels, theirs.labels)
    np.testing.assert_array_equal(ours.take(np.arange(len(ours)))[0], theirs.images)
  a, b = data.BatchStream.of(streamed.train, 8, seed=5), data.BatchStream.of(in_memory.train, 8, seed=5)
  for step in (0, 4, 11):
    np.testing.assert_array_equal(a.batch_at(step)[0], b.batch_at(step)[0])
  assert streaming.load("tfds_stream:edgenas_stream_shapes", data_dir=tfds_dirs["array_record"],
                        image_size=(3, 4), channels=3).test.take([0])[0].shape == (1, 3, 4, 3)


def test_tfds_labels_are_cached_outside_the_data_dir(tfds_dirs, tmp_path, monkeypatch):
  monkeypatch.setenv("EDGENAS_CACHE_DIR", str(tmp_path / "cache"))
  first = streaming.load("tfds_stream:edgenas_stream_shapes", data_dir=tfds_dirs["array_record"])
  cached = sorted((tmp_path / "cache" / "tfds_labels").iterdir())
  assert len(cached) == 2  # train and test
  for path in cached:  # the second load reads the labels from the cache, not from the records
    labels = np.load(path)
    np.save(path, (labels + 1) % 3)
  second = streaming.load("tfds_stream:edgenas_stream_shapes", data_dir=tfds_dirs["array_record"])
  np.testing.assert_array_equal(second.test.labels, (first.test.labels + 1) % 3)


def test_tfds_not_streamable_or_not_prepared_says_what_to_do(tfds_dirs, tmp_path):
  with pytest.raises(data.DataError, match=r"prepared as tfrecord only.*tfds build edgenas_stream_shapes "
                                           r"--file_format=array_record.*or use 'tfds:edgenas_stream_shapes'"):
    streaming.load("tfds_stream:edgenas_stream_shapes", data_dir=tfds_dirs["tfrecord"])
  where = re.escape(str(tmp_path))
  with pytest.raises(data.DataError, match=rf"'tfds_stream:mnist' is not prepared in data_dir {where}.*"
                                           r"tfds build mnist --file_format=array_record"):
    streaming.load("tfds_stream:mnist", data_dir=str(tmp_path))
  with pytest.raises(data.DataError, match=r"data_dir .*nowhere does not exist"):
    streaming.load("tfds_stream:mnist", data_dir=str(tmp_path / "nowhere"))


def test_reading_a_folder_imports_no_tensorflow(folder):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = (f"import sys; from edgenas import streaming; streaming.load('folder:{folder[0]}').train.take([0, 1]); "
          "bad = [m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_a_streamed_folder_goes_through_the_real_search_and_retrain_loops(folder, tmp_path):
  """The loops read a streamed split only through the split protocol: a tiny search and a retrain on `folder:`,
  with a non-square image size, run end to end and never hold the split in memory."""
  from conftest import small_search_config
  from edgenas import search as search_lib
  from edgenas import train as train_lib
  root, _ = folder
  c = small_search_config()
  c.dataset = f"folder:{root}"
  del c.image_size
  c.image_size = (12, 8)
  c.channels = 1
  c.val_fraction = 0.25
  c.search.batch_size = 8
  c.retrain.update(dict(epochs=1, qat_epochs=0, warmup_epochs=0, batch_size=8))
  ds = data.load_data(c)
  assert isinstance(ds.train, streaming.StreamSplit) and ds.input_shape == (12, 8, 1)
  result = search_lib.run_search(c, str(tmp_path / "search"))
  arch = train_lib.arch_lib.Architecture.load(str(tmp_path / "search" / "arch.json"))
  assert arch.input_shape == (12, 8, 1) and arch.num_classes == 2
  assert result["steps"] == len(ds.train) // 8  # max_steps 6 caps nothing: one epoch of batches of 8
  report = train_lib.run_retrain(c, arch, str(tmp_path / "retrain"))
  assert report["steps"] == (len(ds.train) + len(ds.val)) // 8  # train + validation, streamed through concat
  assert 0.0 <= report["test_acc_float"] <= 1.0
