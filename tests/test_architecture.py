"""The derived network: Architecture accounting and its arch.json in and out."""
import json

import pytest

from edgenas import architecture as arch_lib


def tiny_arch():
  return arch_lib.Architecture(
      (8, 8, 1), 10, arch_lib.Stem(4, 3, 1),
      (arch_lib.Layer("mbconv", 4, 4, 1, kernel=3, expansion=2, hidden=8),
       arch_lib.Layer("skip", 4, 4, 1),
       arch_lib.Layer("mbconv", 4, 8, 2, kernel=3, expansion=1, hidden=4)))


def test_architecture_accounting_matches_hand_computed_values():
  a = tiny_arch()
  assert a.feature_shapes() == [(8, 8, 4), (8, 8, 4), (8, 8, 4), (4, 4, 8)]
  stem = 8 * 8 * 4 * 9 * 1
  block0 = 64 * 8 * 4 + 64 * 8 * 9 + 64 * 4 * 8  # expand, depthwise, project
  block2 = 16 * 4 * 9 + 16 * 8 * 4  # depthwise (stride 2), project
  pool, fc = 16 * 8, 8 * 10
  add = 64 * 4
  assert a.macs() == stem + block0 + add + block2 + pool + fc
  weights = 9 * 4 + (4 * 8 + 9 * 8 + 8 * 4) + (9 * 4 + 4 * 8) + 8 * 10
  biases = 4 + (8 + 8 + 4) + (4 + 8) + 10
  assert a.params() == weights + biases
  assert a.weight_bytes() == weights + 4 * biases
  # Peak: block 0's depthwise holds the expanded input and output plus the residual input (8*8*(8+8+4)).
  assert a.peak_activation_bytes() == 64 * 20
  assert [o.op for o in a.ops()] == ["conv_2d", "conv_2d", "depthwise_conv_2d", "conv_2d", "add",
                                     "depthwise_conv_2d", "conv_2d", "average_pool_2d", "fully_connected"]


def test_arch_json_round_trip(tmp_path):
  a = tiny_arch()
  path = str(tmp_path / "arch.json")
  a.save(path)
  b = arch_lib.Architecture.load(path)
  assert b == a and b.hash() == a.hash()
  assert json.load(open(path))["version"] == arch_lib.ARCH_VERSION


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(version=99), "unsupported 'version' 99"),
    (lambda d: d["layers"][0].pop("hidden"), "missing field 'layers\\[0\\].hidden'"),
    (lambda d: d["layers"][0].update(kernel="3"), "'layers\\[0\\].kernel' must be an integer"),
    (lambda d: d["layers"][2].update(in_channels=5), "'layers\\[2\\].in_channels' is 5"),
    (lambda d: d["layers"][1].update(out_channels=8), "is a skip but changes the shape"),
    (lambda d: d["layers"][0].update(op="conv9"), "must be 'mbconv' or 'skip'"),
])
def test_malformed_arch_json_names_the_file_and_field(tmp_path, mutate, message):
  d = tiny_arch().to_dict()
  mutate(d)
  path = tmp_path / "arch.json"
  path.write_text(json.dumps(d))
  with pytest.raises(arch_lib.ArchitectureError, match=message) as e:
    arch_lib.Architecture.load(str(path))
  assert str(path) in str(e.value)


def test_not_json_is_refused(tmp_path):
  path = tmp_path / "arch.json"
  path.write_text("{not json")
  with pytest.raises(arch_lib.ArchitectureError, match="not valid JSON"):
    arch_lib.Architecture.load(str(path))
