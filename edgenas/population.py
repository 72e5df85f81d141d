"""Vectorised search: K members of a sweep searched as one population, in one compiled program.

Members differ only in their penalty weight λ (`config.cost.lam`) and target T (`config.cost.target`); they share
the search space, data, seed, platform and schedule. The state of every member is stacked along a leading
population axis, and the weight and α steps of `edgenas.objective.Objective` are `jax.vmap`-ed over it with λ and
T as traced inputs, so K searches share one compile, one initialisation and one stream of batches. Each member
therefore follows exactly the path it would follow alone with the same seed and batches (up to float
reassociation).

The population axis is laid out over the devices of a `jax.sharding.Mesh` ("pop" axis), so on several devices,
or several hosts after `jax.distributed.initialize()`, each device steps its own slice of members; every process
feeds the same (replicated) batches and process 0 writes the files. A population whose size does not divide the
device count is padded with copies of its last member, whose results are dropped.

Under vmap, the Gumbel relaxation's `lax.switch` becomes a `select`: every candidate runs for every member. The
per-step arithmetic is then that of the softmax relaxation; what a population saves on CPU is compile,
initialisation and data time (measured by benchmarks/sweep.py; README "Sweeps and Pareto fronts"). `chunk` trades that
off: members are stepped `chunk` at a time (`jax.lax.map` over the population, vmapped within a chunk); `chunk=1`
is a loop over members inside the one compiled program, where each member's switch runs only its sampled branch.
"""
from __future__ import annotations

import math
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from edgenas import aot
from edgenas import cost as cost_lib
from edgenas import data as data_lib
from edgenas import loop as loop_lib
from edgenas import objective as objective_lib
from edgenas import optim
from edgenas import parallel
from edgenas import rundir
from edgenas import search as search_lib
from edgenas.console import say
from edgenas.nn import supernet as supernet_lib

POP_AXIS = "pop"
# The config fields members of one population may differ in; everything else must be equal.
MEMBER_FIELDS = ("cost.lam", "cost.target")


class PopulationError(ValueError):
  """Configs that cannot be searched as one population; the message names the differing fields."""


def population_mesh() -> Mesh:
  # Auto axis: XLA partitions the vmapped steps itself. With explicit sharding-in-types the batched convolutions'
  # reshapes would each need an out_sharding.
  return jax.make_mesh((jax.device_count(),), (POP_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def padded_size(members: int, devices: int) -> int:
  return int(math.ceil(members / devices) * devices)


def check_population(configs: Sequence) -> None:
  """Raises PopulationError unless the configs differ only in MEMBER_FIELDS."""
  if not configs:
    raise PopulationError("a population needs at least one member config")
  first = rundir.to_jsonable(configs[0])
  for i, c in enumerate(configs[1:], 1):
    differences = [d[0] for d in rundir.config_differences(first, rundir.to_jsonable(c))
                   if d[0] not in MEMBER_FIELDS]
    if differences:
      raise PopulationError(f"member {i} of the population differs from member 0 in {', '.join(differences)}; "
                            f"members of one population may differ only in {', '.join(MEMBER_FIELDS)}")


def over_population(fn, in_axes: tuple, chunk: int, size: int):
  """fn mapped over the population axis of the arguments whose in_axes entry is 0 (the others are shared):
  one vmap when chunk is 0 or covers the population, else `lax.map` over chunks of `chunk` members."""
  if not chunk or chunk >= size:
    return jax.vmap(fn, in_axes=in_axes)

  def mapped(*args):
    per_member = tuple(a for a, axis in zip(args, in_axes) if axis == 0)

    def one(xs):
      it = iter(xs)
      return fn(*(next(it) if axis == 0 else a for a, axis in zip(args, in_axes)))

    return jax.lax.map(one, per_member, batch_size=chunk if chunk > 1 else None)

  return mapped


def _stack(tree, size: int):
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (size,) + jnp.shape(x)), tree)


