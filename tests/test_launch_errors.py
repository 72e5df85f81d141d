"""The launchers' one error boundary, end to end: bad input ends in exactly one `error: ...` line on stderr and a
non-zero exit without touching saved files, a refused config does not block the corrected command, one launcher
at a time writes a workdir, and Ctrl-C stops a search so that a rerun resumes it."""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from edgenas import rundir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "experiments/tiny.py"


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _default_sigint():
  # Started from a shell's background job or a test runner, a child may inherit SIGINT ignored.
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def launch(name, *args, timeout=600):
  return subprocess.run([sys.executable, "-m", f"launch.{name}", *args], cwd=REPO_ROOT, env=_env(),
                        capture_output=True, text=True, timeout=timeout, preexec_fn=_default_sigint)


def start(name, *args):
  return subprocess.Popen([sys.executable, "-m", f"launch.{name}", *args], cwd=REPO_ROOT, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def snapshot(directory) -> dict:
  """{relative path: sha256} of every file under `directory` ({} if it does not exist)."""
  files = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return files


def assert_one_error_line(r, *needles, code=1):
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert r.returncode == code and len(lines) == 1, f"exit {r.returncode}, stderr:\n{r.stderr}"
  assert lines[0].startswith("error: ") and "Traceback" not in r.stderr, lines[0]
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


@pytest.fixture
def saved_workdir(tmp_path):
  """A workdir holding an earlier run's files, which no refused command may change."""
  from experiments import tiny
  workdir = str(tmp_path / "run")
  rundir.prepare_workdir(workdir, tiny.get_config())
  with open(os.path.join(workdir, rundir.METRICS_FILE), "w") as f:
    f.write('{"step": 3, "train_ce": 2.0}\n')
  return workdir, snapshot(workdir)


def test_missing_config_file(saved_workdir):
  workdir, before = saved_workdir
  r = launch("search", "--config=experiments/nosuch.py", f"--workdir={workdir}")
  assert_one_error_line(r, "--config", "experiments/nosuch.py", "no such file")
  assert snapshot(workdir) == before


def test_config_file_with_a_syntax_error(saved_workdir, tmp_path):
  workdir, before = saved_workdir
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config():\n  return dict(a=1,,)\n")
  r = launch("search", f"--config={bad}", f"--workdir={workdir}")
  assert_one_error_line(r, "--config", str(bad), "line 2", "SyntaxError")
  assert snapshot(workdir) == before


def test_unknown_config_field(saved_workdir):
  workdir, before = saved_workdir
  r = launch("search", f"--config={TINY}", "--config.search.nosuch=1", f"--workdir={workdir}")
  assert_one_error_line(r, "--config.search.nosuch", "config.search has: ", "batch_size, epochs")
  assert snapshot(workdir) == before


def test_a_config_value_the_search_rejects_leaves_the_workdir_as_it_was(saved_workdir):
  workdir, before = saved_workdir
  r = launch("search", f"--config={TINY}", "--config.search.batch_size=0", f"--workdir={workdir}")
  assert_one_error_line(r, "config.search.batch_size", "got 0")
  assert snapshot(workdir) == before
  r = launch("retrain", f"--config={TINY}", "--config.retrain.batch_size=0", "--baseline=dscnn",
             f"--workdir={workdir}")
  assert_one_error_line(r, "config.retrain.batch_size", "got 0")
  assert snapshot(workdir) == before


def test_rejected_configs_do_not_block_the_corrected_command(tmp_path):
  workdir = str(tmp_path / "new")
  for bad in ("--config.search.batch_size=0", "--config.search.relaxation=foo"):
    r = launch("search", f"--config={TINY}", bad, f"--workdir={workdir}")
    assert_one_error_line(r, bad.split("=")[0][2:])
    assert not os.path.exists(workdir), os.listdir(workdir)  # not even the directory is left
  r = launch("search", f"--config={TINY}", f"--workdir={workdir}")
  assert r.returncode == 0, r.stderr
  assert os.path.exists(os.path.join(workdir, "arch.json"))
  assert not os.path.exists(os.path.join(workdir, rundir.LOCK_FILE))  # released on exit

  # A lock left by a killed run on this host (its process is gone) is taken over with a warning.
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  lock = os.path.join(workdir, rundir.LOCK_FILE)
  with open(lock, "w") as f:
    json.dump(dict(pid=dead.pid, host=socket.gethostname(), since="2020-01-01 00:00:00", command="killed"), f)
  r = launch("search", f"--config={TINY}", f"--workdir={workdir}")
  assert r.returncode == 0 and "already finished" in r.stdout, r.stderr
  assert "taking over the stale lock" in r.stderr and f"pid {dead.pid}" in r.stderr, r.stderr
  assert not os.path.exists(lock)


def test_a_lock_held_on_another_host_is_refused(saved_workdir):
  workdir, _ = saved_workdir
  with open(os.path.join(workdir, rundir.LOCK_FILE), "w") as f:
    json.dump(dict(pid=1234, host="elsewhere", since="2020-01-01 00:00:00", command="python -m launch.search"), f)
  before = snapshot(workdir)
  r = launch("search", f"--config={TINY}", f"--workdir={workdir}")
  assert_one_error_line(r, "pid 1234 on elsewhere", "delete")
  assert snapshot(workdir) == before


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / "afile"
  path.write_text("keep me\n")
  r = launch("search", f"--config={TINY}", f"--workdir={path}")
  assert_one_error_line(r, str(path), "not a directory")
  assert path.read_text() == "keep me\n"


def test_read_only_workdir(saved_workdir):
  if os.geteuid() == 0:  # root ignores permission bits; sysfs refuses even root a new directory
    r = launch("search", f"--config={TINY}", "--workdir=/sys/edgenas-run")
    assert_one_error_line(r, "/sys/edgenas-run")
    return
  workdir, before = saved_workdir
  os.chmod(workdir, 0o555)
  try:
    r = launch("search", f"--config={TINY}", f"--workdir={workdir}")
  finally:
    os.chmod(workdir, 0o755)
  assert_one_error_line(r, workdir)
  assert snapshot(workdir) == before


def test_workdir_under_proc():
  r = launch("search", f"--config={TINY}", "--workdir=/proc/edgenas-run")
  assert_one_error_line(r, "/proc/edgenas-run", "cannot create")


def test_estimate_of_a_directory(tmp_path):
  r = launch("estimate", f"--model={tmp_path}")
  assert_one_error_line(r, f"--model={tmp_path}", "is a directory")


def test_profile_errors_are_one_line():
  r = launch("profile", "--backend=calibrate", "--platform=nosuch")
  assert_one_error_line(r, "nosuch")
  r = launch("profile", "--backend=host")  # a usage error: one line too, not the flag listing
  assert_one_error_line(r, "--out is required")


def test_verbosity_keeps_the_traceback(tmp_path):
  r = launch("search", f"--config={TINY}", "--config.search.relaxation=foo", f"--workdir={tmp_path / 'v'}",
             "--verbosity=1")
  assert r.returncode == 1 and "Traceback" in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("error: config.search.relaxation")


@pytest.mark.parametrize("name", ["search", "retrain", "sweep", "pipeline", "export"])
def test_help_exits_zero_and_says_where_the_config_fields_are(name):
  r = launch(name, "--help")
  assert r.returncode == 0, r.stderr
  assert "--config" in r.stdout and "experiments/digits.py" in r.stdout and "Search options" in r.stdout


def test_second_launcher_on_a_workdir_exits_at_once_and_the_first_finishes(tmp_path):
  workdir = str(tmp_path / "shared")
  first = start("search", f"--config={TINY}", f"--workdir={workdir}")
  lock = os.path.join(workdir, rundir.LOCK_FILE)
  deadline = time.time() + 120
  while not os.path.exists(lock) and first.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert first.poll() is None, first.communicate()
  t0 = time.time()
  second = launch("search", f"--config={TINY}", f"--workdir={workdir}", timeout=60)
  elapsed = time.time() - t0
  line = assert_one_error_line(second, workdir, "in use by pid", f"pid {first.pid} ", "since ")
  # The target is 2 s (about 1 s here: the lock is taken before JAX is imported); the bound leaves room for a
  # loaded CI machine, so this is a check that it does not wait for the first run, not a timing benchmark.
  assert elapsed < 5.0, f"the second launcher took {elapsed:.1f} s: {line}"
  out, err = first.communicate(timeout=600)
  assert first.returncode == 0, err
  assert "arch" in out and os.path.exists(os.path.join(workdir, "arch.json"))


def test_ctrl_c_stops_at_a_step_and_the_rerun_resumes_to_the_same_result(tmp_path):
  # Two epochs (76 steps): after the first progress line there are seconds of steps left to interrupt.
  args = [f"--config={TINY}", "--config.search.epochs=2", "--config.search.max_steps=0"]
  reference_dir, workdir = str(tmp_path / "straight"), str(tmp_path / "interrupted")
  reference = start("search", *args, f"--workdir={reference_dir}")
  run = start("search", *args, f"--workdir={workdir}")
  for line in run.stdout:
    if line.startswith("step 4/"):
      run.send_signal(signal.SIGINT)
      break
  out, err = run.communicate(timeout=600)
  lines = [line for line in err.splitlines() if line.strip()]
  assert run.returncode == 130 and len(lines) == 1, err
  assert lines[0].startswith("interrupted at step ") and "rerun the same command to resume" in lines[0]
  assert not os.path.exists(os.path.join(workdir, "arch.json"))
  step = int(lines[0].split()[3].rstrip(";"))
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(step - 1)))  # saved where it stopped

  r = launch("search", *args, f"--workdir={workdir}")
  assert r.returncode == 0, r.stderr
  assert f"resuming from checkpoint step {step - 1}" in r.stdout
  assert reference.wait(timeout=600) == 0, reference.stderr.read()
  with open(os.path.join(workdir, "arch.json")) as f, open(os.path.join(reference_dir, "arch.json")) as g:
    assert f.read() == g.read()
  got, want = (rundir.read_json(os.path.join(d, "search.json")) for d in (workdir, reference_dir))
  assert got["alpha"] == want["alpha"]


