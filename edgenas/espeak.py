"""Offline speech synthesis: a ctypes binding of libespeak-ng as PyPI's `espeakng-loader` ships it.

The embedded keyword-spotting set (edgenas.kws) is made of words spoken by espeak-ng, so a fresh machine builds it
with pip alone: `espeakng-loader` carries the shared library and its espeak-ng-data directory, no system package
and no download.

`synthesizer().synthesize(text, Voice("en-us+f3", rate=160, pitch=60))` gives a float32 waveform in [-1, 1] at
espeak-ng's native 22,050 Hz; `resample_16k` brings it to the 16 kHz of Speech Commands.

Reproducibility: espeak-ng keeps state between utterances that no API call resets (the pitch-flutter phase is a
function-level static in wavegen.c; the breath noise draws on libc's rand()), so the same call gives slightly
different samples depending on what was spoken before, even after espeak_Terminate + espeak_Initialize. Each
`synthesize` / `synthesize_many` call therefore runs in a freshly loaded copy of the library (dlclose, then
dlopen, about a millisecond) with both random generators seeded per utterance: a waveform is a pure function
of (text, voice), or, for `synthesize_many`, of the whole list, whatever the process said before. A synthesiser
checks this once when it starts.

espeak-ng is not thread-safe and holds process-wide state: one synthesiser per process (`synthesizer()`), its
calls serialised by a lock. Multiprocessing workers each make their own.
"""
from __future__ import annotations

import _ctypes
import ctypes
import dataclasses
import functools
import math
import os
import threading
from typing import Sequence

import numpy as np

from edgenas import data

NATIVE_RATE = 22050  # Hz; what espeak_Initialize reports for the shipped voices
TARGET_RATE = 16000  # Hz; 22050 * 320 / 441
LIBRARY_ENV = "EDGENAS_ESPEAK_LIBRARY"  # overrides espeakng_loader.get_library_path()
DATA_ENV = "EDGENAS_ESPEAK_DATA"  # overrides espeakng_loader.get_data_path()
INSTALL_HINT = "pip install espeakng-loader"
# Files every English voice reads; a data directory without one of them cannot speak.
REQUIRED_DATA = ("phontab", "phonindex", "phondata", "intonations", "en_dict", os.path.join("lang", "gmw", "en"))
VARIANTS_DIR = os.path.join("voices", "!v")

# speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # without it a missing data directory makes espeak_Initialize call exit()
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EE_OK, _EE_NOT_FOUND = 0, 2
_RATE, _PITCH, _RANGE, _WORDGAP = 1, 3, 4, 7
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_dlclose = getattr(_ctypes, "dlclose", None) or getattr(_ctypes, "FreeLibrary")


class EspeakError(data.DataError):
  """espeak-ng cannot be loaded or cannot speak as asked; the message names what failed and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Voice:
  """How to speak: a voice name (language[+variant], e.g. 'en-us+f3', variants in espeak-ng-data/voices/!v) and
  espeak_SetParameter's prosody values."""
  name: str = "en-us"
  rate: int = 175  # words per minute, 80..450
  pitch: int = 50  # base pitch, 0..100
  pitch_range: int = 50  # 0 = monotone, 50 = normal, 100
  word_gap: int = 0  # extra pause between words, in 10 ms units
  seed: int = 1  # espeak-ng's and libc's random generators (breath and frication noise)

  def check(self) -> None:
    if not self.name or not isinstance(self.name, str):
      raise EspeakError(f"espeak-ng voice name must be a non-empty string, got {self.name!r}")
    for field, lo, hi in (("rate", 80, 450), ("pitch", 0, 100), ("pitch_range", 0, 100), ("word_gap", 0, 1000)):
      value = getattr(self, field)
      if not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise EspeakError(f"espeak-ng voice {self.name!r}: {field} must be an integer in [{lo}, {hi}], got {value!r}")


# --------------------------------------------------------------------------------------------------------------
# Finding the library and its data


def library_path(path: str | None = None) -> str:
  """The libespeak-ng shared library: `path`, else $EDGENAS_ESPEAK_LIBRARY, else espeakng-loader's copy."""
  path = path or os.environ.get(LIBRARY_ENV) or _loader_path("get_library_path")
  if not os.path.isfile(path):
    raise EspeakError(f"cannot load espeak-ng: the library {path} does not exist. Install it with "
                      f"`{INSTALL_HINT}` (or point ${LIBRARY_ENV} at a libespeak-ng shared library)")
  return path


