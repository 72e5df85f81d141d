/*
 * edgenas_icount: a QEMU TCG plugin (plugin API version 1, QEMU 7.2) that counts
 * the guest instructions executed and logs the count each time the guest reaches a
 * marker address.
 *
 *   qemu-system-... -plugin /path/libedgenas_icount.so,marker=0xADDR,out=/path/log.txt
 *                           [,flash=LO-HI][,ram=LO-HI][,mem=on][,classes=on][,dump=PATH]
 *
 * Each time the instruction at `marker` is about to execute it appends
 *   M <instructions before it> [<flash reads> <ram reads> <ram writes>]
 * to `out`, and when QEMU exits
 *   T <instructions in all> [<flash reads> <ram reads> <ram writes>]
 * The memory columns appear with mem=on: guest data accesses (loads and stores,
 * not instruction fetches, not semihosting's own copies) whose address lies in
 * [LO, HI) of flash= or ram=, counted per access whatever its width. Addresses are
 * numbers in C syntax (0x.. hex, 0.. octal, decimal); a bit 0 in marker (a Thumb
 * function symbol) is ignored, since instruction addresses are always even.
 *
 * With classes=on every M and T line ends with ` C <n_0> ... <n_K-1>`: the executed
 * instructions per class (alu, mul, div, load, mem_pipelined, store, mem_pair,
 * mem_multi, branch, cond_branch, fp, other; they sum to the instruction count)
 * followed by three event counts (multi_regs: registers moved by LDM/STM/PUSH/POP;
 * cond_taken: conditional branches taken; pc_loads: loads that write the PC). The
 * first line of the log, `H <names...>`, names them. Classes come from the
 * instruction's disassembly at translation time (Thumb-2 and RV32 mnemonics); a
 * conditional branch ends its TB, so whether it was taken is known at the next TB
 * entry: if that TB does not start at the branch's fall-through address. `dump=PATH`
 * writes each translated instruction's address, class and disassembly (for tests).
 * `mem_pipelined` is a single load or store that directly follows a single load in
 * the same TB: the Cortex-M3/M4 pipeline overlaps it (one cycle less, per their TRMs).
 *
 * Counting: on entering a translation block (TB) an inline add puts the block's
 * whole instruction count on the counter; the marker callback, placed on the
 * marker's own instruction, subtracts the instructions of its TB that have not yet
 * run (the marker's and those after it). So the M value is exact however QEMU cuts
 * the code into blocks. A TB left half-way by a synchronous exception (a guest
 * fault) would be over-counted by its untaken tail; ebreak/bkpt semihosting calls
 * end their TB, so they are not. Single-vCPU boards only: the counters are shared
 * and not atomic.
 *
 * QEMU installs no qemu-plugin.h on Debian; the declarations below are written
 * from the API version 1 documentation of QEMU 7.2 (only what this file uses).
 * Build: cc -shared -fPIC -O2 -o libedgenas_icount.so edgenas_icount.c
 */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- QEMU plugin API, version 1 (QEMU 7.2) ---- */

#define EDGENAS_PLUGIN_EXPORT __attribute__((visibility("default")))

typedef uint64_t qemu_plugin_id_t;
typedef uint32_t qemu_plugin_meminfo_t;

typedef struct {
  const char *target_name;
  struct {
    int min;
    int cur;
  } version;
  bool system_emulation;
  union {
    struct {
      int smp_vcpus;
      int max_vcpus;
    } system;
  };
} qemu_info_t;

struct qemu_plugin_tb;
struct qemu_plugin_insn;

enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS = 0, QEMU_PLUGIN_CB_R_REGS = 1, QEMU_PLUGIN_CB_RW_REGS = 2 };
enum qemu_plugin_mem_rw { QEMU_PLUGIN_MEM_R = 1, QEMU_PLUGIN_MEM_W = 2, QEMU_PLUGIN_MEM_RW = 3 };
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 = 0 };

typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);
typedef void (*qemu_plugin_vcpu_udata_cb_t)(unsigned int vcpu_index, void *userdata);
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_vcpu_mem_cb_t)(unsigned int vcpu_index, qemu_plugin_meminfo_t info, uint64_t vaddr,
                                          void *userdata);

extern void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
extern void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op, void *ptr,
                                                     uint64_t imm);
