"""The supernet's relaxations, channel gates, expected cost and derivation, and the exact second-order step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgenas import cost as cost_lib
from edgenas import objective as objective_lib
from edgenas import optim
from edgenas import search, space as space_lib
from edgenas.nn import fusion
from edgenas.nn import supernet as sn
from experiments import tiny


@pytest.fixture(scope="module")
def space():
  cfg = dict(tiny.get_config().space)
  cfg.update(input_shape=(8, 8, 1), num_classes=10)
  return space_lib.SearchSpace.from_config(cfg)


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  return {"image": jnp.asarray(rng.random((16, 8, 8, 1)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32)}


def make_objective(space, relaxation, weight_sharing="independent", compute_dtype="float32", **cost_overrides):
  c = tiny.get_config()
  c.search.relaxation = relaxation
  c.search.weight_sharing = weight_sharing
  c.search.compute_dtype = compute_dtype
  c.cost.model = "macs"
  c.cost.update(cost_overrides)
  ocfg = search.objective_config(c, cost_ref=1e5)
  return objective_lib.Objective(space, ocfg, cost_lib.mac_cost, None,
                                 optim.weight_optimizer(c.weights, 10), optim.arch_optimizer(c.arch))


@pytest.mark.parametrize("relaxation", sn.RELAXATIONS)
def test_every_relaxation_trains_weights_and_arch(space, batch, relaxation):
  obj = make_objective(space, relaxation, lam=0.5, penalty="additive")
  state = obj.init_state(jax.random.PRNGKey(0), batch["image"][:1])
  s1, wm = jax.jit(obj.weight_step)(state, batch, 1.0)
  s2, am = jax.jit(obj.arch_step)(s1, batch, batch, 1.0, 0.01)
  assert np.isfinite(float(wm["train_ce"])) and np.isfinite(float(am["val_ce"]))
  moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(s2.arch["alpha"], s1.arch["alpha"])]
  assert max(moved) > 0, "the architecture step did not move α"
  assert float(jnp.max(jnp.abs(s2.arch["gate"] - s1.arch["gate"]))) > 0, "gates did not move"
  logits = obj.logits(s2.weights, s2.arch, batch["image"], s2.rng, False, 1.0)
  assert logits.shape == (16, 10)


def test_gumbel_hard_runs_one_branch_per_layer(space, batch):
  obj = make_objective(space, "gumbel")
  state = obj.init_state(jax.random.PRNGKey(0), batch["image"][:1])
  loss = lambda w: obj.task_loss(w, state.arch, batch, jax.random.PRNGKey(1), 1.0)[0]
  conds = [e for e in jax.make_jaxpr(loss)(state.weights).jaxpr.eqns if e.primitive.name == "cond"]
  assert len(conds) == len(space.slots())
  # Untaken candidates get exactly zero weight gradient: they did not run. The taken one does get one.
  grads = jax.grad(loss)(state.weights)
  for i in range(len(space.slots())):
    norms = [float(optax_norm(v)) for v in grads[f"layer_{i}"].values()]
    assert sum(n > 0 for n in norms) == 1, norms


def test_gumbel_architecture_gradient_reaches_every_layer(space, batch):
  """The two-path straight-through gradient survives the next layer's BatchNorm (a single path's would not)."""
  obj = make_objective(space, "gumbel", penalty="none")  # task loss only: the cost term would touch every α
  state = obj.init_state(jax.random.PRNGKey(0), batch["image"][:1])
  loss = lambda a: obj.arch_loss(state.weights, a, batch, jax.random.PRNGKey(1), 1.0)[0]
  conds = [e for e in jax.make_jaxpr(loss)(state.arch).jaxpr.eqns if e.primitive.name == "cond"]
  assert len(conds) == 2 * len(space.slots())  # the sample and its runner-up, nothing else
  for g in jax.grad(loss)(state.arch)["alpha"]:
    assert int(jnp.sum(g != 0)) == 2, g  # exactly the two candidates that ran


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_expected_cost_is_differentiable_and_matches_the_derived_network(space):
  arch = sn.init_arch_params(space)
  f = lambda a: cost_lib.expected_cost(cost_lib.mac_cost, space, [jax.nn.softmax(x) for x in a["alpha"]],
                                       sn.gate_fractions(space, a))
  g = jax.grad(f)(arch)
  assert all(float(jnp.max(jnp.abs(x))) > 0 for x in g["alpha"])
  assert float(jnp.min(g["gate"])) > 0  # opening channels always costs MACs
  # Almost one-hot α and fully open gates: the expected cost is the derived network's cost.
  choice = [1, 1]  # k3e3 in both slots
  arch["alpha"] = [jnp.where(jnp.arange(len(a)) == c, 40.0, -40.0) for a, c in zip(arch["alpha"], choice)]
  arch["gate"] = jnp.full_like(arch["gate"], 30.0)
  derived = sn.derive(space, arch, "softmax")
  assert [l.hidden for l in derived.layers] == [24, 24]
  np.testing.assert_allclose(float(f(arch)), derived.macs(), rtol=1e-5)


def test_derive_rounds_open_gates_to_the_divisor(space):
  arch = sn.init_arch_params(space)
  arch["alpha"] = [jnp.where(jnp.arange(len(a)) == 1, 1.0, 0.0) for a in arch["alpha"]]
  (o0, n0), (o1, n1) = sn.gate_layout(space)[0][1], sn.gate_layout(space)[1][1]
  gate = np.full(arch["gate"].shape, 5.0, np.float32)
  gate[o0:o0 + n0] = -5.0
  gate[o0:o0 + 3] = 5.0  # 3 open groups of 4 channels = 12 channels
  gate[o1:o1 + n1] = -5.0  # all closed: the divisor is the minimum
  arch["gate"] = jnp.asarray(gate)
  derived = sn.derive(space, arch, "gumbel")
  assert [l.hidden for l in derived.layers] == [12, space.channel_divisor]


@pytest.mark.parametrize("relaxation", ["softmax", "gumbel"])  # gumbel: through remat'd candidates in a switch
def test_second_order_uses_the_exact_hessian_vector_product(space, batch, relaxation):
  """The forward-over-reverse implicit term equals the reverse-over-reverse one, computed independently."""
  obj = make_objective(space, relaxation, lam=0.0, penalty="none")
  obj.cfg.second_order = True
  state = obj.init_state(jax.random.PRNGKey(0), batch["image"][:1])
  xi = 0.05
  g2, _ = obj.arch_grad(state, batch, batch, 1.0, xi)
  # Rebuild the pieces by hand, with the same random draws as arch_grad.
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)
  r_val, r_train = jax.random.split(rng)
  train_ce = lambda w, a: obj.task_loss(w, a, batch, r_train, 1.0, arch_step=True)[0]
  w_virtual = jax.tree.map(lambda w, g: w - xi * g, state.weights, jax.grad(train_ce)(state.weights, state.arch))
  gw, ga = jax.grad(lambda w, a: obj.arch_loss(w, a, batch, r_val, 1.0)[0], argnums=(0, 1))(w_virtual, state.arch)
  assert any(np.abs(np.asarray(h)).max() > 0 for h in jax.tree.leaves(gw))
  # Independent exact form: reverse over reverse, ∇_α <∇_w L_train(w, α), gw>.
  inner = lambda a: sum(jnp.vdot(g, v) for g, v in zip(jax.tree.leaves(jax.grad(train_ce)(state.weights, a)),
                                                         jax.tree.leaves(gw)))
  expected = jax.tree.map(lambda a, h: a - xi * h, ga, jax.grad(inner)(state.arch))
  for got, want in zip(jax.tree.leaves(g2), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("penalty, extra", [("additive", dict(lam=1.0)), ("mnas", dict(target=1e3)),
                                            ("target", dict(lam=1.0, target=1e3))])
def test_penalties_push_towards_cheaper_candidates(space, batch, penalty, extra):
  obj = make_objective(space, "softmax", penalty=penalty, **extra)
  state = obj.init_state(jax.random.PRNGKey(0), batch["image"][:1])
  g_cost = jax.grad(lambda a: objective_lib.cost_penalty(jnp.float32(2.0), obj.expected_cost(a), obj.cfg))(
      state.arch)
  costs = cost_lib.candidate_costs(cost_lib.mac_cost, space, sn.gate_fractions(space, state.arch))
  for g, c in zip(g_cost["alpha"], costs):
    # The most expensive candidate's logit is pushed down hardest.
    assert int(jnp.argmax(g)) == int(jnp.argmax(c))


def test_bad_search_config_is_refused():
  c = tiny.get_config()
  c.search.relaxation = "annealed"
  with pytest.raises(search.SearchConfigError, match="relaxation"):
    search.objective_config(c, 1.0)
  c = tiny.get_config()
  c.cost.penalty = "target"
  with pytest.raises(search.SearchConfigError, match="config.cost.target"):
    search.objective_config(c, 1.0)
  c = tiny.get_config()
  c.search.weight_sharing = "shared"
  with pytest.raises(search.SearchConfigError, match="config.search.weight_sharing must be one of"):
    search.check_config(c)
  c = tiny.get_config()
  c.search.compute_dtype = "float16"
  with pytest.raises(search.SearchConfigError, match="config.search.compute_dtype must be one of"):
    search.check_config(c)


@pytest.mark.parametrize("relaxation", sn.RELAXATIONS)
def test_the_objective_prices_exactly_the_network_derive_returns(space, relaxation):
  """One statistic: at a converged α and gates, the objective's expected cost (under each relaxation's own
  candidate weights and P(gate open)) is the cost of the network `derive` returns."""
  obj = make_objective(space, relaxation)
  arch = sn.init_arch_params(space)
  choice = [1, 1]  # k3e3 in both slots: 8 x 3 = 24 expanded channels, 6 gates of 4
  arch["alpha"] = [jnp.where(jnp.arange(len(a)) == c, 40.0, -40.0) for a, c in zip(arch["alpha"], choice)]
  gate = np.full(arch["gate"].shape, 30.0, np.float32)
  o0, (o1, n1) = sn.gate_layout(space)[0][1][0], sn.gate_layout(space)[1][1]
  gate[o0:o0 + 2] = -30.0  # 4 of 6 groups open: 16 channels
  gate[o1:o1 + n1 - 1] = -30.0  # 1 of 6 open: 4 channels, rounded up to the divisor
  arch["gate"] = jnp.asarray(gate)
  derived = sn.derive(space, arch, relaxation)
  assert [l.hidden for l in derived.layers] == [16, max(4, space.channel_divisor)]
  np.testing.assert_allclose(float(obj.expected_cost(arch)), cost_lib.architecture_cost(cost_lib.mac_cost, derived),
                             rtol=1e-4)


def test_derive_keeps_a_gate_exactly_when_the_cost_counts_it_more_open_than_not(space):
  arch = sn.init_arch_params(space)
  arch["alpha"] = [jnp.where(jnp.arange(len(a)) == 1, 5.0, 0.0) for a in arch["alpha"]]
  (o0, n0) = sn.gate_layout(space)[0][1]
  gate = np.full(arch["gate"].shape, 5.0, np.float32)
  gate[o0:o0 + n0] = [-1.0, -1.0, -1.0, -2.5, -2.5, -2.5]  # P(open) 0.65 and 0.29
  arch["gate"] = jnp.asarray(gate)
  p_open = np.asarray(sn.gate_open_prob(arch["gate"][o0:o0 + n0]))
  np.testing.assert_allclose(p_open, [0.646] * 3 + [0.289] * 3, atol=2e-3)
  assert sn.derive(space, arch, "softmax").layers[0].hidden == 3 * space.gate_group  # the three at 0.65


def test_the_task_loss_reaches_the_channel_gates(space, batch):
  """λ = 0: the cross-entropy's gradient on the gate logits is of the order of its gradient on α, not at the
  BatchNorm-eps scale it had when the gates sat before the depthwise conv's BatchNorm."""
  obj = make_objective(space, "softmax", penalty="none", lam=0.0)
  state = obj.init_state(jax.random.PRNGKey(0), batch["image"][:1])
  arch = dict(state.arch, gate=jnp.zeros_like(state.arch["gate"]))  # gates half open: sigmoid slope at its largest
  g = jax.grad(lambda a: obj.task_loss(state.weights, a, batch, jax.random.PRNGKey(1), 1.0, arch_step=True)[0])(arch)
  gate_grad = float(jnp.mean(jnp.abs(g["gate"])))
  alpha_grad = float(jnp.mean(jnp.concatenate([jnp.abs(a) for a in g["alpha"]])))
  assert gate_grad > 1e-4, gate_grad
  assert 1e-2 < gate_grad / alpha_grad < 1e2, (gate_grad, alpha_grad)


