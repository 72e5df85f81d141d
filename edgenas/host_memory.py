"""Keep freed host memory inside the process (glibc), so XLA:CPU reuses its per-step buffers instead of faulting
them in afresh on every step.

Why: XLA:CPU allocates an executable's temporary buffer with `posix_memalign` on every call, from one of its
worker threads (63 MB for the KWS DS-CNN train step at batch 64). glibc serves a block that large with a fresh
`mmap` (its mmap threshold cannot exceed 32 MB) or a fresh per-thread heap, and unmaps it again on `free`, so
each step page-faults the whole buffer in anew, 4 KiB at a time. With one arena, no mmap for large blocks and no
trimming, the freed block stays in the heap for the next step; the arithmetic is untouched (same trained weights).

Measured on a 2-core AMD EPYC by `python -m benchmarks.host_memory`:
- steady (a 3-epoch DS-CNN retrain on the embedded KWS set, warm compilation cache; results/host_memory.json):
  7.76 M page faults and 27.9 s of system time in 56.8 s without, 0.15 M and 2.6 s in 43.8 s with (1.30x);
- cold (a 20-step KWS search, empty compilation cache; results/host_memory_cold.json, 3 runs each): 63.5-68.3 s
  without, 78.1-90.4 s with. XLA compiles on the same worker threads, and LLVM's allocations from several threads
  in one arena cost about 20 s of CPU time. (Two arenas keep compilation as fast, but which arena a worker lands
  in is chance: in a KWS search it kept its page faults.)
- the CIFAR-sized all-paths search step (`python -m benchmarks.torch_reference --modes eager --steps 3`, run once
  each way, not kept in results/): softmax pair 11.3 -> 14.9 s and sigmoid 10.3 -> 11.9 s *slower* with it, peak
  RSS 5.4 -> 10.4 GB (one heap fragments under that step's many large buffers), while PyTorch eager in the same
  process got faster (4.6 -> 4.0 s, 5.8 -> 4.3 s).
So it is off unless EDGENAS_KEEP_HOST_MEMORY=1: it pays for long runs of small-activation networks (the KWS
retrain and search) with a warm compilation cache, not for a cold short run nor for the large all-paths step.
Freed memory is not returned to the OS until the process exits.

`keep_freed_memory()` must run before JAX creates its CPU client (its worker threads pick their malloc arena
when they first allocate): importing `edgenas` calls it. Elsewhere than glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV_VAR = "EDGENAS_KEEP_HOST_MEMORY"

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied: bool | None = None


def _glibc():
  """The C library if it is glibc (it has mallopt and gnu_get_libc_version), else None."""
  name = ctypes.util.find_library("c")
  if not name:
    return None
  try:
    libc = ctypes.CDLL(name)
  except OSError:
    return None
  if not (hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version")):
    return None
  return libc


def keep_freed_memory() -> bool:
  """One malloc arena for all threads, large blocks from the heap rather than mmap, and no trimming of the heap
  top, when EDGENAS_KEEP_HOST_MEMORY=1. Returns whether the settings are in force (False off glibc or when the
  variable is not 1). Idempotent."""
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  if os.environ.get(ENV_VAR, "0") != "1":
    return False
  libc = _glibc()
  if libc is None:
    return False
  # One arena: XLA's worker threads would otherwise each get a per-thread arena, whose heaps (64 MB at most)
  # are unmapped when they empty. In the main arena a freed block stays in the brk heap for the next step.
  ok = libc.mallopt(_M_ARENA_MAX, 1)
  ok &= libc.mallopt(_M_MMAP_MAX, 0)  # no mmap for large blocks (the threshold itself is capped at 32 MB)
  ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # keep the heap top; mallopt takes an int
  _applied = bool(ok)
  return _applied