extern void qemu_plugin_register_vcpu_insn_exec_cb(struct qemu_plugin_insn *insn, qemu_plugin_vcpu_udata_cb_t cb,
                                                   enum qemu_plugin_cb_flags flags, void *userdata);
extern void qemu_plugin_register_vcpu_mem_cb(struct qemu_plugin_insn *insn, qemu_plugin_vcpu_mem_cb_t cb,
                                             enum qemu_plugin_cb_flags flags, enum qemu_plugin_mem_rw rw,
                                             void *userdata);
extern void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb, qemu_plugin_vcpu_udata_cb_t cb,
                                                 enum qemu_plugin_cb_flags flags, void *userdata);
extern void qemu_plugin_register_vcpu_insn_exec_inline(struct qemu_plugin_insn *insn, enum qemu_plugin_op op,
                                                       void *ptr, uint64_t imm);
extern uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *tb);
extern size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *insn);
extern char *qemu_plugin_insn_disas(const struct qemu_plugin_insn *insn);
extern void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb, void *userdata);
extern size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
extern struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
extern uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *insn);
extern bool qemu_plugin_mem_is_store(qemu_plugin_meminfo_t info);

EDGENAS_PLUGIN_EXPORT extern int qemu_plugin_version;
EDGENAS_PLUGIN_EXPORT int qemu_plugin_version = 1;

/* ---- state ---- */

typedef struct {
  uint64_t lo, hi; /* [lo, hi) */
  bool set;
} range_t;

static uint64_t insns;        /* instructions of every TB entered so far (inline add) */
static uint64_t flash_reads;  /* data loads from the flash range */
static uint64_t ram_reads;    /* data loads from the RAM range */
static uint64_t ram_writes;   /* data stores to the RAM range */
static uint64_t marker_addr;
static bool count_mem;
static range_t flash_range, ram_range;
static FILE *out;
static const char *out_path;

/* ---- instruction classes (classes=on) ---- */

enum {
  C_ALU, C_MUL, C_DIV, C_LOAD, C_MEM_PIPELINED, C_STORE, C_MEM_PAIR, C_MEM_MULTI, C_BRANCH, C_COND_BRANCH, C_FP,
  C_OTHER, N_CLASSES, /* exclusive: one per instruction */
  E_MULTI_REGS = N_CLASSES, E_COND_TAKEN, E_PC_LOADS, N_COUNTERS /* events, on top */
};
static const char *const counter_names[N_COUNTERS] = {
    "alu", "mul", "div", "load", "mem_pipelined", "store", "mem_pair", "mem_multi", "branch", "cond_branch", "fp",
    "other", "multi_regs", "cond_taken", "pc_loads"};

static bool count_classes;
static bool isa_riscv;               /* else Arm Thumb-2 */
static uint64_t counters[N_COUNTERS];
static uint64_t pending_fallthrough; /* set by a TB-ending conditional branch, resolved at the next TB entry */
static FILE *dump;
static const char *dump_path;

typedef struct {
  uint64_t insns;                 /* instructions of the marker's TB not yet run at the marker */
  uint64_t counters[N_COUNTERS];  /* the same, per class and event (cond_taken excluded) */
} tail_t;

/* ---- callbacks ---- */

static void write_counts(char kind, uint64_t count, const tail_t *tail) {
  if (out == NULL) return;
  if (count_mem)
    fprintf(out, "%c %" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64, kind, count, flash_reads, ram_reads,
            ram_writes);
  else
    fprintf(out, "%c %" PRIu64, kind, count);
  if (count_classes) {
    fputs(" C", out);
    for (int c = 0; c < N_COUNTERS; c++) fprintf(out, " %" PRIu64, counters[c] - (tail ? tail->counters[c] : 0));
  }
  fputc('\n', out);
  /* Markers are rare (a few per inference); flushing keeps the log whole if QEMU is killed. */
  fflush(out);
}

/* userdata: a tail_t, what the marker's TB counted at entry that has not run yet. */
static void on_marker(unsigned int vcpu_index, void *userdata) {
  (void)vcpu_index;
  const tail_t *tail = (const tail_t *)userdata;
  write_counts('M', insns - tail->insns, tail);
}

/* userdata: the fall-through address of the TB's closing conditional branch. */
static void on_cond_branch(unsigned int vcpu_index, void *userdata) {
  (void)vcpu_index;
  pending_fallthrough = (uint64_t)(uintptr_t)userdata;
}