def test_a_gates_scale_changes_the_blocks_output():
  """A gate at 0.5 scales its channels into the projection: d(output)/d(gate) is 8.5e-3 on this probe. Placed
  before the depthwise conv (as until Dec 2026), the per-channel batch-statistics BatchNorm after it cancelled the
  scale and the same derivative was 6.8e-5, BatchNorm-eps scale."""
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 8, 8, 8))
  probe = jax.random.normal(jax.random.PRNGKey(1), (16, 8, 8, 8))
  cand = sn.MBConvCandidate(8, 3, 3, 1, True, 4)
  gate = jnp.full((6,), 0.5)
  params = cand.init(jax.random.PRNGKey(2), x, gate)
  g = jax.grad(lambda gt: jnp.mean(cand.apply(params, x, gt) * probe))(gate)
  assert float(jnp.mean(jnp.abs(g))) > 1e-3


def test_hard_gates_close_what_derive_removes_or_as_many_at_random(space):
  arch = sn.init_arch_params(space)
  rng = np.random.default_rng(0)
  logits = rng.normal(0.0, 3.0, arch["gate"].shape).astype(np.float32)
  arch = dict(arch, gate=jnp.asarray(logits))
  prob = np.asarray(sn.gate_open_prob(logits))
  learned = sn.hard_gates(space, arch)
  np.testing.assert_array_equal(learned < 0, prob <= 0.5)
  values = np.asarray(sn.gate_deterministic(jnp.asarray(learned)))
  assert set(np.unique(values)) <= {0.0, 1.0}  # exactly open or exactly closed
  assert np.all(sn.hard_gates(space, arch, closed=False) > 0)
  differs = False
  for draw in range(3):
    random = sn.hard_gates(space, arch, rng=np.random.default_rng(draw))
    for row in sn.gate_layout(space):
      for offset, n in row:
        if n:  # as many closed in each candidate, not necessarily the same ones
          assert np.sum(random[offset:offset + n] < 0) == np.sum(learned[offset:offset + n] < 0)
    differs |= bool(np.any(random != learned))
  assert differs
  closed, total = sn.closed_gate_groups(space, arch, selected_only=False)
  assert closed == int(np.sum(prob <= 0.5)) and total == logits.size


