"""Retraining end to end at tiny scale: real digits, optax, orbax, QAT, the launcher in subprocesses
(resume after SIGKILL, NaN loss), and the errors for bad arch.json files and foreign checkpoints."""
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from edgenas import architecture as arch_lib
from edgenas import checkpoint as ckpt_lib
from edgenas import data as data_lib
from edgenas import optim
from edgenas import quant
from edgenas import metrics as metrics_lib
from edgenas import rundir
from edgenas import train
from experiments import digits
from launch import retrain as retrain_launcher

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = arch_lib.Architecture((8, 8, 1), 10, arch_lib.Stem(8, 3, 1),
                             (arch_lib.Layer(arch_lib.MBCONV, 8, 8, 1, 3, 3, 16),), name="tiny")
# Two epochs of 47 steps (batch 32 over train + val), the second quantization-aware.
OVERRIDES = dict(epochs=2, qat_epochs=1, warmup_epochs=0, batch_size=32, lr=0.1, qat_lr=5e-4)
RUN = dict(checkpoint_every=10, log_every=10, keep_checkpoints=2)


def tiny_config(**retrain_overrides):
  c = digits.get_config()
  c.retrain.update({**OVERRIDES, **retrain_overrides})
  c.update(RUN)
  return c


def launcher_flags(**retrain_overrides):
  flags = [f"--config.retrain.{k}={v}" for k, v in {**OVERRIDES, **retrain_overrides}.items()]
  return flags + [f"--config.{k}={v}" for k, v in RUN.items()]


