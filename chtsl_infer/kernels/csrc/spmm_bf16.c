/* CPU sparse branch in bf16, feature-major: Y = S X with S's values, X and Y in bfloat16 (uint16 bit
 * patterns) and every sum accumulated in fp32; Y rounded to bf16 to nearest-even (as torch does).
 * Same CSR conventions, tiles and tasks as spmm.c (stored row r is output row rows[r]).
 *
 * Tiles (tile 16/32/64: prefill, scoring): a task widens its token tile of X to an fp32 buffer, then
 * accumulates vectors of TILE_VW floats per row, widening each link's value (a shift).
 * Gather (tile 0: one or two tokens, decoding): X is widened once per call to an fp32 (n_tok × n_in)
 * array; each row sums value · x over its links. Where the compiler targets AVX512-BF16
 * (-march=native on a CPU with the avx512_bf16 flag), 32 links at a time go through one
 * `vdpbf16ps` (pairs of bf16 products accumulated into 16 fp32 lanes) on the row's values as loaded
 * and the gathered x values narrowed back to bf16 (exact: they were bf16); elsewhere 8 links at a
 * time in 8-float vectors: the values widened as one vector, the x values loaded one by one into
 * another (see x8_i16), then the last few links in two scalar chains. `kernel_probe` reports which
 * was compiled (bf16_dot: BF16_DP of bf16.h).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "csr_tiles.h"
#include "kernels.h"

#if BF16_DP
#include <immintrin.h>
#endif

/* Rows i0..i1 of Y[:, t0:t0+nt] (y points at column t0) from the (n_in × TILE) fp32 tile `buf`. */
#define BROWS(NAME, COL_T, TILE)                                                                      \
  static void NAME(const float *buf, const int32_t *crow, const COL_T *col, const uint16_t *val,      \
                   const int32_t *rows, uint16_t *y, long ldy, int i0, int i1, int nt) {              \
    enum { V = TILE / TILE_VW };                                                                      \
    for (int i = i0; i < i1; i++) {                                                                   \
      CSR_ROW_SUM(tile_vec, V, TILE, buf, crow, col, val, bf2f, i, acc);                              \
      float sums[TILE] __attribute__((aligned(64)));                                                  \
      for (int v = 0; v < V; v++) *(tile_vec *)(sums + TILE_VW * v) = acc[v];                         \
      uint16_t *out = y + (long)(rows ? rows[i] : i) * ldy;                                           \
      for (int t = 0; t < nt; t++) out[t] = f2bf(sums[t]);                                            \
    }                                                                                                 \
  }

/* dst[0:nt] = src[0:nt] widened to fp32, dst[nt:tile] = 0: one feature's row of a token tile. */
static inline void bfill_tile(float *dst, const uint16_t *src, int nt, int tile) {
  for (int t = 0; t < nt; t++) dst[t] = bf2f(src[t]);
  for (int t = nt; t < tile; t++) dst[t] = 0.0f;
}

/* x[c[0..7]] as one vector. A link costs three loads in a scalar loop (column, value, x), and on AMD
 * EPYC (Zen 3, AVX2) those loads were the bound: 0.74 ns per link with the data in cache. Here the
 * eight int16 columns come in two 8-byte loads (little-endian: column j is bits 16j..16j+15) and the
 * values in one: 0.48 ns per link. A llama1b token in bf16 took 0.88× the time (interleaved A/B), its
 * sparse part 0.74×. (AVX2's vgatherdps is no help there: 17 cycles per 8 floats.) */
static inline g8 x8_i16(const float *x, const int16_t *c) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  uint64_t lo, hi;
  memcpy(&lo, c, 8);
  memcpy(&hi, c + 4, 8);
  return (g8){x[lo & 0xffff], x[(lo >> 16) & 0xffff], x[(lo >> 32) & 0xffff], x[lo >> 48],
              x[hi & 0xffff], x[(hi >> 16) & 0xffff], x[(hi >> 32) & 0xffff], x[hi >> 48]};
#else
  return (g8){x[c[0]], x[c[1]], x[c[2]], x[c[3]], x[c[4]], x[c[5]], x[c[6]], x[c[7]]};
#endif
}

static inline g8 x8_i32(const float *x, const int32_t *c) {
  return (g8){x[c[0]], x[c[1]], x[c[2]], x[c[3]], x[c[4]], x[c[5]], x[c[6]], x[c[7]]};
}

#if BF16_DP
#define GATHER_ROW(COL_T)                                                                             \
  {                                                                                                   \
    __m512 acc = _mm512_setzero_ps();                                                                 \
    for (; k + 31 < end; k += 32) {                                                                   \
      __m512i lo = COL_T == 2 ? _mm512_cvtepi16_epi32(_mm256_loadu_si256((const void *)(col + k)))    \
                              : _mm512_loadu_si512((const void *)(col + k));                          \
      __m512i hi = COL_T == 2 ? _mm512_cvtepi16_epi32(_mm256_loadu_si256((const void *)(col + k + 16))) \
                              : _mm512_loadu_si512((const void *)(col + k + 16));                     \
      __m512 xl = _mm512_i32gather_ps(lo, xt, 4), xh = _mm512_i32gather_ps(hi, xt, 4);                \
      __m512bh xs = _mm512_cvtne2ps_pbh(xh, xl); /* links k … k+31 in order */                        \
      __m512bh vs = (__m512bh)_mm512_loadu_si512((const void *)(val + k));                            \
      acc = _mm512_dpbf16_ps(acc, vs, xs);                                                            \
    }                                                                                                 \
    s0 += _mm512_reduce_add_ps(acc);                                                                  \
  }
