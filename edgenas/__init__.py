"""edgenas: hardware-aware neural architecture search for microcontrollers, in JAX."""
from edgenas import host_memory as _host_memory

# With EDGENAS_KEEP_HOST_MEMORY=1, before JAX starts its CPU worker threads: XLA:CPU's per-step buffers are then
# reused rather than page-faulted in afresh on every step (see edgenas/host_memory.py for what it gains and costs).
_host_memory.keep_freed_memory()
