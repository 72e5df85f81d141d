"""The supernet: sparse-gated Flax blocks, one mixed op per searchable layer.

Architecture parameters are *not* Flax params: the supernet's `__call__` takes them as an argument
(`ArchParams`: one logit vector α per layer, and per expanding candidate a vector of channel-gate logits), so the
weight optimizer and the architecture optimizer see disjoint pytrees and second-order DARTS can differentiate
through either.

Relaxations of a mixed op (chosen by config):
- "softmax" (DARTS): every candidate runs, outputs mixed by softmax(α).
- "gumbel" (GDAS/ProxylessNAS): a hard Gumbel-max sample picks one candidate and `nn.switch` runs only that one in
  the weight step; the architecture step also runs the Gumbel runner-up and passes a straight-through gradient
  through the relaxed choice between the two (see `MixedOp._gumbel`).
- "sigmoid" (FairDARTS): every candidate runs, outputs mixed by independent sigmoid(α); a zero-one loss pushes
  each weight to 0 or 1.

Weights (`config.search.weight_sharing`):
- "independent": every candidate has its own weights, so a one-path (Gumbel) step trains a tenth of a layer.
- "entangled" (Single-Path NAS superkernel, Once-for-All's nested widths): a slot's expanding candidates share
  one expand / depthwise / project set, as wide as the largest expansion, and each runs on its first `hidden`
  channels and the centred kh x kw of the largest kernel; the unexpanded candidates share another. Every step
  trains what all candidates of the sampled family use.

Channel gates (hard-concrete / L0, Louizos et al. 2018) sit on the expanded channels of each expanding candidate,
one gate per `gate_group` channels, after the depthwise conv's BatchNorm and ReLU6, just before the projection:
there a gate's value changes the block's output. (Before the depthwise conv, the per-channel batch-statistics
BatchNorm that follows it cancelled any non-zero gate scale, leaving the task loss a gradient of eps/σ² on the
gates.) A channel whose gate closes drops out of all three operators, as derivation removes it.

One statistic prices and derives: the cost counts a gate open with P(z > 0) (`gate_open_prob`) and `derive`
keeps exactly the gates with P(z > 0) > 0.5; a candidate weighs in the cost with the weight the network runs it
with (softmax(α), or σ(α) for FairDARTS), and `derive` keeps the heaviest. BatchNorm in the supernet normalises with batch statistics only (as in DARTS
search): candidates that rarely run would otherwise carry stale running statistics.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edgenas import architecture as arch_lib
from edgenas import ops as ops_lib
from edgenas import space as space_lib
from edgenas.nn import fusion
from edgenas.nn.depthwise import depthwise_conv
from edgenas.nn.model import conv2d, global_avg_pool, pointwise, relu6

RELAXATIONS = ("softmax", "gumbel", "sigmoid")
WEIGHT_SHARING = ("independent", "entangled")

# Hard-concrete stretch interval and temperature (Louizos et al. 2018, Sec. 4).
HC_GAMMA, HC_ZETA, HC_BETA = -0.1, 1.1, 2.0 / 3.0
GATE_INIT_LOGIT = 3.0  # gates start almost surely open: the search decides what to remove


# {"alpha": [(n_candidates,) logits per slot], "gate": (n_gates,) logits of every channel gate in the network}.
# The gates of all candidates share one flat vector (see `gate_layout`) so that no leaf is empty.
ArchParams = dict


def n_gate_groups(slot: space_lib.LayerSlot, cand: space_lib.Candidate, gate_group: int) -> int:
  """Gated candidates are the expanding MBConvs; the others have no gates."""
  if cand.op != arch_lib.MBCONV or cand.expansion == 1:
    return 0
  return math.ceil(slot.hidden_max(cand) / gate_group)


def gate_layout(space: space_lib.SearchSpace) -> list[list[tuple[int, int]]]:
  """Per slot, per candidate: (offset, count) of its gates in the flat gate vector."""
  layout, offset = [], 0
  for slot in space.slots():
    row = []
    for cand in slot.candidates:
      n = n_gate_groups(slot, cand, space.gate_group)
      row.append((offset, n))
      offset += n
    layout.append(row)
  return layout


def init_arch_params(space: space_lib.SearchSpace) -> ArchParams:
  """α = 0 (uniform) and every gate nearly open."""
  n_gates = sum(n for row in gate_layout(space) for _, n in row)
  return {"alpha": [jnp.zeros((len(slot.candidates),), jnp.float32) for slot in space.slots()],
          "gate": jnp.full((max(1, n_gates),), GATE_INIT_LOGIT, jnp.float32)}


def candidate_gates(space: space_lib.SearchSpace, arch: ArchParams) -> list[list]:
  """Per slot, per candidate: its gate logits, or None for an ungated candidate."""
  return [[arch["gate"][o:o + n] if n else None for o, n in row] for row in gate_layout(space)]


def gate_open_prob(log_alpha):
  """P(gate > 0) of a hard-concrete gate: the expected open fraction the cost model sees."""
  return jax.nn.sigmoid(log_alpha - HC_BETA * math.log(-HC_GAMMA / HC_ZETA))


def gate_sample(log_alpha, rng):
  """A hard-concrete sample in [0, 1] with exact zeros and ones; reparameterised in log_alpha."""
  u = jax.random.uniform(rng, log_alpha.shape, minval=1e-6, maxval=1.0 - 1e-6)
  s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / HC_BETA)
  return jnp.clip(s * (HC_ZETA - HC_GAMMA) + HC_GAMMA, 0.0, 1.0)


def gate_deterministic(log_alpha):
  """The test-time gate of Louizos et al.: the stretched, clipped sigmoid."""
  return jnp.clip(jax.nn.sigmoid(log_alpha) * (HC_ZETA - HC_GAMMA) + HC_GAMMA, 0.0, 1.0)


# A gate logit at which the deterministic gate is exactly 1 (or, negated, exactly 0): sigmoid(30) rounds to 1 in
# float32, and the stretched sigmoid is clipped.
HARD_GATE_LOGIT = 30.0


def hard_gates(space: space_lib.SearchSpace, arch: ArchParams, rng: np.random.Generator | None = None,
               closed: bool = True, fraction: float | None = None):
  """The flat gate logits with every gate exactly open or exactly closed.

  `closed=False`: every gate open. Otherwise the gates `derive` removes (P(z > 0) <= 0.5) are closed, or with
  `fraction`, the ceil(fraction · n) gate groups of lowest logit in each gated candidate (the search's ranking of
  its channels, whether or not it crossed the threshold). With `rng`, each candidate closes as many groups chosen
  uniformly at random instead: the control that shows whether the search ranks the channels the task needs."""
  flat = np.full(np.shape(arch["gate"]), HARD_GATE_LOGIT, np.float32)
  if not closed:
    return flat
  logits = np.asarray(arch["gate"], np.float32)
  prob = np.asarray(gate_open_prob(logits))
  for row in gate_layout(space):
    for offset, n in row:
      if not n:
        continue
      if fraction is None:
        shut = np.flatnonzero(prob[offset:offset + n] <= 0.5)
      else:
        shut = np.argsort(logits[offset:offset + n], kind="stable")[:math.ceil(fraction * n)]
      if rng is not None:
        shut = rng.choice(n, size=shut.size, replace=False)
      flat[offset + shut] = -HARD_GATE_LOGIT
  return flat


def closed_gate_groups(space: space_lib.SearchSpace, arch: ArchParams, selected_only: bool = True) -> tuple[int, int]:
  """(closed, total) gate groups, of the candidates `derive` selects (argmax α) or of all candidates."""
  prob = np.asarray(gate_open_prob(np.asarray(arch["gate"])))
  closed = total = 0
  for alpha, row in zip(arch["alpha"], gate_layout(space)):
    for j, (offset, n) in enumerate(row):
      if n and (not selected_only or j == int(np.argmax(alpha))):
        closed += int(np.sum(prob[offset:offset + n] <= 0.5))
        total += n
  return closed, total


def selected_gate_summary(space: space_lib.SearchSpace, arch: ArchParams) -> list[dict | None]:
  """Per layer, the gates of the candidate `derive` selects: how many groups, and their P(z > 0) (min, mean, max,
  and how many derive closes); None for an ungated candidate. Written to search.json, so a run shows whether its
  gates moved towards the threshold or stayed open."""
  prob = np.asarray(gate_open_prob(np.asarray(arch["gate"], np.float32)))
  out = []
  for alpha, row in zip(arch["alpha"], gate_layout(space)):
    offset, n = row[int(np.argmax(alpha))]
    p = prob[offset:offset + n]
    out.append(dict(groups=n, open_prob_min=round(float(p.min()), 4), open_prob_mean=round(float(p.mean()), 4),
                    open_prob_max=round(float(p.max()), 4), closed=int(np.sum(p <= 0.5))) if n else None)
  return out


def candidate_probs(alpha, relaxation: str):
  """The weight each candidate runs with in the mixed op, which the cost model prices it with: softmax(α), or
  FairDARTS's independent σ(α) (not normalised: the network runs Σ σ(α_j)·op_j). Gumbel's forward pass is one
  sample whose probabilities are softmax(α)."""
  if relaxation == "sigmoid":
    return jax.nn.sigmoid(alpha)
  return jax.nn.softmax(alpha)


def gate_fractions(space: space_lib.SearchSpace, arch: ArchParams) -> list:
  """Per slot, per candidate: the expected open fraction of its expanded channels (1 for ungated ones)."""
  return [jnp.stack([jnp.mean(gate_open_prob(g)) if g is not None else jnp.ones(()) for g in row])
          for row in candidate_gates(space, arch)]


BN_EPS = 1e-3


def batch_stat_norm(x, scale, bias, eps: float = BN_EPS):
  """Normalises with the batch's own statistics, then the affine (scale, bias)."""
  mean = jnp.mean(x, axis=(0, 1, 2))
  var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def pointwise_batch_stat_norm(x, w, scale, bias, eps: float = BN_EPS):
  """batch_stat_norm(pointwise(x, w), scale, bias), as one matmul.

  The statistics of y = x @ w follow from x's mean and covariance (C_in x C_in): mean(y) = mean(x) @ w and
  var(y) = diag(wᵀ Σ w). The normalisation then folds into the weights and a bias, so no pass over the wide
  expanded tensor computes statistics or applies them, in the forward pass or (differentiated) the backward pass:
  one k7 e6 candidate at 32x32x16, batch 64, forward and backward 255 -> 220 ms; CIFAR-sized supernet weight step
  4.1 -> 3.4 s, architecture step 2.0 -> 1.6 s (2 cores). Statistics are float32 and their small matmuls exact
  (TPUs default to bfloat16 passes), whatever the compute dtype."""
  flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  mean_x = jnp.mean(flat, axis=0)
  centred = flat - mean_x
  hi = jax.lax.Precision.HIGHEST
  cov = jnp.matmul(centred.T, centred, precision=hi) / flat.shape[0]
  wf = w.astype(jnp.float32)
  var = jnp.maximum(jnp.sum(wf * jnp.matmul(cov, wf, precision=hi), axis=0), 0.0)
  a = scale * jax.lax.rsqrt(var + eps)
  shift = bias - jnp.matmul(mean_x, wf, precision=hi) * a
  return pointwise(x, (wf * a).astype(x.dtype)) + shift.astype(x.dtype)


