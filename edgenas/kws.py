"""The embedded keyword-spotting set (`kws`): MLPerf Tiny's 12 classes spoken by espeak-ng, made offline.

A fresh machine builds it with pip alone (espeak-ng ships in the `espeakng-loader` wheel) in well under a minute
with two worker processes, then reads it from a cache. It stands in for Speech Commands where that cannot be
downloaded, so it keeps the properties that make Speech Commands a useful benchmark:

  - classes: the ten keywords, `_silence_` (background only) and `_unknown_` (Speech Commands' 25 auxiliary words
    and one word a sound away from each keyword: "top" for stop, "town" for down, "lift" for left, ...), in
    `audio.LABELS` order. The test split holds the same number of clips of each class, as MLPerf Tiny's test set
    does (1/12 each), so its accuracy is also the balanced accuracy. The training pool holds twice as many
    `_unknown_` clips as of any other class: one class spread over 35 words gets 23 clips a word per 800 and was
    recognised worst by far (40% against 90% for keywords, clean); Speech Commands' own training split, too,
    holds more unknown-word clips than keyword clips.
  - speakers: a voice is an English accent (`LANGUAGES`) x a voice variant (espeak-ng-data/voices/!v: formants,
    breathiness, roughness, synthesis method) at a random base pitch, pitch range and speaking rate. The test
    split speaks with 24 variants that training never hears (`TEST_VARIANTS`), like Speech Commands'
    speaker-disjoint split: variants that share their formants (edward/edward2, RicishayMax 1-3, Mike/mike2, ...)
    are held out together, and voices with no kin at all (steph 1-3, anika, kaukovalta) stay in training, since a
    held-out voice unlike any other scores every network near chance alike and only blurs the comparison.
    Validation is carved from the training pool by whole variants too (`val_speakers`, with the run's seed).
  - conditions: each word is placed anywhere in the 1 s window, half of them in a room (exponentially decaying
    noise as impulse response), over synthetic backgrounds at an SNR uniform in 8..30 dB (10% clean): coloured
    noise from brown to blue, band-limited noise with slow amplitude modulation (taps, fans, bikes), mains hum
    with harmonics, clatter of ringing impulses, and babble of 1-6 talkers made of other synthesised speech, one
    or two kinds at a time; then a random microphone response, a random gain, and 16-bit quantisation.
  - features: `audio.features` (MLPerf Tiny's peak-normalised MFCCs), [49, 10, 1] per clip.

Sizes (`GenerationParams` defaults): a training pool of 800 clips per class (1,600 `_unknown_`; 10,400) and a
test split of 180 per class (2,160: one clip is 0.046 accuracy points). The SNR range, the unknown words and the
test voices were tuned so that the task separates architectures under the pipeline's 12-epoch retraining: DS-CNN
lands between 85% and 95% test accuracy and a network with 11x fewer MACs about 10 points below it (at -5..20 dB
DS-CNN reached 69%; holding out the kinless voices cost it another 4 points). benchmarks/kws_data.py measures
both; the numbers are in benchmarks/results/kws_data.json.

Determinism: every clip is drawn from np.random.default_rng([params.seed, clip_index]) and espeak-ng's output is
a pure function of its input (edgenas.espeak), so the set is a pure function of the `GenerationParams`. Clips
are made in fixed chunks (`chunks`), each spoken in one espeak-ng session, so the bytes do not depend on the
number of worker processes. The test split occupies the first clip indices in chunks of its own, so it changes
neither with `seed` nor with the size of the training pool.

Cache: `<cache_dir or ~/.cache/edgenas/datasets>/kws-v<KWS_VERSION>-<hash of the params>/` holds the MFCCs
(features.npy), labels, split, speaker and word arrays and manifest.json (parameters, counts, per-class counts,
sha256 of every array, the espeak-ng version). It is written into a temporary directory and renamed into place
only when complete, so a half-written cache is never read; one that fails its checksums is generated again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import secrets
import subprocess
import sys
import tempfile
import time

import numpy as np

from edgenas import audio
from edgenas import data as data_lib
from edgenas import espeak
from edgenas.console import say  # imports no JAX: the generation workers stay light

KWS_VERSION = 1  # bump when generation changes in a way GenerationParams does not capture
NAME = data_lib.KWS
TRAIN, TEST = 0, 1  # values of split.npy
DEFAULT_CACHE = os.path.join("~", ".cache", "edgenas", "datasets")
MANIFEST = "manifest.json"
ARRAYS = ("features", "labels", "split", "speaker", "word")  # <name>.npy in a dataset directory
CHUNK_CLIPS = 96  # clips per work item: fixed, so results do not depend on the number of workers
SR = audio.SAMPLE_RATE
CLIP = audio.CLIP_SAMPLES
_BABBLE_STREAM = 0xBAB  # second seed word of the babble bank's generators, apart from clip indices

# The English voices of espeak-ng-data/lang/gmw (names as espeak_SetVoiceByName takes them).
LANGUAGES = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029",
             "en-us-nyc")
# Test-only voice variants: about a quarter of voices/!v, whole families of near-duplicates at a time, and of
# every kind (male, female, robotic) so the test split stays the same population of voices.
TEST_VARIANTS = ("Annie", "belinda", "david", "Denis", "Diogo", "edward", "edward2", "f2", "f4", "f5", "ian",
                 "linda", "m3", "m6", "m8", "Mario", "max", "Mike", "mike2", "RicishayMax", "RicishayMax2",
                 "RicishayMax3", "rob", "UniRobot")
TRAIN_VARIANTS = ("adam", "Alex", "Alicia", "Andrea", "Andy", "anika", "anikaRobot", "announcer", "antonio",
                  "AnxiousAndy", "aunty", "benjamin", "boris", "caleb", "croak", "Demonic", "ed", "f1", "f3", "fast",
                  "Gene", "Gene2", "grandma", "grandpa", "gustave", "Henrique", "Hugo", "iven", "iven2", "iven3",
                  "iven4", "Jacky", "john", "kaukovalta", "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6",
                  "Lee", "m1", "m2", "m4", "m5", "m7", "marcelo", "Marco", "Michael", "michel", "miguel", "Nguyen",
                  "norbert", "pablo", "paul", "pedro", "quincy", "Reed", "robert", "robosoft", "robosoft2",
                  "robosoft3", "robosoft4", "robosoft5", "robosoft6", "robosoft7", "robosoft8", "sandro", "shelby",
                  "steph", "steph2", "steph3", "Storm", "travis", "Tweaky", "victor", "whisper", "whisperf", "zac")
# `_unknown_`: Speech Commands v2's 25 auxiliary words, then one word a sound away from each keyword (never a
# homophone: "write" would be "right").
UNKNOWN_WORDS = ("backward", "bed", "bird", "cat", "dog", "eight", "five", "follow", "forward", "four", "happy",
                 "house", "learn", "marvin", "nine", "one", "seven", "sheila", "six", "three", "tree", "two",
                 "visual", "wow", "zero",
                 "yet", "note", "cup", "town", "lift", "bright", "gone", "cough", "top", "goat")
# Babble is speech nobody is meant to recognise: common words, no keyword and nothing close to one.
BABBLE_WORDS = ("the", "and", "that", "have", "with", "this", "from", "they", "would", "there", "their", "what",
                "about", "which", "when", "make", "like", "time", "just", "him", "take", "people", "into", "year",
                "your", "good", "some", "could", "them", "other", "than", "then", "look", "only", "come", "over",
                "think", "also", "back", "after", "work", "first", "well", "even", "want", "because", "these",
                "give", "day", "most", "water", "morning", "table", "window", "coffee", "answer", "paper", "garden")
BACKGROUNDS = ("coloured", "band", "hum", "clatter", "babble")


@dataclasses.dataclass(frozen=True)
class GenerationParams:
  """Everything the set is a function of, with KWS_VERSION (and the espeak-ng build, which the manifest records);
  its hash names the cache."""
  seed: int = 20240601
  train_per_class: int = 800
  test_per_class: int = 180
  train_unknown_multiple: int = 2  # training-pool `_unknown_` clips per keyword clip (the class spans 35 words)
  languages: tuple[str, ...] = LANGUAGES
  train_variants: tuple[str, ...] = TRAIN_VARIANTS
  test_variants: tuple[str, ...] = TEST_VARIANTS
  unknown_words: tuple[str, ...] = UNKNOWN_WORDS
  rate: tuple[int, int] = (100, 240)  # espeak words per minute: words of about 0.3 to 0.7 s
  pitch: tuple[int, int] = (10, 90)  # espeak base pitch, 0..100
  pitch_range: tuple[int, int] = (10, 90)  # espeak pitch range, 0 (monotone)..100
  # Playback speed scales every formant and the pitch (a vocal tract's size); +-15% made held-out voices no
  # easier to recognise, so it is off.
  speed: tuple[float, float] = (1.0, 1.0)
  snr_db: tuple[float, float] = (8.0, 30.0)  # speech RMS (while speaking) over background RMS, uniform in dB
  clean_fraction: float = 0.1  # speech clips without background
  second_background: float = 0.35  # probability that a second kind of background is mixed in
  background_weights: tuple[float, ...] = (2.0, 1.5, 1.0, 1.0, 2.0)  # of BACKGROUNDS
  babble_talkers: tuple[int, int] = (1, 6)
  reverb_fraction: float = 0.5
  rt60_s: tuple[float, float] = (0.15, 0.8)
  gain_db: tuple[float, float] = (-30.0, -1.0)  # peak level, dBFS
  babble_phrases: int = 24  # phrases in the babble bank (each process synthesises it once)

  def __post_init__(self):
    if self.train_per_class < 1 or self.test_per_class < 1 or self.train_unknown_multiple < 1:
      raise data_lib.DataError(f"kws: train_per_class, test_per_class and train_unknown_multiple must be >= 1, "
                               f"got {self.train_per_class}, {self.test_per_class} and "
                               f"{self.train_unknown_multiple}")
    shared = sorted(set(self.train_variants) & set(self.test_variants))
    if shared:
      raise data_lib.DataError(f"kws: voice variants in both splits: {shared}")
    if not (self.languages and self.train_variants and self.test_variants and self.unknown_words):
      raise data_lib.DataError("kws: languages, train_variants, test_variants and unknown_words must be non-empty")
    if len(self.background_weights) != len(BACKGROUNDS):
      raise data_lib.DataError(f"kws: background_weights needs one weight per background {BACKGROUNDS}")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def hash(self) -> str:
    text = json.dumps({"kws_version": KWS_VERSION, "params": self.to_dict()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]

  @property
  def num_test(self) -> int:
    return self.test_per_class * len(audio.LABELS)

  @property
  def train_cycle(self) -> tuple[int, ...]:
    """Labels of consecutive training-pool clips, repeated: each class once, `_unknown_` train_unknown_multiple
    times."""
    return tuple(range(len(audio.LABELS))) + (audio.LABELS.index(audio.UNKNOWN),) * (self.train_unknown_multiple - 1)

  @property
  def num_clips(self) -> int:
    return self.num_test + self.train_per_class * len(self.train_cycle)

  @property
  def voices(self) -> tuple[str, ...]:
    """Speaker ids index this: the training variants, then the test ones."""
    return self.train_variants + self.test_variants

  @property
  def words(self) -> tuple[str, ...]:
    """Word ids index this (silence clips have word -1)."""
    return audio.KEYWORDS + self.unknown_words


DEFAULT_PARAMS = GenerationParams()


# --------------------------------------------------------------------------------------------------------------
# Loading


def load_embedded(cache_dir: str | None = None, val_fraction: float = 0.1, seed: int = 0,
                  params: GenerationParams | None = None, workers: int | None = None) -> data_lib.Dataset:
  """The `kws` Dataset: test is the fixed held-out-voice split; `val_fraction` of the training pool, in whole
  voice variants chosen with `seed`, is validation. Generates the set on first use (see the module docstring).

  `cache_dir` is the cache's parent (default ~/.cache/edgenas/datasets); `params` default to DEFAULT_PARAMS."""
  data_lib.check_val_fraction(NAME, val_fraction)
  arrays = load_arrays(params or DEFAULT_PARAMS, cache_dir, workers)
  images = arrays["features"][..., None]
  labels = arrays["labels"]
  test = np.nonzero(arrays["split"] == TEST)[0]
  pool = np.nonzero(arrays["split"] == TRAIN)[0]
  val_voices = val_speakers(arrays["speaker"][pool], val_fraction, seed)
  in_val = np.isin(arrays["speaker"][pool], val_voices)
  train, val = pool[~in_val], pool[in_val]

  def split(rows):
    return data_lib.Split(images[rows], labels[rows])

  return data_lib.Dataset(name=NAME, train=split(train), val=split(val), test=split(test),
                          input_shape=audio.INPUT_SHAPE, num_classes=len(audio.LABELS), flip_invariant=False)


