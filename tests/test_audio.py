"""The KWS audio front-end (NumPy MFCCs against tf.signal's pipeline, clip checks) and the Speech Commands loader."""
import os
import subprocess
import sys

import numpy as np
import pytest

from edgenas import audio
from edgenas import data

_T = np.arange(audio.CLIP_SAMPLES) / audio.SAMPLE_RATE


def _tf_mfcc(waveforms, dtype="float32"):
  """MLPerf Tiny's get_dataset feature computation, in tf.signal (the reference `audio.mfcc` must match)."""
  import tensorflow as tf
  dtype = tf.as_dtype(dtype)
  x = tf.constant(waveforms, dtype)
  spectrograms = tf.abs(tf.signal.stft(x, frame_length=480, frame_step=320, fft_length=512,
                                       window_fn=tf.signal.hann_window))
  mel = tf.signal.linear_to_mel_weight_matrix(40, spectrograms.shape[-1], 16000, 20.0, 4000.0, dtype=dtype)
  log_mel = tf.math.log(tf.tensordot(spectrograms, mel, 1) + 1e-6)
  return tf.signal.mfccs_from_log_mel_spectrograms(log_mel)[..., :10].numpy()


def _signals(noise_floor: float) -> np.ndarray:
  """A sweep, a chirp, white noise, an amplitude-modulated tone, a half-second burst, a pure tone, silence.

  `noise_floor` adds white noise of that standard deviation, as every recording has (a microphone's, or at
  least int16 quantisation's).
  """
  rng = np.random.default_rng(0)
  clips = np.stack([
      np.sin(2 * np.pi * (100 + 1700 * _T) * _T),  # linear sweep 100 -> 3500 Hz
      0.5 * np.sin(2 * np.pi * 200 * (20 ** _T - 1) / np.log(20)),  # exponential chirp 200 -> 4000 Hz
      0.3 * rng.standard_normal(audio.CLIP_SAMPLES),
      0.05 * np.sin(2 * np.pi * 440 * _T) * (1 + np.sin(2 * np.pi * 3 * _T)),
      np.concatenate([rng.uniform(-1, 1, 8000), np.zeros(8000)]),  # a short clip, zero-padded
      np.sin(2 * np.pi * 1000 * _T),
      np.zeros(audio.CLIP_SAMPLES),
  ])
  return (clips + noise_floor * rng.standard_normal(clips.shape)).astype(np.float32)


def test_constants_and_labels():
  assert audio.NUM_FRAMES == 49 and audio.INPUT_SHAPE == (49, 10, 1)
  assert audio.LABELS == ("down", "go", "left", "no", "off", "on", "right", "stop", "up", "yes", "_silence_",
                          "_unknown_")
  assert audio.LABELS[:10] == audio.KEYWORDS and audio.LABELS[10:] == (audio.SILENCE, audio.UNKNOWN)


def test_labels_are_the_tfds_class_order():
  import tensorflow_datasets as tfds
  assert tuple(tfds.builder("speech_commands").info.features["label"].names) == audio.LABELS


def test_mel_and_dct_matrices_match_tf_signal():
  import tensorflow as tf
  reference = tf.signal.linear_to_mel_weight_matrix(40, 257, 16000, 20.0, 4000.0).numpy()
  assert audio.mel_matrix().shape == (257, 40) and audio.mel_matrix().dtype == np.float32
  np.testing.assert_allclose(audio.mel_matrix(), reference, rtol=0, atol=1e-5)
  assert not audio.mel_matrix()[0].any()  # the DC bin feeds no mel bin
  log_mel = np.random.default_rng(1).normal(-5, 3, (7, 40)).astype(np.float32)
  np.testing.assert_allclose(log_mel @ audio.dct_matrix(),
                             tf.signal.mfccs_from_log_mel_spectrograms(log_mel)[..., :10].numpy(), rtol=0, atol=1e-4)


def test_mfcc_matches_tf_signal_on_recorded_like_audio():
  clips = _signals(noise_floor=1e-3)
  ours, reference = audio.mfcc(clips), _tf_mfcc(clips)
  assert ours.shape == (len(clips), 49, 10) and ours.dtype == np.float32
  error = np.abs(ours - reference)
  scale = np.abs(reference).max(axis=(1, 2), keepdims=True)  # per clip: coefficients k >= 1 of silence are ~0
  print(f"mfcc vs tf.signal: max abs {error.max():.2e}, max abs / clip's max |mfcc| {(error / scale).max():.2e}")
  # The coefficients span about +-120; the differences are float32 round-off.
  np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-3)
  assert (error / scale).max() < 5e-5