def data_path(path: str | None = None) -> str:
  """The espeak-ng-data directory: `path`, else $EDGENAS_ESPEAK_DATA, else espeakng-loader's copy; checked to
  hold the files English voices need."""
  path = path or os.environ.get(DATA_ENV) or _loader_path("get_data_path")
  if not os.path.isdir(path):
    raise EspeakError(f"cannot load espeak-ng: its data directory {path} does not exist. Install it with "
                      f"`{INSTALL_HINT}` (or point ${DATA_ENV} at an espeak-ng-data directory)")
  missing = [f for f in REQUIRED_DATA if not os.path.exists(os.path.join(path, f))]
  if missing:
    raise EspeakError(f"cannot load espeak-ng: its data directory {path} lacks {', '.join(missing)}. Reinstall "
                      f"it with `pip install --force-reinstall espeakng-loader` (or point ${DATA_ENV} at a "
                      f"complete espeak-ng-data directory)")
  return path


def _loader_path(getter: str) -> str:
  try:
    import espeakng_loader  # pylint: disable=g-import-not-at-top  # only where no path is given
    return getattr(espeakng_loader, getter)()
  except ImportError:
    raise EspeakError(f"cannot load espeak-ng: the espeakng-loader package is not installed. Install it with "
                      f"`{INSTALL_HINT}` (or set ${LIBRARY_ENV} and ${DATA_ENV})") from None
  except RuntimeError as e:  # get_data_path raises when its directory is gone
    raise EspeakError(f"cannot load espeak-ng: {e}. Reinstall it with `pip install --force-reinstall "
                      f"espeakng-loader`") from None


def variants(data_dir: str | None = None) -> list[str]:
  """The voice variants (file names in espeak-ng-data/voices/!v), sorted."""
  directory = os.path.join(data_path(data_dir), VARIANTS_DIR)
  return sorted(f for f in os.listdir(directory) if os.path.isfile(os.path.join(directory, f)))


# --------------------------------------------------------------------------------------------------------------
# Synthesis


_ACTIVE: Synthesizer | None = None
_ACTIVE_LOCK = threading.Lock()


def synthesizer(library: str | None = None, data_dir: str | None = None) -> Synthesizer:
  """This process's synthesiser, made on the first call (later calls must name the same library and data)."""
  global _ACTIVE
  lib, dat = library_path(library), data_path(data_dir)
  with _ACTIVE_LOCK:
    if _ACTIVE is None:
      _ACTIVE = Synthesizer(lib, dat)
    elif (_ACTIVE.library, _ACTIVE.data_dir) != (lib, dat):
      raise EspeakError(f"this process already speaks with espeak-ng from {_ACTIVE.library} and "
                        f"{_ACTIVE.data_dir}; espeak-ng keeps process-wide state, so one synthesiser per process "
                        f"(asked for {lib} and {dat})")
    return _ACTIVE


