"""The keyword-spotting audio front-end of MLPerf Tiny's KWS reference, in NumPy, and TFDS's Speech Commands.

Front-end (MLPerf Tiny `get_dataset.py`, feature_type 'mfcc'): 1 s clips at 16 kHz, frames of 30 ms (480 samples)
every 20 ms (320) without end padding (49 frames), periodic Hann window, |rFFT| of 512 points, 40 HTK-mel bins over
20-4000 Hz (the DC bin weighted 0), log(mel + 1e-6), DCT-II scaled as tf.signal.mfccs_from_log_mel_spectrograms,
the first 10 coefficients: a [49, 10, 1] image per clip. `mfcc` reproduces tf.signal's pipeline to float32
round-off (tests/test_audio.py compares them) without TensorFlow, so the search path stays TensorFlow-free.

Clips shorter than 1 s are zero-padded at the end, as MLPerf Tiny does (many Speech Commands clips are shorter);
longer ones are refused rather than cut, since which second holds the word is unknown.

Speech Commands (`tfds:speech_commands`) is read from a prepared TFDS data_dir with the builder's own
train / validation / test splits, which are speaker-disjoint (the dataset's validation_list / testing_list), as
MLPerf Tiny uses them. TensorFlow is imported only inside `load_speech_commands`.
"""
from __future__ import annotations

import functools
import os
from typing import Iterable

import numpy as np
import scipy.fft

from edgenas import data as data_lib
from edgenas.console import say

SAMPLE_RATE = 16000
CLIP_SAMPLES = 16000  # 1 s
FRAME_LENGTH = 480  # 30 ms
FRAME_STEP = 320  # 20 ms
FFT_LENGTH = 512
NUM_SPECTROGRAM_BINS = FFT_LENGTH // 2 + 1
NUM_MEL_BINS = 40
LOWER_HZ = 20.0
UPPER_HZ = 4000.0
NUM_MFCC = 10
LOG_OFFSET = 1e-6
NUM_FRAMES = 1 + (CLIP_SAMPLES - FRAME_LENGTH) // FRAME_STEP  # 49
INPUT_SHAPE = (NUM_FRAMES, NUM_MFCC, 1)

# In the order of TFDS speech_commands' ClassLabel (the label ints of the prepared data).
KEYWORDS = ("down", "go", "left", "no", "off", "on", "right", "stop", "up", "yes")
SILENCE = "_silence_"
UNKNOWN = "_unknown_"
LABELS = KEYWORDS + (SILENCE, UNKNOWN)

_CHUNK = 256  # clips transformed at a time: ~50 MB of working memory, and faster than larger chunks (cache)
_READ_BATCH = 1024  # Speech Commands clips read (int16, zero-padded to the batch's longest) and featurised at a time
_PROGRESS_EVERY = 10_000  # clips between progress lines while reading Speech Commands
_BUILDER = "speech_commands"
_SPLITS = (("train", "train"), ("val", "validation"), ("test", "test"))  # Dataset field, the builder's split


class AudioError(data_lib.DataError):
  """Audio that cannot be turned into features as asked; the message names its source and the problem."""


# --------------------------------------------------------------------------------------------------------------
# Clips


def from_int16(audio: np.ndarray) -> np.ndarray:
  """int16 PCM as float32 in [-1, 1)."""
  return np.asarray(audio, np.float32) / 32768.0


