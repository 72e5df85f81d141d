"""Non-square inputs, kernels and strides from the search space to the device: a search on digits resized to
12x8 with a 5x3 stem, a 5x3 candidate and a time-only (2, 1) stride derives a network whose arch.json, cost,
trained weights, int8 export, `.tflite` reading and emulated Cortex-M4 run all keep the (h, w) geometry."""
import json
import os

import numpy as np
import pytest

from edgenas import architecture as arch_lib
from edgenas import data as data_lib
from edgenas import ops as ops_lib
from edgenas import search as search_lib
from edgenas import space as space_lib
from edgenas.energy import tflite_graph
from edgenas.export import exporter
from conftest import adam_trained, require_device, small_search_config

SIZE = (12, 8)


def non_square_config():
  c = small_search_config()
  del c.image_size  # an int field by default (0: keep the size); a pair replaces it
  c.image_size = SIZE
  c.space.stem = dict(channels=8, kernel=(5, 3), stride=(2, 1))
  c.space.stages = [dict(layers=1, channels=8, stride=1), dict(layers=1, channels=16, stride=(2, 1))]
  c.space.kernels = ((5, 3),)
  c.space.expansions = (1,)
  c.space.allow_skip = False  # every layer is an MBConv: the derived net must carry the 5x3 kernels
  return c


def test_search_space_geometry_is_per_axis():
  c = non_square_config()
  space = space_lib.SearchSpace.from_config(dict(c.space, input_shape=(*SIZE, 1), num_classes=10))
  slots = space.slots()
  assert [(s.in_h, s.in_w, s.stride) for s in slots] == [(6, 8, 1), (6, 8, (2, 1))]
  assert slots[0].candidates[0].name == "k5x3e1"
  with pytest.raises(space_lib.SpaceError, match=r"space\.kernels' must be positive odd sizes"):
    space_lib.SearchSpace.from_config(dict(c.space, kernels=((5, 4),), input_shape=(*SIZE, 1), num_classes=10))
  with pytest.raises(space_lib.SpaceError, match=r"space\.stages\[0\]\.stride' must be an integer or an \(h, w\)"):
    space_lib.SearchSpace.from_config(dict(c.space, stages=[dict(layers=1, channels=8, stride=(2, 1, 1))],
                                           input_shape=(*SIZE, 1), num_classes=10))


def test_search_derives_a_non_square_network(tmp_path):
  workdir = str(tmp_path / "search")
  result = search_lib.run_search(non_square_config(), workdir)
  raw = json.load(open(os.path.join(workdir, "arch.json")))
  assert raw["input_shape"] == [*SIZE, 1]
  assert raw["stem"] == {"channels": 8, "kernel": [5, 3], "stride": [2, 1]}
  assert [l["kernel"] for l in raw["layers"]] == [[5, 3], [5, 3]]
  assert [l["stride"] for l in raw["layers"]] == [1, [2, 1]]
  arch = arch_lib.Architecture.load(os.path.join(workdir, "arch.json"))
  assert arch.feature_shapes() == [(6, 8, 8), (6, 8, 8), (3, 8, 16)]
  assert result["derived_cost"] > 0 and np.isfinite(result["derived_cost"])


def _arch():
  return arch_lib.Architecture(
      (*SIZE, 1), 10, arch_lib.Stem(8, (5, 3), (2, 1)),
      (arch_lib.Layer("mbconv", 8, 8, 1, (5, 3), 3, 24), arch_lib.Layer("mbconv", 8, 16, (2, 1), (3, 5), 1, 8)),
      0, "non_square")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A non-square network trained briefly on 12x8 digits, exported to int8 TFLite Micro."""
  dataset = data_lib.load_dataset("digits", val_fraction=0.1, seed=0, image_size=SIZE)
  arch = _arch()
  variables = adam_trained(arch, dataset.train, 300)
  out = str(tmp_path_factory.mktemp("export") / "export")
  report = exporter.export_model(arch, variables, dataset, out, ["stm32l4r5_tflm"])
  return arch, dataset, out, report


def test_export_keeps_the_geometry_and_tflm_agrees(exported):
  arch, _, out, report = exported
  assert report["accuracy"]["int8_tflm"] > 0.6
  assert report["accuracy"]["argmax_agreement_int8_float"] >= 0.97
  graph = tflite_graph.read_tflite(os.path.join(out, "model.tflite"))
  windowed = (ops_lib.CONV_2D, ops_lib.DEPTHWISE_CONV_2D, ops_lib.AVERAGE_POOL_2D)
  from_file = [(o.spec.op, o.spec.kernel, o.spec.stride) for o in graph.ops if o.spec.op in windowed]
  planned = [(o.op, o.kernel, o.stride) for o in arch.ops() if o.op in windowed]
  # The converter writes the one-channel stem as a depthwise conv with a channel multiplier.
  planned[0] = (ops_lib.DEPTHWISE_CONV_2D,) + planned[0][1:]
  assert from_file == planned
  assert from_file[0] == (ops_lib.DEPTHWISE_CONV_2D, (5, 3), (2, 1))
  assert sum(o.macs for o in graph.ops) == arch.macs()


def test_non_square_export_runs_byte_exact_on_the_emulated_cortex_m4(exported):
  _, dataset, out, _ = exported
  require_device("cortex-m4")
  report = exporter.run_targets(out, ["cortex-m4"], dataset, images=8)
  t = report["targets"]["cortex-m4"]
  assert t["matches_host"] and t["images_checked"] == 8 and t["first_mismatch"] is None
