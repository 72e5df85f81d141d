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


def load_mutated(tmp_path, mutate, message):
  """(path, error) of loading the tiny architecture's JSON after `mutate`; the load must fail matching `message`."""
  d = tiny_arch().to_dict()
  mutate(d)
  path = tmp_path / "arch.json"
  path.write_text(json.dumps(d))
  with pytest.raises(arch_lib.ArchitectureError, match=message) as e:
    arch_lib.Architecture.load(str(path))
  return path, e.value


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(version=99), "unsupported 'version' 99"),
    (lambda d: d["layers"][0].pop("hidden"), "missing field 'layers\\[0\\].hidden'"),
    (lambda d: d["layers"][0].update(kernel="3"), "'layers\\[0\\].kernel' must be an integer or an \\[h, w\\] pair"),
    (lambda d: d["layers"][2].update(in_channels=5), "'layers\\[2\\].in_channels' is 5"),
    (lambda d: d["layers"][1].update(out_channels=8), "is a skip but changes the shape"),
    (lambda d: d["layers"][0].update(op="conv9"), "must be 'mbconv' or 'skip'"),
])
def test_malformed_arch_json_names_the_file_and_field(tmp_path, mutate, message):
  path, error = load_mutated(tmp_path, mutate, message)
  assert str(path) in str(error)


def test_not_json_is_refused(tmp_path):
  path = tmp_path / "arch.json"
  path.write_text("{not json")
  with pytest.raises(arch_lib.ArchitectureError, match="not valid JSON"):
    arch_lib.Architecture.load(str(path))


def _set(path, value):
  """A mutation setting d[path...] = value, path given as keys/indices."""
  def mutate(d):
    for key in path[:-1]:
      d = d[key]
    d[path[-1]] = value
  return mutate


def _drop(path):
  def mutate(d):
    for key in path[:-1]:
      d = d[key]
    del d[path[-1]]
  return mutate


def _rename(path, new):
  def mutate(d):
    for key in path[:-1]:
      d = d[key]
    d[new] = d.pop(path[-1])
  return mutate


# Every row: a change to a valid arch.json and the message that must name the field (path) at fault.
BAD_ARCH_JSON = [
    ("unknown top-level field", _set(["colour"], "red"), r"unknown field 'colour' \(known: version, name, "),
    ("unknown stem field", _set(["stem", "padding"], 1), r"stem: unknown field 'padding' \(known: channels, kernel, "
                                                          r"stride\)"),
    ("kernal typo", _rename(["layers", 0, "kernel"], "kernal"), r"layers\[0\]: unknown field 'kernal' \(known: op, "),
    ("unknown layer field", _set(["layers", 2, "groups"], 2), r"layers\[2\]: unknown field 'groups'"),
    ("kernel on a skip", _set(["layers", 1, "kernel"], 3), r"layers\[1\] \(a skip\): unknown field 'kernel'"),
    ("hidden too large", _set(["layers", 0, "hidden"], 10**7), r"'layers\[0\].hidden' is 10000000 but in_channels x "
                                                               r"expansion = 4 x 2 gives at most 8"),
    ("hidden 0", _set(["layers", 0, "hidden"], 0), r"'layers\[0\].hidden' must be positive, got 0"),
    ("hidden negative", _set(["layers", 0, "hidden"], -8), r"'layers\[0\].hidden' must be positive"),
    ("empty layers", _set(["layers"], []), r"'layers' is empty"),
    ("layers not a list", _set(["layers"], {"op": "skip"}), r"field 'layers' must be a list"),
    ("layer not an object", _set(["layers", 1], "skip"), r"field 'layers\[1\]' must be an object"),
    ("version 2", _set(["version"], 2), r"unsupported 'version' 2"),
    ("version as text", _set(["version"], "1"), r"unsupported 'version' '1'"),
    ("version as bool", _set(["version"], True), r"unsupported 'version' True"),
    ("missing version", _drop(["version"]), r"missing field 'version'"),
    ("negative stride", _set(["layers", 2, "stride"], -1), r"'layers\[2\].stride' must be 1 or 2 \(or an \[h, w\] pair of them\), got -1"),
    ("stride 3", _set(["layers", 2, "stride"], 3), r"'layers\[2\].stride' must be 1 or 2 \(or an \[h, w\] pair of them\), got 3"),
    ("stem stride 0", _set(["stem", "stride"], 0), r"'stem.stride' must be 1 or 2 \(or an \[h, w\] pair of them\), got 0"),
    ("even kernel", _set(["layers", 0, "kernel"], 4), r"'layers\[0\].kernel' must be a positive odd size or an \[h, w\] pair of them, got 4"),
    ("zero stem kernel", _set(["stem", "kernel"], 0), r"'stem.kernel' must be a positive size or an \[h, w\] pair"),
    ("even side of a layer kernel", _set(["layers", 0, "kernel"], [5, 4]),
     r"'layers\[0\].kernel' must be a positive odd size or an \[h, w\] pair of them, got \(5, 4\)"),
    ("stride pair with a 3", _set(["layers", 2, "stride"], [2, 3]), r"'layers\[2\].stride' must be 1 or 2"),
    ("kernel of three sides", _set(["stem", "kernel"], [3, 3, 3]),
     r"field 'stem.kernel' must be an integer or an \[h, w\] pair of integers, got \[3, 3, 3\]"),
    ("channel chain broken", _set(["layers", 1, "in_channels"], 6), r"'layers\[1\].in_channels' is 6 but the previous "
                                                                    r"layer gives 4"),
    ("stem chain broken", _set(["stem", "channels"], 6), r"'layers\[0\].in_channels' is 4 but the previous layer "
                                                         r"gives 6"),
    ("skip changes the shape", _set(["layers", 1, "stride"], 2), r"'layers\[1\]' is a skip but changes the shape"),
    ("zero out_channels", _set(["layers", 2, "out_channels"], 0), r"'layers\[2\].out_channels' must be positive"),
    ("expansion 0", _set(["layers", 0, "expansion"], 0), r"'layers\[0\].expansion' must be positive"),
    ("float channels", _set(["layers", 0, "out_channels"], 4.0), r"field 'layers\[0\].out_channels' must be an "
                                                                 r"integer, got 4.0"),
    ("bool stride", _set(["layers", 0, "stride"], True), r"field 'layers\[0\].stride' must be an integer or an \[h, w\] pair of integers, got True"),
    ("string kernel", _set(["stem", "kernel"], "3"), r"field 'stem.kernel' must be an integer or an \[h, w\] pair of integers, got '3'"),
    ("null hidden", _set(["layers", 2, "hidden"], None), r"field 'layers\[2\].hidden' must be an integer, got None"),
    ("missing stem field", _drop(["stem", "channels"]), r"missing field 'stem.channels'"),
    ("missing layer field", _drop(["layers", 2, "out_channels"]), r"missing field 'layers\[2\].out_channels'"),
    ("missing num_classes", _drop(["num_classes"]), r"missing field 'num_classes'"),
    ("stem not an object", _set(["stem"], [4, 3, 1]), r"field 'stem' must be an object"),
    ("num_classes 0", _set(["num_classes"], 0), r"'num_classes' must be at least 2, got 0"),
    ("num_classes as text", _set(["num_classes"], "10"), r"field 'num_classes' must be an integer"),
    ("input_shape rank 2", _set(["input_shape"], [8, 8]), r"field 'input_shape' must be \[H, W, C\] integers, got "
                                                          r"\[8, 8\]"),
    ("input_shape zero", _set(["input_shape"], [8, 0, 1]), r"'input_shape' must be \[H, W, C\], all positive"),
    ("input_shape floats", _set(["input_shape"], [8.0, 8, 1]), r"field 'input_shape' must be \[H, W, C\] integers"),
    ("head_channels negative", _set(["head_channels"], -1), r"'head_channels' must be >= 0, got -1"),
    ("head_channels as text", _set(["head_channels"], "16"), r"field 'head_channels' must be an integer, got '16'"),
    ("name not a string", _set(["name"], 7), r"field 'name' must be a string, got 7"),
]


