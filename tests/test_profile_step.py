"""benchmarks/profile_step.py attributes a profiled step's operations to phases and supernet parts."""
import collections

from benchmarks import profile_step

HLO = """
HloModule jit_weight_step
  %ynn_fusion.1 = f32[65536,96]{1,0} fusion(%a, %b), kind=kCustom, metadata={op_name="jit(weight_step)/jvp(Supernet)/layer_0/layer_0._run/cand_8_k7e6/expand_bn.after_pointwise/nhwc,cd->nhwd/dot_general"}
  %slice_add_fusion.2 = f32[4,32,32,48]{3,2,1,0} fusion(%c), kind=kLoop, metadata={op_name="jit(weight_step)/transpose(jvp(Supernet))/layer_0/layer_0._run/cand_7_k7e3/depthwise/while/body/closed_call/add"}
  %while.3 = (s32[], f32[49,48]{1,0}) while(%t), condition=%cond, body=%body, metadata={op_name="jit(weight_step)/transpose(jvp(Supernet))/layer_0/layer_0._run/cand_7_k7e3/depthwise/while"}
  %conditional.4 = (f32[64,32,32,16]{3,2,1,0}) conditional(%p, %g, %g), metadata={op_name="jit(weight_step)/transpose(jvp(Supernet))/fusion_boundary/cond"}
  %copy.5 = f32[64,32,32,16]{3,2,1,0} copy(%g), metadata={op_name="jit(weight_step)/transpose(jvp(Supernet))/layer_1/fusion_boundary/cond/branch_1_fun/copy"}
  %add.6 = f32[10]{0} add(%x, %y), metadata={op_name="jit(weight_step)/add"}
"""


def test_operations_are_attributed_by_phase_and_part_and_containers_are_not_counted_twice():
  times = collections.Counter({"ynn_fusion.1": 30.0, "slice_add_fusion.2": 50.0, "copy.5": 4.0, "add.6": 1.0})
  out = profile_step.attribute(times, HLO)
  parts = {(r["phase"], r["part"]): r["ms"] for r in out["by_part_ms"]}
  assert parts == {("forward", "expand 1x1 conv + BatchNorm"): 30.0, ("backward", "depthwise conv"): 50.0,
                   ("backward", "fusion boundary"): 4.0, ("forward", "optimizer, cost, other"): 1.0}
  assert out["by_phase_ms"] == {"backward": 54.0, "forward": 31.0}
  assert out["thread_ms"] == 85.0
  assert [r["op"] for r in out["largest_ops"]] == ["slice_add_fusion.2", "ynn_fusion.1", "copy.5", "add.6"]
  # A loop's or a conditional's own event spans the operations inside it: the trace reader drops it.
  assert profile_step.CONTAINER.match("while.3") and profile_step.CONTAINER.match("conditional.4")
  assert not profile_step.CONTAINER.match("while_fusion.3")
