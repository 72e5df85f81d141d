"""Where a search step's time goes: one weight step and one architecture step under `jax.profiler`, every XLA
operation's time summed by phase (forward, backward) and by the part of the supernet it computes.

  python -m benchmarks.profile_step [--config cifar] [--relaxation softmax] [--out ...]

Same supernet, batch and step as `benchmarks.search_step` (random data of the right shape). The profiler records
each XLA:CPU thunk (a fusion, a matmul, a loop) with its duration and the thread it ran on; each is attributed with
the `op_name` XLA keeps from the JAX trace (`jit(weight_step)/transpose(jvp(Supernet))/layer_0/.../cand_8_k7e6/
expand_bn...`): `transpose(` marks the backward pass, the candidate's module path the part. Times are thread
time: on 2 cores they add up to between one and two times the wall time, depending on how much runs in parallel. Also lists the largest
single operations with their shapes, the place to start looking. Needs TensorFlow's copy of the profiler's protos
(the `export` extra) to read the trace.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile
import time

from benchmarks import results_file
from benchmarks import search_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The first match (in this order) in an operation's op_name names its part.
PARTS = (
    ("fusion boundary", r"fusion_boundary"),
    ("depthwise conv", r"/depthwise/"),
    ("expand 1x1 conv + BatchNorm", r"expand_bn"),
    ("depthwise BatchNorm", r"dw_bn"),
    ("project BatchNorm", r"project_bn"),
    ("project 1x1 conv", r"cand_\d+_[^/]+/nhwc,cd->nhwd"),
    ("ReLU6, gates", r"cand_\d+_[^/]+/(jit\(clip\)|mul|repeat|min|max)"),
    ("candidate, other", r"cand_\d+_"),
    ("mixing candidates", r"layer_\d+/"),
    ("stem, head, loss", r"Supernet"),
    ("optimizer, cost, other", r""),
)


CONTAINER = re.compile(r"^(end: )?(while|cond|conditional)(\.\d+)?$")


def _op_names(hlo_text: str) -> dict:
  """Instruction name -> (op_name, result shape), from the compiled module's text."""
  names = {}
  for m in re.finditer(r"\n\s*(?:ROOT )?%(\S+) = (\S+) [^\n]*?op_name=\"([^\"]*)\"", hlo_text):
    names.setdefault(m.group(1), (m.group(3), m.group(2)))
  return names


def _thunk_times(trace_dir: str) -> collections.Counter:
  """Thunk name -> summed duration (ms) over the XLA worker threads, from the trace's XSpace."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # the export extra; jax ships no reader
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
  if not paths:
    raise SystemExit(f"profile_step: jax.profiler wrote no trace under {trace_dir}")
  space = xplane_pb2.XSpace()
  with open(paths[-1], "rb") as f:
    space.ParseFromString(f.read())
  times = collections.Counter()
  for plane in space.planes:
    names = {k: v.name for k, v in plane.event_metadata.items()}
    for line in plane.lines:
      if not line.name.startswith("tf_XLAEigen"):  # the XLA:CPU worker threads that run the thunks
        continue
      for event in line.events:
        name = names.get(event.metadata_id, "")
        # A loop's or a conditional's event spans the operations inside it, which have events of their own.
        if not name.startswith("ThunkExecutor") and not CONTAINER.match(name):
          times[name] += event.duration_ps / 1e9
  return times


def attribute(times: collections.Counter, hlo_text: str) -> dict:
  """Summed thread time by phase and part, and the 12 largest operations."""
  names = _op_names(hlo_text)
  by_part, by_phase, top = collections.Counter(), collections.Counter(), []
  for thunk, ms in times.items():
    base = re.sub(r"^end: ", "", thunk)
    op_name, shape = names.get(base, ("", ""))
    phase = "backward" if "transpose(" in op_name else "forward"
    part = next(label for label, pattern in PARTS if re.search(pattern, op_name or "optimizer"))
    by_part[(phase, part)] += ms
    by_phase[phase] += ms
    top.append((ms, base, shape, op_name))
  top.sort(reverse=True)
  return dict(
      thread_ms=round(sum(times.values()), 1),
      by_phase_ms={k: round(v, 1) for k, v in by_phase.most_common()},
      by_part_ms=[dict(phase=ph, part=pa, ms=round(v, 1)) for (ph, pa), v in by_part.most_common()],
      largest_ops=[dict(ms=round(ms, 1), op=name, shape=shape, op_name=op_name[-120:])
                   for ms, name, shape, op_name in top[:12]])


def profile(config: str, relaxation: str) -> dict:
  import jax
  obj, _, batch = search_step.build(config, relaxation)
  state = jax.jit(obj.init_state)(jax.random.PRNGKey(0), batch["image"][:1])
  tau, xi = jax.numpy.float32(1.0), jax.numpy.float32(0.05)
  weight = jax.jit(obj.weight_step).lower(state, batch, tau).compile()
  arch = jax.jit(obj.arch_step).lower(state, batch, batch, tau, xi).compile()
  steps = {"weight_step": (weight, lambda s: weight(s, batch, tau)),
           "arch_step": (arch, lambda s: arch(s, batch, batch, tau, xi))}
  for _, run in steps.values():  # warm-up: first-run allocations stay out of the trace
    state, metrics = run(state)
    jax.block_until_ready(metrics)
  out = {}
  for name, (compiled, run) in steps.items():
    wall = []
    for _ in range(2):
      t0 = time.perf_counter()
      state, metrics = run(state)
      jax.block_until_ready(metrics)
      wall.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory(prefix="edgenas-profile-") as trace_dir:
      jax.profiler.start_trace(trace_dir)
      state, metrics = run(state)
      jax.block_until_ready(metrics)
      jax.profiler.stop_trace()
      times = _thunk_times(trace_dir)
    out[name] = dict(wall_ms_unprofiled=round(1000 * min(wall), 1), **attribute(times, compiled.as_text()))
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="cifar", choices=sorted(search_step.SHAPES))
  p.add_argument("--relaxation", default="softmax", choices=("softmax", "sigmoid", "gumbel"))
  p.add_argument("--out", default=None, help="default benchmarks/results/profile_step_<config>_<relaxation>.json")
  args = p.parse_args()
  out = args.out or os.path.join(REPO, "benchmarks", "results", f"profile_step_{args.config}_{args.relaxation}.json")
  result = dict(benchmark="profile_step", config=args.config, relaxation=args.relaxation,
                cpu_count=os.cpu_count(), **profile(args.config, args.relaxation),
                note="thread time of XLA:CPU operations in one profiled step each, after a warm-up step; "
                     "wall_ms_unprofiled is the faster of two steps run just before, outside the profiler")
  result["load_avg_1m_at_end"] = os.getloadavg()[0]
  results_file.write(out, result)


if __name__ == "__main__":
  main()
