"""The embedded keyword-spotting set: real espeak-ng synthesis, deterministic generation, the cache's rules, splits."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edgenas import audio
from edgenas import data
from edgenas import espeak
from edgenas import kws

# 12 x 3 test clips (one chunk) and 5 cycles of the training pool's classes (one chunk): two chunks, so two
# workers both work.
TINY = kws.GenerationParams(train_per_class=5, test_per_class=3, babble_phrases=4)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The tiny set generated in this process (one worker) through the real cache, and where it lives."""
  parent = str(tmp_path_factory.mktemp("kws-reference"))
  return kws.load_arrays(TINY, parent, workers=1), parent


def _same(a, b):
  assert sorted(a) == sorted(b) == sorted(kws.ARRAYS)
  for name in kws.ARRAYS:
    assert a[name].dtype == b[name].dtype, name
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# --------------------------------------------------------------------------------------------------------------
# espeak-ng


def test_synthesis_is_speech_at_the_native_rate_and_resamples_to_16k():
  synth = espeak.synthesizer()
  assert synth.sample_rate == espeak.NATIVE_RATE == 22050
  wave = synth.synthesize("stop", espeak.Voice("en-us+f3", rate=150, pitch=60))
  assert wave.dtype == np.float32 and wave.ndim == 1
  assert 0.2 < len(wave) / synth.sample_rate < 1.0  # one word
  assert 0.05 < np.sqrt(np.mean(wave ** 2)) and np.abs(wave).max() <= 1.0
  resampled = espeak.resample_16k(wave)
  assert resampled.dtype == np.float32 and abs(len(resampled) - len(wave) * 320 / 441) <= 1
  # The energy stays where it was: the resampler changes the rate, not the sound.
  np.testing.assert_allclose(np.mean(resampled ** 2), np.mean(wave ** 2), rtol=0.05)


def test_synthesis_is_a_pure_function_of_text_and_voice():
  synth = espeak.synthesizer()
  voice = espeak.Voice("en-gb-x-rp+klatt2", rate=200, pitch=30, pitch_range=80, seed=11)
  first = synth.synthesize("left", voice)
  synth.synthesize("yes no up down", espeak.Voice("en+m3"))  # whatever was said before ...
  np.testing.assert_array_equal(synth.synthesize("left", voice), first)  # ... changes nothing
  assert not np.array_equal(synth.synthesize("left", espeak.Voice("en-gb-x-rp+f4", seed=11))[:len(first)], first)
  assert len(synth.synthesize("left", espeak.Voice("en-gb-x-rp+klatt2", rate=100))) > 1.3 * len(first)  # slower
  batch = [("go", voice), ("right", espeak.Voice("en-029+m7"))]
  _pairs_equal(synth.synthesize_many(batch), synth.synthesize_many(batch))


def _pairs_equal(a, b):
  assert len(a) == len(b) and all(len(x) > 1000 for x in a)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_synthesis_matches_across_processes():
  code = ("import numpy as np; from edgenas import espeak; "
          "w = espeak.synthesizer().synthesize('seven', espeak.Voice('en-us+whisper', seed=5)); "
          "print(len(w), float(np.abs(w.astype(np.float64)).sum()))")
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
  wave = espeak.synthesizer().synthesize("seven", espeak.Voice("en-us+whisper", seed=5))
  length, total = out.split()
  assert int(length) == len(wave) and float(total) == float(np.abs(wave.astype(np.float64)).sum())


def test_unknown_voice_and_bad_parameters_are_named():
  synth = espeak.synthesizer()
  with pytest.raises(espeak.EspeakError, match="no voice 'en-zz'"):
    synth.synthesize("yes", espeak.Voice("en-zz"))
  with pytest.raises(espeak.EspeakError, match=r"rate must be an integer in \[80, 450\]"):
    synth.synthesize("yes", espeak.Voice(rate=20))


