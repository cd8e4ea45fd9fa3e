/* CPU sparse branch in bf16, feature-major: Y = S X with S's values, X and Y in bfloat16 (uint16 bit
 * patterns) and every sum accumulated in fp32; Y rounded to bf16 to nearest-even (as torch does).
 * Same CSR conventions (int16, int32 or 8-bit delta columns; a row's sum times scale[r] where `scale`
 * is given, before the rounding), tiles and tasks as spmm.c (stored row r is output row rows[r]).
 *
 * Tiles (tile 16/32/64: prefill, scoring): a task widens its token tile of X to an fp32 buffer, then
 * accumulates vectors of TILE_VW floats per row, widening each link's value (a shift).
 * Gather (tile 0: one or two tokens, decoding): X is widened once per call to an fp32 (n_tok × n_in)
 * array; each row sums value · x over its links. Where the compiler targets AVX512-BF16
 * (-march=native on a CPU with the avx512_bf16 flag), 32 links at a time go through one
 * `vdpbf16ps` (pairs of bf16 products accumulated into 16 fp32 lanes) on the row's values as loaded
 * and the gathered x values narrowed back to bf16 (exact: they were bf16); elsewhere 8 links at a
 * time in 8-float vectors: the values widened as one vector, the x values loaded one by one into
 * another (gather.h's x8_<index>), then the last few links in two scalar chains. `kernel_probe` reports which
 * was compiled (bf16_dot: BF16_DP of bf16.h).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "csr_tiles.h"
#include "gather.h"
#include "kernels.h"

/* Rows i0..i1 of Y[:, t0:t0+nt] (y points at column t0) from the (n_in × TILE) fp32 tile `buf`. */
#define BROWS(NAME, COL_T, COL, TILE)                                                                 \
  static void NAME(const float *buf, const int32_t *crow, const COL_T *col, const uint16_t *val,      \
                   const float *scale, const int32_t *rows, uint16_t *y, long ldy, int i0, int i1, int nt) { \
    enum { V = TILE / TILE_VW };                                                                      \
    for (int i = i0; i < i1; i++) {                                                                   \
      CSR_ROW_SUM(tile_vec, V, TILE, buf, crow, col, val, bf2f, COL, i, acc);                         \
      float sums[TILE] __attribute__((aligned(64)));                                                  \
      for (int v = 0; v < V; v++) *(tile_vec *)(sums + TILE_VW * v) = acc[v];                         \
      float s = scale ? scale[i] : 1.0f;                                                              \
      uint16_t *out = y + (long)(rows ? rows[i] : i) * ldy;                                           \
      for (int t = 0; t < nt; t++) out[t] = f2bf(scale ? s * sums[t] : sums[t]);                      \
    }                                                                                                 \
  }

/* dst[0:nt] = src[0:nt] widened to fp32, dst[nt:tile] = 0: one feature's row of a token tile. */
static inline void bfill_tile(float *dst, const uint16_t *src, int nt, int tile) {
  for (int t = 0; t < nt; t++) dst[t] = bf2f(src[t]);
  for (int t = nt; t < tile; t++) dst[t] = 0.0f;
}

#if BF16_DP && GATHER16
#define BDOT32(SUFFIX)                                                                                \
  {                                                                                                   \
    __m512 acc = _mm512_setzero_ps();                                                                 \
    __m512i base = _mm512_setzero_si512();                                                            \
    for (; k + 31 < end; k += 32) {                                                                   \
      __m512i lo = cols16_##SUFFIX(col + k, &base), hi = cols16_##SUFFIX(col + k + 16, &base);        \
      __m512 xl = _mm512_i32gather_ps(lo, xt, 4), xh = _mm512_i32gather_ps(hi, xt, 4);                \
      __m512bh xs = _mm512_cvtne2ps_pbh(xh, xl); /* links k … k+31 in order */                        \
      __m512bh vs = (__m512bh)_mm512_loadu_si512((const void *)(val + k));                            \
      acc = _mm512_dpbf16_ps(acc, vs, xs);                                                            \
    }                                                                                                 \
    c = base_col(base);                                                                               \
    s0 += _mm512_reduce_add_ps(acc);                                                                  \
  }
