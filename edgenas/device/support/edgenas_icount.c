/*
 * edgenas_icount: a QEMU TCG plugin (plugin API version 1, QEMU 7.2) that counts
 * the guest instructions executed and logs the count each time the guest reaches a
 * marker address.
 *
 *   qemu-system-... -plugin /path/libedgenas_icount.so,marker=0xADDR,out=/path/log.txt
 *                           [,flash=LO-HI][,ram=LO-HI][,mem=on]
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

/* ---- callbacks ---- */

static void write_counts(char kind, uint64_t count) {
  if (out == NULL) return;
  if (count_mem)
    fprintf(out, "%c %" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64 "\n", kind, count, flash_reads, ram_reads,
            ram_writes);
  else
    fprintf(out, "%c %" PRIu64 "\n", kind, count);
  /* Markers are rare (a few per inference); flushing keeps the log whole if QEMU is killed. */
  fflush(out);
}

/* userdata: instructions of the marker's TB counted at entry that have not run yet. */
static void on_marker(unsigned int vcpu_index, void *userdata) {
  (void)vcpu_index;
  write_counts('M', insns - (uint64_t)(uintptr_t)userdata);
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
  for (size_t i = 0; i < n; i++) {
    struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
    if (qemu_plugin_insn_vaddr(insn) == marker_addr)
      qemu_plugin_register_vcpu_insn_exec_cb(insn, on_marker, QEMU_PLUGIN_CB_NO_REGS, (void *)(uintptr_t)(n - i));
    if (count_mem) qemu_plugin_register_vcpu_mem_cb(insn, on_mem, QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_MEM_RW, NULL);
  }
}

static void on_qemu_exit(qemu_plugin_id_t id, void *userdata) {
  (void)id;
  (void)userdata;
  write_counts('T', insns);
  if (out != NULL && fclose(out) != 0) fprintf(stderr, "edgenas_icount: closing %s: %s\n", out_path, strerror(errno));
  out = NULL;
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
      if (strcmp(value, "on") == 0 || strcmp(value, "true") == 0 || strcmp(value, "1") == 0)
        count_mem = true;
      else if (strcmp(value, "off") == 0 || strcmp(value, "false") == 0 || strcmp(value, "0") == 0)
        count_mem = false;
      else
        return bad_arg(arg, "mem=on or mem=off");
    } else {
      return bad_arg(arg, "known keys: marker, out, flash, ram, mem");
    }
  }
  if (!have_marker) return bad_arg("", "marker=ADDRESS is required");
  if (out_path == NULL) return bad_arg("", "out=PATH is required");
  if (info != NULL && info->system_emulation && info->system.smp_vcpus > 1)
    fprintf(stderr, "edgenas_icount: %d vCPUs; counts are summed without atomics\n", info->system.smp_vcpus);
  out = fopen(out_path, "w");
  if (out == NULL) {
    fprintf(stderr, "edgenas_icount: cannot write %s: %s\n", out_path, strerror(errno));
    return -1;
  }
  qemu_plugin_register_vcpu_tb_trans_cb(id, on_tb_trans);
  qemu_plugin_register_atexit_cb(id, on_qemu_exit, NULL);
  return 0;
}