def test_gate_closure_compares_learned_with_random_closing(space):
  """With an accuracy that depends only on which gates are open, closing the least useful gates (those the search
  drove down) must lose less than closing as many at random."""
  arch = sn.init_arch_params(space)
  n = arch["gate"].shape[0]
  usefulness = np.linspace(1.0, 2.0, n)
  logits = np.where(np.arange(n) % 3 == 0, -4.0, 4.0).astype(np.float32)  # every third gate learned closed
  usefulness[np.arange(n) % 3 == 0] = 0.01
  arch = dict(arch, gate=jnp.asarray(logits))

  def accuracy(gates):
    return [float(np.sum(usefulness * (g > 0)) / np.sum(usefulness)) for g in gates]
  (row,) = search.gate_closure(space, [arch], accuracy, draws=5)
  assert row["val_acc_all_open"] == pytest.approx(1.0)
  for rule in ("learned", "lowest_logits"):  # the learned-closed gates are also the lowest third of the logits
    assert len(row[rule]["val_acc_random"]) == 5
    assert row[rule]["loss"] < row[rule]["random_loss"]
  assert row["closed_groups_all_candidates"] == int(np.sum(logits < 0)) and row["closed_groups"] <= row["groups"]
  # With no gate closed only the ranked rule is measured.
  (row,) = search.gate_closure(space, [dict(arch, gate=jnp.abs(arch["gate"]))], accuracy, draws=2)
  assert "learned" not in row and len(row["lowest_logits"]["val_acc_random"]) == 2