class Synthesizer:
  """Text to float32 waveforms at `sample_rate` (22,050 Hz). Use `synthesizer()`: one per process."""

  def __init__(self, library: str | None = None, data_dir: str | None = None):
    self.library, self.data_dir = library_path(library), data_path(data_dir)
    self._lock = threading.Lock()
    self._chunks: list[np.ndarray] = []
    self._callback = _CALLBACK(self._on_audio)  # kept referenced: espeak calls it from C
    self._libc = ctypes.CDLL(None)
    self.sample_rate, self.version = self._with_fresh_library(_version)
    probe = [("left", Voice("en-us+f3", seed=7)), ("stop", Voice("en+m3", seed=3))]  # f3: flutter and breath
    first, again = self.synthesize_many(probe), self.synthesize_many(probe)
    if not all(np.array_equal(a, b) for a, b in zip(first, again)):
      raise EspeakError(f"espeak-ng from {self.library} does not give the same waveform twice in this process "
                        f"(the library could not be reloaded between utterances); synthesis would not be "
                        f"reproducible")

  def _on_audio(self, wav, num_samples, events) -> int:
    del events
    if num_samples > 0:
      self._chunks.append(np.ctypeslib.as_array(wav, (num_samples,)).copy())
    return 0  # continue

  def _with_fresh_library(self, fn):
    """Loads the library anew (fresh static state), initialises it, runs fn(lib), unloads it: (sample rate,
    fn's result)."""
    try:
      lib = ctypes.CDLL(self.library)
    except OSError as e:
      raise EspeakError(f"cannot load espeak-ng: {self.library} is not a loadable library ({e}). Reinstall it "
                        f"with `pip install --force-reinstall espeakng-loader` (or point ${LIBRARY_ENV} at a "
                        f"libespeak-ng shared library)") from None
    initialised = False
    try:
      for name in ("espeak_Initialize", "espeak_SetSynthCallback", "espeak_SetVoiceByName", "espeak_SetParameter",
                   "espeak_Synth", "espeak_Terminate"):
        if not hasattr(lib, name):
          raise EspeakError(f"cannot load espeak-ng: {self.library} has no {name}; it is not libespeak-ng. "
                            f"Install it with `{INSTALL_HINT}`")
      lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
      lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
      lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
      lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                   ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
      rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_dir.encode(), _INITIALIZE_DONT_EXIT)
      if rate <= 0:
        raise EspeakError(f"cannot load espeak-ng: espeak_Initialize failed (returned {rate}) with data "
                          f"{self.data_dir}. Reinstall it with `pip install --force-reinstall espeakng-loader`")
      initialised = True
      lib.espeak_SetSynthCallback(self._callback)
      return rate, fn(lib)
    finally:
      if initialised:
        lib.espeak_Terminate()
      _dlclose(lib._handle)  # pylint: disable=protected-access

  def synthesize(self, text: str, voice: Voice = Voice()) -> np.ndarray:
    """float32 [n] in [-1, 1] at `sample_rate`: `text` spoken by `voice`, without espeak's final pause. A pure
    function of (text, voice)."""
    return self.synthesize_many([(text, voice)])[0]

  def synthesize_many(self, requests: Sequence[tuple[str, Voice]]) -> list[np.ndarray]:
    """`synthesize` of each (text, voice) in turn, in one freshly loaded library (a voice list and dictionary
    loaded once: 5-8x faster for single words). espeak-ng carries its pitch-flutter phase from one utterance
    to the next, so each waveform is a pure function of the whole list, not of its own request alone."""
    requests = [(text, voice) for text, voice in requests]
    for _, voice in requests:
      voice.check()

    def speak_all(lib):
      waves = []
      for text, voice in requests:
        self._chunks = []
        self._speak(lib, text, voice)
        waves.append(np.concatenate(self._chunks).astype(np.float32) / 32768.0 if self._chunks
                     else np.zeros(0, np.float32))
      return waves

    with self._lock:
      try:
        return self._with_fresh_library(speak_all)[1]
      finally:
        self._chunks = []

  def _speak(self, lib, text: str, voice: Voice) -> None:
    status = lib.espeak_SetVoiceByName(voice.name.encode("utf-8"))
    if status == _EE_NOT_FOUND:
      raise EspeakError(f"espeak-ng has no voice {voice.name!r} in {self.data_dir} (a language from lang/, e.g. "
                        f"'en-us', optionally +variant from {VARIANTS_DIR}/, e.g. 'en-us+f3')")
    if status != _EE_OK:
      raise EspeakError(f"espeak-ng: espeak_SetVoiceByName({voice.name!r}) failed with status {status}")
    for param, value in ((_RATE, voice.rate), (_PITCH, voice.pitch), (_RANGE, voice.pitch_range),
                         (_WORDGAP, voice.word_gap)):
      lib.espeak_SetParameter(param, int(value), 0)
    if hasattr(lib, "espeak_ng_SetRandSeed"):  # espeak-ng >= 1.52; a fresh copy starts from a fixed state anyway
      lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
      lib.espeak_ng_SetRandSeed(int(voice.seed))
    self._libc.srand(ctypes.c_uint(int(voice.seed) & 0xFFFFFFFF))
    encoded = text.encode("utf-8")
    status = lib.espeak_Synth(encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
    if status != _EE_OK:
      raise EspeakError(f"espeak-ng: espeak_Synth({text!r}) failed with status {status}")


def _version(lib) -> str:
  if not hasattr(lib, "espeak_Info"):
    return "unknown"
  lib.espeak_Info.restype = ctypes.c_char_p
  lib.espeak_Info.argtypes = [ctypes.c_void_p]
  return (lib.espeak_Info(None) or b"unknown").decode("utf-8", "replace")


def resample_16k(waveform: np.ndarray, rate: int = NATIVE_RATE) -> np.ndarray:
  """float32 waveform(s) (last axis time) from `rate` to 16 kHz, polyphase (320/441 for 22,050 Hz)."""
  from scipy import signal  # pylint: disable=g-import-not-at-top  # only synthesis needs it
  if rate == TARGET_RATE:
    return np.asarray(waveform, np.float32)
  up, down, taps = _resampling_filter(int(rate))
  return signal.resample_poly(waveform, up, down, axis=-1, window=taps).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _resampling_filter(rate: int) -> tuple[int, int, np.ndarray]:
  """resample_poly's own default filter (Kaiser, beta 5), designed once: designing it is 10x the filtering."""
  from scipy import signal  # pylint: disable=g-import-not-at-top
  g = math.gcd(TARGET_RATE, rate)
  up, down = TARGET_RATE // g, rate // g
  return up, down, signal.firwin(2 * 10 * max(up, down) + 1, 1.0 / max(up, down), window=("kaiser", 5.0))
