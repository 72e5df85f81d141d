"""The emulated device targets: instruction set, compiler flags, TFLite Micro kernels and QEMU board of each.

A target is one core as a build sees it. The same definitions serve the TFLM library build (`tflm.py`), the
program build and the QEMU run (`runner.py`), so a library is never linked into a program with other flags.

| target     | QEMU board             | kernels        | real chips it stands for                          |
|------------|------------------------|----------------|---------------------------------------------------|
| cortex-m4  | mps2-an386, cortex-m4  | CMSIS-NN       | STM32L4R5 (stm32l4r5_tflm), nRF52, ...            |
| cortex-m7  | mps2-an500, cortex-m7  | CMSIS-NN       | STM32H7A3 (stm32h7a3_xcubeai), STM32F7, ...       |
| cortex-m33 | mps2-an505, cortex-m33 | CMSIS-NN       | EFR32MG24 (efr32mg24_tflm), nRF5340, STM32U5, ... |
| rv32imac   | virt, rv32             | TFLM reference | Andes D45 (andes_d45_tflm), SiFive E31, ...       |

QEMU counts instructions exactly but models no pipeline or memory timing: cycles come from the platform's cost
model on top of these counts (edgenas.energy), never from the emulator's clock.
"""
from __future__ import annotations

import dataclasses
import shutil
import subprocess

from edgenas.device import errors