def test_missing_library_is_one_clear_line(monkeypatch, tmp_path):
  missing = str(tmp_path / "libespeak-ng.so")
  monkeypatch.setenv(espeak.LIBRARY_ENV, missing)
  with pytest.raises(espeak.EspeakError) as e:
    espeak.Synthesizer()
  message = str(e.value)
  assert "\n" not in message and missing in message and "pip install espeakng-loader" in message
  assert isinstance(e.value, data.DataError)  # the launchers' one error boundary prints it as one line
  not_a_library = tmp_path / "libfake.so"
  not_a_library.write_text("not a shared library")
  monkeypatch.setenv(espeak.LIBRARY_ENV, str(not_a_library))
  with pytest.raises(espeak.EspeakError, match="not a loadable library.*espeakng-loader") as e:
    espeak.Synthesizer()
  assert "\n" not in str(e.value)


def test_missing_library_fails_the_dataset_load_before_any_work(monkeypatch, tmp_path):
  monkeypatch.setenv(espeak.LIBRARY_ENV, str(tmp_path / "nothing.so"))
  monkeypatch.setattr(kws, "DEFAULT_PARAMS", TINY)
  with pytest.raises(data.DataError, match="cannot load espeak-ng.*pip install espeakng-loader"):
    data.load_dataset("kws", data_dir=str(tmp_path / "cache"))
  assert not glob.glob(str(tmp_path / "cache" / "*kws*"))  # nothing half-made was left behind


def test_incomplete_data_directory_is_named(tmp_path):
  (tmp_path / "phontab").write_bytes(b"")
  with pytest.raises(espeak.EspeakError, match="lacks phonindex.*espeakng-loader"):
    espeak.data_path(str(tmp_path))


# --------------------------------------------------------------------------------------------------------------
# Generation and the cache


def test_generation_is_deterministic_across_cache_dirs_and_worker_counts(reference, tmp_path):
  arrays, _ = reference
  assert len(kws.chunks(TINY)) == 2
  _same(kws.load_arrays(TINY, str(tmp_path / "one"), workers=1), arrays)
  _same(kws.load_arrays(TINY, str(tmp_path / "two"), workers=2), arrays)
  with open(os.path.join(kws.dataset_dir(TINY, str(tmp_path / "two")), kws.MANIFEST)) as f:
    two = json.load(f)
  with open(os.path.join(kws.dataset_dir(TINY, str(tmp_path / "one")), kws.MANIFEST)) as f:
    one = json.load(f)
  assert two["arrays"] == one["arrays"] and two["workers"] == 2 and one["workers"] == 1


def test_arrays_are_mfccs_of_balanced_classes(reference):
  arrays, parent = reference
  n = TINY.num_clips
  assert arrays["features"].shape == (n, audio.NUM_FRAMES, audio.NUM_MFCC) and arrays["features"].dtype == np.float32
  assert np.isfinite(arrays["features"]).all() and arrays["features"].std() > 1.0
  test_counts = np.bincount(arrays["labels"][arrays["split"] == kws.TEST], minlength=12)
  np.testing.assert_array_equal(test_counts, [TINY.test_per_class] * 12)  # balanced, as MLPerf Tiny's test set
  train_counts = np.bincount(arrays["labels"][arrays["split"] == kws.TRAIN], minlength=12)
  unknown = audio.LABELS.index(audio.UNKNOWN)
  assert train_counts[unknown] == TINY.train_unknown_multiple * TINY.train_per_class
  np.testing.assert_array_equal(np.delete(train_counts, unknown), [TINY.train_per_class] * 11)
  silence = arrays["labels"] == audio.LABELS.index(audio.SILENCE)
  assert (arrays["word"][silence] == -1).all() and (arrays["word"][~silence] >= 0).all()
  with open(os.path.join(kws.dataset_dir(TINY, parent), kws.MANIFEST)) as f:
    manifest = json.load(f)
  assert manifest["params"] == json.loads(json.dumps(TINY.to_dict())) and manifest["params_hash"] == TINY.hash()
  assert manifest["counts"] == dict(total=n, train_pool=n - 36, test=36)
  assert manifest["per_class"]["test"] == {label: 3 for label in audio.LABELS}
  assert manifest["espeak"]["version"] not in ("", "unknown")