class BatchStatNorm(nn.Module):
  """BatchNorm with batch statistics only and a learned affine."""
  eps: float = BN_EPS

  @nn.compact
  def affine(self, channels: int):
    return (self.param("scale", nn.initializers.ones, (channels,)),
            self.param("bias", nn.initializers.zeros, (channels,)))

  def __call__(self, x):
    return batch_stat_norm(x, *self.affine(x.shape[-1]), self.eps)

  def after_pointwise(self, x, w):
    """BatchStatNorm()(pointwise(x, w)), computed as `pointwise_batch_stat_norm`."""
    return pointwise_batch_stat_norm(x, w, *self.affine(w.shape[-1]), self.eps)


class MBConvCandidate(nn.Module):
  """Inverted residual block; its expanded channels are multiplied by `gate` (one value per gate group)."""
  out_channels: int
  kernel: int | tuple[int, int]
  expansion: int
  stride: int | tuple[int, int]
  residual: bool
  gate_group: int

  @nn.compact
  def __call__(self, x, gate):
    cin = x.shape[-1]
    init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    h = x
    if self.expansion != 1:
      hidden = cin * self.expansion
      h = relu6(BatchStatNorm(name="expand_bn").after_pointwise(h, self.param("expand", init, (cin, hidden))))
    hidden = h.shape[-1]
    dw = self.param("dw", nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
                    (*ops_lib.pair(self.kernel), hidden))
    h = relu6(BatchStatNorm(name="dw_bn")(depthwise_conv(h, dw, self.stride)))
    if self.expansion != 1:  # after the per-channel BatchNorm, so the gate's scale reaches the projection
      h = h * jnp.repeat(gate, self.gate_group)[:hidden]
    h = pointwise(h, self.param("project", init, (hidden, self.out_channels)))
    h = BatchStatNorm(name="project_bn")(h)
    return h + x if self.residual else h


