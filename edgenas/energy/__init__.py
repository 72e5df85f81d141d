"""Energy and memory model: per-platform profiles and lookup tables, a differentiable cost regressor, and
latency / energy / SRAM / flash estimates for any int8 network.

    from edgenas import cost, energy
    op_cost = energy.op_cost_fn("stm32l4r5_tflm", "energy_uj")
    expected_uj = cost.expected_cost(op_cost, space, probs, gate_fracs)      # differentiable
    soft_sram, flash = energy.expected_memory(space, probs, gate_fracs)     # differentiable
    report = energy.estimate_tflite("model.tflite", "stm32l4r5_tflm")      # or estimate_architecture(arch, ...)

Nothing here imports TensorFlow, LiteRT or tflite-micro at import time.
"""
from edgenas.energy.errors import EnergyModelError
from edgenas.energy.estimate import estimate_architecture, estimate_tflite, solution_power, battery_life
from edgenas.energy.memory import architecture_memory, expected_memory, tflite_memory
from edgenas.energy.platform import DEFAULT_PLATFORM, Platform, list_platforms, load_platform
from edgenas.energy.regressor import op_cost_fn

__all__ = ["EnergyModelError", "estimate_architecture", "estimate_tflite", "solution_power", "battery_life",
           "architecture_memory", "expected_memory", "tflite_memory", "DEFAULT_PLATFORM", "Platform",
           "list_platforms", "load_platform", "op_cost_fn"]
