"""The loop core (edgenas.loop) on a tiny pure step function: cadence, resume, the NaN stop, populations, and
closing its files when a run fails. Checkpoints are real orbax checkpoints in tmp_path."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgenas import checkpoint as ckpt_lib
from edgenas import loop as loop_lib
from edgenas import metrics as metrics_lib


class Crash(Exception):
  """A process dying mid-run."""


def make_loop(workdir, **overrides) -> loop_lib.Loop:
  # 10 steps, epochs of 4 (the last one short), metrics every 3 steps, checkpoints every 4.
  fields = dict(name=str(workdir), checkpoint_dir=str(workdir / "checkpoints"),
                metrics_paths=[str(workdir / "metrics.jsonl")], total_steps=10, steps_per_epoch=4, images_per_step=8,
                log_every=3, checkpoint_every=4, keep_checkpoints=None, advice="Lower the rate.")
  return loop_lib.Loop(**(fields | overrides))


def init_state():
  return {"w": jnp.ones((3,), jnp.float32), "n": jnp.zeros((), jnp.int32)}


@jax.jit
def _update(state, x):
  w = 0.9 * state["w"] + x
  return {"w": w, "n": state["n"] + 1}, {"loss": jnp.sum(w * w)}


def step_fn(state, step):
  return _update(state, jnp.float32(np.sin(step)))  # what a step sees is a function of the step, as a batch is


def loss_diverged(step, record):
  return f"the loss became {record['loss']} at step {step}" if loop_lib.non_finite(record, ("loss",)) else None


def epoch_field(state, step, epoch_end):
  return {"epoch": step // 4}


def checkpoint_steps(workdir) -> list[int]:
  return sorted(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit())


def quiet(line):
  pass


def test_metrics_progress_and_checkpoints_follow_the_cadence(tmp_path):
  lines, calls = [], []

  def log_fields(state, step, epoch_end):
    calls.append((step, epoch_end))
    return epoch_field(state, step, epoch_end)

  result = make_loop(tmp_path).run(init_state(), step_fn, diverged=loss_diverged, log_fields=log_fields,
                                   epoch_summary=lambda record, line: f"epoch {record['epoch']} done",
                                   log=lines.append)
  assert int(result.state["n"]) == 10
  # Every log_every-th step, and each epoch's last step (the run's last step ends its short epoch).
  assert calls == [(2, False), (3, True), (5, False), (7, True), (8, False), (9, True)]
  records = metrics_lib.read_metrics(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in records] == [2, 3, 5, 7, 8, 9]
  assert set(records[0]) == {"step", "loss", "epoch"} and isinstance(records[0]["loss"], float)
  # Progress every log_every steps done and at the end; an epoch's summary after that step's progress line.
  assert [line.split("  ")[0] for line in lines] == [
      "step 3/10 (30.0%)", "epoch 0 done", "step 6/10 (60.0%)", "epoch 1 done", "step 9/10 (90.0%)",
      "step 10/10 (100.0%)", "epoch 2 done"]
  assert checkpoint_steps(tmp_path) == [0, 4, 8, 9]  # every checkpoint_every steps, and the last one


def test_a_run_resumed_after_a_crash_ends_where_an_uninterrupted_run_ends(tmp_path):
  kwargs = dict(diverged=loss_diverged, log_fields=epoch_field, log=quiet)
  straight = make_loop(tmp_path / "straight").run(init_state(), step_fn, **kwargs)

  def crashing(state, step):
    if step == 6:
      raise Crash()
    return step_fn(state, step)

  resumed_dir = tmp_path / "resumed"
  with pytest.raises(Crash):
    make_loop(resumed_dir, carry_seconds=True).run(init_state(), crashing, **kwargs)
  assert checkpoint_steps(resumed_dir) == [0, 4]
  lines = []
  resumed = make_loop(resumed_dir, carry_seconds=True).run(init_state(), step_fn, **(kwargs | dict(log=lines.append)))
  assert lines[0] == "resuming from checkpoint step 4"
  np.testing.assert_array_equal(np.asarray(resumed.state["w"]), np.asarray(straight.state["w"]))
  assert int(resumed.state["n"]) == 10
  # The line the crashed run wrote after its checkpoint (step 5) is dropped and written again, once.
  with open(resumed_dir / "metrics.jsonl") as f, open(tmp_path / "straight" / "metrics.jsonl") as g:
    assert f.read() == g.read()
  assert resumed.train_seconds > resumed.seconds  # the crashed run's time up to its checkpoint is carried over


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  def blowing_up(state, step):
    return _update(state, jnp.float32(np.nan if step >= 6 else np.sin(step)))

  with pytest.raises(loop_lib.NonFiniteLossError) as raised:
    make_loop(tmp_path).run(init_state(), blowing_up, diverged=loss_diverged, log=quiet)
  assert str(raised.value) == (f"{tmp_path}: the loss became nan at step 6; stopping. The last good checkpoint is "
                               f"step 4 in {tmp_path / 'checkpoints'}. Lower the rate.")
  assert checkpoint_steps(tmp_path) == [0, 4]
  with ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")) as ckpt:
    restored = ckpt.restore_latest(init_state())
  assert restored.step == 4 and np.isfinite(np.asarray(restored.state["w"])).all()


def test_a_non_finite_state_behind_a_finite_loss_is_not_checkpointed_either(tmp_path):
  def hiding_it(state, step):
    state, _ = _update(state, jnp.float32(np.nan if step >= 6 else np.sin(step)))
    return state, {"loss": jnp.float32(1.0)}

  with pytest.raises(loop_lib.NonFiniteLossError, match="the parameters became NaN/Inf at step 8; stopping. The "
                                                         "last good checkpoint is step 4"):
    make_loop(tmp_path).run(init_state(), hiding_it, diverged=loss_diverged, log=quiet)
  assert checkpoint_steps(tmp_path) == [0, 4]


def test_a_population_writes_each_member_its_own_metrics(tmp_path):
  paths = [str(tmp_path / member / "metrics.jsonl") for member in ("a", "b")]

  def population_step(state, step):  # two members in three slots: the last slot is padding
    return state, {"loss": jnp.array([1.0, 2.0, 99.0]) * (step + 1)}

  make_loop(tmp_path, metrics_paths=paths, total_steps=4).run(
      init_state(), population_step, diverged=loss_diverged, log=quiet,
      log_fields=lambda state, step, epoch_end: {"acc": np.array([0.5, 0.25]), "epoch": 0})
  a, b = (metrics_lib.read_metrics(path) for path in paths)
  assert a == [dict(step=2, loss=3.0, acc=0.5, epoch=0), dict(step=3, loss=4.0, acc=0.5, epoch=0)]
  assert b == [dict(step=2, loss=6.0, acc=0.25, epoch=0), dict(step=3, loss=8.0, acc=0.25, epoch=0)]


def test_metrics_files_and_checkpointer_are_closed_when_a_run_fails(tmp_path, monkeypatch):
  closed = []

  class SpyWriter(metrics_lib.MetricsWriter):
    def close(self):
      closed.append(self.path)
      super().close()

  checkpointer_close = ckpt_lib.Checkpointer.close

  def spy_close(self):
    closed.append("checkpointer")
    checkpointer_close(self)

  monkeypatch.setattr(metrics_lib, "MetricsWriter", SpyWriter)
  monkeypatch.setattr(ckpt_lib.Checkpointer, "close", spy_close)

  def crashing(state, step):
    if step == 5:
      raise Crash()
    return step_fn(state, step)

  paths = [str(tmp_path / member / "metrics.jsonl") for member in ("a", "b")]
  with pytest.raises(Crash):
    make_loop(tmp_path, metrics_paths=paths).run(init_state(), crashing, diverged=loss_diverged, log=quiet)
  assert sorted(closed) == sorted(paths + ["checkpointer"])


def test_ctrl_c_saves_the_step_it_stopped_at_and_a_rerun_ends_like_an_uninterrupted_run(tmp_path):
  import signal
  if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
    pytest.skip("SIGINT is not Python's KeyboardInterrupt in this process")
  kwargs = dict(diverged=loss_diverged, log_fields=epoch_field, log=quiet)
  straight = make_loop(tmp_path / "straight").run(init_state(), step_fn, **kwargs)

  def interrupted(state, step):
    if step == 5:
      os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 5: the loop ends that step, then stops
    return step_fn(state, step)

  workdir = tmp_path / "interrupted"
  with pytest.raises(loop_lib.Interrupted, match="interrupted at step 6; rerun the same command to resume") as e:
    make_loop(workdir).run(init_state(), interrupted, **kwargs)
  assert isinstance(e.value, KeyboardInterrupt) and e.value.step == 6
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
  assert checkpoint_steps(workdir) == [0, 4, 5]  # saved where it stopped
  lines = []
  resumed = make_loop(workdir).run(init_state(), step_fn, **(kwargs | dict(log=lines.append)))
  assert lines[0] == "resuming from checkpoint step 5"
  np.testing.assert_array_equal(np.asarray(resumed.state["w"]), np.asarray(straight.state["w"]))
  with open(workdir / "metrics.jsonl") as f, open(tmp_path / "straight" / "metrics.jsonl") as g:
    assert f.read() == g.read()


def test_metrics_come_back_only_at_the_steps_that_need_them(tmp_path, monkeypatch):
  """No host sync per step: the step's metrics stay on the device and are fetched, all pending steps in one
  transfer, at log/epoch steps, before a checkpoint and at the end. A NaN between two fetches is still named
  by its own step, and no checkpoint is written past it."""
  fetches = []
  real_get = loop_lib.jax.device_get

  def counting_get(tree):
    if isinstance(tree, list) and tree and all(isinstance(m, dict) for m in tree):  # the loop's metrics fetch
      fetches.append(len(tree))
    return real_get(tree)

  monkeypatch.setattr(loop_lib.jax, "device_get", counting_get)
  loop = make_loop(tmp_path, total_steps=20, steps_per_epoch=20, log_every=10, checkpoint_every=10)
  loop.run(init_state(), step_fn, diverged=loss_diverged, log=quiet)
  assert fetches == [1, 9, 1, 9], fetches  # steps 0 (checkpoint), 1-9 (log), 10 (checkpoint), 11-19 (end)

  def blowing_up(state, step):
    return _update(state, jnp.float32(np.nan if step >= 13 else np.sin(step)))

  with pytest.raises(loop_lib.NonFiniteLossError, match="the loss became nan at step 13; stopping. The last good "
                                                         "checkpoint is step 10"):
    make_loop(tmp_path / "nan", total_steps=20, steps_per_epoch=20, log_every=10, checkpoint_every=10).run(
        init_state(), blowing_up, diverged=loss_diverged, log=quiet)
  assert checkpoint_steps(tmp_path / "nan") == [0, 10]