/* userdata: the TB's start address. */
static void on_tb_exec(unsigned int vcpu_index, void *userdata) {
  (void)vcpu_index;
  if (pending_fallthrough != 0) {
    if ((uint64_t)(uintptr_t)userdata != pending_fallthrough) counters[E_COND_TAKEN]++;
    pending_fallthrough = 0;
  }
}

/* ---- classification from the disassembly ---- */

static bool starts(const char *s, const char *prefix) { return strncmp(s, prefix, strlen(prefix)) == 0; }

static bool in_list(const char *s, const char *const *list) {
  for (; *list != NULL; list++)
    if (strcmp(s, *list) == 0) return true;
  return false;
}

static const char *const arm_conditions[] = {"eq", "ne", "cs", "hs", "cc", "lo", "mi", "pl", "vs",
                                             "vc", "hi", "ls", "ge", "lt", "gt", "le", NULL};

/* Registers in a {..} list, ranges like r4-r7 included; *pc set if the list holds pc. */
static int register_list(const char *operands, bool *pc) {
  const char *open = strchr(operands, '{'), *close = open ? strchr(open, '}') : NULL;
  *pc = false;
  if (open == NULL || close == NULL) return 1;
  int n = 0;
  const char *p = open + 1;
  while (p < close) {
    while (p < close && (*p == ' ' || *p == ',')) p++;
    if (p >= close) break;
    const char *end = p;
    while (end < close && *end != ',') end++;
    char item[32];
    size_t len = (size_t)(end - p) < sizeof item - 1 ? (size_t)(end - p) : sizeof item - 1;
    memcpy(item, p, len);
    item[len] = '\0';
    while (len > 0 && item[len - 1] == ' ') item[--len] = '\0';
    char *dash = strchr(item, '-');
    int lo, hi;
    if (dash != NULL && sscanf(item, "r%d-r%d", &lo, &hi) == 2 && hi >= lo) {
      n += hi - lo + 1;
      if (hi >= 15) *pc = true;
    } else {
      n++;
      if (strcmp(item, "pc") == 0 || strcmp(item, "r15") == 0) *pc = true;
    }
    p = end;
  }
  return n > 0 ? n : 1;
}

/* Thumb-2 (ARMv7-M / ARMv8-M Mainline): the class of `mnemonic` (".w"/".n" already stripped). */
static int classify_arm(const char *m, const char *operands, int *regs, bool *pc_load) {
  static const char *const branches[] = {"b", "bl", "blx", "bx", "tbb", "tbh", NULL};
  static const char *const others[] = {"nop", "dmb", "dsb", "isb", "svc", "bkpt", "wfi", "wfe", "sev", "mrs",
                                       "msr", "udf", "cpsie", "cpsid", "yield", NULL};
  *regs = 0;
  *pc_load = false;
  if (in_list(m, branches)) return C_BRANCH;
  if (strcmp(m, "cbz") == 0 || strcmp(m, "cbnz") == 0) return C_COND_BRANCH;
  if (m[0] == 'b') {  /* b<cc>, bx<cc>, bl<cc>: conditional forms (the last two only inside an IT block) */
    const char *rest = m + 1;
    if (starts(rest, "lx")) rest += 2;
    else if (starts(rest, "x") || (starts(rest, "l") && !in_list(rest, arm_conditions))) rest += 1;
    if (in_list(rest, arm_conditions)) return C_COND_BRANCH;
  }
  if (starts(m, "it") || in_list(m, others)) return C_OTHER;
  if (m[0] == 'v') return C_FP;
  if (starts(m, "sdiv") || starts(m, "udiv")) return C_DIV;
  if (starts(m, "mul") || starts(m, "mla") || starts(m, "mls") || starts(m, "smul") || starts(m, "smla") ||
      starts(m, "smls") || starts(m, "smmul") || starts(m, "smmla") || starts(m, "smmls") || starts(m, "smuad") ||
      starts(m, "smusd") || starts(m, "umul") || starts(m, "umla") || starts(m, "umaal"))
    return C_MUL;
  if (starts(m, "ldm") || starts(m, "stm") || starts(m, "push") || starts(m, "pop")) {
    bool pc;
    *regs = register_list(operands, &pc);
    *pc_load = pc && (starts(m, "ldm") || starts(m, "pop"));
    return C_MEM_MULTI;
  }
  if (starts(m, "ldrd") || starts(m, "strd")) return C_MEM_PAIR;
  if (starts(m, "ldr") || starts(m, "lda")) {
    *pc_load = starts(operands, "pc");
    return C_LOAD;
  }
  if (starts(m, "str") || starts(m, "stl")) return C_STORE;
  return C_ALU;
}

