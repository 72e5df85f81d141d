"""Search space validation and the operator specs it is priced with."""
import pytest

from edgenas import ops, space
from experiments import digits


def digits_space(**overrides):
  cfg = dict(digits.get_config().space)
  cfg.update(input_shape=(8, 8, 1), num_classes=10, **overrides)
  return space.SearchSpace.from_config(cfg)


def test_digits_space_slots_offer_skip_only_where_shapes_match():
  s = digits_space()
  slots = s.slots()
  assert [sl.stride for sl in slots] == [1, 1, 2, 1]
  names = [[c.name for c in sl.candidates] for sl in slots]
  assert names[0][-1] == "skip" and "skip" not in names[2]  # stage 2 changes 16 -> 32 channels
  assert len(names[2]) == 9 and len(names[0]) == 10


@pytest.mark.parametrize("overrides, field", [
    (dict(stages=[dict(layers=1, channels=8, stride=2)] * 5), "space.stages[3].stride"),
    (dict(kernels=()), "space.kernels"),
    (dict(stages=[dict(layers=1, channels=0, stride=1)]), "space.stages[0].channels"),
    (dict(stem=dict(channels=-3, kernel=3, stride=1)), "space.stem.channels"),
    (dict(stages=[dict(layers=1, stride=1)]), "space.stages[0].channels"),
    (dict(kernels=(4,)), "space.kernels"),
])
def test_impossible_spaces_are_refused_naming_the_field(overrides, field):
  with pytest.raises(space.SpaceError, match=field.replace("[", r"\[").replace("]", r"\]")):
    digits_space(**overrides)


def test_op_features_are_consistent_with_counts():
  spec = ops.OpSpec(ops.CONV_2D, 8, 8, 4, 6, 3, 2)
  macs, wbytes, abytes, const = spec.features()
  assert macs == 4 * 4 * 6 * 9 * 4
  assert wbytes == 9 * 4 * 6 + 4 * 6
  assert abytes == 8 * 8 * 4 + 4 * 4 * 6 and const == 1.0
  with pytest.raises(ValueError, match="unknown operator type 'gelu'"):
    ops.OpSpec("gelu", 1, 1, 1, 1)