def test_gates_close_under_the_cost_term_and_are_not_decayed_back_open(space):
  """The architecture optimizer decays α but not the gate logits (config.arch.gate_weight_decay, default 0).
  Decay pulls a logit to 0, where a gate is 83% open: against a cost gradient that is orders of magnitude
  smaller it holds every gate above derive's threshold. Under the cost term alone the gates close; with the
  old decay on them, none does."""
  obj = make_objective(space, "softmax")
  cost = lambda a: 0.1 * obj.expected_cost(a) / 1e5  # λ = 0.1 of the tiny space's additive penalty

  def closed_after(steps, **arch_cfg):
    c = tiny.get_config().arch
    c.update(arch_cfg)
    tx = optim.arch_optimizer(c)
    arch = sn.init_arch_params(space)
    opt = tx.init(arch)

    @jax.jit
    def step(arch, opt):
      updates, opt = tx.update(jax.grad(cost)(arch), opt, arch)
      return jax.tree.map(lambda p, u: p + u, arch, updates), opt

    for _ in range(steps):
      arch, opt = step(arch, opt)
    return arch, float(jnp.mean(sn.gate_open_prob(arch["gate"]) <= 0.5))

  arch, closed = closed_after(150)
  assert closed == 1.0, closed
  assert float(jnp.max(jnp.abs(jax.grad(cost)(sn.init_arch_params(space))["gate"]))) < 1e-3 * 3.0  # < decay's pull
  _, closed_decayed = closed_after(150, gate_weight_decay=1e-3)
  assert closed_decayed == 0.0, closed_decayed
  # α is still decayed: with the cost gradient switched off, decay alone shrinks a non-zero α
  c = tiny.get_config().arch
  tx = optim.arch_optimizer(c)
  a = dict(sn.init_arch_params(space), alpha=[jnp.ones_like(x) for x in sn.init_arch_params(space)["alpha"]])
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, a), tx.init(a), a)
  assert all(float(jnp.max(u)) < 0 for u in updates["alpha"]) and float(jnp.max(jnp.abs(updates["gate"]))) == 0.0