def test_every_split_speaks_only_its_own_voices(reference):
  arrays, _ = reference
  voices = np.asarray(TINY.voices)
  assert set(voices[arrays["speaker"][arrays["split"] == kws.TEST]]) <= set(TINY.test_variants)
  assert set(voices[arrays["speaker"][arrays["split"] == kws.TRAIN]]) <= set(TINY.train_variants)


def test_waveforms_hold_a_word_placed_anywhere(reference):
  clips = kws.make_clips(TINY, 0, 24)
  waves = clips["waveforms"]
  assert waves.shape == (24, audio.CLIP_SAMPLES) and waves.dtype == np.float32
  np.testing.assert_array_equal(np.round(waves * 32768), waves * 32768)  # 16-bit samples
  assert (np.abs(waves).max(axis=1) > 10 ** (-31 / 20)).all()  # nothing below the lowest gain
  # Where the loudest 100 ms sits varies from clip to clip: words are not all at the start or in the middle.
  frames = (waves[:, :16000].reshape(24, 10, 1600) ** 2).mean(-1)
  assert len(set(frames.argmax(1).tolist())) >= 4
  _same(kws.make_features(TINY, 0, 36), {k: v[:36] for k, v in reference[0].items()})


def test_test_split_does_not_move_with_the_size_of_the_training_pool(reference, tmp_path):
  arrays, _ = reference
  bigger = kws.load_arrays(kws.GenerationParams(train_per_class=6, test_per_class=3, babble_phrases=4),
                           str(tmp_path), workers=1)
  test = arrays["split"] == kws.TEST
  for name in kws.ARRAYS:
    np.testing.assert_array_equal(bigger[name][:test.sum()], arrays[name][test], err_msg=name)


def test_a_cached_set_is_read_not_generated(reference, monkeypatch):
  arrays, parent = reference
  monkeypatch.setattr(kws, "generate", lambda *a, **k: pytest.fail("generated although the cache was complete"))
  _same(kws.load_arrays(TINY, parent), arrays)


def test_leftover_temporary_directory_is_never_used(reference, tmp_path, capsys):
  arrays, _ = reference
  parent = str(tmp_path)
  final = kws.dataset_dir(TINY, parent)
  name = os.path.basename(final)
  # An interrupted writer that is still alive (this process's pid) and one that died (a pid that cannot exist).
  live = os.path.join(parent, f".{name}.tmp-{os.getpid()}-aaaa")
  dead = os.path.join(parent, f".{name}.tmp-{2**22 + 12345}-bbbb")
  for leftover in (live, dead):
    os.makedirs(leftover)
    np.save(os.path.join(leftover, "features.npy"), np.zeros((3, 49, 10), np.float32))
  _same(kws.load_arrays(TINY, parent, workers=1), arrays)
  assert "generating" in capsys.readouterr().out
  assert os.path.isfile(os.path.join(live, "features.npy"))  # a live writer's files are its own
  assert not os.path.exists(dead)  # a dead writer's are cleaned up
  _same(kws.read_cache(final, TINY), arrays)


def test_tampered_or_partial_cache_is_detected_and_made_again(reference, tmp_path, capsys):
  arrays, _ = reference
  parent = str(tmp_path)
  final = kws.dataset_dir(TINY, parent)
  kws.load_arrays(TINY, parent, workers=1)
  path = os.path.join(final, "features.npy")
  raw = bytearray(open(path, "rb").read())
  raw[-5] ^= 0xFF  # one flipped byte in the last feature
  with open(path, "wb") as f:
    f.write(raw)
  with open(os.path.join(final, "notes.txt"), "w") as f:
    f.write("a file kws did not write")
  capsys.readouterr()
  with pytest.raises(kws.CacheError, match="features.npy does not match its sha256"):
    kws.read_cache(final, TINY)
  _same(kws.load_arrays(TINY, parent, workers=1), arrays)
  lines = capsys.readouterr().out.splitlines()
  assert any("unusable (features.npy does not match its sha256" in line for line in lines), lines
  _same(kws.read_cache(final, TINY), arrays)
  kept = glob.glob(final + ".unusable-*/notes.txt")  # never deletes what it did not write
  assert len(kept) == 1 and not os.path.exists(os.path.join(os.path.dirname(kept[0]), "features.npy"))
  os.remove(os.path.join(final, "labels.npy"))  # a partial copy (files removed by hand)
  _same(kws.load_arrays(TINY, parent, workers=1), arrays)
  assert "labels.npy is missing" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------