def run_launcher(args, **kwargs):
  return subprocess.Popen([sys.executable, "-m", "launch.retrain", "--config=experiments/digits.py", *args],
                          cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """One uninterrupted retrain that the other tests compare against and reuse."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  report = train.run_retrain(tiny_config(), ARCH, workdir)
  return workdir, report


def test_report_holds_accuracy_costs_and_qat_ranges(straight):
  workdir, report = straight
  assert report == rundir.read_json(os.path.join(workdir, "report.json"))
  assert report["arch_hash"] == ARCH.hash() and report["params"] == ARCH.params() and report["macs"] == ARCH.macs()
  assert report["test_acc_float"] > 0.3  # far above chance (0.1) after 94 steps
  assert abs(report["test_acc_fake_quant"] - report["test_acc_float"]) < 0.1
  assert report["ranges_source"] == "qat_ema_minmax"
  assert set(report["activation_ranges"]) == set(quant.activation_names(ARCH))
  assert report["activation_ranges"]["input"] == {"min": 0.0, "max": 1.0}
  costs = report["platforms"]["stm32l4r5_tflm"]
  assert costs["energy_uj"] > 0 and costs["latency_ms"] > 0 and costs["flash_bytes"] > costs["weight_bytes"] > 0
  assert costs["peak_sram_bytes"] >= ARCH.peak_activation_bytes()
  assert report["steps"] == 94 and report["seconds"]["train"] > 0
  records = metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  assert [r["qat"] for r in records if r["step"] in (46, 93)] == [False, True]
  assert all(np.isfinite(r["loss"]) for r in records)


def test_finished_workdir_is_not_trained_again(straight):
  workdir, report = straight
  before = os.path.getmtime(os.path.join(workdir, "report.json"))
  assert train.run_retrain(tiny_config(), ARCH, workdir) == report
  assert os.path.getmtime(os.path.join(workdir, "report.json")) == before


def test_load_trained_gives_the_evaluated_network(straight):
  workdir, report = straight
  arch, variables, ranges = train.load_trained(workdir)
  assert arch == ARCH and set(ranges) == set(quant.activation_names(ARCH))
  trainer = train.Trainer(arch, tiny_config().retrain, 94, 47)
  dataset = data_lib.load_data(tiny_config())
  assert train.accuracy(trainer.float_correct_jit, dataset.test, variables) == report["test_acc_float"]
  acc_fq = train.accuracy(jax.jit(trainer.fake_quant_correct), dataset.test, variables, ranges)
  assert acc_fq == report["test_acc_fake_quant"]


def test_resume_after_sigkill_ends_with_the_same_result(straight, tmp_path):
  straight_dir, straight_report = straight
  arch_path = str(tmp_path / "arch.json")
  ARCH.save(arch_path)
  workdir = str(tmp_path / "killed")
  args = [f"--arch={arch_path}", f"--workdir={workdir}", *launcher_flags()]
  proc = run_launcher(args)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpt_dir) and any(name.isdigit() for name in os.listdir(ckpt_dir)):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  assert not os.path.exists(os.path.join(workdir, "report.json"))

  proc = run_launcher(args)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  assert "resuming from checkpoint step" in out
  report = rundir.read_json(os.path.join(workdir, "report.json"))
  for key in ("test_acc_float", "test_acc_fake_quant", "activation_ranges", "arch_hash", "platforms"):
    assert report[key] == straight_report[key], key
  _, resumed_vars, _ = train.load_trained(workdir)
  _, straight_vars, _ = train.load_trained(straight_dir)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), resumed_vars, straight_vars)
  resumed_metrics = metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in resumed_metrics] == [
      r["step"] for r in metrics_lib.read_metrics(os.path.join(straight_dir, "metrics.jsonl"))]


def test_nan_loss_stops_with_an_error_and_keeps_the_last_good_checkpoint(tmp_path):
  arch_path = str(tmp_path / "arch.json")
  ARCH.save(arch_path)
  workdir = str(tmp_path / "nan")
  # One warm-up epoch: step 0 runs at rate 0 and is checkpointed; the rate then climbs towards 1e30.
  proc = run_launcher([f"--arch={arch_path}", f"--workdir={workdir}",
                       *launcher_flags(lr=1e30, warmup_epochs=1, qat_epochs=0), "--config.checkpoint_every=1"])
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 1
  assert "stopping" in err and "last good checkpoint is step" in err and "config.retrain.lr" in err
  assert not os.path.exists(os.path.join(workdir, "report.json"))
  target = train.Trainer(ARCH, tiny_config().retrain, 94, 47).init_state(jax.random.PRNGKey(0))
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    restored = ckpt.restore_latest(target)
  assert restored is not None
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(restored.state.params))


def test_malformed_arch_json_names_the_file_and_field(tmp_path):
  path = tmp_path / "arch.json"
  path.write_text('{"version": 1, "input_shape": [8, 8, 1], "num_classes": 10, "stem": {"channels": 8, '
                  '"kernel": 3}, "layers": []}')
  with pytest.raises(arch_lib.ArchitectureError, match=r"arch.json: missing field 'stem.stride'"):
    retrain_launcher.retrain(tiny_config(), str(path), None, str(tmp_path / "w"), None)
  path.write_text("{not json")
  with pytest.raises(arch_lib.ArchitectureError, match="not valid JSON"):
    retrain_launcher.retrain(tiny_config(), str(tmp_path), None, str(tmp_path / "w"), None)  # a workdir holding it
  (tmp_path / "empty").mkdir()
  with pytest.raises(train.RetrainError, match="without an arch.json"):
    retrain_launcher.retrain(tiny_config(), str(tmp_path / "empty"), None, str(tmp_path / "w2"), None)
  with pytest.raises(train.RetrainError, match="exactly one of --arch"):
    retrain_launcher.retrain(tiny_config(), str(path), "dscnn", str(tmp_path / "w3"), None)


@pytest.mark.parametrize("arch, field", [
    (arch_lib.Architecture((16, 16, 1), 10, arch_lib.Stem(8, 3, 1), ARCH.layers), "input_shape"),
    (arch_lib.Architecture((8, 8, 1), 5, arch_lib.Stem(8, 3, 1), ARCH.layers), "num_classes"),
])
def test_arch_incompatible_with_the_dataset_is_rejected(tmp_path, arch, field):
  with pytest.raises(train.RetrainError, match=f"incompatible.json: field '{field}'.*dataset 'digits'"):
    train.run_retrain(tiny_config(), arch, str(tmp_path / "w"), source="incompatible.json")


def test_checkpoint_of_another_architecture_is_refused(straight, tmp_path):
  straight_dir, _ = straight
  workdir = tmp_path / "other"
  workdir.mkdir()
  shutil.copytree(os.path.join(straight_dir, "checkpoints"), workdir / "checkpoints")
  other = arch_lib.Architecture((8, 8, 1), 10, arch_lib.Stem(12, 3, 1),
                                (arch_lib.Layer(arch_lib.MBCONV, 12, 12, 1, 3, 1, 12),), name="other")
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="different structure"):
    train.run_retrain(tiny_config(), other, str(workdir))


def test_bad_retrain_config_names_the_field(tmp_path):
  with pytest.raises(train.RetrainError, match="config.retrain.qat_epochs"):
    train.run_retrain(tiny_config(qat_epochs=3), ARCH, str(tmp_path / "w"))
  with pytest.raises(train.RetrainError, match="config.retrain.optimizer"):
    train.run_retrain(tiny_config(optimizer="lamb"), ARCH, str(tmp_path / "w2"))


def test_schedule_warms_up_decays_and_restarts_small_for_qat():
  rc = tiny_config(epochs=10, qat_epochs=2, warmup_epochs=2, lr=0.1, qat_lr=1e-3).retrain
  lr = optim.retrain_lr_schedule(rc, total_steps=100, steps_per_epoch=10)
  assert float(lr(0)) == 0.0
  assert float(lr(20)) == pytest.approx(0.1)
  assert float(lr(79)) < 0.01  # the float phase has annealed by the time QAT starts
  assert float(lr(80)) == pytest.approx(1e-3)
  assert float(lr(99)) < 1e-4


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_weight_decay_touches_kernels_only_and_ema_tracks_the_weights(optimizer):
  rc = tiny_config(optimizer=optimizer, weight_decay=0.5, ema_decay=0.9, warmup_epochs=0).retrain
  trainer = train.Trainer(ARCH, rc, 94, 47)
  state = trainer.init_state(jax.random.PRNGKey(0))
  zero_grads = jax.tree.map(np.zeros_like, state.params)
  after = trainer._apply_update(state, zero_grads)
  # With zero gradients only decoupled weight decay moves anything: kernels shrink, BN and biases stay.
  assert np.all(np.abs(after.params["stem"]["kernel"]) < np.abs(state.params["stem"]["kernel"]) + 1e-12)
  assert not np.allclose(after.params["stem"]["kernel"], state.params["stem"]["kernel"])
  np.testing.assert_array_equal(after.params["stem"]["bn"]["scale"], state.params["stem"]["bn"]["scale"])
  np.testing.assert_array_equal(after.params["classifier"]["bias"], state.params["classifier"]["bias"])
  # EMA with its warm-up: decay min(0.9, (1 + step) / (10 + step)) = 0.1 at step 0.
  expected = 0.1 * state.params["stem"]["kernel"] + 0.9 * after.params["stem"]["kernel"]
  np.testing.assert_allclose(after.ema_params["stem"]["kernel"], expected, rtol=1e-5)
  assert int(after.step) == 1


def test_missing_retrain_fields_are_named(tmp_path):
  c = tiny_config()
  del c.retrain["qat_lr"]
  with pytest.raises(train.RetrainError, match="config.retrain is missing qat_lr"):
    train.run_retrain(c, ARCH, str(tmp_path / "w"))


# ---- the config and platform checks, called directly (no launcher, no training)


@pytest.mark.parametrize("overrides, message", [
    (dict(lr=float("nan")), r"config\.retrain\.lr must be a finite number, got nan"),
    (dict(lr=0.0), r"config\.retrain\.lr must be a number > 0, got 0\.0"),
    (dict(epochs=-1), r"config\.retrain\.epochs must be an integer >= 1, got -1"),
    (dict(batch_size=0), r"config\.retrain\.batch_size must be an integer >= 1, got 0"),
    (dict(weight_decay=float("inf")), r"config\.retrain\.weight_decay must be a finite number"),
    (dict(qat_lr=float("nan")), r"config\.retrain\.qat_lr must be a finite number"),
    (dict(qat_lr=0.0), r"config\.retrain\.qat_lr must be a number > 0 \(QAT is on"),
    (dict(warmup_epochs=2), r"config\.retrain\.warmup_epochs must be a number in \[0, 2\)"),
    (dict(ema_decay=1.0), r"config\.retrain\.ema_decay must be a number in \[0, 1\)"),
    (dict(label_smoothing=float("nan")), r"config\.retrain\.label_smoothing must be a finite number"),
    (dict(max_shift=-1), r"config\.retrain\.max_shift must be an integer >= 0"),
    (dict(momentum=float("nan")), r"config\.retrain\.momentum must be a finite number"),
    (dict(platforms="stm32l4r5_tflm"), r"config\.retrain\.platforms must be a list of platform names"),
])
def test_check_config_refuses_a_bad_retrain_field_naming_it(overrides, message):
  import ml_collections
  rc = ml_collections.ConfigDict({**tiny_config().retrain.to_dict(), **overrides})  # any type, as a config file
  with pytest.raises(train.RetrainError, match=message):
    train.check_config(rc)


def test_check_config_passes_the_shipped_retrain_configs():
  from experiments import cifar10, tiny
  for module in (digits, tiny, cifar10):
    train.check_later_stages(module.get_config())


def test_unknown_platform_is_refused_before_any_training(tmp_path):
  with pytest.raises(train.RetrainError, match=r"--platforms: unknown platform 'nosuchchip'; shipped platforms: "
                                               r".*stm32l4r5_tflm"):
    train.platforms_of(tiny_config(), ["stm32l4r5_tflm", "nosuchchip"])
  c = tiny_config(platforms=("nosuchchip",))
  with pytest.raises(train.RetrainError, match=r"config\.retrain\.platforms: unknown platform 'nosuchchip'"):
    train.check_later_stages(c)
  with pytest.raises(train.RetrainError, match="unknown platform 'nosuchchip'"):
    train.run_retrain(tiny_config(), ARCH, str(tmp_path / "w"), platforms=["nosuchchip"])
  assert not (tmp_path / "w").exists()
  assert train.platforms_of(tiny_config(), ["andes_d45_tflm"]) == ["andes_d45_tflm"]
  assert train.platforms_of(tiny_config()) == [tiny_config().cost.platform]