# ---- weight-entangled candidates (config.search.weight_sharing = "entangled")

@pytest.mark.parametrize("relaxation", sn.RELAXATIONS)
def test_entangled_supernet_trains_weights_and_arch(space, batch, relaxation):
  obj = make_objective(space, relaxation, "entangled", lam=0.5, penalty="additive")
  state = obj.init_state(jax.random.PRNGKey(0), batch["image"][:1])
  names = set(state.weights["layer_0"])
  assert "ex_expand" in names and "e1_dw" in names and not any(n.startswith("cand_") for n in names)
  s1, wm = jax.jit(obj.weight_step)(state, batch, 1.0)
  s2, am = jax.jit(obj.arch_step)(s1, batch, batch, 1.0, 0.01)
  assert np.isfinite(float(wm["train_ce"])) and np.isfinite(float(am["val_ce"]))
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(s2.arch["alpha"], s1.arch["alpha"])) > 0
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), s1.weights, state.weights)
  assert max(jax.tree.leaves(moved)) > 0


def test_an_entangled_candidate_is_the_independent_block_on_its_slice_of_the_shared_weights(space, batch):
  """Each candidate runs the same operators as `MBConvCandidate`, on the first `hidden` expanded channels and the
  centred kh x kw of the shared depthwise kernel: so the candidate a search derives is the network it priced."""
  slot = space.slots()[0]
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 8, slot.in_channels))
  mixed = sn.MixedOp(slot, space.gate_group, "softmax", "entangled")
  n_gates = [sn.n_gate_groups(slot, c, space.gate_group) for c in slot.candidates]
  gates = [jax.random.uniform(jax.random.PRNGKey(4 + j), (n,)) if n else None for j, n in enumerate(n_gates)]
  alpha = jnp.zeros(len(slot.candidates))
  params = mixed.init(jax.random.PRNGKey(0), x, alpha, gates, True, 1.0)["params"]
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(5), p.shape), params)
  checked = 0
  for j, cand in enumerate(slot.candidates):
    if cand.op != "mbconv":
      continue
    fam = "e1" if cand.expansion == 1 else "ex"
    hidden = slot.hidden_max(cand)
    kh, kw = sn.ops_lib.pair(cand.kernel)
    big_h, big_w = params[f"{fam}_dw"].shape[:2]
    top, left = (big_h - kh) // 2, (big_w - kw) // 2
    own = {"dw": params[f"{fam}_dw"][top:top + kh, left:left + kw, :hidden],
           "dw_bn": {"scale": params[f"{fam}_dw_bn_scale"][:hidden], "bias": params[f"{fam}_dw_bn_bias"][:hidden]},
           "project": params[f"{fam}_project"][:hidden],
           "project_bn": {"scale": params[f"{fam}_project_bn_scale"], "bias": params[f"{fam}_project_bn_bias"]}}
    if cand.expansion != 1:
      own["expand"] = params[f"{fam}_expand"][:, :hidden]
      own["expand_bn"] = {"scale": params[f"{fam}_expand_bn_scale"][:hidden],
                          "bias": params[f"{fam}_expand_bn_bias"][:hidden]}
    block = sn.MBConvCandidate(slot.out_channels, cand.kernel, cand.expansion, slot.stride, slot.residual_ok,
                               space.gate_group)
    want = block.apply({"params": own}, x, gates[j])
    got = mixed.apply({"params": params}, j, x, gates, method=sn.MixedOp._run)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    checked += 1
  assert checked == sum(c.op == "mbconv" for c in slot.candidates) >= 3


