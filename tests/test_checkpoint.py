"""Checkpointer against real orbax in temporary directories."""
import glob
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from conftest import SMALL_SEARCH_CONFIG
from edgenas import checkpoint as ckpt_lib


@struct.dataclass
class _TrainState:
  step: jnp.ndarray
  params: dict
  opt_state: optax.OptState
  rng: jnp.ndarray


def _state(width=4, seed=0):
  key = jax.random.PRNGKey(seed)
  params = {"conv": {"kernel": jax.random.normal(key, (3, 3, 1, width))}, "dense": {"bias": jnp.zeros(10)}}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
  return _TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.key_data(key))


def _advance(state, by):
  return jax.tree.map(lambda x: x + by, state)


def test_round_trip_restores_values_types_and_metadata(tmp_path):
  state = _advance(_state(), 3)
  with ckpt_lib.Checkpointer(str(tmp_path), save_every=1, keep=2) as ckpt:
    assert ckpt.restore_latest(_state()) is None
    assert ckpt.save(7, state, {"epoch": 2, "offset": 5})
  with ckpt_lib.Checkpointer(str(tmp_path), save_every=1, keep=2) as ckpt:  # a new process resuming
    restored = ckpt.restore_latest(_state())
  assert restored.step == 7
  assert restored.metadata == {"epoch": 2, "offset": 5}
  assert isinstance(restored.state, _TrainState)
  assert isinstance(restored.state.opt_state[1][0], optax.TraceState)
  chex.assert_trees_all_equal(restored.state, state)
  chex.assert_trees_all_equal_dtypes(restored.state, state)


def test_round_trip_of_numpy_and_python_leaves(tmp_path):
  state = {"counts": np.arange(4), "epoch": 3, "lr": 0.5, "w": jnp.ones((2, 2))}
  with ckpt_lib.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(0, state)
    restored = ckpt.restore_latest(state).state
  assert restored["epoch"] == 3 and restored["lr"] == 0.5
  assert isinstance(restored["counts"], np.ndarray) and isinstance(restored["w"], jax.Array)
  np.testing.assert_array_equal(restored["counts"], np.arange(4))


def test_saves_every_n_steps_and_keeps_k(tmp_path):
  state = _state()
  with ckpt_lib.Checkpointer(str(tmp_path), save_every=3, keep=2) as ckpt:
    started = [ckpt.save(step, _advance(state, step)) for step in range(10)]
    assert ckpt.save(10, state, force=True)
    assert not ckpt.save(10, state, force=True)  # already on disk: no second write
    ckpt.wait()
    assert started == [step % 3 == 0 for step in range(10)]
    assert ckpt.steps() == [9, 10]
    assert ckpt.latest_step() == 10


def test_corrupt_latest_falls_back_with_warning_and_can_be_saved_again(tmp_path, caplog):
  state = _state()
  with ckpt_lib.Checkpointer(str(tmp_path), save_every=1, keep=3) as ckpt:
    for step in (1, 2):
      ckpt.save(step, _advance(state, step), {"step": step})
  for data_file in glob.glob(str(tmp_path / "2" / "state" / "**" / "d" / "*"), recursive=True):
    with open(data_file, "r+b") as f:
      f.truncate(3)

  with ckpt_lib.Checkpointer(str(tmp_path), save_every=1, keep=3) as ckpt:
    with caplog.at_level("WARNING"):
      restored = ckpt.restore_latest(state)
    assert restored.step == 1
    chex.assert_trees_all_equal(restored.state, _advance(state, 1))
    assert any("step 2" in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    assert ckpt.steps() == [1]
    assert os.path.isdir(tmp_path / "2.corrupt")  # kept for inspection, out of the manager's way
    assert ckpt.save(2, _advance(state, 2), force=True)  # the resumed run can write step 2 again


def test_missing_metadata_file_falls_back(tmp_path):
  state = _state()
  with ckpt_lib.Checkpointer(str(tmp_path), save_every=1, keep=3) as ckpt:
    for step in (4, 8):
      ckpt.save(step, _advance(state, step))
  os.remove(tmp_path / "8" / "meta" / "metadata")
  with ckpt_lib.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.restore_latest(state).step == 4


def test_no_readable_checkpoint_is_an_error(tmp_path):
  with ckpt_lib.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, _state())
  os.remove(tmp_path / "1" / "meta" / "metadata")
  with ckpt_lib.Checkpointer(str(tmp_path)) as ckpt:
    with pytest.raises(ckpt_lib.CheckpointError, match="no readable checkpoint"):
      ckpt.restore_latest(_state())


