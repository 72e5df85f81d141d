/*
 * Exit path for edgenas programs on QEMU's RISC-V "virt" board (qemu-system-riscv32
 * -M virt -bios none), linked with picolibc (--specs=picolibc.specs --oslib=semihost).
 *
 * QEMU 7.2 does not stop when picolibc's semihosting _exit runs: the program ends
 * and the emulator keeps going. This file replaces that _exit (picolibc keeps it
 * alone in its own libsemihost.a member, so linking this object first means the
 * archive's is never pulled in; no duplicate symbol). It powers the board off
 * through the SiFive test device ("sifive,test0", at 0x100000 on virt):
 *   write 0x5555                  -> QEMU exits with status 0
 *   write (code << 16) | 0x3333   -> QEMU exits with status `code`
 * picolibc's exit() runs atexit handlers and destructors, then calls this; stdio
 * on semihosting is unbuffered, so nothing is left to flush.
 *
 * The status is the low 8 bits of the guest's code, as a host process sees it; a
 * non-zero code whose low 8 bits are 0 exits with 1 so that failure stays failure.
 * picolibc's crt0-semihost trap handler prints the trap and calls _exit(1).
 */
#include <stdint.h>
#include <unistd.h>

#define EDGENAS_SIFIVE_TEST_ADDR 0x00100000u
#define EDGENAS_SIFIVE_TEST_FAIL 0x3333u
#define EDGENAS_SIFIVE_TEST_PASS 0x5555u

void _exit(int code) {
  volatile uint32_t *finisher = (volatile uint32_t *)EDGENAS_SIFIVE_TEST_ADDR;
  uint32_t status = (uint32_t)code & 0xffu;
  if (code != 0 && status == 0) status = 1;
  *finisher = status == 0 ? EDGENAS_SIFIVE_TEST_PASS : (status << 16) | EDGENAS_SIFIVE_TEST_FAIL;
  for (;;) __asm__ volatile("wfi");
}