def test_an_entangled_gumbel_step_trains_the_weights_every_candidate_of_its_family_shares(space, batch):
  """The point of entangling: whichever expanding candidate a Gumbel step samples, the expand/depthwise/project
  core every other expanding candidate runs on gets a gradient (with independent weights only the sampled
  candidate's own do)."""
  obj = make_objective(space, "gumbel", "entangled")
  state = obj.init_state(jax.random.PRNGKey(0), batch["image"][:1])
  ex = [j for j, c in enumerate(space.slots()[0].candidates) if c.op == "mbconv" and c.expansion > 1]
  for j in ex:  # force candidate j in every layer
    arch = dict(state.arch, alpha=[jnp.where(jnp.arange(len(a)) == j, 50.0, -50.0) for a in state.arch["alpha"]])
    loss = lambda w: obj.task_loss(w, arch, batch, jax.random.PRNGKey(1), 1.0)[0]
    g = jax.grad(loss)(state.weights)["layer_0"]
    k = sn.ops_lib.pair(space.slots()[0].candidates[j].kernel)[0]
    centre = (g["ex_dw"].shape[0] - k) // 2
    assert float(jnp.max(jnp.abs(g["ex_dw"][centre:centre + k, centre:centre + k]))) > 0
    assert float(jnp.max(jnp.abs(g["ex_expand"]))) > 0 and float(jnp.max(jnp.abs(g["ex_project"]))) > 0
    assert float(jnp.max(jnp.abs(g["e1_dw"]))) == 0  # the other family did not run