#else
#define GATHER_ROW(COL_T) (void)0
#endif

#define BKERNEL(SUFFIX, COL_T, X8)                                                                    \
  BROWS(brows16_##SUFFIX, COL_T, 16)                                                                  \
  BROWS(brows32_##SUFFIX, COL_T, 32)                                                                  \
  BROWS(brows64_##SUFFIX, COL_T, 64)                                                                  \
  static void bgather_##SUFFIX(const float *xf, int n_in, const int32_t *crow, const COL_T *col,      \
                               const uint16_t *val, const int32_t *rows, uint16_t *y, long ldy,       \
                               int i0, int i1, int n_tok) {                                           \
    for (int i = i0; i < i1; i++) {                                                                   \
      for (int t = 0; t < n_tok; t++) {                                                               \
        const float *xt = xf + (long)t * n_in;                                                        \
        float s0 = 0.0f, s1 = 0.0f;                                                                   \
        int k = crow[i], end = crow[i + 1];                                                           \
        GATHER_ROW(sizeof(COL_T));                                                                    \
        g8 a0 = {0}, a1 = {0}; /* two chains: an FMA's latency */                                     \
        for (; k + 16 <= end; k += 16) {                                                              \
          a0 += load8_bf16(val + k) * X8(xt, col + k);                                                \
          a1 += load8_bf16(val + k + 8) * X8(xt, col + k + 8);                                        \
        }                                                                                             \
        if (k + 8 <= end) {                                                                           \
          a0 += load8_bf16(val + k) * X8(xt, col + k);                                                \
          k += 8;                                                                                     \
        }                                                                                             \
        for (; k + 1 < end; k += 2) {                                                                 \
          s0 += bf2f(val[k]) * xt[col[k]];                                                            \
          s1 += bf2f(val[k + 1]) * xt[col[k + 1]];                                                    \
        }                                                                                             \
        if (k < end) s0 += bf2f(val[k]) * xt[col[k]];                                                 \
        y[(long)(rows ? rows[i] : i) * ldy + t] = f2bf(hsum8(a0 + a1) + (s0 + s1));                   \
      }                                                                                               \
    }                                                                                                 \
  }                                                                                                   \
  /* Rows i0..i1 of Y for tokens t0 … t0 + tile (tile 0: all n_tok tokens, by the gather loop over \
   * xf, X widened to fp32 token-major: (n_tok × n_in)), with buf an (n_in × tile) fp32 buffer,       \
   * 64-byte aligned (unused at tile 0). */                                                           \
  void spmm_bf16_task_##SUFFIX(const uint16_t *x, long ldx, const float *xf, int n_in, int n_tok, int t0, int tile, \
                               const int32_t *crow, const COL_T *col, const uint16_t *val, const int32_t *rows, \
                               uint16_t *y, long ldy, int i0, int i1, float *buf) {                   \
    if (tile == 0) {                                                                                  \
      bgather_##SUFFIX(xf, n_in, crow, col, val, rows, y, ldy, i0, i1, n_tok);                        \
      return;                                                                                         \
    }                                                                                                 \
    TILE_TASK(brows16_##SUFFIX, brows32_##SUFFIX, brows64_##SUFFIX, bfill_tile);                      \
  }                                                                                                   \
  /* Returns 0, or 1 when a buffer could not be allocated (Y is then incomplete). */                 \
  int spmm_bf16_##SUFFIX(const uint16_t *x, long ldx, int n_in, int n_tok, const int32_t *crow,       \
                         const COL_T *col, const uint16_t *val, const int32_t *rows, uint16_t *y,     \
                         long ldy, int n_out, int tile, int n_chunks, int n_threads) {                \
    float *xf = NULL;                                                                                 \
    if (tile == 0) { /* widen X once */                                                               \
      xf = malloc(sizeof(float) * (size_t)n_in * n_tok);                                              \
      if (!xf) return 1;                                                                              \
      widen_tm(x, ldx, 1, n_in, n_tok, xf, 0, n_in);                                                     \
    }                                                                                                 \
    int failed = 0;                                                                                   \
    SPMM_TASKS(TASK_##SUFFIX);                                                                        \
    free(xf);                                                                                         \
    return failed;                                                                                    \
  }

#define TASK_i16(t0, i0, i1, buf) \
  spmm_bf16_task_i16(x, ldx, xf, n_in, n_tok, t0, tile, crow, col, val, rows, y, ldy, i0, i1, buf)
#define TASK_i32(t0, i0, i1, buf) \
  spmm_bf16_task_i32(x, ldx, xf, n_in, n_tok, t0, tile, crow, col, val, rows, y, ldy, i0, i1, buf)
BKERNEL(i16, int16_t, x8_i16)
BKERNEL(i32, int32_t, x8_i32)