def val_speakers(speakers: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
  """Voice ids for validation: in an order seeded by `seed`, as many whole voices as first hold at least
  `val_fraction` of the clips, keeping at least one voice for training."""
  voices, counts = np.unique(speakers, return_counts=True)
  if len(voices) < 2:
    raise data_lib.DataError(f"dataset '{NAME}': the training pool has {len(voices)} voice(s); validation is "
                             f"carved by whole voices, so it needs at least 2")
  order = np.random.default_rng(seed).permutation(len(voices))
  cumulative = np.cumsum(counts[order])
  take = int(np.searchsorted(cumulative, val_fraction * len(speakers))) + 1
  return np.sort(voices[order[:min(take, len(voices) - 1)]])


def dataset_dir(params: GenerationParams = DEFAULT_PARAMS, cache_dir: str | None = None) -> str:
  """Where the set with these parameters is cached."""
  parent = os.path.abspath(os.path.expanduser(cache_dir or DEFAULT_CACHE))
  return os.path.join(parent, f"kws-v{KWS_VERSION}-{params.hash()}")


def load_arrays(params: GenerationParams = DEFAULT_PARAMS, cache_dir: str | None = None,
                workers: int | None = None) -> dict[str, np.ndarray]:
  """The set's arrays (ARRAYS), from the cache when it holds a complete, intact copy, else generated and cached."""
  final = dataset_dir(params, cache_dir)
  if os.path.exists(final):
    try:
      return read_cache(final, params)
    except CacheError as e:
      say(f"kws: the cached set in {final} is unusable ({e}); generating it again")
  else:
    say(f"kws: generating the embedded keyword-spotting set ({params.num_clips} clips, once) into {final}")
  arrays, manifest = generate(params, workers)
  try:
    return write_cache(final, arrays, manifest, params)
  except OSError as e:
    raise data_lib.DataError(f"kws: cannot write the dataset cache {final}: {e}. Give a writable directory as "
                             f"data_dir (the cache's parent)") from None


class CacheError(data_lib.DataError):
  """A cached set that is incomplete or does not match its manifest."""


def read_cache(directory: str, params: GenerationParams) -> dict[str, np.ndarray]:
  """The arrays of a complete dataset directory, each checked against the manifest's sha256; else CacheError."""
  try:
    with open(os.path.join(directory, MANIFEST)) as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise CacheError(f"no {MANIFEST}") from None
  except (OSError, ValueError) as e:
    raise CacheError(f"{MANIFEST} cannot be read: {e}") from None
  if not isinstance(manifest, dict) or manifest.get("params_hash") != params.hash():
    raise CacheError(f"{MANIFEST} is not for parameters {params.hash()}")
  arrays = {}
  for name in ARRAYS:
    path = os.path.join(directory, f"{name}.npy")
    expected = manifest.get("arrays", {}).get(name, {})
    try:
      with open(path, "rb") as f:
        raw = f.read()
    except OSError:
      raise CacheError(f"{name}.npy is missing") from None
    if hashlib.sha256(raw).hexdigest() != expected.get("sha256"):
      raise CacheError(f"{name}.npy does not match its sha256 in {MANIFEST}")
    arrays[name] = np.load(path, allow_pickle=False)
  if len(arrays["features"]) != params.num_clips or any(len(a) != params.num_clips for a in arrays.values()):
    raise CacheError(f"the arrays do not hold {params.num_clips} clips")
  return arrays


def write_cache(final: str, arrays: dict[str, np.ndarray], manifest: dict,
                params: GenerationParams) -> dict[str, np.ndarray]:
  """Writes the arrays and manifest into a temporary sibling of `final`, then renames it into place (replacing an
  unusable copy); returns the arrays (a concurrent writer's identical copy, if it got there first)."""
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  _remove_stale_temps(parent, os.path.basename(final))
  tmp = os.path.join(parent, f".{os.path.basename(final)}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
  os.makedirs(tmp)
  try:
    manifest = dict(manifest, arrays={})
    for name in ARRAYS:
      path = os.path.join(tmp, f"{name}.npy")
      np.save(path, arrays[name], allow_pickle=False)
      with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
      manifest["arrays"][name] = dict(sha256=digest, shape=list(arrays[name].shape), dtype=str(arrays[name].dtype))
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=2, sort_keys=True)
      f.write("\n")
    for name in os.listdir(tmp):  # on disk before the rename makes them visible
      with open(os.path.join(tmp, name), "rb") as f:
        os.fsync(f.fileno())
    if os.path.exists(final):  # unusable (read_cache refused it): move it aside, then drop our own files from it
      aside = f"{final}.unusable-{os.getpid()}-{secrets.token_hex(4)}"
      os.rename(final, aside)
      _remove_dataset_dir(aside)
    try:
      os.rename(tmp, final)
    except OSError:
      if not os.path.isdir(final):
        raise
      _remove_dataset_dir(tmp)  # another process finished first; its copy is the same set
      return read_cache(final, params)
  except BaseException:
    if os.path.isdir(tmp):
      _remove_dataset_dir(tmp)
    raise
  say(f"kws: cached {params.num_clips} clips in {final}")
  return arrays


def _remove_dataset_dir(directory: str) -> None:
  """Deletes the files this module writes in `directory`, then the directory if nothing else is left in it."""
  for name in [f"{a}.npy" for a in ARRAYS] + [MANIFEST]:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      os.remove(path)
  try:
    os.rmdir(directory)
  except OSError:
    say(f"kws: left {directory} in place: it holds files kws did not write")


def _remove_stale_temps(parent: str, base: str) -> None:
  """Temporary directories of writers that died (a pid that no longer runs) are removed; live ones are left."""
  prefix = f".{base}.tmp-"
  for name in os.listdir(parent):
    if not name.startswith(prefix):
      continue
    try:
      pid = int(name[len(prefix):].split("-")[0])
      os.kill(pid, 0)
      continue  # a writer that is still running
    except ProcessLookupError:
      pass
    except (ValueError, PermissionError):
      continue
    _remove_dataset_dir(os.path.join(parent, name))


# --------------------------------------------------------------------------------------------------------------
# Generation


def generate(params: GenerationParams = DEFAULT_PARAMS, workers: int | None = None) -> tuple[dict, dict]:
  """(arrays, manifest without checksums) of the whole set, made in `workers` processes (default: up to 2)."""
  workers = min(2, os.cpu_count() or 1) if workers is None else workers
  if workers < 1:
    raise data_lib.DataError(f"kws: workers must be >= 1, got {workers}")
  synth = espeak.synthesizer()  # fails here, with its one line, before any worker starts
  n = params.num_clips
  ranges = chunks(params)
  out = dict(features=np.empty((n, audio.NUM_FRAMES, audio.NUM_MFCC), np.float32), labels=np.empty(n, np.int32),
             split=np.empty(n, np.uint8), speaker=np.empty(n, np.int16), word=np.empty(n, np.int16))
  t0 = time.time()
  next_report, done = 0.1, 0

  def store(start, result):
    nonlocal done, next_report
    for name, values in result.items():
      out[name][start:start + len(values)] = values
    done += len(result["labels"])
    if done / n >= next_report or done == n:
      say(f"kws: {done}/{n} clips, {time.time() - t0:.0f} s")
      next_report = done / n + 0.1

  if workers == 1 or len(ranges) == 1:
    for start, stop in ranges:
      store(start, make_features(params, start, stop))
  else:
    _run_workers(params, ranges, min(workers, len(ranges)), store)
  seconds = time.time() - t0
  per_class = {s: {label: int(np.sum((out["labels"] == i) & (out["split"] == v))) for i, label in
                   enumerate(audio.LABELS)} for s, v in (("train_pool", TRAIN), ("test", TEST))}
  manifest = dict(name=NAME, kws_version=KWS_VERSION, params=params.to_dict(), params_hash=params.hash(),
                  espeak=dict(version=synth.version, library=synth.library), front_end="edgenas.audio.features",
                  counts=dict(total=n, train_pool=int(np.sum(out["split"] == TRAIN)),
                              test=int(np.sum(out["split"] == TEST))),
                  per_class=per_class, generation_seconds=round(seconds, 2), workers=workers)
  return out, manifest


def _run_workers(params: GenerationParams, ranges, workers: int, store) -> None:
  """Chunks made by `workers` child interpreters (`python -c ...kws._worker_main()`), chunk k by worker
  k % workers, each result a file in a scratch directory; `store(start, arrays)` gets them in order.

  Plain subprocesses rather than multiprocessing: spawn would re-run the caller's main script in every child
  (a script without an `if __name__ == "__main__"` guard would fail), and fork is unsafe once JAX has started
  its threads."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the directory holding edgenas/
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
             OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")  # cores go to the workers
  with tempfile.TemporaryDirectory(prefix="edgenas-kws-") as scratch:
    procs = []
    try:
      for w in range(workers):
        job = os.path.join(scratch, f"job-{w}.pkl")
        with open(job, "wb") as f:
          pickle.dump((params, ranges[w::workers], scratch), f)
        log = open(os.path.join(scratch, f"worker-{w}.log"), "wb")  # pylint: disable=consider-using-with
        procs.append((subprocess.Popen([sys.executable, "-c", "from edgenas import kws; kws._worker_main()", job],
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                       cwd=root), log))
      pending = list(ranges)
      while pending:
        path = os.path.join(scratch, f"chunk-{pending[0][0]}.npz")
        if os.path.exists(path):
          with np.load(path) as result:
            store(pending[0][0], {name: result[name] for name in result.files})
          os.remove(path)
          pending.pop(0)
          continue
        for w, (proc, log) in enumerate(procs):
          if proc.poll() not in (None, 0):
            log.flush()
            with open(log.name, "rb") as f:
              lines = f.read().decode("utf-8", "replace").strip().splitlines()
            raise data_lib.DataError(f"kws: generation worker {w} failed (exit {proc.returncode}): "
                                     f"{lines[-1] if lines else 'no output'}")
        if all(proc.poll() == 0 for proc, _ in procs) and not os.path.exists(path):
          raise data_lib.DataError(f"kws: generation workers finished without clips [{pending[0][0]}, "
                                   f"{pending[0][1]})")
        time.sleep(0.05)
    finally:
      for proc, log in procs:
        if proc.poll() is None:
          proc.kill()
        proc.wait()
        log.close()


def _worker_main() -> None:
  """A generation worker: makes the chunks its job file names, each into <scratch>/chunk-<start>.npz (written
  under a temporary name, then renamed, so the parent never reads half a file). Errors: one line, exit 1."""
  with open(sys.argv[1], "rb") as f:
    params, ranges, scratch = pickle.load(f)
  try:
    for start, stop in ranges:
      result = make_features(params, start, stop)
      tmp = os.path.join(scratch, f".chunk-{start}.tmp.npz")
      np.savez(tmp, **result)
      os.replace(tmp, os.path.join(scratch, f"chunk-{start}.npz"))
  except data_lib.DataError as e:
    print(e, flush=True)
    sys.exit(1)


def make_features(params: GenerationParams, start: int, stop: int) -> dict[str, np.ndarray]:
  """Clips [start, stop) as the cached arrays: MFCC features and their labels, split, speaker and word ids."""
  clips = make_clips(params, start, stop)
  waveforms = audio.check_clips(clips.pop("waveforms"), SR, f"kws clips [{start}, {stop})")
  return dict(features=audio.features(waveforms)[..., 0], **clips)


def clip_plan(params: GenerationParams, index: int) -> dict:
  """What clip `index` is: split, label, speaker and word ids (the first draws of its generator)."""
  if not 0 <= index < params.num_clips:
    raise data_lib.DataError(f"kws: clip index {index} is outside [0, {params.num_clips})")
  test = index < params.num_test
  cycle = tuple(range(len(audio.LABELS))) if test else params.train_cycle
  label = cycle[(index if test else index - params.num_test) % len(cycle)]
  rng = np.random.default_rng([params.seed, index])
  variants = params.test_variants if test else params.train_variants
  speaker = int(rng.integers(len(variants))) + (len(params.train_variants) if test else 0)
  name = audio.LABELS[label]
  if name == audio.SILENCE:
    word = -1
  elif name == audio.UNKNOWN:
    word = len(audio.KEYWORDS) + int(rng.integers(len(params.unknown_words)))
  else:
    word = audio.KEYWORDS.index(name)
  return dict(split=TEST if test else TRAIN, label=label, speaker=speaker, word=word, rng=rng)


def make_clips(params: GenerationParams, start: int, stop: int) -> dict[str, np.ndarray]:
  """Waveforms float32 [n, 16000] of clips [start, stop) with their labels, split, speaker and word ids.

  The words of a range are spoken in one espeak-ng session (edgenas.espeak.synthesize_many), so a clip's audio
  depends on the range it is made in: `generate` always makes the same ranges (`chunks`)."""
  synth = espeak.synthesizer()
  bank = babble_bank(params)
  plans = [clip_plan(params, index) for index in range(start, stop)]
  speaking = [p for p in plans if p["word"] >= 0]
  for p in speaking:
    rng = p["rng"]
    p["voice"] = espeak.Voice(
        f"{params.languages[int(rng.integers(len(params.languages)))]}+{params.voices[p['speaker']]}",
        rate=int(rng.integers(params.rate[0], params.rate[1] + 1)),
        pitch=int(rng.integers(params.pitch[0], params.pitch[1] + 1)),
        pitch_range=int(rng.integers(params.pitch_range[0], params.pitch_range[1] + 1)),
        seed=int(rng.integers(1, 2**31)))
  waves = synth.synthesize_many([(params.words[p["word"]], p["voice"]) for p in speaking])
  for p, wave in zip(speaking, waves):
    speed = _uniform(p["rng"], params.speed)
    p["speech"] = _trim(espeak.resample_16k(_play_at(wave, speed), synth.sample_rate))
  n = stop - start
  out = dict(waveforms=np.zeros((n, CLIP), np.float32), labels=np.zeros(n, np.int32), split=np.zeros(n, np.uint8),
             speaker=np.zeros(n, np.int16), word=np.zeros(n, np.int16))
  for row, plan in enumerate(plans):
    out["waveforms"][row] = _render(params, plan, bank)
    for name in ("split", "speaker", "word"):
      out[name][row] = plan[name]
    out["labels"][row] = plan["label"]
  return out


def chunks(params: GenerationParams) -> list[tuple[int, int]]:
  """The clip ranges generation makes, each in one espeak-ng session: CHUNK_CLIPS at a time within each split,
  so test clips never share a range with training clips (the test split does not move with the pool's size)."""
  bounds = []
  for lo, hi in ((0, params.num_test), (params.num_test, params.num_clips)):
    bounds += [(a, min(a + CHUNK_CLIPS, hi)) for a in range(lo, hi, CHUNK_CLIPS)]
  return bounds


def _uniform(rng, bounds):
  return float(rng.uniform(bounds[0], bounds[1]))


def _render(params: GenerationParams, plan: dict, bank: np.ndarray) -> np.ndarray:
  rng = plan["rng"]
  kinds = _pick_backgrounds(params, rng)
  if plan["word"] < 0:  # silence: background only (babble of many talkers: a crowd, not a speaker)
    mix = _background(params, rng, kinds, bank, min_talkers=4)
  else:
    speech = plan["speech"][:CLIP - 160]
    clip = np.zeros(CLIP, np.float64)
    offset = int(rng.integers(0, CLIP - len(speech) + 1))
    clip[offset:offset + len(speech)] = speech
    active_rms = np.sqrt(np.mean(speech.astype(np.float64) ** 2)) + 1e-12
    if rng.random() < params.reverb_fraction:
      clip = _reverb(clip, rng, _uniform(rng, params.rt60_s))
    clip /= active_rms
    clean = rng.random() < params.clean_fraction
    snr = _uniform(rng, params.snr_db)
    mix = clip if clean else clip + _background(params, rng, kinds, bank) * 10.0 ** (-snr / 20.0)
  mix = _microphone(mix, rng)
  peak = np.max(np.abs(mix)) + 1e-12
  mix = mix / peak * 10.0 ** (_uniform(rng, params.gain_db) / 20.0)
  return (np.clip(np.round(mix * 32767.0), -32768, 32767) / 32768.0).astype(np.float32)  # a 16-bit recording


def _play_at(wave: np.ndarray, speed: float) -> np.ndarray:
  """The waveform played `speed` times faster (linear interpolation at espeak's 22 kHz: what folds back lands
  above the 8 kHz the 16 kHz resampler keeps)."""
  if speed == 1.0 or len(wave) < 2:
    return wave
  at = np.arange(0.0, len(wave) - 1, speed)
  return np.interp(at, np.arange(len(wave)), wave).astype(np.float32)


def _trim(speech: np.ndarray, threshold: float = 0.01, margin: int = 160) -> np.ndarray:
  """The speech without espeak's leading and trailing near-silence (10 ms kept either side)."""
  loud = np.nonzero(np.abs(speech) > threshold * (np.max(np.abs(speech)) + 1e-12))[0]
  if not len(loud):
    return speech
  return speech[max(0, loud[0] - margin):loud[-1] + margin]


def _pick_backgrounds(params: GenerationParams, rng) -> list[str]:
  weights = np.asarray(params.background_weights, np.float64)
  first = int(rng.choice(len(BACKGROUNDS), p=weights / weights.sum()))
  kinds = [BACKGROUNDS[first]]
  if rng.random() < params.second_background:
    weights[first] = 0.0
    kinds.append(BACKGROUNDS[int(rng.choice(len(BACKGROUNDS), p=weights / weights.sum()))])
  return kinds


def _background(params, rng, kinds, bank, min_talkers: int = 0) -> np.ndarray:
  """A sum of the given background kinds at random relative levels, unit RMS over the clip."""
  total = np.zeros(CLIP, np.float64)
  for kind in kinds:
    if kind == "coloured":
      x = _coloured_noise(rng, _uniform(rng, (-2.0, 1.0)))
    elif kind == "band":
      x = _band_noise(rng)
    elif kind == "hum":
      x = _hum(rng)
    elif kind == "clatter":
      x = _clatter(rng)
    else:
      lo, hi = params.babble_talkers
      x = _babble(rng, bank, int(rng.integers(max(lo, min_talkers), max(hi, min_talkers) + 1)))
    total += _unit_rms(x) * 10.0 ** (_uniform(rng, (-6.0, 0.0)) / 20.0)
  return _unit_rms(total)


def _unit_rms(x: np.ndarray) -> np.ndarray:
  return x / (np.sqrt(np.mean(x * x)) + 1e-12)


def _freqs() -> np.ndarray:
  f = np.fft.rfftfreq(CLIP, 1.0 / SR)
  f[0] = f[1]
  return f


def _coloured_noise(rng, slope: float) -> np.ndarray:
  """Power ∝ f^slope: -2 brown, -1 pink, 0 white, 1 blue."""
  spectrum = np.fft.rfft(rng.standard_normal(CLIP)) * _freqs() ** (slope / 2.0)
  return np.fft.irfft(spectrum, CLIP)


def _band_noise(rng) -> np.ndarray:
  """Noise in one band (log-Gaussian), slowly amplitude-modulated: a tap, a fan, an exercise bike."""
  centre = np.exp(_uniform(rng, (np.log(150.0), np.log(5000.0))))
  octaves = _uniform(rng, (0.3, 2.0))
  gain = np.exp(-0.5 * (np.log2(_freqs() / centre) / (octaves / 2.0)) ** 2)
  x = np.fft.irfft(np.fft.rfft(rng.standard_normal(CLIP)) * gain, CLIP)
  t = np.arange(CLIP) / SR
  depth = _uniform(rng, (0.0, 0.9))
  return x * (1.0 + depth * np.sin(2 * np.pi * _uniform(rng, (0.5, 8.0)) * t + _uniform(rng, (0, 2 * np.pi))))


def _hum(rng) -> np.ndarray:
  """Mains hum: 50 or 60 Hz and its harmonics to about 2 kHz, with a little hiss."""
  f0 = (50.0 if rng.random() < 0.5 else 60.0) * (1.0 + _uniform(rng, (-0.01, 0.01)))
  decay = _uniform(rng, (0.5, 2.0))
  spectrum = np.zeros(CLIP // 2 + 1, np.complex128)
  for k in range(1, int(2000 / f0) + 1):  # bins are 1 Hz apart: each harmonic to its nearest bin
    spectrum[int(round(k * f0))] += rng.uniform(0.2, 1.0) / k ** decay * np.exp(1j * rng.uniform(0, 2 * np.pi))
  x = _unit_rms(np.fft.irfft(spectrum, CLIP))
  return x + 0.05 * rng.standard_normal(CLIP)


def _clatter(rng) -> np.ndarray:
  """Dishes and keys: ringing impulses (decaying sinusoids over a noise burst) at random times."""
  x = np.zeros(CLIP)
  for _ in range(int(rng.integers(3, 16))):
    length = int(_uniform(rng, (0.01, 0.08)) * SR)
    t = np.arange(length) / SR
    envelope = np.exp(-t / _uniform(rng, (0.004, 0.04)))
    tone = np.sin(2 * np.pi * np.exp(_uniform(rng, (np.log(800.0), np.log(6000.0)))) * t)
    burst = envelope * (tone + 0.5 * rng.standard_normal(length)) * rng.uniform(0.2, 1.0)
    at = int(rng.integers(0, CLIP - length))
    x[at:at + length] += burst
  return x


def _babble(rng, bank: np.ndarray, talkers: int) -> np.ndarray:
  """`talkers` one-second stretches of the babble bank, at random offsets and levels, summed."""
  x = np.zeros(CLIP)
  for _ in range(max(1, talkers)):
    at = int(rng.integers(0, len(bank) - CLIP))
    x += bank[at:at + CLIP] * rng.uniform(0.3, 1.0)
  return x


def _reverb(clip: np.ndarray, rng, rt60: float) -> np.ndarray:
  """The clip in a room: a direct path plus an exponentially decaying noise tail (60 dB down after rt60 s)."""
  from scipy import signal  # pylint: disable=g-import-not-at-top
  length = int(rt60 * SR)
  t = np.arange(length) / SR
  tail = rng.standard_normal(length) * np.exp(-6.9 * t / rt60)
  tail *= 10.0 ** (_uniform(rng, (-12.0, 3.0)) / 20.0) / (np.sqrt(np.sum(tail ** 2)) + 1e-12)  # direct/reverb
  impulse = np.concatenate([[1.0], tail])
  return signal.fftconvolve(clip, impulse)[:CLIP]


def _microphone(x: np.ndarray, rng) -> np.ndarray:
  """A random microphone and channel: a high-pass corner and a spectral tilt."""
  f = _freqs()
  corner = _uniform(rng, (40.0, 300.0))
  tilt = _uniform(rng, (-3.0, 3.0))  # dB per octave around 1 kHz
  gain = (f / corner) ** 2 / (1.0 + (f / corner) ** 2) * 10.0 ** (tilt * np.log2(f / 1000.0) / 20.0)
  return np.fft.irfft(np.fft.rfft(x) * gain, CLIP)


_BANKS: dict[str, np.ndarray] = {}


def babble_bank(params: GenerationParams) -> np.ndarray:
  """float64 [n] of 16 kHz speech: `babble_phrases` phrases of BABBLE_WORDS by random voices, end to end.

  A pure function of the params, made once per process (a fraction of a second)."""
  key = params.hash()
  if key not in _BANKS:
    synth = espeak.synthesizer()
    requests, gaps = [], []
    for j in range(params.babble_phrases):
      rng = np.random.default_rng([params.seed, _BABBLE_STREAM, j])
      words = " ".join(rng.choice(BABBLE_WORDS, size=int(rng.integers(4, 9))))
      voice = espeak.Voice(f"{params.languages[int(rng.integers(len(params.languages)))]}+"
                           f"{params.voices[int(rng.integers(len(params.voices)))]}",
                           rate=int(rng.integers(140, 260)), pitch=int(rng.integers(10, 91)),
                           pitch_range=int(rng.integers(20, 91)), seed=int(rng.integers(1, 2**31)))
      requests.append((words, voice))
      gaps.append(int(rng.integers(0, SR // 10)))
    pieces = []
    for wave, gap in zip(synth.synthesize_many(requests), gaps):
      speech = _trim(espeak.resample_16k(wave, synth.sample_rate)).astype(np.float64)
      pieces += [_unit_rms(speech), np.zeros(gap)]
    bank = np.concatenate(pieces)
    if len(bank) < 2 * CLIP:
      bank = np.tile(bank, int(np.ceil(2 * CLIP / len(bank))))
    _BANKS[key] = bank
  return _BANKS[key]
