"""The TensorFlow Lite Micro library for a target: located, generated with TFLM's own tree generator, compiled once.

One library serves every model of a target. It is cached under `~/.cache/edgenas/device/tflm/` (EDGENAS_DEVICE_CACHE
moves it), keyed by the target, its flags, the compiler and the TFLM commit, so a new TFLM or compiler builds a
new library and never links against a stale one. Concurrent builds of one key (two test workers) wait on a lock
instead of racing.

The sources come from `TFLM_DIR` (a tflite-micro checkout with its third-party downloads in place). Without it,
the pinned tree in `../shared/third_party/tflite-micro/` next to the repository is unpacked into the cache. No
network is used: an empty `downloads/pigweed` and `downloads/riscv_toolchain` keep TFLM's make from cloning
pigweed or fetching a SiFive toolchain (nothing built needs either).

Optimisation levels follow TFLM's own makefile: -Os for the framework, -O2 for kernels and third-party code.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from typing import Callable, Iterator

from edgenas.device import errors
from edgenas.device import targets as targets_lib

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED_TFLM_GLOB = os.path.join(_REPO_ROOT, "..", "shared", "third_party", "tflite-micro", "tflite-micro-*.tar.xz")
TREE_GENERATOR = "tensorflow/lite/micro/tools/project_generation/create_tflm_tree.py"
DOWNLOADS = "tensorflow/lite/micro/tools/make/downloads"
LIBRARY_VERSION = 1  # bump when the build recipe changes
CORE_OPT, KERNEL_OPT = "-Os", "-O2"
COMMON_FLAGS = ("-DTF_LITE_STATIC_MEMORY", "-DTF_LITE_DISABLE_X86_NEON", "-ffunction-sections", "-fdata-sections",
                "-fno-unwind-tables", "-fno-asynchronous-unwind-tables", "-fomit-frame-pointer", "-fmessage-length=0")
CXX_FLAGS = ("-std=c++17", "-fno-rtti", "-fno-exceptions", "-fno-threadsafe-statics", "-fno-use-cxa-atexit")
C_FLAGS = ("-std=c11",)


def cache_root() -> str:
  return os.environ.get("EDGENAS_DEVICE_CACHE", os.path.expanduser("~/.cache/edgenas/device"))


def _say(line: str) -> None:
  print(line, flush=True)


def _is_tflm_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, TREE_GENERATOR))


def resolve_tflm_dir(log: Callable[[str], None] = _say) -> str:
  """TFLM_DIR if set; else the shared pinned tree, unpacked into the cache once. Raises ToolchainMissingError
  saying how to supply the sources offline."""
  given = os.environ.get("TFLM_DIR")
  if given:
    if not _is_tflm_dir(given):
      raise errors.ToolchainMissingError(
          f"TFLM_DIR={given} is not a tflite-micro checkout ({TREE_GENERATOR} is missing); point it at a clone of "
          "tensorflow/tflite-micro with its third-party downloads in place (BUILD_NOTES.md)")
    return os.path.abspath(given)
  archives = sorted(glob.glob(SHARED_TFLM_GLOB))
  if not archives:
    raise errors.ToolchainMissingError(
        "TFLM_DIR is not set and no pinned TFLM archive was found at "
        f"{os.path.normpath(os.path.dirname(SHARED_TFLM_GLOB))}; set TFLM_DIR to a tflite-micro checkout with its "
        "third-party downloads in place (BUILD_NOTES.md says how to prepare one offline)")
  archive = archives[-1]
  tag = os.path.basename(archive)[:-len(".tar.xz")]
  root = os.path.join(cache_root(), "tflm-src", tag)
  tree = os.path.join(root, "tflite-micro")
  with _locked(root + ".lock"):
    if not os.path.isfile(os.path.join(root, ".complete")):
      log(f"device: unpacking {archive} into {root}")
      if os.path.isdir(root):
        shutil.rmtree(root)
      staging = root + ".partial"
      shutil.rmtree(staging, ignore_errors=True)
      os.makedirs(staging)
      with tarfile.open(archive) as tar:
        tar.extractall(staging, filter="data")
      with open(os.path.join(staging, ".source"), "w") as f:
        f.write(tag.split("-")[-1] + "\n")
      open(os.path.join(staging, ".complete"), "w").close()
      os.replace(staging, root)
  if not _is_tflm_dir(tree):
    raise errors.ToolchainMissingError(f"{archive} did not unpack to a tflite-micro tree at {tree}")
  return tree


def tflm_commit(tflm_dir: str) -> str:
  """The commit of a TFLM tree: git's HEAD, else the tag the shared archive was unpacked with, else a digest of
  the kernel sources (a tree of unknown origin still gets a stable key)."""
  if os.path.isdir(os.path.join(tflm_dir, ".git")):
    out = subprocess.run(["git", "-C", tflm_dir, "rev-parse", "HEAD"], capture_output=True, text=True)
    if out.returncode == 0:
      return out.stdout.strip()
  marker = os.path.join(os.path.dirname(tflm_dir), ".source")
  if os.path.isfile(marker):
    return open(marker).read().strip()
  digest = hashlib.sha256()
  for path in sorted(glob.glob(os.path.join(tflm_dir, "tensorflow/lite/micro/**/*.cc"), recursive=True)):
    digest.update(path[len(tflm_dir):].encode())
    digest.update(str(os.path.getsize(path)).encode())
  return "tree-" + digest.hexdigest()[:12]


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@dataclasses.dataclass(frozen=True)
class Library:
  """A compiled TFLM library and what a program needs to compile and link against it."""
  target: str
  directory: str
  archive: str  # libtflm.a
  include_dirs: tuple[str, ...]
  compile_flags: tuple[str, ...]  # architecture + common flags (no -O level, no language flags)
  tflm_commit: str
  compiler: str
  seconds: float  # how long the build took (0 when it was cached)

  def describe(self) -> dict:
    return dict(target=self.target, library=self.archive, tflm_commit=self.tflm_commit, compiler=self.compiler,
                kernels=targets_lib.get_target(self.target).kernels, core_opt=CORE_OPT, kernel_opt=KERNEL_OPT)


def _include_dirs(target: targets_lib.Target, tree: str, tflm_dir: str) -> tuple[str, ...]:
  dirs = [tree] + [os.path.join(tree, "third_party", d) for d in
                   ("gemmlowp", "flatbuffers/include", "kissfft", "ruy")]
  if target.family == "cortex_m":
    cmsis = os.path.join(tflm_dir, DOWNLOADS, "cmsis")
    armcm = next(f[2:] for f in target.compile_flags if f.startswith("-DARMCM"))
    # TFLM's Cortex-M timer includes the core's CMSIS device header, which the tree generator does not copy.
    dirs += [os.path.join(cmsis, "CMSIS/Core/Include"), os.path.join(cmsis, "Cortex_DFP/Device", armcm, "Include"),
             os.path.join(tree, "third_party/cmsis"), os.path.join(tree, "third_party/cmsis_nn"),
             os.path.join(tree, "third_party/cmsis_nn/Include")]
  else:
    dirs += [os.path.join(tree, "third_party"), os.path.join(tree, "third_party/eyalroz_printf/src")]
  return tuple(dirs)


def system_includes(target: targets_lib.Target) -> tuple[str, ...]:
  """-isystem flags: the Arm libstdc++ headers for RISC-V (headers only; no libstdc++ is linked)."""
  if target.family != "riscv32":
    return ()
  base = targets_lib.ARM_CXX_HEADERS
  return ("-isystem", base, "-isystem", os.path.join(base, "arm-none-eabi"))


def _library_key(target: targets_lib.Target, commit: str, compiler: str) -> str:
  blob = json.dumps([LIBRARY_VERSION, target.name, target.compile_flags, target.tflm_make_options, commit, compiler,
                     COMMON_FLAGS, CXX_FLAGS, C_FLAGS, CORE_OPT, KERNEL_OPT])
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _sources(tree: str) -> list[str]:
  out = []
  for top in ("tensorflow", "third_party", "signal"):
    for path in glob.glob(os.path.join(tree, top, "**", "*.c*"), recursive=True):
      rel = os.path.relpath(path, tree)
      if rel.endswith((".cc", ".c")) and not rel.endswith("_test.cc") and "/examples/" not in rel:
        out.append(rel)
  return sorted(out)


def _opt_level(rel: str) -> str:
  return KERNEL_OPT if rel.startswith(("third_party/", "tensorflow/lite/micro/kernels/", "signal/")) else CORE_OPT


def compile_command(target: targets_lib.Target, source: str, obj: str, include_dirs, extra=(), opt=None) -> list[str]:
  """The compiler command line for one C or C++ source of a device program or library."""
  cxx = source.endswith((".cc", ".cpp"))
  tool = target.prefix + ("g++" if cxx else "gcc")
  lang = CXX_FLAGS if cxx else C_FLAGS
  return ([tool, *lang, *COMMON_FLAGS, *target.compile_flags, opt or CORE_OPT, *system_includes(target)] +
          [f"-I{d}" for d in include_dirs] + list(extra) + ["-c", source, "-o", obj])


def run_logged(cmd: list[str], log_path: str, cwd: str | None = None) -> int:
  """Runs `cmd`, appending the command line and its output to `log_path`; returns the exit status."""
  with open(log_path, "a") as log:
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd).returncode


def build_library(target: targets_lib.Target | str, tflm_dir: str | None = None, jobs: int | None = None,
                  log: Callable[[str], None] = _say) -> Library:
  """The TFLM library for `target`, built if the cache lacks it (minutes), else returned at once."""
  target = targets_lib.get_target(target) if isinstance(target, str) else target
  targets_lib.check_toolchain(target)
  tflm_dir = tflm_dir or resolve_tflm_dir(log)
  commit, compiler = tflm_commit(tflm_dir), target.compiler_version()
  directory = os.path.join(cache_root(), "tflm", f"{target.name}-{_library_key(target, commit, compiler)}")
  tree = os.path.join(directory, "tree")
  archive = os.path.join(directory, "libtflm.a")

  def library(seconds: float) -> Library:
    return Library(target.name, directory, archive, _include_dirs(target, tree, tflm_dir), target.compile_flags,
                   commit, compiler, seconds)

  with _locked(directory + ".lock"):
    if os.path.isfile(os.path.join(directory, "library.json")):
      return library(0.0)
    t0 = time.time()
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    build_log = os.path.join(directory, "build.log")
    for d in ("pigweed", "riscv_toolchain"):
      # Empty on purpose: TFLM's make would clone pigweed and download a SiFive toolchain otherwise.
      os.makedirs(os.path.join(tflm_dir, DOWNLOADS, d), exist_ok=True)
    log(f"device: building the TFLM library for {target.name} ({target.kernels} kernels, TFLM {commit[:12]}, "
        f"{compiler}); once per target, a few minutes")
    options = f"{target.tflm_make_options} TARGET_TOOLCHAIN_ROOT={os.path.dirname(shutil.which(target.prefix + 'gcc'))}/"
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    with open(build_log, "a") as f:
      gen = subprocess.run([sys.executable, TREE_GENERATOR, f"--makefile_options={options}", tree], cwd=tflm_dir,
                           env=env, stdout=f, stderr=subprocess.STDOUT)
    if gen.returncode != 0 or not os.path.isdir(tree):
      raise errors.BuildError(f"target {target.name}: TFLM's tree generator failed; log kept at {build_log}")
    sources = _sources(tree)
    includes = _include_dirs(target, tree, tflm_dir)
    objects = [os.path.join(directory, "obj", os.path.splitext(s)[0] + ".o") for s in sources]
    for o in objects:
      os.makedirs(os.path.dirname(o), exist_ok=True)
    logs = [os.path.join(directory, "obj", f"{i}.log") for i in range(len(sources))]

    def compile_one(i: int) -> int:
      return run_logged(compile_command(target, os.path.join(tree, sources[i]), objects[i], includes,
                                         opt=_opt_level(sources[i])), logs[i])

    done, step = 0, max(1, len(sources) // 10)
    with concurrent.futures.ThreadPoolExecutor(jobs or os.cpu_count() or 2) as pool:
      for i, rc in zip(range(len(sources)), pool.map(compile_one, range(len(sources)))):
        if rc != 0:
          with open(build_log, "a") as f:
            f.write(open(logs[i]).read())
          raise errors.BuildError(f"target {target.name}: compiling {sources[i]} failed; log kept at {build_log}")
        done += 1
        if done % step == 0 or done == len(sources):
          log(f"device: {target.name}: compiled {done}/{len(sources)} TFLM sources ({time.time() - t0:.0f} s)")
    with open(build_log, "a") as f:
      for p in logs:
        f.write(open(p).read())
        os.remove(p)
    partial = archive + ".partial"
    if run_logged([target.prefix + "ar", "rcs", partial] + objects, build_log) != 0:
      raise errors.BuildError(f"target {target.name}: archiving the TFLM library failed; log kept at {build_log}")
    os.replace(partial, archive)
    seconds = time.time() - t0
    with open(os.path.join(directory, "library.json"), "w") as f:
      json.dump(dict(library(seconds).describe(), sources=len(sources), seconds=round(seconds, 1)), f, indent=1)
    log(f"device: {target.name}: TFLM library ready in {seconds:.0f} s -> {archive}")
    return library(seconds)