/* RV32IMAC: the class of `mnemonic` (a "c." prefix already stripped). */
static int classify_riscv(const char *m) {
  static const char *const loads[] = {"lb", "lh", "lw", "lbu", "lhu", "lwsp", "lr.w", NULL};
  static const char *const stores[] = {"sb", "sh", "sw", "swsp", "sc.w", NULL};
  static const char *const muls[] = {"mul", "mulh", "mulhsu", "mulhu", NULL};
  static const char *const divs[] = {"div", "divu", "rem", "remu", NULL};
  static const char *const conds[] = {"beq", "bne", "blt", "bge", "bltu", "bgeu", "beqz", "bnez", "blez", "bgez",
                                      "bltz", "bgtz", "bgt", "ble", "bgtu", "bleu", NULL};
  static const char *const jumps[] = {"jal", "jalr", "j", "jr", "ret", "call", "tail", NULL};
  static const char *const others[] = {"ecall", "ebreak", "fence", "fence.i", "wfi", "mret", "nop", "unimp", NULL};
  if (in_list(m, loads)) return C_LOAD;
  if (in_list(m, stores)) return C_STORE;
  if (in_list(m, muls)) return C_MUL;
  if (in_list(m, divs)) return C_DIV;
  if (in_list(m, conds)) return C_COND_BRANCH;
  if (in_list(m, jumps)) return C_BRANCH;
  if (in_list(m, others) || starts(m, "csr")) return C_OTHER;
  if (starts(m, "amo")) return C_MEM_PAIR;  /* read-modify-write: two accesses */
  if (m[0] == 'f') return C_FP;
  return C_ALU;
}

/* Class of one instruction from its disassembly "mnemonic operands". */
static int classify(const char *disas, int *regs, bool *pc_load) {
  char mnemonic[24];
  size_t i = 0;
  while (*disas == ' ' || *disas == '\t') disas++;
  if (isa_riscv) {
    /* QEMU's RISC-V disassembler starts with the encoding (4 or 8 hex digits); no RV32 mnemonic is all hex. */
    size_t n = 0;
    while (isxdigit((unsigned char)disas[n])) n++;
    if ((n == 4 || n == 8) && (disas[n] == ' ' || disas[n] == '\t')) {
      disas += n;
      while (*disas == ' ' || *disas == '\t') disas++;
    }
  }
  while (disas[i] != '\0' && disas[i] != ' ' && disas[i] != '\t' && i < sizeof mnemonic - 1) {
    mnemonic[i] = (char)(disas[i] >= 'A' && disas[i] <= 'Z' ? disas[i] - 'A' + 'a' : disas[i]);
    i++;
  }
  mnemonic[i] = '\0';
  const char *operands = disas + i;
  while (*operands == ' ' || *operands == '\t') operands++;
  *regs = 0;
  *pc_load = false;
  if (isa_riscv) {
    const char *m = starts(mnemonic, "c.") ? mnemonic + 2 : mnemonic;
    return classify_riscv(m);
  }
  size_t len = strlen(mnemonic);
  if (len > 2 && (strcmp(mnemonic + len - 2, ".w") == 0 || strcmp(mnemonic + len - 2, ".n") == 0))
    mnemonic[len - 2] = '\0';
  return classify_arm(mnemonic, operands, regs, pc_load);
}

static void on_mem(unsigned int vcpu_index, qemu_plugin_meminfo_t info, uint64_t vaddr, void *userdata) {
  (void)vcpu_index;
  (void)userdata;
  if (qemu_plugin_mem_is_store(info)) {
    if (ram_range.set && vaddr >= ram_range.lo && vaddr < ram_range.hi) ram_writes++;
  } else if (flash_range.set && vaddr >= flash_range.lo && vaddr < flash_range.hi) {
    flash_reads++;
  } else if (ram_range.set && vaddr >= ram_range.lo && vaddr < ram_range.hi) {
    ram_reads++;
  }
}

