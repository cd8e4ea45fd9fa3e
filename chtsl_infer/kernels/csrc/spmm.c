/* CPU sparse branch in feature-major layout: Y = S X, S (n_out × n_in) in CSR, X (n_in × T), Y (n_out × T).
 * The CSR may store its rows in any order: stored row r is output row rows[r] (rows NULL: r itself).
 *
 * Built on first use by chtsl_infer/kernels/build.py with the host C compiler (-O3 -march=native, OpenMP
 * when the compiler has it) and called through ctypes. Portable C: the GCC/Clang vector extension,
 * `tile_vec` of csr_tiles.h (16 floats in a zmm with AVX-512, 8 in a ymm elsewhere).
 *
 * Work is split into tasks (token tile × row chunk). A task copies its tile X[:, t0:t0+TILE] into a
 * contiguous (n_in × TILE) buffer — plain row copies, no transpose, because the runtime keeps
 * activations feature-major — then, for every row i of its chunk, accumulates
 *
 *     acc[0:TILE] += v · buf[c, 0:TILE]      over the row's links (v, c)
 *
 * in TILE/TILE_VW vector registers (see CSR_ROW_SUM) and stores them into Y[i, t0:t0+TILE]. The
 * last tile is zero-padded in the buffer and stored partially. Tiles are 16, 32 or 64 tokens (chosen
 * by KernelSettings.token_tile); tile 0 (one or two tokens: decoding) takes a gather loop over the row's
 * links instead. The runtime stores rows sorted by link count, so consecutive rows run loops of equal
 * length and the branch predictor learns their exits (3–12 % faster on random 5 % masks). Measured
 * on 2 Xeon (AVX-512) cores, 5 % density, 4096 tokens: 45–58 GFLOP/s per core, 5–7× faster than
 * MKL's dense GEMM of the same shape; on 2 AMD EPYC (AVX2) cores, llama60m's seven shapes at 2048
 * tokens, 4.6–5.9× (0.8× with 16-float vectors there, see TILE_VW). Tried and no faster: a
 * column-blocked CSR (buffer slices in L1), software prefetch of links or of the next tile, four
 * accumulator sets, 128-token tiles.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "csr_tiles.h"
#include "kernels.h"

/* Y is written once and read by the next operation, not by this kernel: with AVX-512, aligned full
 * tiles go out with non-temporal stores, which skip reading each line of Y into the cache first
 * (measured 1.0–1.3× faster at 4096 tokens, most for the widest Y). */
#if defined(__AVX512F__)
#include <immintrin.h>
#define STREAM_OK(p) ((((uintptr_t)(p)) & 63) == 0)
#if TILE_VW == 16
#define STREAM(p, v) _mm512_stream_ps((p), (__m512)(v))
#else /* the 8-float build variant (csr_tiles.h): the same stores, two per 64-byte line */
#define STREAM(p, v) _mm256_stream_ps((p), (__m256)(v))
#endif
#define STREAM_FENCE() _mm_sfence()
#else
#define STREAM_OK(p) 0
#define STREAM(p, v) (void)0
#define STREAM_FENCE() (void)0
#endif

/* Rows i0..i1 of Y[:, t0:t0+nt] (y points at column t0) from the (n_in × TILE) tile `buf`. */
#define ROWS(NAME, COL_T, TILE)                                                                       \
  static void NAME(const float *buf, const int32_t *crow, const COL_T *col, const float *val,         \
                   const int32_t *rows, float *y, long ldy, int i0, int i1, int nt) {                 \
    enum { V = TILE / TILE_VW };                                                                      \
    for (int i = i0; i < i1; i++) {                                                                   \
      CSR_ROW_SUM(tile_vec, V, TILE, buf, crow, col, val, (float), i, acc);                           \
      float *out = y + (long)(rows ? rows[i] : i) * ldy;                                              \
      if (nt == TILE && STREAM_OK(out)) {                                                             \
        for (int v = 0; v < V; v++) STREAM(out + TILE_VW * v, acc[v]);                                \
      } else if (nt == TILE) {                                                                        \
        for (int v = 0; v < V; v++) *(tile_vec_u *)(out + TILE_VW * v) = acc[v];                      \
      } else {                                                                                        \
        memcpy(out, acc, sizeof(float) * nt);                                                         \
      }                                                                                               \
    }                                                                                                 \
  }