def check_clips(waveforms, sample_rate: int, source: str) -> np.ndarray:
  """`waveforms` as float32 [N, CLIP_SAMPLES], or AudioError naming `source` and what is wrong."""
  if sample_rate != SAMPLE_RATE:
    raise AudioError(f"{source}: sample rate {sample_rate} Hz; the KWS front-end needs {SAMPLE_RATE} Hz audio "
                     f"(resample it first)")
  waveforms = np.asarray(waveforms)
  if waveforms.ndim != 2:
    raise AudioError(f"{source}: expected clips [N, {CLIP_SAMPLES}], got an array of shape {waveforms.shape}")
  if not np.issubdtype(waveforms.dtype, np.floating) and waveforms.size:
    raise AudioError(f"{source}: expected float samples in [-1, 1], got {waveforms.dtype} "
                     f"(int16 PCM: convert with audio.from_int16)")
  length = waveforms.shape[1]
  if length > CLIP_SAMPLES:
    raise AudioError(f"{source}: clips of {length} samples are longer than 1 s ({CLIP_SAMPLES} samples at "
                     f"{SAMPLE_RATE} Hz); cut them to the second that holds the word")
  if length < CLIP_SAMPLES:
    raise AudioError(f"{source}: clips of {length} samples are shorter than 1 s ({CLIP_SAMPLES} samples); "
                     f"zero-pad them with audio.pad_clips")
  waveforms = waveforms.astype(np.float32, copy=False)
  bad = ~np.isfinite(waveforms).all(axis=1)
  if bad.any():
    raise AudioError(f"{source}: {int(bad.sum())} clip(s) hold non-finite samples (NaN/inf), the first at index "
                     f"{int(np.argmax(bad))}")
  return waveforms


def pad_clips(clips: Iterable[np.ndarray], source: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """1-D clips of up to 1 s, zero-padded at the end (as MLPerf Tiny does) to float32 [N, CLIP_SAMPLES]."""
  clips = list(clips)
  out = np.zeros((len(clips), CLIP_SAMPLES), np.float32)
  for i, clip in enumerate(clips):
    clip = np.asarray(clip)
    if clip.ndim != 1:
      raise AudioError(f"{source}: clip {i} has shape {clip.shape}; expected 1-D samples (mono)")
    if len(clip) > CLIP_SAMPLES:
      raise AudioError(f"{source}: clip {i} has {len(clip)} samples, longer than 1 s ({CLIP_SAMPLES} samples at "
                       f"{SAMPLE_RATE} Hz)")
    out[i, :len(clip)] = clip
  return check_clips(out, sample_rate, source)


def peak_normalize(waveforms: np.ndarray) -> np.ndarray:
  """Each clip divided by its largest sample, as MLPerf Tiny's get_dataset does before its MFCCs.

  That is the signed maximum (tf.reduce_max), not the largest magnitude; clips whose maximum is not positive
  (e.g. all zeros), where MLPerf Tiny would divide by zero, are left as they are.
  """
  peak = waveforms.max(axis=1, keepdims=True) if waveforms.size else np.ones((len(waveforms), 1), np.float32)
  return (waveforms / np.where(peak > 0, peak, 1.0)).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# MFCC


def _hertz_to_mel(hertz: np.ndarray) -> np.ndarray:
  return 1127.0 * np.log1p(hertz / 700.0)  # HTK, as tf.signal


@functools.lru_cache(maxsize=None)
def mel_matrix() -> np.ndarray:
  """float32 [NUM_SPECTROGRAM_BINS, NUM_MEL_BINS]: tf.signal.linear_to_mel_weight_matrix's triangles."""
  # Computed in float32 as tf.signal does, so the weights agree to the last bit or two.
  f32 = np.float32
  spectrogram_mel = _hertz_to_mel(np.linspace(0.0, SAMPLE_RATE / 2.0, NUM_SPECTROGRAM_BINS, dtype=f32)[1:])[:, None]
  edges = np.linspace(_hertz_to_mel(f32(LOWER_HZ)), _hertz_to_mel(f32(UPPER_HZ)), NUM_MEL_BINS + 2, dtype=f32)
  lower, center, upper = edges[None, :-2], edges[None, 1:-1], edges[None, 2:]
  rising = (spectrogram_mel - lower) / (center - lower)
  falling = (upper - spectrogram_mel) / (upper - center)
  weights = np.maximum(f32(0.0), np.minimum(rising, falling))
  return _read_only(np.pad(weights, ((1, 0), (0, 0))).astype(f32))  # the DC bin contributes to no mel bin


@functools.lru_cache(maxsize=None)
def _num_weighted_bins() -> int:
  """Spectrogram bins below the last one with a mel weight (128 of 257): the rest would only add zeros."""
  return int(np.nonzero(mel_matrix().any(axis=1))[0][-1]) + 1


@functools.lru_cache(maxsize=None)
def dct_matrix() -> np.ndarray:
  """float32 [NUM_MEL_BINS, NUM_MFCC]: tf.signal.dct type II (2 * sum x cos) times rsqrt(2 * NUM_MEL_BINS)."""
  n = np.arange(NUM_MEL_BINS)[:, None]
  k = np.arange(NUM_MFCC)[None, :]
  basis = 2.0 * np.cos(np.pi * k * (2 * n + 1) / (2.0 * NUM_MEL_BINS))
  return _read_only((basis / np.sqrt(2.0 * NUM_MEL_BINS)).astype(np.float32))


@functools.lru_cache(maxsize=None)
def hann_window() -> np.ndarray:
  """float32 [FRAME_LENGTH]: the periodic Hann window of tf.signal.hann_window (the default periodic=True)."""
  return _read_only((0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(FRAME_LENGTH) / FRAME_LENGTH)).astype(np.float32))