static void on_tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
  (void)id;
  size_t n = qemu_plugin_tb_n_insns(tb);
  qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insns, n);
  /* Per instruction: its class and event counts; per TB they are added on entry like the instruction count. */
  uint8_t cls[512], regs_of[512];  /* per instruction of the TB (at most 512, QEMU's limit) */
  bool pc_load_of[512];
  uint64_t in_tb[N_COUNTERS] = {0};
  int marker_index = -1;
  bool after_load = false;
  if (count_classes) {
    qemu_plugin_register_vcpu_tb_exec_cb(tb, on_tb_exec, QEMU_PLUGIN_CB_NO_REGS,
                                         (void *)(uintptr_t)qemu_plugin_tb_vaddr(tb));
  }
  for (size_t i = 0; i < n; i++) {
    struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
    if (qemu_plugin_insn_vaddr(insn) == marker_addr) marker_index = (int)i;
    if (count_mem) qemu_plugin_register_vcpu_mem_cb(insn, on_mem, QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_MEM_RW, NULL);
    if (!count_classes) continue;
    char *text = qemu_plugin_insn_disas(insn);
    int regs;
    bool pc_load;
    int c = classify(text ? text : "", &regs, &pc_load);
    if (!isa_riscv && (c == C_LOAD || c == C_STORE) && after_load) c = C_MEM_PIPELINED;
    /* A single load pipelines the next single load or store; nothing pipelines after a store (M3/M4 TRM). */
    after_load = !isa_riscv && !pc_load && text != NULL && (c == C_LOAD || (c == C_MEM_PIPELINED && starts(text, "ldr")));
    if (i < sizeof cls) {
      cls[i] = (uint8_t)c;
      regs_of[i] = (uint8_t)regs;
      pc_load_of[i] = pc_load;
    }
    in_tb[c]++;
    in_tb[E_MULTI_REGS] += (uint64_t)regs;
    in_tb[E_PC_LOADS] += pc_load ? 1 : 0;
    if (dump != NULL)
      fprintf(dump, "%#" PRIx64 " %s %s\n", qemu_plugin_insn_vaddr(insn), counter_names[c], text ? text : "?");
    if (c == C_COND_BRANCH && i + 1 == n)
      qemu_plugin_register_vcpu_insn_exec_cb(
          insn, on_cond_branch, QEMU_PLUGIN_CB_NO_REGS,
          (void *)(uintptr_t)(qemu_plugin_insn_vaddr(insn) + qemu_plugin_insn_size(insn)));
    free(text);
  }
  if (count_classes)
    for (int c = 0; c < N_COUNTERS; c++)
      if (in_tb[c] != 0) qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &counters[c], in_tb[c]);
  if (marker_index >= 0) {
    /* Markers are few: one small record per translation of the marker's TB (never freed; TBs are rarely
       retranslated on these boards). */
    tail_t *tail = calloc(1, sizeof *tail);
    if (tail == NULL) {
      fprintf(stderr, "edgenas_icount: out of memory\n");
      abort();
    }
    tail->insns = n - (size_t)marker_index;
    if (count_classes) {
      for (size_t i = (size_t)marker_index; i < n && i < sizeof cls; i++) {
        tail->counters[cls[i]]++;
        tail->counters[E_MULTI_REGS] += regs_of[i];
        tail->counters[E_PC_LOADS] += pc_load_of[i] ? 1 : 0;
      }
    }
    qemu_plugin_register_vcpu_insn_exec_cb(qemu_plugin_tb_get_insn(tb, (size_t)marker_index), on_marker,
                                           QEMU_PLUGIN_CB_NO_REGS, tail);
  }
}

static void on_qemu_exit(qemu_plugin_id_t id, void *userdata) {
  (void)id;
  (void)userdata;
  write_counts('T', insns, NULL);
  if (out != NULL && fclose(out) != 0) fprintf(stderr, "edgenas_icount: closing %s: %s\n", out_path, strerror(errno));
  out = NULL;
  if (dump != NULL && fclose(dump) != 0)
    fprintf(stderr, "edgenas_icount: closing %s: %s\n", dump_path, strerror(errno));
  dump = NULL;
}

/* ---- arguments ---- */

static bool parse_u64(const char *text, uint64_t *value) {
  char *end;
  if (*text == '\0' || *text == '-') return false;
  errno = 0;
  unsigned long long v = strtoull(text, &end, 0);
  if (errno != 0 || *end != '\0') return false;
  *value = (uint64_t)v;
  return true;
}

