"""The training loops' behaviour, pinned: the same config and seed give the same arch.json (byte for byte), the same
architecture logits and the same retrain accuracy as the code recorded in tests/golden/loop_golden.json.

The golden file was first written from the loops before the refactor into `edgenas.loop` (commit 0b41db7), and
re-recorded by this module's `main` at the commit it names when the supernet itself changed on purpose (the
channel gates moved after the depthwise BatchNorm, and derivation took the cost's gate statistic; issue "Search
that earns its result"); the retrain figures were unchanged by that re-recording:

    python tests/test_loop_identity.py   # rewrites tests/golden/loop_golden.json from the current code
"""
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from edgenas import architecture as arch_lib
from edgenas import search
from edgenas import train
from experiments import tiny

RELAXATIONS = ("softmax", "gumbel", "sigmoid")
HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
GOLDEN = os.path.join(HERE, "loop_golden.json")


def search_config(relaxation):
  c = tiny.get_config()
  c.search.relaxation = relaxation
  c.cost.model = "macs"  # the stand-in cost: the pin must not move when a platform's table is re-measured
  return c


def retrain_config():
  c = tiny.get_config()
  c.retrain.update(dict(epochs=2, qat_epochs=1, warmup_epochs=0, batch_size=32))
  return c


def run_jobs(root: str) -> dict:
  """The three tiny digits searches and one retrain of the softmax search's network."""
  out = {}
  for relaxation in RELAXATIONS:
    workdir = os.path.join(root, relaxation)
    search.run_search(search_config(relaxation), workdir)
    with open(os.path.join(workdir, "arch.json"), "rb") as f:
      raw = f.read()
    with open(os.path.join(workdir, "search.json")) as f:
      result = json.load(f)
    out[relaxation] = dict(arch_sha256=hashlib.sha256(raw).hexdigest(), alpha=result["alpha"],
                           val_acc_supernet=result["val_acc_supernet"])
  arch = arch_lib.Architecture.load(os.path.join(root, "softmax", "arch.json"))
  report = train.run_retrain(retrain_config(), arch, os.path.join(root, "retrain"))
  out["retrain"] = {k: report[k] for k in ("test_acc_float", "test_acc_fake_quant")}
  return out


@pytest.fixture(scope="module")
def golden_and_now(tmp_path_factory):
  with open(GOLDEN) as f:
    golden = json.load(f)["jobs"]
  return golden, run_jobs(str(tmp_path_factory.mktemp("loops")))


@pytest.mark.parametrize("relaxation", RELAXATIONS)
def test_search_gives_the_recorded_architecture_and_logits(golden_and_now, relaxation):
  golden, now = golden_and_now
  assert now[relaxation]["arch_sha256"] == golden[relaxation]["arch_sha256"]
  for got, want in zip(now[relaxation]["alpha"], golden[relaxation]["alpha"]):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  assert now[relaxation]["val_acc_supernet"] == pytest.approx(golden[relaxation]["val_acc_supernet"], abs=1e-9)


def test_retrain_gives_the_recorded_accuracy(golden_and_now):
  golden, now = golden_and_now
  assert now["retrain"] == pytest.approx(golden["retrain"], abs=1e-9)


def main():
  commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
  with tempfile.TemporaryDirectory() as root:
    jobs = run_jobs(root)
  path = GOLDEN
  with open(path, "w") as f:
    json.dump(dict(recorded_at_commit=commit, jobs=jobs), f, indent=1)
    f.write("\n")
  print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
  main()