def _centred(kernel_hw, shared_hw) -> tuple[slice, slice]:
  """The rows and columns of a kh x kw kernel inside the shared KH x KW one: its centre, so that k3 is the middle
  of k5 and 7x3 the middle columns of a 7x5 (Single-Path NAS's superkernel)."""
  return tuple(slice((big - k) // 2, (big - k) // 2 + k) for k, big in zip(kernel_hw, shared_hw))


def entangled_mbconv(x, p, gate, *, kernel, hidden: int, stride, residual: bool, gate_group: int):
  """One candidate of an entangled slot, run on slices of the weights its family shares (`p`): the first `hidden`
  expanded channels, and the centred kh x kw of the depthwise kernel. The same operators, in the same order, as
  `MBConvCandidate`, so a candidate computes what its own network would with those weights."""
  h = x
  if "expand" in p:
    h = relu6(pointwise_batch_stat_norm(h, p["expand"][:, :hidden], p["expand_bn_scale"][:hidden],
                                        p["expand_bn_bias"][:hidden]))
  rows, cols = _centred(ops_lib.pair(kernel), p["dw"].shape[:2])
  h = depthwise_conv(h, p["dw"][rows, cols, :hidden], stride)
  h = relu6(batch_stat_norm(h, p["dw_bn_scale"][:hidden], p["dw_bn_bias"][:hidden]))
  if "expand" in p:
    h = h * jnp.repeat(gate, gate_group)[:hidden]
  h = batch_stat_norm(pointwise(h, p["project"][:hidden]), p["project_bn_scale"], p["project_bn_bias"])
  return h + x if residual else h


class MixedOp(nn.Module):
  slot: space_lib.LayerSlot
  gate_group: int
  relaxation: str
  weight_sharing: str = "independent"

  def setup(self):
    if self.weight_sharing == "entangled":
      self._setup_entangled()
      return
    # Gumbel runs one candidate per layer under `nn.switch`. Differentiating a switch makes every branch return
    # the union of all branches' residuals (zeros for the branches not taken), which cost more than the chosen
    # path itself; rematerialised candidates keep only their inputs, so the backward pass re-runs the one chosen
    # forward instead (digits weight step 96 -> 54 ms, architecture step 73 -> 38 ms on 2 CPU cores).
    cand_cls = nn.remat(MBConvCandidate) if self.relaxation == "gumbel" else MBConvCandidate
    self.cands = [
        cand_cls(self.slot.out_channels, c.kernel, c.expansion, self.slot.stride, self.slot.residual_ok,
                 self.gate_group, name=f"cand_{j}_{c.name}") if c.op == arch_lib.MBCONV else None
        for j, c in enumerate(self.slot.candidates)
    ]

  def _setup_entangled(self):
    """Weight-entangled candidates (Single-Path NAS, Once-for-All): the expanding candidates share one expand /
    depthwise / project set, as wide as the largest expansion and as large as the largest kernel; the unexpanded
    ones (no expand conv, a different input to the depthwise) share another. A step that runs any candidate then
    trains the core every other candidate of its family uses, instead of each of a layer's ten candidates getting
    a tenth of the steps (measured on keyword spotting: see experiments/kws.py)."""
    slot = self.slot
    cin, cout = slot.in_channels, slot.out_channels
    conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    dw_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
    families = {}
    for c in slot.candidates:
      if c.op == arch_lib.MBCONV:
        fam = families.setdefault("e1" if c.expansion == 1 else "ex", dict(expansion=1, kh=1, kw=1))
        kh, kw = ops_lib.pair(c.kernel)
        fam.update(expansion=max(fam["expansion"], c.expansion), kh=max(fam["kh"], kh), kw=max(fam["kw"], kw))
    shared = {}
    for name, fam in families.items():
      hidden = cin * fam["expansion"]
      p = {}
      if name == "ex":
        p["expand"] = self.param(f"{name}_expand", conv_init, (cin, hidden))
        p["expand_bn_scale"] = self.param(f"{name}_expand_bn_scale", nn.initializers.ones, (hidden,))
        p["expand_bn_bias"] = self.param(f"{name}_expand_bn_bias", nn.initializers.zeros, (hidden,))
      p["dw"] = self.param(f"{name}_dw", dw_init, (fam["kh"], fam["kw"], hidden))
      p["dw_bn_scale"] = self.param(f"{name}_dw_bn_scale", nn.initializers.ones, (hidden,))
      p["dw_bn_bias"] = self.param(f"{name}_dw_bn_bias", nn.initializers.zeros, (hidden,))
      p["project"] = self.param(f"{name}_project", conv_init, (hidden, cout))
      p["project_bn_scale"] = self.param(f"{name}_project_bn_scale", nn.initializers.ones, (cout,))
      p["project_bn_bias"] = self.param(f"{name}_project_bn_bias", nn.initializers.zeros, (cout,))
      shared[name] = p
    self.shared = shared  # Flax freezes a dict assigned in setup: filled first, then assigned
    self.cands = [None] * len(slot.candidates)

  def _run(self, j, x, gates):
    if self.weight_sharing == "entangled":
      c = self.slot.candidates[j]
      if c.op != arch_lib.MBCONV:
        return x
      fn = functools.partial(entangled_mbconv, kernel=c.kernel, hidden=self.slot.hidden_max(c),
                             stride=self.slot.stride, residual=self.slot.residual_ok, gate_group=self.gate_group)
      if self.relaxation == "gumbel":  # as the independent candidates are rematerialised (see setup)
        fn = jax.checkpoint(fn)
      return fn(x, self.shared["e1" if c.expansion == 1 else "ex"], gates[j])
    cand = self.cands[j]
    return x if cand is None else cand(x, gates[j])

  def __call__(self, x, alpha, gates, train: bool, tau, arch_step: bool = False):
    n = len(self.slot.candidates)
    if self.is_initializing():  # every branch must create its parameters
      return sum(self._run(j, x, gates) for j in range(n)) / n
    if self.relaxation == "gumbel":
      return self._gumbel(x, alpha, gates, train, tau, arch_step)
    w = jax.nn.softmax(alpha) if self.relaxation == "softmax" else jax.nn.sigmoid(alpha)
    return sum(w[j] * self._run(j, x, gates) for j in range(n))

  def _gumbel(self, x, alpha, gates, train, tau, arch_step):
    """Hard Gumbel-max sample: the forward pass is exactly one candidate's output.

    Weight step and evaluation run only that candidate (`nn.switch`). The architecture step needs a gradient for
    α that survives the next layer's BatchNorm, which is blind to the scale of a single path (so GDAS's gradient
    through the chosen path's weight alone vanishes in a chain of BN'd layers). It therefore also runs the
    runner-up of the Gumbel top-2 and relaxes the choice between the two, as ProxylessNAS's two-path binary
    gates do: value o_first, gradient of softmax((α + g)/τ) restricted to the pair, straight through.
    """
    n = len(self.slot.candidates)
    branches = [lambda mdl, x, gates, j=j: mdl._run(j, x, gates) for j in range(n)]
    if not train:
      return nn.switch(jnp.argmax(alpha), branches, self, x, gates)
    scores = alpha + jax.random.gumbel(self.make_rng("gumbel"), alpha.shape)
    first = jnp.argmax(scores)
    if not arch_step or n == 1:
      return nn.switch(first, branches, self, x, gates)
    second = jnp.argmax(jnp.where(jnp.arange(n) == first, -jnp.inf, scores))
    pair = jax.nn.softmax(jnp.stack([scores[first], scores[second]]) / tau)
    hard = jnp.array([1.0, 0.0]) - jax.lax.stop_gradient(pair) + pair  # value (1, 0), gradient of the pair
    return (hard[0] * nn.switch(first, branches, self, x, gates)
            + hard[1] * nn.switch(second, branches, self, x, gates))


class Supernet(nn.Module):
  space: space_lib.SearchSpace
  relaxation: str = "softmax"
  weight_sharing: str = "independent"  # or "entangled" (see MixedOp._setup_entangled)

  @nn.compact
  def __call__(self, x, arch: ArchParams, train: bool = True, tau=1.0, arch_step: bool = False):
    s = self.space
    w = self.param("stem", nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                   (*ops_lib.pair(s.stem_kernel), x.shape[-1], s.stem_channels))
    x = relu6(BatchStatNorm(name="stem_bn")(conv2d(x, w, s.stem_stride)))
    if train and not self.is_initializing():  # one hard-concrete sample for every gate of the network
      gate_values = gate_sample(arch["gate"], self.make_rng("gates"))
    else:
      gate_values = gate_deterministic(arch["gate"])
    gate_values = gate_values.astype(x.dtype)  # a bfloat16 search stays bfloat16 (float32 draws would promote)
    for i, (slot, row) in enumerate(zip(s.slots(), gate_layout(s))):
      gates = [gate_values[o:o + n] if n else None for o, n in row]
      x = MixedOp(slot, s.gate_group, self.relaxation, self.weight_sharing, name=f"layer_{i}")(
          x, arch["alpha"][i], gates, train, tau, arch_step).astype(x.dtype)
      # Where every candidate runs, the next layer's candidates all add to this output's gradient (see
      # `fusion.gradient_boundary`); on GPU and TPU a conditional would cost a round trip to the host.
      if self.relaxation != "gumbel" and jax.default_backend() == "cpu":
        x = fusion.gradient_boundary(x)
    if s.head_channels:
      x = pointwise(x, self.param("head", nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                                  (x.shape[-1], s.head_channels)))
      x = relu6(BatchStatNorm(name="head_bn")(x))
    x = global_avg_pool(x)
    return nn.Dense(s.num_classes, name="classifier")(x)


def zero_one_loss(arch: ArchParams) -> jnp.ndarray:
  """FairDARTS's regulariser: -mean((σ(α) - 0.5)²), minimised when every weight is 0 or 1."""
  sig = jnp.concatenate([jax.nn.sigmoid(a) for a in arch["alpha"]])
  return -jnp.mean(jnp.square(sig - 0.5))


def derive(space: space_lib.SearchSpace, arch: ArchParams, relaxation: str, name: str = ""
           ) -> arch_lib.Architecture:
  """The discrete network: the heaviest candidate per layer (argmax of α, which is also the argmax of softmax(α)
  and σ(α)) and, inside it, the gate groups the cost counts as more likely open than not (P(z > 0) > 0.5, the
  statistic `gate_fractions` prices), rounded up to the space's channel divisor and never above the width."""
  del relaxation  # every relaxation's selection rule is argmax α; kept in the signature for clarity
  choices, hidden = [], []
  for slot, alpha, gates in zip(space.slots(), arch["alpha"], candidate_gates(space, arch)):
    j = int(jnp.argmax(alpha))
    cand = slot.candidates[j]
    choices.append(j)
    g = gates[j]
    if g is not None:
      hmax = slot.hidden_max(cand)
      open_groups = int(jnp.sum(gate_open_prob(g) > 0.5))
      hidden.append(min(hmax, space.round_channels(open_groups * space.gate_group)))
    else:
      hidden.append(0)
  return space.architecture(choices, hidden, name=name)