def _all_eqns(jaxpr):
  """Every equation of a jaxpr, including those of the jaxprs inside it (remat, switch, pjit)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _all_eqns(inner)


@pytest.mark.parametrize("relaxation", ["softmax", "gumbel"])  # sigmoid mixes as softmax does
def test_a_bfloat16_search_computes_in_bfloat16_and_keeps_float32_state(space, batch, relaxation):
  """config.search.compute_dtype = "bfloat16": the supernet's activations are bfloat16 (GPU/TPU matrix units,
  half the activation memory), while the weights, α, gates, optimizer state and losses stay float32, and the
  steps agree with the float32 ones to bfloat16 precision."""
  obj32 = make_objective(space, relaxation, lam=0.5, penalty="additive")
  obj16 = make_objective(space, relaxation, compute_dtype="bfloat16", lam=0.5, penalty="additive")
  state = obj32.init_state(jax.random.PRNGKey(0), batch["image"][:1])
  eqns = list(_all_eqns(jax.make_jaxpr(
      lambda w: obj16.task_loss(w, state.arch, batch, jax.random.PRNGKey(1), 1.0))(state.weights).jaxpr))
  dtypes = {e.outvars[0].aval.dtype for e in eqns
            if e.primitive.name in ("conv_general_dilated", "dot_general") and e.outvars[0].aval.ndim == 4}
  assert dtypes == {jnp.dtype("bfloat16")}, dtypes  # every conv and matmul over the activations
  # The statistics an expand conv's BatchNorm takes from its input's covariance stay float32 (C_in x C_in).
  stats = {e.outvars[0].aval.dtype for e in eqns if e.primitive.name == "dot_general"
           and e.outvars[0].aval.ndim == 2 and 1 < e.outvars[0].aval.shape[0] == e.outvars[0].aval.shape[1]}
  assert stats == {jnp.dtype("float32")}, stats
  results = []
  for obj in (obj32, obj16):
    s1, wm = jax.jit(obj.weight_step)(state, batch, 1.0)
    s2, am = jax.jit(obj.arch_step)(s1, batch, batch, 1.0, 0.01)
    leaves = jax.tree.leaves((s2.weights, s2.arch, s2.w_opt, s2.a_opt))
    assert {x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype("float32")}
    assert wm["train_ce"].dtype == jnp.float32 and np.isfinite(float(am["val_ce"]))
    results.append((float(wm["train_ce"]), float(am["val_ce"])))
  np.testing.assert_allclose(results[1], results[0], rtol=0.05)



def test_gradient_boundary_is_the_identity_and_materialises_the_cotangent():
  """The boundary between layers changes no value or gradient (first and forward-over-reverse second order), and
  on XLA:CPU its cotangent stays a conditional's operand, which XLA cannot fuse into the consumers."""
  x = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)

  def loss(v, boundary):
    h = jnp.sin(3.0 * v)
    return jnp.sum(jnp.cos(fusion.gradient_boundary(h) if boundary else h) * v)

  g_with, g_without = jax.grad(loss)(x, True), jax.grad(loss)(x, False)
  np.testing.assert_allclose(g_with, g_without, rtol=1e-6)
  tangent = jnp.ones_like(x)
  hvp_with = jax.jvp(lambda v: jax.grad(loss)(v, True), (x,), (tangent,))[1]
  hvp_without = jax.jvp(lambda v: jax.grad(loss)(v, False), (x,), (tangent,))[1]
  np.testing.assert_allclose(hvp_with, hvp_without, rtol=1e-5)
  compiled = jax.jit(jax.grad(loss), static_argnums=1).lower(x, True).compile().as_text()
  assert "conditional" in compiled
  # A non-finite cotangent stays non-finite: the loop's NaN check must still see it.
  assert not np.isfinite(np.asarray(jax.grad(lambda v: jnp.sum(fusion.gradient_boundary(v) * jnp.nan))(x))).any()


def test_pointwise_batch_stat_norm_equals_the_conv_then_the_norm():
  """The expand conv's BatchNorm from its input's covariance: the same values and gradients as normalising the
  conv's output, for an input whose channels are correlated and off-centre."""
  from edgenas.nn.model import pointwise
  k = jax.random.split(jax.random.PRNGKey(0), 5)
  x = jax.random.normal(k[0], (6, 5, 5, 8)) @ jax.random.normal(k[1], (8, 8)) + 2.0
  w = 0.3 * jax.random.normal(k[2], (8, 24))
  scale, bias = 1.0 + jax.random.normal(k[3], (24,)), jax.random.normal(k[4], (24,))

  def loss(fn, *args):
    return jnp.sum(jnp.sin(fn(*args)))

  direct = lambda x, w, s, b: sn.batch_stat_norm(pointwise(x, w), s, b)
  np.testing.assert_allclose(sn.pointwise_batch_stat_norm(x, w, scale, bias), direct(x, w, scale, bias),
                             rtol=1e-4, atol=1e-4)
  got = jax.grad(lambda *a: loss(sn.pointwise_batch_stat_norm, *a), argnums=(0, 1, 2, 3))(x, w, scale, bias)
  want = jax.grad(lambda *a: loss(direct, *a), argnums=(0, 1, 2, 3))(x, w, scale, bias)
  for g, h in zip(got, want):
    np.testing.assert_allclose(g, h, rtol=1e-3, atol=1e-4 * float(jnp.max(jnp.abs(h))))