/* dst[0:nt] = src[0:nt], dst[nt:tile] = 0: one feature's row of a token tile. */
static inline void fill_tile(float *dst, const float *src, int nt, int tile) {
  memcpy(dst, src, sizeof(float) * nt);
  if (nt < tile) memset(dst + nt, 0, sizeof(float) * (tile - nt));
}

#define KERNEL(SUFFIX, COL_T)                                                                         \
  ROWS(rows16_##SUFFIX, COL_T, 16)                                                                    \
  ROWS(rows32_##SUFFIX, COL_T, 32)                                                                    \
  ROWS(rows64_##SUFFIX, COL_T, 64)                                                                    \
  static void gather_##SUFFIX(const float *x, long ldx, const int32_t *crow, const COL_T *col,        \
                              const float *val, const int32_t *rows, float *y, long ldy, int i0,      \
                              int i1, int n_tok) {                                                    \
    for (int i = i0; i < i1; i++) {                                                                   \
      for (int t = 0; t < n_tok; t++) {                                                               \
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f; /* four chains hide the add latency */     \
        int k = crow[i], end = crow[i + 1];                                                           \
        for (; k + 3 < end; k += 4) {                                                                 \
          s0 += val[k] * x[(long)col[k] * ldx + t];                                                   \
          s1 += val[k + 1] * x[(long)col[k + 1] * ldx + t];                                           \
          s2 += val[k + 2] * x[(long)col[k + 2] * ldx + t];                                           \
          s3 += val[k + 3] * x[(long)col[k + 3] * ldx + t];                                           \
        }                                                                                             \
        for (; k < end; k++) s0 += val[k] * x[(long)col[k] * ldx + t];                                \
        y[(long)(rows ? rows[i] : i) * ldy + t] = (s0 + s1) + (s2 + s3);                              \
      }                                                                                               \
    }                                                                                                 \
  }                                                                                                   \
  /* Rows i0..i1 of Y for tokens t0 … t0 + tile (tile 0: all n_tok tokens, by the gather loop), with \
   * buf an (n_in × tile) fp32 buffer, 64-byte aligned (unused at tile 0). */                        \
  void spmm_task_##SUFFIX(const float *x, long ldx, int n_in, int n_tok, int t0, int tile, const int32_t *crow, \
                          const COL_T *col, const float *val, const int32_t *rows, float *y, long ldy, int i0, \
                          int i1, float *buf) {                                                       \
    if (tile == 0) {                                                                                  \
      gather_##SUFFIX(x, ldx, crow, col, val, rows, y, ldy, i0, i1, n_tok);                           \
      return;                                                                                         \
    }                                                                                                 \
    TILE_TASK(rows16_##SUFFIX, rows32_##SUFFIX, rows64_##SUFFIX, fill_tile);                          \
    STREAM_FENCE(); /* order the streamed stores before the caller's threads join */                  \
  }                                                                                                   \
  /* Returns 0, or 1 when a tile buffer could not be allocated (Y is then incomplete). */            \
  int spmm_##SUFFIX(const float *x, long ldx, int n_in, int n_tok, const int32_t *crow,               \
                    const COL_T *col, const float *val, const int32_t *rows, float *y, long ldy,      \
                    int n_out, int tile, int n_chunks, int n_threads) {                               \
    int failed = 0;                                                                                   \
    SPMM_TASKS(TASK_##SUFFIX);                                                                        \
    return failed;                                                                                    \
  }

#define TASK_i16(t0, i0, i1, buf) spmm_task_i16(x, ldx, n_in, n_tok, t0, tile, crow, col, val, rows, y, ldy, i0, i1, buf)
#define TASK_i32(t0, i0, i1, buf) spmm_task_i32(x, ldx, n_in, n_tok, t0, tile, crow, col, val, rows, y, ldy, i0, i1, buf)
KERNEL(i16, int16_t)
KERNEL(i32, int32_t)