# The Dataset


def test_dataset_splits_and_seed_independent_test(reference, monkeypatch):
  arrays, parent = reference
  monkeypatch.setattr(kws, "DEFAULT_PARAMS", TINY)
  a = data.load_dataset("kws", data_dir=parent, val_fraction=0.25, seed=0)  # through data.py's dispatch
  b = data.load_dataset("kws", data_dir=parent, val_fraction=0.25, seed=1)
  assert a.name == "kws" and a.num_classes == 12 and a.input_shape == (49, 10, 1) and not a.flip_invariant
  for split in (a.train, a.val, a.test):
    assert split.images.dtype == np.float32 and split.labels.dtype == np.int32
    assert split.images.shape[1:] == (49, 10, 1)
  assert len(a.test) == 36 and len(a.train) + len(a.val) == TINY.num_clips - 36
  np.testing.assert_array_equal(a.test.images, b.test.images)
  np.testing.assert_array_equal(a.test.labels, b.test.labels)
  np.testing.assert_array_equal(a.test.images[..., 0], arrays["features"][arrays["split"] == kws.TEST])
  assert not np.array_equal(_sorted_rows(a.val), _sorted_rows(b.val))
  np.testing.assert_array_equal(_sorted_rows(data.concat(a.train, a.val)), _sorted_rows(data.concat(b.train, b.val)))


def _sorted_rows(split):
  flat = np.concatenate([split.images.reshape(len(split), -1), split.labels[:, None].astype(np.float32)], axis=1)
  return flat[np.lexsort(flat.T[::-1])]


def test_validation_is_carved_by_whole_voices():
  speakers = np.repeat(np.arange(10), [5, 1, 8, 2, 3, 7, 4, 6, 2, 2])
  for seed in range(5):
    val = kws.val_speakers(speakers, 0.2, seed)
    held = np.isin(speakers, val)
    assert 0.2 * len(speakers) <= held.sum() < 0.2 * len(speakers) + 8  # whole voices: up to one voice over
    assert 1 <= len(val) < 10
  assert not np.array_equal(kws.val_speakers(speakers, 0.2, 0), kws.val_speakers(speakers, 0.2, 1))
  assert len(kws.val_speakers(np.array([0, 0, 1]), 0.99, 0)) == 1  # at least one voice stays for training
  with pytest.raises(data.DataError, match="at least 2"):
    kws.val_speakers(np.zeros(5, int), 0.2, 0)


def test_params_are_checked_and_hashed():
  assert kws.GenerationParams().hash() == kws.DEFAULT_PARAMS.hash() != TINY.hash()
  assert kws.dataset_dir(TINY, "/x").startswith(f"/x/kws-v{kws.KWS_VERSION}-")
  assert kws.DEFAULT_PARAMS.num_test >= 2000  # one test clip is at most 0.05 accuracy points
  with pytest.raises(data.DataError, match="both splits"):
    kws.GenerationParams(test_variants=("m1",))


def test_unwritable_cache_is_one_clear_error(tmp_path):
  blocker = tmp_path / "a-file"
  blocker.write_text("not a directory")
  with pytest.raises(data.DataError, match="cannot write the dataset cache .*writable directory as data_dir"):
    kws.load_arrays(TINY, str(blocker / "cache"), workers=1)