static bool parse_range(const char *text, range_t *range) {
  const char *dash = strchr(text, '-');
  if (dash == NULL || (size_t)(dash - text) >= 64) return false;
  char lo[64];
  memcpy(lo, text, (size_t)(dash - text));
  lo[dash - text] = '\0';
  if (!parse_u64(lo, &range->lo) || !parse_u64(dash + 1, &range->hi) || range->hi <= range->lo) return false;
  range->set = true;
  return true;
}

/* on/true/1 or off/false/0. */
static bool parse_switch(const char *text, bool *value) {
  if (strcmp(text, "on") == 0 || strcmp(text, "true") == 0 || strcmp(text, "1") == 0) {
    *value = true;
  } else if (strcmp(text, "off") == 0 || strcmp(text, "false") == 0 || strcmp(text, "0") == 0) {
    *value = false;
  } else {
    return false;
  }
  return true;
}

static int bad_arg(const char *arg, const char *why) {
  fprintf(stderr, "edgenas_icount: bad argument '%s': %s\n", arg, why);
  return -1;
}

EDGENAS_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv);

EDGENAS_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv) {
  bool have_marker = false;
  out_path = NULL;
  for (int i = 0; i < argc; i++) {
    const char *arg = argv[i];
    const char *eq = strchr(arg, '=');
    if (eq == NULL) return bad_arg(arg, "expected key=value");
    size_t klen = (size_t)(eq - arg);
    const char *value = eq + 1;
    if (klen == 6 && strncmp(arg, "marker", 6) == 0) {
      if (!parse_u64(value, &marker_addr)) return bad_arg(arg, "marker=ADDRESS");
      marker_addr &= ~(uint64_t)1;
      have_marker = true;
    } else if (klen == 3 && strncmp(arg, "out", 3) == 0) {
      if (*value == '\0') return bad_arg(arg, "out=PATH");
      out_path = value;
    } else if (klen == 5 && strncmp(arg, "flash", 5) == 0) {
      if (!parse_range(value, &flash_range)) return bad_arg(arg, "flash=LO-HI with LO < HI");
    } else if (klen == 3 && strncmp(arg, "ram", 3) == 0) {
      if (!parse_range(value, &ram_range)) return bad_arg(arg, "ram=LO-HI with LO < HI");
    } else if (klen == 3 && strncmp(arg, "mem", 3) == 0) {
      if (!parse_switch(value, &count_mem)) return bad_arg(arg, "mem=on or mem=off");
    } else if (klen == 7 && strncmp(arg, "classes", 7) == 0) {
      if (!parse_switch(value, &count_classes)) return bad_arg(arg, "classes=on or classes=off");
    } else if (klen == 4 && strncmp(arg, "dump", 4) == 0) {
      if (*value == '\0') return bad_arg(arg, "dump=PATH");
      dump_path = value;
    } else {
      return bad_arg(arg, "known keys: marker, out, flash, ram, mem, classes, dump");
    }
  }
  if (!have_marker) return bad_arg("", "marker=ADDRESS is required");
  if (out_path == NULL) return bad_arg("", "out=PATH is required");
  if (info != NULL && info->system_emulation && info->system.smp_vcpus > 1)
    fprintf(stderr, "edgenas_icount: %d vCPUs; counts are summed without atomics\n", info->system.smp_vcpus);
  if (info != NULL && info->target_name != NULL) isa_riscv = strncmp(info->target_name, "riscv", 5) == 0;
  if (dump_path != NULL && !count_classes) return bad_arg("dump", "dump= needs classes=on");
  out = fopen(out_path, "w");
  if (out == NULL) {
    fprintf(stderr, "edgenas_icount: cannot write %s: %s\n", out_path, strerror(errno));
    return -1;
  }
  if (count_classes) {
    fputc('H', out);
    for (int c = 0; c < N_COUNTERS; c++) fprintf(out, " %s", counter_names[c]);
    fputc('\n', out);
  }
  if (dump_path != NULL && (dump = fopen(dump_path, "w")) == NULL) {
    fprintf(stderr, "edgenas_icount: cannot write %s: %s\n", dump_path, strerror(errno));
    return -1;
  }
  qemu_plugin_register_vcpu_tb_trans_cb(id, on_tb_trans);
  qemu_plugin_register_atexit_cb(id, on_qemu_exit, NULL);
  return 0;
}