#else
#define BDOT32(SUFFIX)
#endif

#define BKERNEL(SUFFIX, COL_T)                                                                        \
  BROWS(brows16_##SUFFIX, COL_T, col_##SUFFIX, 16)                                                    \
  BROWS(brows32_##SUFFIX, COL_T, col_##SUFFIX, 32)                                                    \
  BROWS(brows64_##SUFFIX, COL_T, col_##SUFFIX, 64)                                                    \
  GATHER_DOT(bdot_##SUFFIX, SUFFIX, COL_T, uint16_t, load8_bf16, bf2f, BDOT32)                        \
  static void bgather_##SUFFIX(const float *xf, int n_in, const int32_t *crow, const COL_T *col,      \
                               const uint16_t *val, const float *scale, const int32_t *rows, uint16_t *y, \
                               long ldy, int i0, int i1, int n_tok) {                                 \
    for (int i = i0; i < i1; i++)                                                                     \
      for (int t = 0; t < n_tok; t++) {                                                               \
        float sum = bdot_##SUFFIX(xf + (long)t * n_in, col, val, crow[i], crow[i + 1]);               \
        y[(long)(rows ? rows[i] : i) * ldy + t] = f2bf(scale ? scale[i] * sum : sum);                 \
      }                                                                                               \
  }                                                                                                   \
  /* Rows i0..i1 of Y for tokens t0 … t0 + tile (tile 0: all n_tok tokens, by the gather loop over \
   * xf, X widened to fp32 token-major: (n_tok × n_in)), with buf an (n_in × tile) fp32 buffer,       \
   * 64-byte aligned (unused at tile 0). */                                                           \
  void spmm_bf16_task_##SUFFIX(const uint16_t *x, long ldx, const float *xf, int n_in, int n_tok, int t0, int tile, \
                               const int32_t *crow, const COL_T *col, const uint16_t *val, const float *scale, \
                               const int32_t *rows, uint16_t *y, long ldy, int i0, int i1, float *buf) { \
    if (tile == 0) {                                                                                  \
      bgather_##SUFFIX(xf, n_in, crow, col, val, scale, rows, y, ldy, i0, i1, n_tok);                 \
      return;                                                                                         \
    }                                                                                                 \
    TILE_TASK(brows16_##SUFFIX, brows32_##SUFFIX, brows64_##SUFFIX, bfill_tile);                      \
  }                                                                                                   \
  /* Returns 0, or 1 when a buffer could not be allocated (Y is then incomplete). */                 \
  int spmm_bf16_##SUFFIX(const uint16_t *x, long ldx, int n_in, int n_tok, const int32_t *crow,       \
                         const COL_T *col, const uint16_t *val, const float *scale, const int32_t *rows, \
                         uint16_t *y, long ldy, int n_out, int tile, int n_chunks, int n_threads) {   \
    float *xf = NULL;                                                                                 \
    if (tile == 0) { /* widen X once */                                                               \
      xf = malloc(sizeof(float) * (size_t)n_in * n_tok);                                              \
      if (!xf) return 1;                                                                              \
      widen_tm(x, ldx, 1, n_in, n_tok, xf, 0, n_in);                                                  \
    }                                                                                                 \
    int failed = 0;                                                                                   \
    SPMM_TASKS(TASK_##SUFFIX);                                                                        \
    free(xf);                                                                                         \
    return failed;                                                                                    \
  }

#define BTASK(SUFFIX, t0, i0, i1, buf) \
  spmm_bf16_task_##SUFFIX(x, ldx, xf, n_in, n_tok, t0, tile, crow, col, val, scale, rows, y, ldy, i0, i1, buf)
#define TASK_i16(t0, i0, i1, buf) BTASK(i16, t0, i0, i1, buf)
#define TASK_i32(t0, i0, i1, buf) BTASK(i32, t0, i0, i1, buf)
#define TASK_d8(t0, i0, i1, buf) BTASK(d8, t0, i0, i1, buf)
BKERNEL(i16, int16_t)
BKERNEL(i32, int32_t)
BKERNEL(d8, uint8_t)