def test_mfcc_float32_error_is_no_larger_than_tf_signals_own():
  """Without a noise floor the mel bins far from a pure tone hold only FFT round-off (~1e-5 of the peak, against
  the 1e-6 log offset), so any two float32 pipelines differ there; both are compared with float64 truth."""
  clips = _signals(noise_floor=0.0)
  truth = _tf_mfcc(clips.astype(np.float64), dtype="float64")
  ours_error = np.abs(audio.mfcc(clips) - truth).max(axis=(1, 2))
  tf_error = np.abs(_tf_mfcc(clips) - truth).max(axis=(1, 2))
  print(f"error against float64: ours {ours_error.max():.2e}, tf.signal float32 {tf_error.max():.2e}")
  assert np.all(ours_error <= 3 * tf_error + 1e-4), (ours_error, tf_error)


def test_mfcc_shapes_chunks_and_silence():
  clips = np.random.default_rng(2).uniform(-1, 1, (audio._CHUNK + 3, audio.CLIP_SAMPLES)).astype(np.float32)
  whole = audio.mfcc(clips)
  assert whole.shape == (audio._CHUNK + 3, 49, 10)
  np.testing.assert_array_equal(whole[-3:], audio.mfcc(clips[-3:]))  # chunking does not change a clip's result
  assert audio.mfcc(np.zeros((0, audio.CLIP_SAMPLES), np.float32)).shape == (0, 49, 10)
  silence = audio.mfcc(np.zeros((1, audio.CLIP_SAMPLES), np.float32))
  np.testing.assert_allclose(silence[..., 0], np.log(1e-6) * np.sqrt(2 * 40), rtol=1e-6)  # flat log(1e-6)
  np.testing.assert_allclose(silence[..., 1:], 0.0, atol=1e-4)
  with pytest.raises(audio.AudioError, match=r"mfcc: expected clips \[N, 16000\], got shape \(16000,\)"):
    audio.mfcc(np.zeros(audio.CLIP_SAMPLES, np.float32))


def test_features_peak_normalise_as_mlperf_tiny():
  clips = _signals(noise_floor=1e-3)[:3]
  images = audio.features(0.25 * clips)
  assert images.shape == (3, 49, 10, 1) and images.dtype == np.float32
  np.testing.assert_allclose(images[..., 0], _tf_mfcc(clips / clips.max(axis=1, keepdims=True)), rtol=0, atol=1e-3)
  np.testing.assert_array_equal(audio.peak_normalize(np.zeros((2, 5), np.float32)), 0.0)  # no division by zero


def test_check_clips_accepts_and_converts():
  clips = audio.check_clips(np.zeros((3, audio.CLIP_SAMPLES), np.float64), 16000, "unit")
  assert clips.shape == (3, audio.CLIP_SAMPLES) and clips.dtype == np.float32
  np.testing.assert_array_equal(audio.from_int16(np.array([-32768, 0, 16384], np.int16)), [-1.0, 0.0, 0.5])


@pytest.mark.parametrize("waveforms, sample_rate, match", [
    (np.zeros((2, 16000)), 8000, r"^my.wav: sample rate 8000 Hz; the KWS front-end needs 16000 Hz"),
    (np.zeros((2, 16001)), 16000, r"^my.wav: clips of 16001 samples are longer than 1 s"),
    (np.zeros((2, 15999)), 16000, r"^my.wav: clips of 15999 samples are shorter than 1 s .* audio.pad_clips"),
    (np.zeros(16000), 16000, r"^my.wav: expected clips \[N, 16000\], got an array of shape \(16000,\)"),
    (np.zeros((2, 16000), np.int16), 16000, r"^my.wav: expected float samples .* audio.from_int16"),
    (np.array([[0.0] * 15999 + [np.nan]] * 2 + [[0.0] * 16000]), 16000,
     r"^my.wav: 2 clip\(s\) hold non-finite samples \(NaN/inf\), the first at index 0"),
])
def test_check_clips_refuses_with_one_line(waveforms, sample_rate, match):
  with pytest.raises(audio.AudioError, match=match) as info:
    audio.check_clips(waveforms, sample_rate, "my.wav")
  assert "\n" not in str(info.value) and isinstance(info.value, data.DataError)


def test_pad_clips_zero_pads_at_the_end():
  padded = audio.pad_clips([np.ones(100), np.full(16000, 0.5), np.zeros(0)], "list")
  assert padded.shape == (3, 16000) and padded.dtype == np.float32
  assert padded[0, :100].min() == 1.0 and not padded[0, 100:].any() and padded[1].min() == 0.5
  assert audio.pad_clips([], "list").shape == (0, 16000)


