"""The infrastructure pieces together: an interrupted and resumed training run ends exactly where an
uninterrupted one does (same parameters, same metrics.jsonl), using real digits, optax, orbax and jit."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from edgenas import checkpoint as ckpt_lib
from edgenas import data
from edgenas import metrics as metrics_lib
from edgenas import rundir

TOTAL_STEPS = 12
SAVE_EVERY = 4
BATCH = 32


class _Interrupted(Exception):
  pass


@pytest.fixture(scope="module")
def digits():
  return data.load_dataset("digits", seed=0)


def _train(digits, workdir, stop_after=None):
  """A linear classifier trained with momentum SGD; draws a train and a val batch each step like the search."""
  tx = optax.sgd(0.1, momentum=0.9)
  params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}
  state = {"params": params, "opt_state": tx.init(params)}

  def loss_fn(p, images, labels):
    logits = images.reshape(len(images), -1) @ p["w"] + p["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def train_step(state, images, labels):
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], images, labels)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss

  config = {"seed": 0, "batch_size": BATCH, "steps": TOTAL_STEPS}
  rundir.prepare_workdir(workdir, config)
  train = data.BatchStream(*digits.train, BATCH, seed=0)
  val = data.BatchStream(*digits.val, BATCH, seed=1)
  with ckpt_lib.Checkpointer(f"{workdir}/checkpoints", save_every=SAVE_EVERY, keep=2) as ckpt:
    restored = ckpt.restore_latest(state)
    start = 0
    if restored:
      state, start = restored.state, restored.step + 1
      assert restored.metadata["train_epoch"] == train.position(restored.step)[0]
    with metrics_lib.MetricsWriter(f"{workdir}/metrics.jsonl", resume_step=restored.step if restored else -1) as metrics:
      for step in range(start, TOTAL_STEPS):
        state, loss = train_step(state, *train.batch_at(step))
        val_loss = loss_fn(state["params"], *val.batch_at(step))
        metrics.write(step, {"loss": loss, "val_loss": val_loss})
        ckpt.save(step, state, {"train_epoch": train.position(step)[0]})
        if step == stop_after:
          raise _Interrupted()
  return state


def test_interrupted_run_resumes_to_the_same_result(digits, tmp_path):
  straight = _train(digits, str(tmp_path / "straight"))
  resumed_dir = str(tmp_path / "resumed")
  with pytest.raises(_Interrupted):
    _train(digits, resumed_dir, stop_after=6)  # dies after step 6; the last checkpoint is step 4
  resumed = _train(digits, resumed_dir)
  np.testing.assert_array_equal(np.asarray(resumed["params"]["w"]), np.asarray(straight["params"]["w"]))
  assert (metrics_lib.read_metrics(f"{resumed_dir}/metrics.jsonl")
          == metrics_lib.read_metrics(str(tmp_path / "straight" / "metrics.jsonl")))
  assert [r["step"] for r in metrics_lib.read_metrics(f"{resumed_dir}/metrics.jsonl")] == list(range(TOTAL_STEPS))
