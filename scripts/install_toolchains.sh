#!/usr/bin/env bash
# Installs what running exports on emulated cores needs, from Debian's packages: the Arm and RISC-V bare-metal
# cross compilers with their C libraries, and QEMU for both. About 1.5 minutes and 4 GB on a fresh machine.
# The TFLite Micro sources come from TFLM_DIR, or from ../shared/third_party/tflite-micro/ next to the repository.
set -euo pipefail
packages=(gcc-arm-none-eabi libnewlib-arm-none-eabi libstdc++-arm-none-eabi-newlib qemu-system-arm
          gcc-riscv64-unknown-elf picolibc-riscv64-unknown-elf qemu-system-misc)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq "${missing[@]}" > /dev/null
echo "installed: ${missing[*]}"
