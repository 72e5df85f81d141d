/*
 * Start-up code for edgenas programs on the Cortex-M cores of QEMU's MPS2 boards
 * (mps2-an386: Cortex-M4F, mps2-an500: Cortex-M7, mps2-an505: Cortex-M33 in
 * Secure state), linked with the board's script (cortex_m_mps2.ld,
 * cortex_m_mps2_an505.ld, both around cortex_m_sections.ld), -nostartfiles and
 * newlib's rdimon (semihosting) C library.
 *
 * Reset: point VTOR at the vector table, enable the FPU, on ARMv8-M set the
 * main stack limit (MSPLIM: an overflow faults instead of running into .bss),
 * copy .data from flash, zero .bss, open the semihosting console
 * (initialise_monitor_handles), run the constructors, call main() and exit()
 * with its result. exit() flushes stdio; the _exit() below then ends QEMU
 * with semihosting SYS_EXIT_EXTENDED, so qemu-system-arm's exit status is the
 * guest's exit code (low 8 bits; a non-zero code whose low 8 bits are 0 exits 1).
 *
 * Any exception other than reset (faults, NMI, unexpected interrupts) prints one
 * line "edgenas-fault: <name> pc=... lr=... cfsr=... hfsr=... mmfar=... bfar=..."
 * on the semihosting console and exits with EDGENAS_FAULT_EXIT_CODE.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define EDGENAS_FAULT_EXIT_CODE 99

/* Symbols of cortex_m_sections.ld. */
extern uint32_t __edgenas_data_load[];
extern uint32_t __edgenas_data_start[];
extern uint32_t __edgenas_data_end[];
extern uint32_t __edgenas_bss_start[];
extern uint32_t __edgenas_bss_end[];
extern uint32_t __edgenas_stack_top[];
extern uint32_t __edgenas_stack_limit[];

extern int main(void);
extern void initialise_monitor_handles(void);
extern void __libc_init_array(void);

void edgenas_reset(void) __attribute__((noreturn, used));
void edgenas_exception(void) __attribute__((naked, used));
void edgenas_fault_report(const uint32_t *frame, uint32_t ipsr, uint32_t exc_return)
    __attribute__((noreturn, used));

/* ---- semihosting (Arm "Angel" interface, BKPT 0xAB in Thumb state) ---- */

#define SEMIHOST_SYS_WRITE0 0x04u
#define SEMIHOST_SYS_EXIT 0x18u
#define SEMIHOST_SYS_EXIT_EXTENDED 0x20u
#define SEMIHOST_ADP_STOPPED_APPLICATION_EXIT 0x20026u
#define SEMIHOST_ADP_STOPPED_RUNTIME_ERROR 0x20023u

static uint32_t semihost_call(uint32_t op, const void *arg) {
  register uint32_t r0 __asm__("r0") = op;
  register const void *r1 __asm__("r1") = arg;
  __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
  return r0;
}

static void semihost_puts(const char *s) { semihost_call(SEMIHOST_SYS_WRITE0, s); }

/*
 * Ends the emulation with `code` as QEMU's exit status. SYS_EXIT_EXTENDED carries
 * the code; the plain SYS_EXIT fallback (if QEMU ever ignores the extended call)
 * can only say success (0) or failure (1).
 */
static void __attribute__((noreturn)) semihost_exit(int code) {
  uint32_t status = (uint32_t)code & 0xffu;
  if (code != 0 && status == 0) status = 1;
  uint32_t block[2] = {SEMIHOST_ADP_STOPPED_APPLICATION_EXIT, status};
  semihost_call(SEMIHOST_SYS_EXIT_EXTENDED, block);
  semihost_call(SEMIHOST_SYS_EXIT,
                (const void *)(status == 0 ? SEMIHOST_ADP_STOPPED_APPLICATION_EXIT
                                           : SEMIHOST_ADP_STOPPED_RUNTIME_ERROR));
  for (;;) __asm__ volatile("wfi");
}

/*
 * Replaces librdimon's _exit (its own archive member, so there is no clash).
 * newlib's passes the status through too, but only after probing QEMU for
 * SYS_EXIT_EXTENDED support (it does on QEMU 7.2); this one needs no probe and
 * never turns a non-zero code into 0.
 */
void _exit(int code) { semihost_exit(code); }

/* newlib's __libc_init_array calls _init(); crti.o, which defines it, is not linked under -nostartfiles. */
void __attribute__((weak)) _init(void) {}
void __attribute__((weak)) _fini(void) {}

/* ---- reset ---- */

typedef void (*edgenas_vector_t)(void);
extern const edgenas_vector_t edgenas_vectors[];