@pytest.mark.parametrize("mutate, message", [row[1:] for row in BAD_ARCH_JSON], ids=[row[0] for row in BAD_ARCH_JSON])
def test_bad_arch_json_is_refused_naming_the_field(tmp_path, mutate, message):
  path, error = load_mutated(tmp_path, mutate, message)
  assert str(error).startswith(f"{path}: ") and "\n" not in str(error)  # one line, naming the file first


def test_optional_fields_may_be_left_out():
  d = tiny_arch().to_dict()
  del d["name"], d["head_channels"]
  assert arch_lib.Architecture.from_dict(d) == tiny_arch()


def test_architecture_built_in_python_is_checked_too():
  with pytest.raises(arch_lib.ArchitectureError, match=r"'layers\[0\].hidden' is 99"):
    arch_lib.Architecture((8, 8, 1), 10, arch_lib.Stem(4, 3, 1), (arch_lib.Layer("mbconv", 4, 4, 1, 3, 2, 99),))
  with pytest.raises(arch_lib.ArchitectureError, match="'layers' is empty"):
    arch_lib.Architecture((8, 8, 1), 10, arch_lib.Stem(4, 3, 1), ())


@pytest.mark.parametrize("shape", [(8, 8, 1), (16, 16, 1), (32, 32, 3), (49, 10, 1), (224, 224, 3), (1, 1, 1)])
def test_every_baseline_round_trips(tmp_path, shape):
  from edgenas import baselines
  for name, a in baselines.baseline_architectures(shape, 12).items():
    path = str(tmp_path / f"{name}.json")
    a.save(path)
    b = arch_lib.Architecture.load(path)
    assert b == a and b.to_json() == a.to_json(), name


def test_the_pinned_searches_arch_json_loads_and_writes_the_same_bytes(tmp_path):
  """tests/golden/loop_golden.json pins the sha256 of the arch.json bytes each tiny search writes: find those
  networks among the tiny space's and check they load and write back byte for byte."""
  import hashlib
  import itertools
  import os
  from edgenas import space as space_lib
  from experiments import tiny
  with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "loop_golden.json")) as f:
    golden = json.load(f)["jobs"]
  c = tiny.get_config()
  space = space_lib.SearchSpace.from_config(dict(c.space) | dict(input_shape=(8, 8, 1), num_classes=10))

  def options(slot):  # every candidate, and every gated width an expanding one can derive
    for j, cand in enumerate(slot.candidates):
      if cand.op == arch_lib.MBCONV and cand.expansion != 1:
        yield from ((j, h) for h in range(space.channel_divisor, slot.hidden_max(cand) + 1, space.channel_divisor))
      else:
        yield j, 0

  by_sha = {}
  for combo in itertools.product(*(list(options(s)) for s in space.slots())):
    a = space.architecture([j for j, _ in combo], [h for _, h in combo], name=c.name)
    by_sha[hashlib.sha256((a.to_json() + "\n").encode()).hexdigest()] = a
  for job in ("softmax", "gumbel", "sigmoid"):
    a = by_sha[golden[job]["arch_sha256"]]
    path = tmp_path / f"{job}.json"
    a.save(str(path))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == golden[job]["arch_sha256"]
    b = arch_lib.Architecture.load(str(path))
    assert b == a and hashlib.sha256((b.to_json() + "\n").encode()).hexdigest() == golden[job]["arch_sha256"]
