"""The DARTS bilevel objective: losses, cost penalties, and the jit-compiled weight and architecture steps.

Weights w minimise the task loss on the train split; architecture parameters (α and channel-gate logits) minimise
task loss plus a cost penalty on a held-out validation split. First order uses ∇_α L_val(w, α). Second order
differentiates through one virtual weight step w' = w − ξ∇_w L_train(w, α):

    ∇_α L_val(w', α) − ξ · ∇²_{α,w} L_train(w, α) · ∇_{w'} L_val(w', α)

where the mixed second-derivative-vector product is computed exactly, forward-over-reverse, as the JVP of
∇_α L_train along the direction ∇_{w'} L_val (DARTS approximates it by finite differences).
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from edgenas import cost as cost_lib
from edgenas import space as space_lib
from edgenas.nn import supernet as supernet_lib

PENALTIES = ("none", "additive", "mnas", "target")
# The supernet's forward and backward run in this dtype; parameters, optimizer state and losses stay float32
# (mixed precision: bfloat16 halves activation memory and runs on GPU/TPU matrix units).
COMPUTE_DTYPES = ("float32", "bfloat16")
# The log-ratio form CE·(log E / log T)^β this used to offer as "multiplicative": it depends on the cost's unit
# (NaN when E < 1, e.g. latency in ms of a small net on the Cortex-M7), so a config asking for it is refused.
RETIRED_PENALTIES = {"multiplicative": "mnas"}


@flax.struct.dataclass
class SearchState:
  step: jnp.ndarray
  weights: Any
  arch: Any
  w_opt: Any
  a_opt: Any
  rng: jnp.ndarray


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  onehot = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    onehot = optax.smooth_labels(onehot, label_smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits, onehot))


def cost_penalty(ce, cost, cfg, lam=None, target=None) -> jnp.ndarray:
  """The task loss with the configured cost penalty.

  additive:  CE + λ·E/E_ref
  mnas:      CE·(E/T)^β             (MnasNet's weighted product, FBNet's form; unit-free: E/T is a ratio)
  target:    CE + λ·|E/T − 1|       (TuNAS)

  `lam` / `target` (arrays) override cfg.lam / cfg.target: a vectorised sweep passes them as traced inputs so
  that one compiled step serves every member of a population.
  """
  form = cfg.penalty
  if lam is None and target is None and (form == "none" or (form == "additive" and cfg.lam == 0)):
    return ce
  lam = cfg.lam if lam is None else lam
  target = cfg.target if target is None else target
  if form == "none":
    return ce
  if form == "additive":
    return ce + lam * cost / cfg.cost_ref
  if form == "mnas":
    return ce * jnp.power(cost / target, cfg.beta)
  if form == "target":
    return ce + lam * jnp.abs(cost / target - 1.0)
  raise ValueError(f"unknown penalty form {form!r}; expected one of {PENALTIES}")


def memory_hinge(mem, cfg) -> jnp.ndarray:
  """μ·max(0, M/budget − 1): zero inside the budget, linear outside it."""
  if not cfg.memory_weight or not cfg.memory_budget:
    return jnp.zeros(())
  return cfg.memory_weight * jax.nn.relu(mem / cfg.memory_budget - 1.0)


class Objective:
  """Builds the loss functions and steps for one search space, relaxation and cost model."""

  def __init__(self, space: space_lib.SearchSpace, cfg, op_cost: cost_lib.OpCost, memory_fn: Callable | None,
               w_tx: optax.GradientTransformation, a_tx: optax.GradientTransformation):
    self.space, self.cfg = space, cfg
    self.relaxation = cfg.relaxation
    self.model = supernet_lib.Supernet(space, cfg.relaxation, cfg.get("weight_sharing", "independent"))
    self.op_cost, self.memory_fn = op_cost, memory_fn
    self.w_tx, self.a_tx = w_tx, a_tx
    self.compute_dtype = jnp.dtype(cfg.get("compute_dtype", "float32"))

  # ---- pieces
  def probs(self, arch):
    return [supernet_lib.candidate_probs(a, self.relaxation) for a in arch["alpha"]]

  def expected_cost(self, arch):
    return cost_lib.expected_cost(self.op_cost, self.space, self.probs(arch),
                                  supernet_lib.gate_fractions(self.space, arch))

  def expected_memory(self, arch):
    if self.memory_fn is None:
      return jnp.zeros(())
    return self.memory_fn(self.space, self.probs(arch), supernet_lib.gate_fractions(self.space, arch))

  def logits(self, weights, arch, images, rng, train: bool, tau, arch_step: bool = False):
    g_rng, h_rng = jax.random.split(rng)
    if self.compute_dtype != jnp.float32:  # cast inside the differentiated function: gradients come back float32
      weights, arch, images = jax.tree.map(lambda v: v.astype(self.compute_dtype), (weights, arch, images))
    logits = self.model.apply({"params": weights}, images, arch, train=train, tau=tau, arch_step=arch_step,
                              rngs={"gumbel": g_rng, "gates": h_rng})
    return logits.astype(jnp.float32)

  def task_loss(self, weights, arch, batch, rng, tau, arch_step: bool = False):
    """Cross-entropy and accuracy; `arch_step` selects the relaxation's architecture-gradient path."""
    logits = self.logits(weights, arch, batch["image"], rng, True, tau, arch_step)
    ce = cross_entropy(logits, batch["label"])
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return ce, acc

  def arch_loss(self, weights, arch, batch, rng, tau, lam=None, target=None):
    ce, acc = self.task_loss(weights, arch, batch, rng, tau, arch_step=True)
    energy = self.expected_cost(arch)
    mem = self.expected_memory(arch)
    loss = cost_penalty(ce, energy, self.cfg, lam, target) + memory_hinge(mem, self.cfg)
    if self.relaxation == "sigmoid":
      loss = loss + self.cfg.zero_one_weight * supernet_lib.zero_one_loss(arch)
    return loss, dict(val_ce=ce, val_acc=acc, expected_cost=energy, expected_memory=mem)

  # ---- steps (pure; the caller jits them)
  def weight_step(self, state: SearchState, batch, tau):
    rng, step_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
    (ce, acc), grads = jax.value_and_grad(self.task_loss, has_aux=True)(state.weights, state.arch, batch,
                                                                          step_rng, tau)
    updates, w_opt = self.w_tx.update(grads, state.w_opt, state.weights)
    weights = optax.apply_updates(state.weights, updates)
    metrics = dict(train_ce=ce, train_acc=acc, grad_norm=optax.tree.norm(grads))
    return state.replace(weights=weights, w_opt=w_opt, step=state.step + 1), metrics

  def arch_grad(self, state: SearchState, train_batch, val_batch, tau, xi, lam=None, target=None):
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)
    r_val, r_train = jax.random.split(rng)
    if not self.cfg.second_order:
      (_, aux), g = jax.value_and_grad(self.arch_loss, argnums=1, has_aux=True)(state.weights, state.arch,
                                                                               val_batch, r_val, tau, lam,
                                                                               target)
      return g, aux

    def train_ce(w, a):
      return self.task_loss(w, a, train_batch, r_train, tau, arch_step=True)[0]

    w_grad = jax.grad(train_ce)(state.weights, state.arch)
    w_virtual = jax.tree.map(lambda w, g: w - xi * g, state.weights, w_grad)
    (_, aux), (gw, ga) = jax.value_and_grad(self.arch_loss, argnums=(0, 1), has_aux=True)(
        w_virtual, state.arch, val_batch, r_val, tau, lam, target)
    # d/dε ∇_α L_train(w + ε·gw, α) at ε = 0: the exact Hessian-vector product, forward over reverse. The inner
    # gradient is taken in (w, α) jointly so that w is differentiated by both passes: the depthwise conv's custom
    # VJP supports jvp-of-grad only for inputs the inner grad also differentiates.
    grad_a_train = lambda w: jax.grad(train_ce, argnums=(0, 1))(w, state.arch)[1]
    _, hvp = jax.jvp(grad_a_train, (state.weights,), (gw,))
    return jax.tree.map(lambda a, h: a - xi * h, ga, hvp), aux

  def arch_step(self, state: SearchState, train_batch, val_batch, tau, xi, lam=None, target=None):
    """One α step; `lam` / `target` optionally override the config's penalty weight and target (see
    `cost_penalty`)."""
    grads, aux = self.arch_grad(state, train_batch, val_batch, tau, xi, lam, target)
    updates, a_opt = self.a_tx.update(grads, state.a_opt, state.arch)
    arch = optax.apply_updates(state.arch, updates)
    aux["alpha_entropy"] = alpha_entropy(self.probs(arch))
    return state.replace(arch=arch, a_opt=a_opt), aux

  def eval_step(self, state: SearchState, batch):
    logits = self.logits(state.weights, state.arch, batch["image"], state.rng, False, 1.0)
    return jnp.sum(jnp.argmax(logits, -1) == batch["label"])

  def init_state(self, rng, sample_images) -> SearchState:
    init_rng, state_rng = jax.random.split(rng)
    arch = supernet_lib.init_arch_params(self.space)
    weights = self.model.init({"params": init_rng}, sample_images, arch, train=False)["params"]
    return SearchState(step=jnp.zeros((), jnp.int32), weights=weights, arch=arch, w_opt=self.w_tx.init(weights),
                       a_opt=self.a_tx.init(arch), rng=state_rng)


def alpha_entropy(probs) -> jnp.ndarray:
  """Mean entropy (nats) of the per-layer candidate distributions: how undecided the search still is (FairDARTS's
  independent σ(α) normalised to a distribution first)."""
  probs = [p / jnp.sum(p) for p in probs]
  return jnp.mean(jnp.stack([-jnp.sum(p * jnp.log(p + 1e-12)) for p in probs]))