@pytest.mark.parametrize("clips, match", [
    ([np.zeros(10), np.zeros(16001)], r"^clips.npz: clip 1 has 16001 samples, longer than 1 s"),
    ([np.zeros((2, 100))], r"^clips.npz: clip 0 has shape \(2, 100\); expected 1-D samples \(mono\)"),
    ([np.array([np.inf])], r"^clips.npz: 1 clip\(s\) hold non-finite samples"),
])
def test_pad_clips_refuses_with_one_line(clips, match):
  with pytest.raises(audio.AudioError, match=match):
    audio.pad_clips(clips, "clips.npz")


def test_importing_audio_and_mfcc_do_not_import_tensorflow():
  code = ("import sys, numpy as np, edgenas.audio as a; a.features(np.zeros((2, 16000), np.float32)); "
          "bad = [m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --------------------------------------------------------------------------------------------------------------
# Speech Commands through TFDS


def _prepare(data_dir, splits, sample_rate=16000, label_names=None):
  """A really prepared `speech_commands` in `data_dir`: TFDS's own writer, the real builder's features and split
  names, the examples given here ({split: [(int16 audio, label)]}) instead of the 2 GB archives.

  `sample_rate` / `label_names` other than the real ones make a directory that only `tfds.builder_from_directory`
  reads as written (the registered builder takes its features from code).
  """
  import tensorflow_datasets as tfds
  from tensorflow_datasets.datasets.speech_commands import speech_commands_dataset_builder as real

  class Tiny(real.Builder, skip_registration=True):
    name = "speech_commands"

    @classmethod
    def _get_pkg_dir_path(cls):
      return real.Builder._get_pkg_dir_path()  # the real builder's metadata (README, citation)

    def _info(self):
      if sample_rate == 16000 and label_names is None:
        return super()._info()
      return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
          "audio": tfds.features.Audio(file_format="wav", sample_rate=sample_rate, dtype=np.int16),
          "label": tfds.features.ClassLabel(names=label_names or list(audio.LABELS))}),
          supervised_keys=("audio", "label"))

    def _split_generators(self, dl_manager):
      del dl_manager  # nothing to download
      return {split: self._generate_examples(examples) for split, examples in splits.items()}

    def _generate_examples(self, examples):
      for i, (clip, label) in enumerate(examples):
        yield f"{i:05d}", {"audio": clip, "label": label}

  tfds.disable_progress_bar()
  Tiny(data_dir=str(data_dir)).download_and_prepare()
  return os.path.join(str(data_dir), "speech_commands", "0.0.3")


def _clips(rng, lengths):
  return [(np.round(8000 * np.sin(2 * np.pi * rng.uniform(200, 3000) * np.arange(n) / 16000) + rng.normal(0, 30, n))
           .astype(np.int16), int(rng.integers(0, 12))) for n in lengths]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  rng = np.random.default_rng(3)
  splits = {"train": _clips(rng, [16000, 12000, 16000, 9000, 16000]), "validation": _clips(rng, [16000, 5000, 16000]),
            "test": _clips(rng, [14000, 16000])}
  data_dir = tmp_path_factory.mktemp("speech_commands")
  _prepare(data_dir, splits)
  return str(data_dir), splits