# Bad input through the real launchers, one row each: (launcher, arguments, what the one error line must name).
# {wd} is a fresh workdir that must not be created, {bad} a directory of malformed files written by `bad_files`.
SEARCH = ("search", f"--config={TINY}", "--workdir={wd}")
BAD_INPUTS = [
    (*SEARCH, "--config.search.batch_size=0", "config.search.batch_size"),
    (*SEARCH, "--config.search.batch_size=-3", "config.search.batch_size"),
    (*SEARCH, "--config.search.epochs=-1", "config.search.epochs"),
    (*SEARCH, "--config.search.epochs=0", "config.search.epochs"),
    (*SEARCH, "--config.search.warmup_epochs=5", "config.search.warmup_epochs"),
    (*SEARCH, "--config.search.relaxation=foo", "config.search.relaxation"),
    (*SEARCH, "--config.search.max_steps=-2", "config.search.max_steps"),
    (*SEARCH, "--config.search.second_order=yes", "second_order"),
    (*SEARCH, "--config.cost.lam=nan", "config.cost.lam"),
    (*SEARCH, "--config.cost.lam=-1", "config.cost.lam"),
    (*SEARCH, "--config.cost.lam=inf", "config.cost.lam"),
    (*SEARCH, "--config.cost.penalty=cubic", "config.cost.penalty"),
    (*SEARCH, "--config.cost.model=joules", "config.cost.model"),
    (*SEARCH, "--config.cost.platform=nosuchchip", "nosuchchip"),
    (*SEARCH, "--config.cost.target=-5", "config.cost.target"),
    (*SEARCH, "--config.cost.beta=nan", "config.cost.beta"),
    (*SEARCH, "--config.weights.lr=nan", "config.weights.lr"),
    (*SEARCH, "--config.weights.lr=-0.1", "config.weights.lr"),
    (*SEARCH, "--config.arch.lr=inf", "config.arch.lr"),
    (*SEARCH, "--config.weights.weight_decay=-1", "config.weights.weight_decay"),
    (*SEARCH, "--config.seed=-1", "config.seed"),
    (*SEARCH, "--config.val_fraction=1.5", "config.val_fraction"),
    (*SEARCH, "--config.val_fraction=0", "config.val_fraction"),
    (*SEARCH, "--config.log_every=0", "config.log_every"),
    (*SEARCH, "--config.checkpoint_every=0", "config.checkpoint_every"),
    (*SEARCH, "--config.keep_checkpoints=0", "config.keep_checkpoints"),
    (*SEARCH, "--config.image_size=-8", "config.image_size"),
    (*SEARCH, "--config.space.kernels=(4,)", "space.kernels"),
    (*SEARCH, "--config.space.expansions=(0,)", "space.expansions"),
    (*SEARCH, "--config.space.stem.channels=0", "space.stem.channels"),
    (*SEARCH, "--config.search.nosuch=1", "config.search.nosuch"),
    (*SEARCH, "--config.search.batch_size=many", "batch_size"),
    ("search", "--config=experiments/nosuch.py", "--workdir={wd}", "experiments/nosuch.py"),
    ("sweep", f"--config={TINY}", "--workdir={wd}", "--lambdas=0,1", "--config.cost.lam=nan", "config.cost.lam"),
    ("sweep", f"--config={TINY}", "--workdir={wd}", "--lambdas=0,1", "--config.search.relaxation=foo",
     "config.search.relaxation"),
    ("sweep", f"--config={TINY}", "--workdir={wd}", "--lambdas=0,x", "--lambdas"),
    ("sweep", f"--config={TINY}", "--workdir={wd}", "--lambdas=0,1", "--config.search.batch_size=100000",
     "config.search.batch_size"),
    ("retrain", f"--config={TINY}", "--workdir={wd}", "--arch={bad}/kernal.json", "kernal"),
    ("retrain", f"--config={TINY}", "--workdir={wd}", "--arch={bad}/hidden.json", "hidden"),
    ("retrain", f"--config={TINY}", "--workdir={wd}", "--arch={bad}/garbage.json", "garbage.json"),
    ("retrain", f"--config={TINY}", "--workdir={wd}", "--arch={bad}/nosuch.json", "nosuch.json"),
    ("retrain", f"--config={TINY}", "--workdir={wd}", "--arch={bad}/good.json", "--platforms=nosuchchip",
     "nosuchchip"),
    ("retrain", f"--config={TINY}", "--workdir={wd}", "--arch={bad}/good.json", "--config.retrain.lr=nan",
     "retrain.lr"),
    ("retrain", f"--config={TINY}", "--workdir={wd}", "--arch={bad}/good.json", "--config.retrain.epochs=0",
     "retrain.epochs"),
    ("estimate", "--model={bad}/garbage.tflite", "garbage.tflite"),
    ("estimate", "--model={bad}/kernal.json", "kernal"),
    ("estimate", "--model={bad}/good.json", "--platform=nosuchchip", "nosuchchip"),
    ("estimate", "--model={bad}", "is a directory"),
    ("profile", "--backend=calibrate", "--platform=nosuchchip", "nosuchchip"),
    ("run_on_target", "--model={bad}/garbage.tflite", "garbage.tflite"),
    ("run_on_target", "--model=testdata/kws_dscnn_int8.tflite", "--targets=z80", "z80"),
]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
  from edgenas import architecture as arch_lib
  d = tmp_path_factory.mktemp("bad")
  good = arch_lib.Architecture((8, 8, 1), 10, arch_lib.Stem(8, 3, 1),
                               (arch_lib.Layer(arch_lib.MBCONV, 8, 8, 1, 3, 3, 16),), name="good").to_dict()
  (d / "good.json").write_text(json.dumps(good))
  kernal = json.loads(json.dumps(good))
  kernal["layers"][0]["kernal"] = kernal["layers"][0].pop("kernel")
  (d / "kernal.json").write_text(json.dumps(kernal))
  hidden = json.loads(json.dumps(good))
  hidden["layers"][0]["hidden"] = 10 ** 7
  (d / "hidden.json").write_text(json.dumps(hidden))
  (d / "garbage.json").write_text("{not json")
  (d / "garbage.tflite").write_bytes(b"\x00" * 64)
  return str(d)


@pytest.mark.parametrize("row", BAD_INPUTS, ids=[f"{r[0]}-{r[-2].split('=')[0].lstrip('-')}-{i}"
                                                 for i, r in enumerate(BAD_INPUTS)])
def test_bad_input_through_the_real_launcher_is_one_line_and_changes_nothing(row, bad_files, tmp_path):
  name, *args, needle = row
  workdir = str(tmp_path / "run")
  args = [a.format(wd=workdir, bad=bad_files) for a in args]
  before = snapshot(bad_files)
  r = launch(name, *args)
  assert_one_error_line(r, needle.format(bad=bad_files))
  assert not os.path.exists(workdir)  # refused before anything was written
  assert snapshot(bad_files) == before
