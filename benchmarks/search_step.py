"""Search-step cost: compile seconds, steady-state ms per (weights + α) step pair, images/s, peak RSS and (on a
GPU/TPU) peak device memory, for each relaxation, on the digits config, a CIFAR-sized config (32x32x3, batch 64)
and a visual-wake-words-sized one (96x96x3, batch 64), in float32 or bfloat16 (`config.search.compute_dtype`).
`--population K` adds a row per config: the vectorised sweep, K members stepping at once (one vmap).

Each row runs in its own subprocess so that peak memory is its own. Random data of the right shape stands in for
the images: the cost of a step does not depend on pixel values.

  python -m benchmarks.search_step [--steps 10] [--configs digits,cifar,vww96] [--relaxations softmax,gumbel,sigmoid]
      [--dtypes float32,bfloat16] [--population 0] [--out benchmarks/results/search_step.json]

The recorded file is one run of `--configs digits,cifar --steps 5`; each gumbel/softmax ratio compares rows of that
run. `benchmarks.profile_step` breaks one step of a row down by operation.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

from benchmarks import results_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CIFAR_SPACE = dict(stem=dict(channels=16, kernel=3, stride=1),
                   stages=[dict(layers=2, channels=16, stride=1), dict(layers=2, channels=32, stride=2)],
                   kernels=(3, 5, 7), expansions=(1, 3, 6), allow_skip=True, gate_group=4, channel_divisor=4,
                   head_channels=0)
VWW96_SPACE = dict(CIFAR_SPACE, stem=dict(channels=16, kernel=3, stride=2))  # 96x96 -> 48x48 after the stem
SHAPES = {"digits": (8, 8, 1), "cifar": (32, 32, 3), "vww96": (96, 96, 3)}


def build(name: str, relaxation: str, dtype: str = "float32"):
  """The objective, its search space and a random batch of the config's shape (digits' defaults otherwise)."""
  import jax.numpy as jnp
  import numpy as np
  from edgenas import objective as objective_lib
  from edgenas import optim
  from edgenas import search
  from edgenas import space as space_lib
  from experiments import digits

  c = digits.get_config()
  c.search.relaxation = relaxation
  c.search.compute_dtype = dtype
  shape = SHAPES[name]
  if name != "digits":
    c.space = CIFAR_SPACE if name == "cifar" else VWW96_SPACE
  space_cfg = dict(c.space)
  space_cfg.update(input_shape=shape, num_classes=10)
  space = space_lib.SearchSpace.from_config(space_cfg)
  op_cost, memory_fn, _ = search.resolve_cost_model(c)
  ocfg = search.objective_config(c, cost_ref=1000.0)
  obj = objective_lib.Objective(space, ocfg, op_cost, memory_fn, optim.weight_optimizer(c.weights, 1000),
                                optim.arch_optimizer(c.arch))
  bs = c.search.batch_size
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.random((bs,) + shape), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, bs), jnp.int32)}
  return obj, space, batch


def measure(name: str, relaxation: str, steps: int, dtype: str = "float32", population: int = 0) -> dict:
  """Runs in the child process. `population` > 0: the vectorised sweep's steps over that many members."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  obj, space, batch = build(name, relaxation, dtype)
  shape, bs = SHAPES[name], batch["label"].shape[0]
  tau, xi = jnp.float32(1.0), jnp.float32(0.05)
  member_args = ()
  t0 = time.perf_counter()
  if population:
    from edgenas import population as population_lib
    pop = population_lib.PopulationSteps(obj, population_lib.population_mesh(), population, chunk=0)
    state = pop.init(jax.random.PRNGKey(0), batch["image"][:1])
    wstep, astep = pop.weight_step, pop.arch_step
    lams = jnp.asarray(np.linspace(0.0, 1.0, population), jnp.float32)
    member_args = (lams, jnp.zeros_like(lams))  # a λ per member; the additive penalty reads no target
  else:
    state = jax.jit(obj.init_state)(jax.random.PRNGKey(0), batch["image"][:1])
    wstep, astep = jax.jit(obj.weight_step), jax.jit(obj.arch_step)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  wc = wstep.lower(state, batch, tau).compile()
  ac = astep.lower(state, batch, batch, tau, xi, *member_args).compile()
  compile_s = time.perf_counter() - t0
  state, _ = ac(state, batch, batch, tau, xi, *member_args)
  state, _ = wc(state, batch, tau)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, _ = ac(state, batch, batch, tau, xi, *member_args)
    state, m = wc(state, batch, tau)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  ms = 1000 * float(np.median(times))
  stats = jax.devices()[0].memory_stats() or {}  # None on CPU
  images = 2 * bs * max(1, population)  # one train and one validation batch per pair, per member
  return dict(config=name, relaxation=relaxation, dtype=dtype, population=population, input_shape=list(shape),
              batch_size=bs, layers=len(space.slots()), candidates=space.max_candidates(), init_s=round(init_s, 2),
              compile_s=round(compile_s, 2), ms_per_step_pair=round(ms, 1),
              images_per_s=round(images / (ms / 1000), 1),
              peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              peak_device_memory_mb=(round(stats["peak_bytes_in_use"] / 2**20, 1)
                                     if "peak_bytes_in_use" in stats else None),
              backend=jax.default_backend(), device=jax.devices()[0].device_kind)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--configs", default="digits,cifar")
  p.add_argument("--relaxations", default="softmax,gumbel,sigmoid")
  p.add_argument("--dtypes", default="float32")
  p.add_argument("--population", type=int, default=0, help="> 0: also a vectorised-sweep row per config")
  p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "search_step.json"))
  p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    name, relax, dtype, population = args.child
    print(json.dumps(measure(name, relax, args.steps, dtype, int(population))))
    return
  runs = [(name, relax, dtype, 0) for name in args.configs.split(",") for dtype in args.dtypes.split(",")
          for relax in args.relaxations.split(",")]
  if args.population:  # the sweep row: softmax, whose per-member work does not depend on the sampled path
    runs += [(name, "softmax", dtype, args.population) for name in args.configs.split(",")
             for dtype in args.dtypes.split(",")]
  rows = []
  for run in runs:
    env = dict(os.environ, EDGENAS_JAX_CACHE="")  # measure real compile time, not a cache hit
    out = subprocess.run([sys.executable, "-m", "benchmarks.search_step", "--child", *map(str, run), "--steps",
                          str(args.steps)], capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode:
      raise SystemExit(out.stderr)
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps(rows[-1]), file=sys.stderr)
  ratios = {}
  for name in args.configs.split(","):
    for dtype in args.dtypes.split(","):
      by = {r["relaxation"]: r for r in rows if r["config"] == name and r["dtype"] == dtype and not r["population"]}
      if "softmax" in by and "gumbel" in by:
        key = name if dtype == "float32" else f"{name} {dtype}"
        ratios[key] = round(by["gumbel"]["ms_per_step_pair"] / by["softmax"]["ms_per_step_pair"], 3)
  result = dict(benchmark="search_step", cpu_count=os.cpu_count(), rows=rows,
                gumbel_over_softmax_step_ratio=ratios, target_ratio="<= 0.5")
  results_file.write(args.out, result)


if __name__ == "__main__":
  main()