def _pop_array(values: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host array every process holds whole, placed with the population sharding (works across processes)."""
  return jax.make_array_from_callback(values.shape, sharding, lambda index: values[index])


class PopulationSteps:
  """The jit-compiled, population-vectorised steps of one Objective on one mesh."""

  def __init__(self, obj: objective_lib.Objective, mesh: Mesh, size: int, chunk: int = 0):
    if chunk and chunk < size and mesh.size > 1:
      raise PopulationError(f"a population chunk of {chunk} needs a single device; on {mesh.size} devices the "
                            f"population is already split across them (use chunk 0)")
    self.obj, self.mesh, self.size = obj, mesh, size
    self.pop = NamedSharding(mesh, P(POP_AXIS))
    self.repl = NamedSharding(mesh, P())
    # Metrics (one small vector per member) come back replicated, so every process can read all of them.
    self.init = jax.jit(lambda rng, x: _stack(obj.init_state(rng, x), size), out_shardings=self.pop)
    self.weight_step = jax.jit(over_population(obj.weight_step, (0, None, None), chunk, size),
                               out_shardings=(self.pop, self.repl), donate_argnums=0)
    self.arch_step = jax.jit(over_population(obj.arch_step, (0, None, None, None, None, 0, 0), chunk, size),
                             out_shardings=(self.pop, self.repl), donate_argnums=0)
    # Evaluation follows the same chunking: under one vmap Gumbel's argmax switch would run every candidate.
    self.correct = jax.jit(over_population(obj.eval_step, (0, None), chunk, size), out_shardings=self.repl)
    self.gather = jax.jit(lambda tree: tree, out_shardings=self.repl)

  def accuracy(self, state, split: data_lib.Split, batch_size: int) -> np.ndarray:
    """Per-member supernet accuracy on a split (deterministic path, full batches only, as search.evaluate)."""
    n = (len(split) // batch_size) * batch_size
    correct = np.zeros(self.size, np.int64)
    for i in range(0, n, batch_size):
      images, labels = split.take(np.arange(i, i + batch_size))
      batch = parallel.replicate({"image": images, "label": labels}, self.mesh)
      correct += np.asarray(jax.device_get(self.correct(state, batch)), np.int64)
    return correct / max(1, n)

  def host_arch(self, state):
    """Every member's architecture parameters as host arrays (gathered from all processes)."""
    return jax.device_get(self.gather(state.arch))


def run_population_search(configs: Sequence, workdirs: Sequence[str], pop_dir: str, chunk: int = 0
                          ) -> list[dict]:
  """Searches every config as one population and writes each member's `arch.json` + `search.json` into its
  workdir (same fields as `search.run_search`, plus `test_acc_supernet`); returns the member records.

  `pop_dir` holds the population's checkpoints; a run started again with the same members resumes from them.
  `chunk`: members stepped at once (0: all, one vmap; see the module docstring)."""
  if len(configs) != len(workdirs):
    raise PopulationError(f"{len(configs)} configs but {len(workdirs)} workdirs")
  check_population(configs)
  pop_config = {"members": [os.path.abspath(w) for w in workdirs],
                "configs": [rundir.to_jsonable(c) for c in configs]}
  for c, w in zip(configs, workdirs):  # a started run must have this config; nothing is written yet
    rundir.check_resume(w, c)
  rundir.check_resume(pop_dir, pop_config)
  t_start = time.time()
  base = configs[0]
  dataset = data_lib.load_data(base)
  space, obj, plan = search_lib.build(base, dataset)
  for c in configs:  # every member's penalty settings are valid on their own
    search_lib.objective_config(c, plan["cost_ref"])
  for c, w in zip(configs, workdirs):  # only now, every check passed: the population starts
    rundir.prepare_workdir(w, c)
  rundir.prepare_workdir(pop_dir, pop_config)
  s = base.search
  total, warmup, per_epoch = plan["total"], plan["warmup"], plan["steps_per_epoch"]
  mesh = population_mesh()
  k = len(configs)
  size = padded_size(k, jax.device_count())
  pad = lambda values: np.asarray(list(values) + [values[-1]] * (size - k), np.float32)
  steps = PopulationSteps(obj, mesh, size, chunk)
  lam = _pop_array(pad([float(c.cost.lam) for c in configs]), steps.pop)
  target = _pop_array(pad([float(c.cost.target) for c in configs]), steps.pop)
  # Every process reads whole batches: members, not examples, are spread over the devices.
  train_stream = data_lib.BatchStream.of(dataset.train, s.batch_size, base.seed, 0, 1)
  val_stream = data_lib.BatchStream.of(dataset.val, s.batch_size, base.seed + 1, 0, 1)
  say(f"population search: {k} members ({size} slots over {jax.device_count()} device(s), "
      f"{'all at once' if not chunk or chunk >= size else f'{chunk} at a time'}, "
      f"{jax.process_count()} process(es)), {len(space.slots())} layers, relaxation {s.relaxation}, "
      f"cost model {plan['cost_model']}, {total} steps ({warmup} warm-up)")

  state = steps.init(jax.random.PRNGKey(base.seed), jnp.zeros((1,) + tuple(space.input_shape), jnp.float32))
  lr_at = optim.weight_lr_schedule(base.weights, total)
  batch_at = lambda stream, step: parallel.replicate(dict(zip(("image", "label"), stream.batch_at(step))), mesh)
  # As in search.run_search: the evaluation and the α step compile in the background while the first steps train.
  tb, vb = batch_at(train_stream, 0), batch_at(val_stream, 0)
  steps.correct = aot.compile_in_background(steps.correct, state, tb)
  if warmup < total:
    steps.arch_step = aot.compile_in_background(steps.arch_step, state, tb, vb, jnp.float32(1.0),
                                                jnp.float32(0.1), lam, target)

  def step_fn(state, step):
    tau = jnp.float32(search_lib.tau_at(step, total, s))
    tb, metrics = batch_at(train_stream, step), {}
    if search_lib.arch_step_due(step, warmup, s):  # DARTS order, as in search.run_search: α first, then w
      state, metrics = steps.arch_step(state, tb, batch_at(val_stream, step), tau, jnp.float32(lr_at(step)), lam,
                                       target)
    state, w_metrics = steps.weight_step(state, tb, tau)
    return state, metrics | w_metrics

  def diverged(step, record):
    bad = loop_lib.non_finite(record, search_lib.WATCHED)
    if not bad:
      return None
    members = [workdirs[i] for i in np.flatnonzero(~np.isfinite(record[bad[0]]))]
    return f"{bad[0]} became non-finite at step {step} for member(s) {', '.join(members)}"

  def log_fields(state, step, epoch_end):
    fields = {"val_acc_supernet": steps.accuracy(state, dataset.val, s.batch_size)[:k]} if epoch_end else {}
    return fields | dict(epoch=step // per_epoch, tau=float(np.float32(search_lib.tau_at(step, total, s))))

  def epoch_summary(record, progress_line):
    if progress_line:
      return "  val acc (supernet) " + " ".join(f"{a:.4f}" for a in record["val_acc_supernet"])
    return None

  loop = loop_lib.Loop(
      name="population", checkpoint_dir=os.path.join(pop_dir, "checkpoints"),
      metrics_paths=[os.path.join(w, rundir.METRICS_FILE) for w in workdirs], total_steps=total,
      steps_per_epoch=per_epoch, images_per_step=s.batch_size * k, log_every=base.log_every,
      checkpoint_every=base.checkpoint_every, keep_checkpoints=base.keep_checkpoints,
      advice="Lower config.weights.lr or config.arch.lr, or search those members without --vectorize.",
      resuming="resuming the population from checkpoint step")
  done = loop.run(state, step_fn, diverged=diverged, log_fields=log_fields, epoch_summary=epoch_summary)
  return _finish(configs, workdirs, space, obj, plan, steps, done.state, dataset, k,
                 dict(total=time.time() - t_start, loop=done.seconds))


def _finish(configs, workdirs, space, obj, plan, steps: PopulationSteps, state, dataset, k: int,
            seconds: dict) -> list[dict]:
  """Derives every member, writes its arch.json and search.json, returns the records."""
  s = configs[0].search
  val_acc = steps.accuracy(state, dataset.val, s.batch_size)
  test_acc = steps.accuracy(state, dataset.test, s.batch_size)
  arch_params = steps.host_arch(state)
  members = [jax.tree.map(lambda x, i=i: x[i], arch_params) for i in range(k)]

  def accuracy(gates):  # every member's validation accuracy with these gate logits, in one pass per batch
    padded = np.concatenate([gates, np.repeat(gates[-1:], steps.size - k, axis=0)])
    arch = dict(state.arch, gate=_pop_array(padded.astype(np.float32), steps.pop))
    return steps.accuracy(state.replace(arch=arch), dataset.val, s.batch_size)[:k]
  closure = search_lib.gate_closure(space, members, accuracy)
  results = []
  for i, (config, workdir) in enumerate(zip(configs, workdirs)):
    member_arch = members[i]
    arch = supernet_lib.derive(space, member_arch, s.relaxation, name=config.get("name", ""))
    result = dict(
        arch_hash=arch.hash(), arch=arch.summary(), val_acc_supernet=float(val_acc[i]), gate_closure=closure[i],
        selected_gates=supernet_lib.selected_gate_summary(space, member_arch),
        test_acc_supernet=float(test_acc[i]), expected_cost=float(obj.expected_cost(member_arch)),
        derived_cost=float(cost_lib.architecture_cost(obj.op_cost, arch)), cost_model=plan["cost_model"],
        cost_ref=plan["cost_ref"], steps=plan["total"], relaxation=s.relaxation,
        probs=[np.asarray(p).round(4).tolist() for p in obj.probs(member_arch)],
        alpha=[np.asarray(a).tolist() for a in member_arch["alpha"]],
        candidates=[[c.name for c in slot.candidates] for slot in space.slots()],
        seconds=seconds, devices=jax.device_count(), population=dict(size=k, index=i))
    if jax.process_index() == 0:
      arch.save(os.path.join(workdir, search_lib.ARCH_FILE))
      rundir.atomic_write_json(os.path.join(workdir, search_lib.RESULT_FILE), result)
    say(f"derived {arch.hash()} (λ={float(config.cost.lam):g}): {' '.join(arch.summary()['layers'])}  "
        f"({arch.macs()} MACs); written to {workdir}")
    results.append(result)
  return results