def _read_only(array: np.ndarray) -> np.ndarray:
  array.flags.writeable = False  # cached and shared by every caller
  return array


def _mfcc_chunk(waveforms: np.ndarray) -> np.ndarray:
  frames = np.lib.stride_tricks.sliding_window_view(waveforms, FRAME_LENGTH, axis=1)[:, ::FRAME_STEP]
  # scipy.fft keeps float32 as complex64 (numpy.fft < 2 computes in float64) and is twice as fast here.
  spectrum = scipy.fft.rfft(frames * hann_window(), n=FFT_LENGTH, axis=-1)[..., :_num_weighted_bins()]
  log_mel = np.log(np.abs(spectrum) @ mel_matrix()[:_num_weighted_bins()] + np.float32(LOG_OFFSET))
  return log_mel @ dct_matrix()


def mfcc(waveforms: np.ndarray) -> np.ndarray:
  """float32 [N, NUM_FRAMES, NUM_MFCC] MFCCs of float32 clips [N, CLIP_SAMPLES] (see `check_clips`)."""
  waveforms = np.asarray(waveforms, np.float32)
  if waveforms.ndim != 2 or waveforms.shape[1] != CLIP_SAMPLES:
    raise AudioError(f"mfcc: expected clips [N, {CLIP_SAMPLES}], got shape {waveforms.shape}")
  out = np.empty((len(waveforms), NUM_FRAMES, NUM_MFCC), np.float32)
  for start in range(0, len(waveforms), _CHUNK):
    out[start:start + _CHUNK] = _mfcc_chunk(waveforms[start:start + _CHUNK])
  return out


def features(waveforms: np.ndarray) -> np.ndarray:
  """float32 [N, *INPUT_SHAPE]: the network input, MLPerf Tiny's: peak-normalised clips through `mfcc`."""
  return mfcc(peak_normalize(waveforms))[..., None]


# --------------------------------------------------------------------------------------------------------------
# Speech Commands


