"""Hand-designed reference networks: the paper's MobileNetV2 at full size, its scaled digits variant, DS-CNN."""
import pytest

from edgenas import architecture as arch_lib
from edgenas import baselines


def _stage_channels(arch):
  out = []
  for l in arch.layers:
    if not out or out[-1] != l.out_channels:
      out.append(l.out_channels)
  return out


def test_mobilenetv2_at_224_is_the_paper_network():
  arch = baselines.baseline_architecture("mobilenetv2_1.0", (224, 224, 3), 1000)
  assert len(arch.layers) == 17
  assert arch.stem == arch_lib.Stem(32, 3, 2)
  assert _stage_channels(arch) == [16, 24, 32, 64, 96, 160, 320]
  assert arch.head_channels == 1280
  assert [l.expansion for l in arch.layers] == [1] + [6] * 16
  assert baselines.final_map(arch) == (7, 7)
  # The paper reports 300M multiply-adds and 3.4M parameters at 224x224 with 1000 classes.
  assert 290e6 < arch.macs() < 310e6
  assert 3.3e6 < arch.params() < 3.6e6


def test_width_035_rounds_channels_to_multiples_of_8_and_keeps_the_1280_head():
  arch = baselines.baseline_architecture("mobilenetv2_0.35", (224, 224, 3), 1000)
  stage_starts = [0, 1, 3, 6, 10, 13, 16]
  assert [arch.layers[i].out_channels for i in stage_starts] == [8, 8, 16, 24, 32, 56, 112]
  assert arch.stem.channels == 16 and arch.head_channels == 1280
  assert arch.macs() < baselines.baseline_architecture("mobilenetv2_1.0", (224, 224, 3), 1000).macs() / 3


def test_digits_variant_has_reduced_depth_and_keeps_maps_of_at_least_1x1():
  archs = baselines.baseline_architectures((8, 8, 1), 10)
  assert set(archs) == {"mobilenetv2_1.0", "mobilenetv2_0.35", "dscnn"}
  for name in ("mobilenetv2_1.0", "mobilenetv2_0.35"):
    arch = archs[name]
    assert len(arch.layers) == 9
    assert arch.stem.stride == 1
    assert [l.stride for l in arch.layers] == [1, 1, 2, 1, 2, 1, 1, 2, 1]  # the 32, 64 and 160 stages downsample
    assert [s[:2] for s in arch.feature_shapes()] == [(8, 8)] * 3 + [(4, 4)] * 2 + [(2, 2)] * 3 + [(1, 1)] * 2
    assert arch.name == name
  assert archs["mobilenetv2_0.35"].macs() < archs["mobilenetv2_1.0"].macs()


def test_16x16_keeps_four_of_the_five_downsamplings():
  arch = baselines.baseline_architecture("mobilenetv2_1.0", (16, 16, 3), 10)
  assert len(arch.layers) == 9 and arch.stem.stride == 1
  assert sum(l.stride == 2 for l in arch.layers) == 4
  assert baselines.final_map(arch) == (1, 1)
  full = baselines.baseline_architecture("mobilenetv2_1.0", (32, 32, 3), 10)
  assert len(full.layers) == 17 and full.stem.stride == 2


def test_dscnn_is_a_plain_depthwise_separable_stack():
  arch = baselines.baseline_architecture("dscnn", (8, 8, 1), 10)
  assert arch.stem == arch_lib.Stem(64, 3, 2)
  assert len(arch.layers) == 4
  assert all(l.expansion == 1 and l.kernel == 3 and l.out_channels == 64 and not l.expand for l in arch.layers)
  assert arch.head_channels == 0


def test_baselines_round_trip_through_arch_json(tmp_path):
  hashes = set()
  for name, arch in baselines.baseline_architectures((8, 8, 1), 10).items():
    path = str(tmp_path / f"{name}.json")
    arch.save(path)
    loaded = arch_lib.Architecture.load(path)
    assert loaded == arch
    hashes.add(arch.hash())
  assert len(hashes) == 3


def test_unknown_baseline_and_bad_shape_are_rejected_with_the_choices():
  with pytest.raises(baselines.BaselineError, match="mobilenetv3.*mobilenetv2_1.0, mobilenetv2_0.35, dscnn"):
    baselines.baseline_architecture("mobilenetv3", (8, 8, 1), 10)
  with pytest.raises(baselines.BaselineError, match="input_shape"):
    baselines.baseline_architecture("dscnn", (8, 8), 10)


def test_make_divisible_never_rounds_down_more_than_ten_percent():
  assert baselines.make_divisible(11.2) == 16
  assert baselines.make_divisible(33.6) == 32
  assert baselines.make_divisible(5.6) == 8
  for v in range(1, 400):
    r = baselines.make_divisible(v * 0.35)
    assert r % 8 == 0 and r >= 0.9 * v * 0.35


def test_dscnn_on_the_kws_mfcc_map_is_mlperf_tinys_reference_geometry():
  """MLPerf Tiny's KWS DS-CNN: a 10x4 stem with stride 2 takes the 49x10 MFCCs to 25x5x64, four depthwise-separable
  blocks of 64 keep it there, and a 25x5 average pool feeds the classifier; about 2.7M multiply-adds."""
  arch = baselines.baseline_architecture("dscnn", (49, 10, 1), 12)
  assert arch.stem == arch_lib.Stem(64, (10, 4), 2)
  assert baselines.final_map(arch) == (25, 5)
  ops = arch.ops()
  assert ops[0].kernel == (10, 4) and ops[0].features()[0] == 25 * 5 * 64 * 10 * 4
  assert ops[-2].op == "average_pool_2d" and ops[-2].kernel == (25, 5)
  assert 2.6e6 < arch.macs() < 2.8e6
  assert arch_lib.Architecture.from_dict(arch.to_dict()) == arch  # [10, 4] survives arch.json
  # Square images keep the 3x3 stem.
  assert baselines.baseline_architecture("dscnn", (32, 32, 3), 10).stem == arch_lib.Stem(64, 3, 2)