def test_load_speech_commands_from_a_prepared_data_dir(prepared):
  data_dir, splits = prepared
  ds = data.load_dataset("tfds:speech_commands", data_dir=data_dir)
  assert (ds.name, ds.input_shape, ds.num_classes, ds.flip_invariant) == ("tfds:speech_commands", (49, 10, 1), 12,
                                                                          False)
  for split, name in ((ds.train, "train"), (ds.val, "validation"), (ds.test, "test")):
    assert len(split) == len(splits[name])  # the builder's own splits, whole
    assert split.images.shape == (len(splits[name]), 49, 10, 1) and split.images.dtype == np.float32
    assert split.labels.dtype == np.int32
    # TFDS shuffles examples when writing; match each clip by its features (distinct random tones).
    expected = audio.features(audio.pad_clips([audio.from_int16(c) for c, _ in splits[name]], "test"))
    labels = np.array([label for _, label in splits[name]], np.int32)
    order = [int(np.argmin(np.abs(expected - image).max(axis=(1, 2, 3)))) for image in split.images]
    assert sorted(order) == list(range(len(order)))
    np.testing.assert_allclose(split.images, expected[order], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(split.labels, labels[order])


def test_load_speech_commands_unpeaked_is_int16_over_32768(prepared):
  data_dir, splits = prepared
  ds = audio.load_speech_commands(data_dir, val_fraction=0.5, seed=7, peak_normalize_clips=False)
  expected = audio.mfcc(audio.pad_clips([audio.from_int16(c) for c, _ in splits["test"]], "test"))[..., None]
  assert min(np.abs(expected - ds.test.images[0]).max() for expected in expected) < 1e-4


def test_load_speech_commands_under_tfds_mock_data(prepared, tmp_path):
  """tfds.testing.mock_data with MockPolicy.USE_FILES: the real metadata of `prepared` (so `is_prepared()` holds
  and the loader runs all its checks unchanged) and the mock's random examples from the feature spec: clips of
  5-50 int16 samples, random labels, `num_examples` in every split. MockPolicy.USE_CODE cannot be used: it points
  the builder at a data_dir that does not exist, which the loader rightly refuses as not prepared."""
  import tensorflow_datasets as tfds
  data_dir, _ = prepared
  with tfds.testing.mock_data(num_examples=9, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=data_dir):
    ds = data.load_dataset("tfds:speech_commands", data_dir=str(tmp_path))  # the mock reads `prepared` instead
  for split in (ds.train, ds.val, ds.test):
    assert split.images.shape == (9, 49, 10, 1) and split.images.dtype == np.float32
    assert split.labels.dtype == np.int32 and split.labels.min() >= 0 and split.labels.max() < 12
    assert np.isfinite(split.images).all()
    # Clips of at most 50 samples: the frames after the first hold only the zero padding, log(1e-6) flat.
    np.testing.assert_allclose(split.images[:, 1:, 0, 0], np.log(1e-6) * np.sqrt(80), rtol=1e-5)


def test_load_speech_commands_not_prepared(tmp_path):
  with pytest.raises(data.DataError, match=r"data_dir .*/missing does not exist\. dataset 'tfds:speech_commands' "
                                           r"is not prepared .* `tfds build speech_commands --data_dir=<dir>`"):
    data.load_dataset("tfds:speech_commands", data_dir=str(tmp_path / "missing"))
  with pytest.raises(data.DataError, match=r"^dataset 'tfds:speech_commands' is not prepared in data_dir "):
    audio.load_speech_commands(str(tmp_path), val_fraction=0.1, seed=0)
  assert not os.listdir(tmp_path)  # nothing written, nothing downloaded


def test_load_speech_commands_refuses_a_clip_longer_than_one_second(tmp_path):
  rng = np.random.default_rng(4)
  _prepare(tmp_path, {"train": _clips(rng, [16000]), "validation": _clips(rng, [16001]), "test": _clips(rng, [10])})
  with pytest.raises(audio.AudioError, match=r"^dataset 'tfds:speech_commands' split 'validation': clip 0 has "
                                             r"16001 samples, longer than 1 s \(16000 samples at 16000 Hz\)$"):
    audio.load_speech_commands(str(tmp_path), val_fraction=0.1, seed=0)


@pytest.mark.parametrize("sample_rate, label_names, error, match", [
    (8000, None, audio.AudioError, r"the audio feature's sample rate is 8000 Hz; the KWS front-end needs 16000 Hz$"),
    (16000, ["yes", "no"], data.DataError, r"label names \['yes', 'no'\] differ from the 12 this front-end expects"),
])
def test_load_speech_commands_refuses_other_features(tmp_path, monkeypatch, sample_rate, label_names, error, match):
  import tensorflow_datasets as tfds
  rng = np.random.default_rng(5)
  clips = [(clip, 0) for clip, _ in _clips(rng, [100])]
  variant = _prepare(tmp_path, {s: clips for s in ("train", "validation", "test")}, sample_rate, label_names)
  monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: tfds.builder_from_directory(variant))
  with pytest.raises(error, match=r"^dataset 'tfds:speech_commands' in .*: " + match) as info:
    audio.load_speech_commands(str(tmp_path), val_fraction=0.1, seed=0)
  assert "\n" not in str(info.value)


def test_load_speech_commands_in_small_batches_is_the_same_and_reports_progress(prepared, monkeypatch, capsys):
  data_dir, _ = prepared
  whole = audio.load_speech_commands(data_dir, val_fraction=0.1, seed=0)
  monkeypatch.setattr(audio, "_READ_BATCH", 2)  # batches padded to different widths
  monkeypatch.setattr(audio, "_PROGRESS_EVERY", 2)
  capsys.readouterr()
  batched = audio.load_speech_commands(data_dir, val_fraction=0.1, seed=0)
  for a, b in ((whole.train, batched.train), (whole.val, batched.val), (whole.test, batched.test)):
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
  lines = capsys.readouterr().out.splitlines()
  assert "dataset 'tfds:speech_commands' split 'train': 2 clips" in lines
  assert "dataset 'tfds:speech_commands' split 'train': 4 clips" in lines
  assert "dataset 'tfds:speech_commands' split 'train': 5 clips -> features (49, 10, 1)" in lines
