/* What this build of the library is, for chtsl_infer/kernels/build.py: the instruction sets the
 * compiler targeted, the compile-time choices the kernels were specialised for, and the layout of
 * the structs Python fills through ctypes (table.py compares it with its own at load and fails
 * loudly on any difference). One "key value…" line each:
 *
 *   isa NAME…               the targeted extensions among those the kernels use (may be empty)
 *   openmp 0|1              built with OpenMP (else single-threaded)
 *   tile_vw N               floats per vector of the spmm tile loops (csr_tiles.h)
 *   bf16_dot 0|1            spmm_bf16.c's gather uses AVX512-BF16's vdpbf16ps (bf16.h)
 *   gather16 0|1            the int8 (and bf16_dot) gather loops take 16 links per vgatherdps (gather.h)
 *   struct NAME SIZE        sizeof of a shared struct
 *   field NAME.F OFF SIZE   offsetof and sizeof of each of its fields, in declaration order
 */
#include <stddef.h>
#include <stdio.h>

#include "bf16.h"
#include "csr_tiles.h"
#include "gather.h"
#include "kernels.h"

#define STRUCT(S) {"struct " #S, sizeof(S), (size_t)-1}
#define FIELD(S, F) {"field " #S "." #F, offsetof(S, F), sizeof(((S *)0)->F)}

static const struct {
  const char *name;
  size_t a, b; /* b = (size_t)-1: a line with one number */
} layout[] = {
    STRUCT(dec_group),          FIELD(dec_group, n_in),    FIELD(dec_group, n_out),  FIELD(dec_group, crow),
    FIELD(dec_group, col),      FIELD(dec_group, values),  FIELD(dec_group, rows),   FIELD(dec_group, index),
    FIELD(dec_group, lora_a),   FIELD(dec_group, lora_b),  FIELD(dec_group, outs),   FIELD(dec_group, ranks),
    FIELD(dec_group, n_rank),   FIELD(dec_group, n_members), FIELD(dec_group, scale), FIELD(dec_group, act),
    FIELD(dec_group, int8),     FIELD(dec_group, values_scale), FIELD(dec_group, a_scale), FIELD(dec_group, b_scale),
    FIELD(dec_group, a8),       FIELD(dec_group, a8_x),    FIELD(dec_group, a8_xs),
    STRUCT(a8_layout),          FIELD(a8_layout, steps),   FIELD(a8_layout, data),   FIELD(a8_layout, start),
    FIELD(a8_layout, spill_n),  FIELD(a8_layout, spill),   FIELD(a8_layout, spill_start),
    STRUCT(dec_layer),          FIELD(dec_layer, norm1),   FIELD(dec_layer, norm2),  FIELD(dec_layer, group),
};

static const char isa[] = "isa"
#if defined(__AVX__)
                          " avx"
#endif
#if defined(__AVX2__)
                          " avx2"
#endif
#if defined(__FMA__)
                          " fma"
#endif
#if defined(__AVX512F__)
                          " avx512f"
#endif
#if defined(__AVX512BW__)
                          " avx512bw"
#endif
#if defined(__AVX512BF16__)
                          " avx512bf16"
#endif
#if defined(__AVX512VBMI__)
                          " avx512vbmi"
#endif
#if defined(__AVX512VNNI__)
                          " avx512vnni"
#endif
#if defined(__ARM_NEON)
                          " neon"
#endif
    ;

#ifdef _OPENMP
#define OPENMP 1
#else
#define OPENMP 0
#endif

/* Writes the lines into buf (size bytes, NUL-terminated); returns their length, or -1 if buf is too small. */
int kernel_probe(char *buf, int size) {
  long n = snprintf(buf, (size_t)size, "%s\nopenmp %d\ntile_vw %d\nbf16_dot %d\ngather16 %d\na8_vector %d\n", isa,
                    OPENMP, TILE_VW, BF16_DP && GATHER16, GATHER16, A8_VECTOR);
  for (size_t i = 0; i < sizeof layout / sizeof layout[0] && n >= 0 && n < size; i++) {
    if (layout[i].b == (size_t)-1)
      n += snprintf(buf + n, (size_t)(size - n), "%s %zu\n", layout[i].name, layout[i].a);
    else
      n += snprintf(buf + n, (size_t)(size - n), "%s %zu %zu\n", layout[i].name, layout[i].a, layout[i].b);
  }
  return n >= 0 && n < size ? (int)n : -1;
}
