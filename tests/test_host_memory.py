"""edgenas.host_memory: with it, a jitted program's large per-call buffer is reused, not page-faulted in anew.

Each case runs in a fresh interpreter, since the malloc settings must be in force before JAX starts its CPU
client. The program returns a 64 MiB array (above glibc's 32 MiB mmap ceiling), dropped after every call: without
the settings (the default) each call maps and faults in 16,384 fresh pages; with EDGENAS_KEEP_HOST_MEMORY=1 the
freed block is handed back.
"""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALLS = 12

PROGRAM = f"""
import json, resource
import edgenas
from edgenas import host_memory
import jax, jax.numpy as jnp

f = jax.jit(lambda x: jnp.broadcast_to(x, (16, 1024, 1024)) * 2.0)  # 64 MiB out of 4 bytes in
x = jnp.ones((), jnp.float32)
f(x).block_until_ready()  # compile and first allocation outside the count
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({CALLS}):
  y = f(x)
  y.block_until_ready()
  del y
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps(dict(applied=host_memory.keep_freed_memory(), faults=faults)))
"""


def _run(keep: bool) -> dict:
  env = dict(os.environ, EDGENAS_KEEP_HOST_MEMORY="1" if keep else "0", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", PROGRAM], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the settings are glibc's")
def test_large_buffers_are_reused_not_faulted_in_again():
  pages_per_call = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
  off = _run(keep=False)
  on = [_run(keep=True) for _ in range(5)]
  assert off["applied"] is False and all(r["applied"] for r in on)
  # Off: every call faults its whole output in (the count is the evidence that the test can see the problem).
  assert off["faults"] >= CALLS * pages_per_call * 0.9, off
  # On: the freed blocks are reused. The runtime frees a call's output at its own pace, so a call sometimes still
  # finds the reused block taken and grows the heap (measured over 20 runs here: 0 to 6 calls' worth of the 12,
  # mean 2), hence five runs and their mean. The program calls keep_freed_memory() only after the loop, so this
  # also shows that importing edgenas applied it.
  faults = [r["faults"] for r in on]
  assert sum(faults) / len(faults) <= 0.4 * off["faults"] and max(faults) < off["faults"], (faults, off)