def test_other_structure_is_a_clear_mismatch_error(tmp_path):
  with ckpt_lib.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(5, _state(width=4))
  with ckpt_lib.Checkpointer(str(tmp_path)) as ckpt:
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"step 5.*another shape.*kernel.*\(3, 3, 1, 4\)"):
      ckpt.restore_latest(_state(width=8))
    other = _state()
    other = other.replace(params={**other.params, "extra": {"w": jnp.ones(2)}})
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"expected but not in the checkpoint.*extra"):
      ckpt.restore_latest(other)
  assert ckpt_lib.describe_mismatch(ckpt_lib.tree_fingerprint(_state()), ckpt_lib.tree_fingerprint(_state())) == []


def test_non_finite_state_is_not_saved(tmp_path):
  state = _state()
  with ckpt_lib.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, state)
    broken = state.replace(params={**state.params, "dense": {"bias": jnp.full(10, np.nan)}})
    with pytest.raises(ckpt_lib.NonFiniteStateError, match="step 2.*latest good checkpoint is step 1"):
      ckpt.save(2, broken)
    assert ckpt.restore_latest(state).step == 1


_SHARDED_RESTORE = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from edgenas import checkpoint as ckpt_lib
mesh = Mesh(np.array(jax.devices()), ("data",))
replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
state = {"w": jax.device_put(jnp.arange(12.0).reshape(4, 3), replicated),
         "rows": jax.device_put(jnp.arange(8.0), split)}
with ckpt_lib.Checkpointer(sys.argv[1]) as ckpt:
  ckpt.save(3, state)
with ckpt_lib.Checkpointer(sys.argv[1]) as ckpt:
  restored = ckpt.restore_latest(state).state
assert len(jax.devices()) == 4
assert restored["w"].sharding == replicated and restored["rows"].sharding == split, restored
np.testing.assert_array_equal(restored["rows"], np.arange(8.0))
"""


def test_restore_keeps_target_shardings_on_a_device_mesh(tmp_path):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, "-c", _SHARDED_RESTORE, str(tmp_path / "ckpt")], check=True, env=env,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: edgenas importable




def test_launcher_falls_back_from_a_truncated_checkpoint_with_one_warning_line(tmp_path):
  """The fallback is the only thing on stderr: orbax's failed restore leaves no 'Event loop is closed' tracebacks."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config, workdir = tmp_path / "config.py", tmp_path / "search"
  config.write_text(SMALL_SEARCH_CONFIG)
  command = [sys.executable, "-m", "launch.search", f"--config={config}", f"--workdir={workdir}"]
  subprocess.run(command, cwd=repo, check=True, capture_output=True, text=True, timeout=300)
  # As if killed while writing the last checkpoint, before the results: the search resumes from step 3.
  os.remove(workdir / "search.json")
  os.remove(workdir / "arch.json")
  data_files = glob.glob(str(workdir / "checkpoints" / "5" / "state" / "**" / "d" / "*"), recursive=True)
  assert data_files
  for data_file in data_files:
    with open(data_file, "r+b") as f:
      f.truncate(3)
  proc = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "resuming from checkpoint step 3" in proc.stdout
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr[:3000]
  assert len(lines) == 1, proc.stderr[:3000]
  assert "checkpoint step 5" in lines[0] and "is corrupt" in lines[0] and "falling back" in lines[0]
  assert os.path.isdir(workdir / "checkpoints" / "5.corrupt") and os.path.exists(workdir / "arch.json")
