"""Compile a jitted function ahead of time in a background thread, while the run goes on.

A search's weight step can compile while the main thread initialises the state; its architecture step is first
needed after the warm-up and its evaluation at the end of the first epoch; a retrain needs its QAT step only for
the last epochs. Compiled on first use, each stops the run for its whole compile (on 2 CPU cores, keyword
spotting's architecture step took 46 s at step 290 of the search). XLA compiles with the GIL released, so a thread
can compile them while the main thread initialises or trains. One thread compiles, in the order asked.

    later = aot.compile_in_background(jitted, *example_args)  # arrays or jax.ShapeDtypeStruct (with sharding)
    later(*args)  # waits for the compile if it has not finished, then runs the compiled program

Calls must use arguments of the example's shapes, dtypes and shardings (a run's state and batches keep theirs);
anything else is refused by the compiled program, as it would be by `jax.jit(...).lower(...).compile()`.
"""
from __future__ import annotations

import concurrent.futures
from typing import Any, Callable

import jax

# One compile thread: a second would take the core the run itself trains on.
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgenas-aot")


class _Compiling:
  """A jitted function being compiled in the background for one signature; calling it runs the compiled program."""

  def __init__(self, jitted: Callable, *example_args: Any):
    # Only shapes, dtypes and shardings: the example arrays themselves may be donated or freed meanwhile. An
    # uncommitted array (a scalar made with jnp.float32) has no sharding to keep: jit places such arguments.
    specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=x.sharding if getattr(x, "committed", True) else None), example_args)
    self._future = _POOL.submit(lambda: jitted.lower(*specs).compile())

  def __call__(self, *args):
    return self._future.result()(*args)


def compile_in_background(jitted: Callable, *example_args: Any) -> Callable:
  """`jitted` (a `jax.jit` function) traced and compiled for `example_args` in a background thread."""
  return _Compiling(jitted, *example_args)