def load_speech_commands(data_dir: str | None, val_fraction: float, seed: int, *,
                         peak_normalize_clips: bool = True) -> data_lib.Dataset:
  """TFDS `speech_commands` from a prepared data_dir as [N, 49, 10, 1] MFCC images, 12 classes (`LABELS`).

  train / val / test are the builder's train / validation / test splits (about 85k / 10k / 4.9k clips). They
  are speaker-disjoint, so `val_fraction` and `seed` are unused: a validation set carved at random from train
  would share speakers with it and overstate accuracy, and MLPerf Tiny validates on these splits.
  Clips are read `_READ_BATCH` at a time and only their features are kept (the train split is ~5 GB as float32
  waveforms, its features ~170 MB). `peak_normalize_clips`: divide each clip by its maximum first, as MLPerf
  Tiny does (see `peak_normalize`); off, the features are of the int16 samples / 32768.
  """
  del val_fraction, seed  # see the docstring
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # pulls in TensorFlow
  name = data_lib.TFDS_PREFIX + _BUILDER
  if data_dir is not None and not os.path.isdir(data_dir):
    raise data_lib.DataError(f"data_dir {data_dir} does not exist. " +
                             data_lib.tfds_not_prepared_message(_BUILDER, data_dir))
  try:
    builder = tfds.builder(_BUILDER, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise data_lib.DataError(data_lib.tfds_not_prepared_message(_BUILDER, data_dir)) from None
  if not builder.is_prepared():
    raise data_lib.DataError(data_lib.tfds_not_prepared_message(_BUILDER, data_dir))
  _check_builder(builder, name)

  splits = {field: _read_split(tfds, builder, split, f"dataset '{name}' split '{split}'", peak_normalize_clips)
            for field, split in _SPLITS}
  return data_lib.Dataset(name=name, **splits, input_shape=INPUT_SHAPE, num_classes=len(LABELS),
                          flip_invariant=False)


def _check_builder(builder, name: str) -> None:
  """The splits, label names, sample rate and sample type the features assume, each refused in one line."""
  where = f"dataset '{name}' in {builder.data_dir}"
  missing = [split for _, split in _SPLITS if split not in builder.info.splits]
  if missing:
    raise data_lib.DataError(f"{where}: has no split(s) {missing} (has {sorted(builder.info.splits)})")
  features = builder.info.features
  if "audio" not in features or "label" not in features:
    raise data_lib.DataError(f"{where}: expected 'audio' and 'label' features, has {sorted(features)}")
  names = tuple(getattr(features["label"], "names", None) or ())
  if names != LABELS:
    raise data_lib.DataError(f"{where}: label names {list(names)} differ from the {len(LABELS)} this front-end "
                             f"expects, in order: {list(LABELS)}")
  sample_rate = getattr(features["audio"], "sample_rate", None)
  if sample_rate != SAMPLE_RATE:
    raise AudioError(f"{where}: the audio feature's sample rate is {sample_rate} Hz; the KWS front-end needs "
                     f"{SAMPLE_RATE} Hz")
  dtype = np.dtype(features["audio"].np_dtype)
  if dtype != np.int16 or tuple(features["audio"].shape) != (None,):
    raise AudioError(f"{where}: expected mono int16 audio of any length, the audio feature is {dtype} of "
                     f"shape {features['audio'].shape}")


def _read_split(tfds, builder, split: str, source: str, peak_normalize_clips: bool) -> data_lib.Split:
  """One split's features and labels, `_READ_BATCH` clips at a time."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  dataset = builder.as_dataset(split=split, shuffle_files=False)
  dataset = dataset.map(lambda ex: {"audio": ex["audio"], "label": ex["label"], "length": tf.shape(ex["audio"])[0]})
  dataset = dataset.padded_batch(_READ_BATCH).prefetch(1)  # pads at the end with zeros, as pad_clips would

  images, labels, done = [], [], 0
  for batch in tfds.as_numpy(dataset):
    lengths = batch["length"]
    too_long = np.nonzero(lengths > CLIP_SAMPLES)[0]
    if len(too_long):
      raise AudioError(f"{source}: clip {done + int(too_long[0])} has {int(lengths[too_long[0]])} samples, longer "
                       f"than 1 s ({CLIP_SAMPLES} samples at {SAMPLE_RATE} Hz)")
    waveforms = np.zeros((len(lengths), CLIP_SAMPLES), np.float32)  # int16 samples: finite, in [-1, 1)
    waveforms[:, :batch["audio"].shape[1]] = from_int16(batch["audio"])
    images.append(features(waveforms) if peak_normalize_clips else mfcc(waveforms)[..., None])
    labels.append(batch["label"].astype(np.int32))
    previous, done = done, done + len(lengths)
    if done // _PROGRESS_EVERY > previous // _PROGRESS_EVERY:
      say(f"{source}: {done} clips")
  if not done:
    raise data_lib.DataError(f"{source} is empty")
  label_array = np.concatenate(labels)
  bad = np.nonzero((label_array < 0) | (label_array >= len(LABELS)))[0]
  if len(bad):
    raise data_lib.DataError(f"{source}: label {int(label_array[bad[0]])} of clip {int(bad[0])} is outside "
                             f"[0, {len(LABELS)})")
  say(f"{source}: {done} clips -> features {INPUT_SHAPE}")
  return data_lib.Split(np.concatenate(images), label_array)