void edgenas_reset(void) {
  /* VTOR: the boards boot from their table (at 0, or INITSVTOR0 = 0x10000000 on the an505); say so anyway. */
  *(volatile uint32_t *)0xE000ED08u = (uint32_t)edgenas_vectors;
#if defined(__ARM_ARCH_8M_MAIN__) || defined(__ARM_ARCH_8M_BASE__) || defined(__ARM_ARCH_8_1M_MAIN__)
  /* Reset leaves MSPLIM at 0 (no limit); a push below the reserved stack now faults (STKOF in CFSR). */
  __asm__ volatile("msr msplim, %0" : : "r"(__edgenas_stack_limit) : "memory");
#endif
#if defined(__ARM_FP)
  /* CPACR: full access to CP10 and CP11 (the FPU), before any floating-point instruction (on ARMv8-M the
     Secure CPACR, the state the an505 runs in). */
  volatile uint32_t *cpacr = (volatile uint32_t *)0xE000ED88u;
  *cpacr |= 0xFu << 20;
  __asm__ volatile("dsb\n\tisb" ::: "memory");
#endif
  size_t data_size = (size_t)((char *)__edgenas_data_end - (char *)__edgenas_data_start);
  if (data_size != 0) memcpy(__edgenas_data_start, __edgenas_data_load, data_size);
  memset(__edgenas_bss_start, 0, (size_t)((char *)__edgenas_bss_end - (char *)__edgenas_bss_start));
  initialise_monitor_handles();
  __libc_init_array();
  exit(main());
}

/* ---- exceptions ---- */

static const char *exception_name(uint32_t number) {
  switch (number) {
    case 2: return "NMI";
    case 3: return "HardFault";
    case 4: return "MemManage";
    case 5: return "BusFault";
    case 6: return "UsageFault";
    case 7: return "SecureFault";
    case 11: return "SVCall";
    case 12: return "DebugMonitor";
    case 14: return "PendSV";
    case 15: return "SysTick";
    default: return number >= 16 ? "IRQ" : "reserved exception";
  }
}

static char *append(char *p, const char *s) {
  while (*s) *p++ = *s++;
  return p;
}

static char *append_hex(char *p, const char *label, uint32_t value) {
  p = append(p, label);
  *p++ = '0';
  *p++ = 'x';
  for (int shift = 28; shift >= 0; shift -= 4) *p++ = "0123456789abcdef"[(value >> shift) & 0xfu];
  return p;
}

/*
 * Entered from every vector but reset: pass the stacked exception frame (on MSP or
 * PSP, as EXC_RETURN bit 2 says), IPSR and EXC_RETURN to the reporter. After a
 * stack overflow on ARMv8-M the frame is not stacked (the core stops at MSPLIM),
 * so pc and lr are then stale; cfsr's STKOF bit (0x00100000) says which it was.
 */
void edgenas_exception(void) {
  __asm__ volatile(
#if defined(__ARM_ARCH_8M_MAIN__) || defined(__ARM_ARCH_8M_BASE__) || defined(__ARM_ARCH_8_1M_MAIN__)
      /* Drop the stack limit: after a stack overflow the reporter itself runs below it. */
      "movs r0, #0\n\t"
      "msr msplim, r0\n\t"
#endif
      "tst lr, #4\n\t"
      "ite eq\n\t"
      "mrseq r0, msp\n\t"
      "mrsne r0, psp\n\t"
      "mrs r1, ipsr\n\t"
      "mov r2, lr\n\t"
      "b edgenas_fault_report\n\t");
}

void edgenas_fault_report(const uint32_t *frame, uint32_t ipsr, uint32_t exc_return) {
  volatile const uint32_t *scb = (volatile const uint32_t *)0xE000ED28u; /* CFSR, HFSR, DFSR, MMFAR, BFAR */
  uint32_t number = ipsr & 0x1ffu;
  char line[224];
  char *p = append(line, "edgenas-fault: ");
  p = append(p, exception_name(number));
  p = append_hex(p, " exception=", number);
  p = append_hex(p, " pc=", frame[6]);
  p = append_hex(p, " lr=", frame[5]);
  p = append_hex(p, " cfsr=", scb[0]);
  p = append_hex(p, " hfsr=", scb[1]);
  p = append_hex(p, " mmfar=", scb[3]);
  p = append_hex(p, " bfar=", scb[4]);
#if defined(__ARM_ARCH_8M_MAIN__) || defined(__ARM_ARCH_8_1M_MAIN__)
  p = append_hex(p, " sfsr=", *(volatile const uint32_t *)0xE000EDE4u); /* SecureFault status (IDAU, SAU) */
#endif
  p = append_hex(p, " exc_return=", exc_return);
  *p++ = '\n';
  *p = '\0';
  semihost_puts(line);
  semihost_exit(EDGENAS_FAULT_EXIT_CODE);
}

/*
 * The vector table, placed at the start of FLASH by the linker script: initial
 * stack pointer, reset, the 14 system exceptions and the first 32 interrupts
 * (the MPS2 boards' own count; nothing enables an interrupt, the an505's higher
 * ones included).
 */
__attribute__((section(".isr_vector"), used)) const edgenas_vector_t edgenas_vectors[16 + 32] = {
    [0] = (edgenas_vector_t)__edgenas_stack_top,
    [1] = edgenas_reset,
    [2 ... 16 + 32 - 1] = edgenas_exception,
};