# The C++ headers of Debian's Arm libstdc++ (the same GCC 12.2 release as the RISC-V compiler): TFLM needs
# headers only, and Debian has no bare-metal RISC-V libstdc++ package.
ARM_CXX_HEADERS = "/usr/include/newlib/c++/12.2.1"


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  family: str  # "cortex_m" or "riscv32": which start-up code and exit path
  description: str
  prefix: str  # toolchain prefix
  compile_flags: tuple[str, ...]  # architecture flags for every compile
  link_flags: tuple[str, ...]  # architecture and C library flags for the link
  tflm_make_options: str  # what create_tflm_tree.py gets: selects the kernels
  kernels: str
  qemu: str
  qemu_args: tuple[str, ...]
  compiler_packages: tuple[str, ...]  # Debian packages that provide the toolchain
  qemu_package: str
  linker_script: str  # in device/support/: the board's memory map (the sections of a family are shared)

  @property
  def nm(self) -> str:
    return self.prefix + "nm"

  def compiler_version(self) -> str:
    out = subprocess.run([self.prefix + "gcc", "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0].strip() if out.stdout else "unknown"

  def qemu_version(self) -> str:
    out = subprocess.run([self.qemu, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0].strip() if out.stdout else "unknown"


_CORTEX_M_PACKAGES = ("gcc-arm-none-eabi", "libnewlib-arm-none-eabi", "libstdc++-arm-none-eabi-newlib")
# -DARMCMx selects CMSIS's device header, which TFLM's Cortex-M timer code includes.
_CORTEX_M_DEFINES = ("-mthumb", "-mlittle-endian", "-DCMSIS_NN", "-DTF_LITE_MCU_DEBUG_LOG", "-funsigned-char")


def _cortex_m(name: str, cpu: str, fpu: str, board: str, armcm: str, description: str,
              tflm_arch: str | None = None, linker_script: str = "cortex_m_mps2.ld") -> Target:
  """`tflm_arch`: TFLM's TARGET_ARCH (default `cpu`+fp); `linker_script`: the board's memory map."""
  arch = (f"-mcpu={cpu}", f"-mfpu={fpu}", "-mfloat-abi=hard")
  return Target(
      name=name, family="cortex_m", description=description, prefix="arm-none-eabi-",
      compile_flags=arch + _CORTEX_M_DEFINES + (f"-D{armcm}", f"-DCMSIS_DEVICE_ARM_CORTEX_M_XX_HEADER_FILE=\"{armcm}.h\""),
      link_flags=arch + ("-mthumb", "-nostartfiles", "--specs=rdimon.specs"),
      tflm_make_options=(f"TARGET=cortex_m_generic TARGET_ARCH={tflm_arch or cpu + '+fp'} "
                         "OPTIMIZED_KERNEL_DIR=cmsis_nn"),
      kernels="CMSIS-NN", qemu="qemu-system-arm",
      qemu_args=("-M", board, "-cpu", cpu, "-nographic", "-semihosting", "-monitor", "none", "-serial", "none"),
      compiler_packages=_CORTEX_M_PACKAGES, qemu_package="qemu-system-arm", linker_script=linker_script)


TARGETS = {
    "cortex-m4": _cortex_m("cortex-m4", "cortex-m4", "fpv4-sp-d16", "mps2-an386", "ARMCM4",
                           "Arm Cortex-M4F (ARMv7E-M, DSP), QEMU mps2-an386, CMSIS-NN kernels"),
    "cortex-m7": _cortex_m("cortex-m7", "cortex-m7", "fpv5-d16", "mps2-an500", "ARMCM7",
                           "Arm Cortex-M7 (ARMv7E-M, DSP, double FPU), QEMU mps2-an500, CMSIS-NN kernels"),
    # TFLM's TARGET_ARCH cortex-m33 is the core with DSP and FPU (cortex-m33+nodsp is the bare one); ARMCM33.h
    # declares both present. The an505 boots Secure, so its memory map is another linker script.
    "cortex-m33": _cortex_m("cortex-m33", "cortex-m33", "fpv5-sp-d16", "mps2-an505", "ARMCM33",
                            "Arm Cortex-M33 (ARMv8-M Mainline, DSP, single FPU), QEMU mps2-an505, CMSIS-NN kernels",
                            tflm_arch="cortex-m33", linker_script="cortex_m_mps2_an505.ld"),
    # GCC 12 needs _zicsr in -march to assemble `csrr mcycle`, but then finds no picolibc multilib: the compile
    # gets the extension, the link does not (the instruction encoding is the same).
    "rv32imac": Target(
        name="rv32imac", family="riscv32", description="RISC-V RV32IMAC, QEMU virt, TFLM reference kernels",
        prefix="riscv64-unknown-elf-",
        compile_flags=("-march=rv32imac_zicsr", "-mabi=ilp32", "-mcmodel=medany", "--specs=picolibc.specs",
                       "-DTF_LITE_MCU_DEBUG_LOG", "-DTF_LITE_USE_GLOBAL_CMATH_FUNCTIONS", "-DTF_LITE_USE_GLOBAL_MIN",
                       "-DTF_LITE_USE_GLOBAL_MAX", "-funsigned-char", "-fno-delete-null-pointer-checks"),
        link_flags=("-march=rv32imac", "-mabi=ilp32", "-mcmodel=medany", "--specs=picolibc.specs",
                    "--oslib=semihost", "--crt0=semihost", "-mno-relax"),
        tflm_make_options="TARGET=riscv32_generic TARGET_TOOLCHAIN_PREFIX=riscv64-unknown-elf-",
        kernels="TFLM reference", qemu="qemu-system-riscv32",
        qemu_args=("-M", "virt", "-bios", "none", "-nographic", "-semihosting", "-monitor", "none", "-serial",
                   "none"),
        compiler_packages=("gcc-riscv64-unknown-elf", "picolibc-riscv64-unknown-elf",
                           "libstdc++-arm-none-eabi-newlib"),
        qemu_package="qemu-system-misc", linker_script="riscv_virt.ld"),
}
# What benchmarks/targets.py covers by default; CI builds every target's library (--targets=all).
DEFAULT_TARGETS = ("cortex-m4", "cortex-m7", "cortex-m33", "rv32imac")


def get_target(name: str) -> Target:
  try:
    return TARGETS[name]
  except KeyError:
    raise errors.DeviceError(f"unknown target {name!r}; targets: {', '.join(TARGETS)}") from None


def parse_targets(text: str) -> list[Target]:
  """'cortex-m4,rv32imac' (or 'all') -> targets, each named once."""
  names = list(TARGETS) if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
  if not names:
    raise errors.DeviceError("no target given; targets: " + ", ".join(TARGETS))
  return [get_target(n) for n in dict.fromkeys(names)]


def check_toolchain(target: Target) -> None:
  """Raises ToolchainMissingError naming the Debian package of the first tool `target` lacks."""
  missing = []
  if shutil.which(target.prefix + "gcc") is None or shutil.which(target.prefix + "g++") is None:
    missing.append((f"{target.prefix}gcc/g++", target.compiler_packages))
  if target.family == "riscv32":
    import os
    if not os.path.isdir(ARM_CXX_HEADERS):
      missing.append((f"the C++ headers in {ARM_CXX_HEADERS}", ("libstdc++-arm-none-eabi-newlib",)))
  if shutil.which(target.qemu) is None:
    missing.append((target.qemu, (target.qemu_package,)))
  if missing:
    what, packages = missing[0]
    raise errors.ToolchainMissingError(
        f"target {target.name}: {what} not found; install it with: apt-get install {' '.join(packages)}")
