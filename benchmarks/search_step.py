"""Search-step cost on CPU: compile seconds, steady-state ms per (weights + α) step pair, images/s and peak RSS,
for each relaxation, on the digits config and on a CIFAR-sized config (32x32x3, batch 64).

Each (config, relaxation) runs in its own subprocess so that peak RSS is its own. Random data of the right shape
stands in for the images: the cost of a step does not depend on pixel values.

  python -m benchmarks.search_step [--steps 10] [--configs digits,cifar] [--relaxations softmax,gumbel,sigmoid]
      [--out benchmarks/results/search_step.json]

The recorded file combines `--configs digits --steps 10` and `--configs cifar --steps 3` (a CIFAR softmax pair takes
about 13 s), run back to back; each gumbel/softmax ratio compares rows of one run.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CIFAR_SPACE = dict(stem=dict(channels=16, kernel=3, stride=1),
                   stages=[dict(layers=2, channels=16, stride=1), dict(layers=2, channels=32, stride=2)],
                   kernels=(3, 5, 7), expansions=(1, 3, 6), allow_skip=True, gate_group=4, channel_divisor=4,
                   head_channels=0)


def measure(name: str, relaxation: str, steps: int) -> dict:
  """Runs in the child process."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from edgenas import objective as objective_lib
  from edgenas import optim
  from edgenas import search
  from edgenas import space as space_lib
  from experiments import digits

  c = digits.get_config()
  c.search.relaxation = relaxation
  shape = (8, 8, 1) if name == "digits" else (32, 32, 3)
  if name != "digits":
    c.space = CIFAR_SPACE
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
  t0 = time.perf_counter()
  state = jax.jit(obj.init_state)(jax.random.PRNGKey(0), batch["image"][:1])
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  wstep, astep = jax.jit(obj.weight_step), jax.jit(obj.arch_step)
  tau, xi = jnp.float32(1.0), jnp.float32(0.05)
  t0 = time.perf_counter()
  wc = wstep.lower(state, batch, tau).compile()
  ac = astep.lower(state, batch, batch, tau, xi).compile()
  compile_s = time.perf_counter() - t0
  state, _ = ac(state, batch, batch, tau, xi)
  state, _ = wc(state, batch, tau)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, _ = ac(state, batch, batch, tau, xi)
    state, m = wc(state, batch, tau)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  ms = 1000 * float(np.median(times))
  return dict(config=name, relaxation=relaxation, input_shape=list(shape), batch_size=bs,
              layers=len(space.slots()), candidates=space.max_candidates(), init_s=round(init_s, 2),
              compile_s=round(compile_s, 2), ms_per_step_pair=round(ms, 1),
              images_per_s=round(2 * bs / (ms / 1000), 1),  # one train and one validation batch per pair
              peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              backend=jax.default_backend())


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--configs", default="digits,cifar")
  p.add_argument("--relaxations", default="softmax,gumbel,sigmoid")
  p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "search_step.json"))
  p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print(json.dumps(measure(args.child[0], args.child[1], args.steps)))
    return
  rows = []
  for name in args.configs.split(","):
    for relax in args.relaxations.split(","):
      env = dict(os.environ, EDGENAS_JAX_CACHE="")  # measure real compile time, not a cache hit
      out = subprocess.run([sys.executable, "-m", "benchmarks.search_step", "--child", name, relax, "--steps",
                            str(args.steps)], capture_output=True, text=True, env=env, cwd=REPO)
      if out.returncode:
        raise SystemExit(out.stderr)
      rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
      print(json.dumps(rows[-1]), file=sys.stderr)
  ratios = {}
  for name in args.configs.split(","):
    by = {r["relaxation"]: r for r in rows if r["config"] == name}
    if "softmax" in by and "gumbel" in by:
      ratios[name] = round(by["gumbel"]["ms_per_step_pair"] / by["softmax"]["ms_per_step_pair"], 3)
  result = dict(benchmark="search_step", cpu_count=os.cpu_count(), rows=rows,
                gumbel_over_softmax_step_ratio=ratios, target_ratio="<= 0.5")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
