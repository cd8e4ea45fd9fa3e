/* CPU sparse branch in feature-major layout: Y = S X, S (n_out × n_in) in CSR, X (n_in × T), Y (n_out × T),
 * X and Y fp32. The CSR may store its rows in any order: stored row r is output row rows[r] (rows NULL:
 * r itself). Its values are fp32 (spmm_<index>) or int8 (spmm_i8_<index>: symmetric, stored row r's
 * weights are scale[r] · q); its columns int16, int32 or 8-bit deltas (csr_tiles.h's cursors). A
 * row's sum is multiplied by scale[r] where `scale` is given (required for int8): int8 rows cost one
 * float multiply per row, and their sums run on the integers widened to float, so the result is the
 * product with the dequantized weights up to the fp32 summation order and that one rounding.
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
 * links instead (int8 values: X copied token-major once, then gather.h's vector dot; fp32: scalar
 * chains reading X in place). The runtime stores rows sorted by link count, so consecutive rows run loops of equal
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
#include "gather.h"
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
#define ROWS(NAME, COL_T, VAL_T, COL, TILE)                                                           \
  static void NAME(const float *buf, const int32_t *crow, const COL_T *col, const VAL_T *val,         \
                   const float *scale, const int32_t *rows, float *y, long ldy, int i0, int i1, int nt) { \
    enum { V = TILE / TILE_VW };                                                                      \
    for (int i = i0; i < i1; i++) {                                                                   \
      CSR_ROW_SUM(tile_vec, V, TILE, buf, crow, col, val, (float), COL, i, acc);                      \
      if (scale) {                                                                                    \
        float s = scale[i];                                                                           \
        for (int v = 0; v < V; v++) acc[v] *= s;                                                      \
      }                                                                                               \
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

/* fp32 values, one or two tokens: per row and token, four scalar chains reading X where it is. */
#define GATHER_F32(SUFFIX, COL_T)                                                                     \
  static void gather_##SUFFIX(const float *x, long ldx, const float *xf, int n_in, const int32_t *crow,  \
                              const COL_T *col, const float *val, const float *scale, const int32_t *rows, \
                              float *y, long ldy, int i0, int i1, int n_tok) {                        \
    (void)xf, (void)n_in;                                                                             \
    for (int i = i0; i < i1; i++) {                                                                   \
      for (int t = 0; t < n_tok; t++) {                                                               \
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f; /* four chains hide the add latency */     \
        int k = crow[i], end = crow[i + 1], c = 0;                                                    \
        for (; k + 3 < end; k += 4) {                                                                 \
          long c0 = col_##SUFFIX(col, k, &c), c1 = col_##SUFFIX(col, k + 1, &c);                      \
          long c2 = col_##SUFFIX(col, k + 2, &c), c3 = col_##SUFFIX(col, k + 3, &c);                  \
          s0 += val[k] * x[c0 * ldx + t];                                                             \
          s1 += val[k + 1] * x[c1 * ldx + t];                                                         \
          s2 += val[k + 2] * x[c2 * ldx + t];                                                         \
          s3 += val[k + 3] * x[c3 * ldx + t];                                                         \
        }                                                                                             \
        for (; k < end; k++) s0 += val[k] * x[(long)col_##SUFFIX(col, k, &c) * ldx + t];              \
        float sum = (s0 + s1) + (s2 + s3);                                                            \
        y[(long)(rows ? rows[i] : i) * ldy + t] = scale ? scale[i] * sum : sum;                       \
      }                                                                                               \
    }                                                                                                 \
  }

/* int8 values, one or two tokens: per row and token, the vector dot of gather.h over xf, X as fp32
 * token-major (n_tok × n_in), then the row's scale. */
#define GATHER_I8(SUFFIX, COL_T)                                                                      \
  static void qgather_##SUFFIX(const float *x, long ldx, const float *xf, int n_in, const int32_t *crow, \
                               const COL_T *col, const int8_t *val, const float *scale, const int32_t *rows, \
                               float *y, long ldy, int i0, int i1, int n_tok) {                       \
    (void)x, (void)ldx;                                                                               \
    for (int i = i0; i < i1; i++)                                                                     \
      for (int t = 0; t < n_tok; t++) {                                                               \
        float sum = qdot_##SUFFIX(xf + (long)t * n_in, col, val, crow[i], crow[i + 1]);               \
        y[(long)(rows ? rows[i] : i) * ldy + t] = scale ? scale[i] * sum : sum;                       \
      }                                                                                               \
  }

/* spmm<NAME>_<SUFFIX> and its task function for values VAL_T, columns COL_T; GATHER: the gather loop's
 * name, XF: whether it reads X as a token-major fp32 copy (made once per call). */
#define KERNEL(NAME, SUFFIX, COL_T, VAL_T, GATHER, XF)                                                \
  ROWS(rows16##NAME##_##SUFFIX, COL_T, VAL_T, col_##SUFFIX, 16)                                       \
  ROWS(rows32##NAME##_##SUFFIX, COL_T, VAL_T, col_##SUFFIX, 32)                                       \
  ROWS(rows64##NAME##_##SUFFIX, COL_T, VAL_T, col_##SUFFIX, 64)                                       \
  /* Rows i0..i1 of Y for tokens t0 … t0 + tile (tile 0: all n_tok tokens, by the gather loop; xf is X \
   * token-major where XF), with buf an (n_in × tile) fp32 buffer, 64-byte aligned (unused at tile 0). */ \
  void spmm##NAME##_task_##SUFFIX(const float *x, long ldx, const float *xf, int n_in, int n_tok, int t0, int tile, \
                                  const int32_t *crow, const COL_T *col, const VAL_T *val, const float *scale,  \
                                  const int32_t *rows, float *y, long ldy, int i0, int i1, float *buf) {       \
    if (tile == 0) {                                                                                  \
      GATHER##_##SUFFIX(x, ldx, xf, n_in, crow, col, val, scale, rows, y, ldy, i0, i1, n_tok);        \
      return;                                                                                         \
    }                                                                                                 \
    TILE_TASK(rows16##NAME##_##SUFFIX, rows32##NAME##_##SUFFIX, rows64##NAME##_##SUFFIX, fill_tile);  \
    STREAM_FENCE(); /* order the streamed stores before the caller's threads join */                  \
  }                                                                                                   \
  /* Returns 0, or 1 when a buffer could not be allocated (Y is then incomplete). */                 \
  int spmm##NAME##_##SUFFIX(const float *x, long ldx, int n_in, int n_tok, const int32_t *crow,       \
                            const COL_T *col, const VAL_T *val, const float *scale, const int32_t *rows, float *y, \
                            long ldy, int n_out, int tile, int n_chunks, int n_threads) {             \
    float *xf = NULL;                                                                                 \
    if (XF && tile == 0) { /* X token-major once */                                                   \
      xf = malloc(sizeof(float) * (size_t)n_in * n_tok);                                              \
      if (!xf) return 1;                                                                              \
      copy_tm(x, ldx, 1, n_in, n_tok, xf, 0, n_in);                                                   \
    }                                                                                                 \
    int failed = 0;                                                                                   \
    SPMM_TASKS(TASK);                                                                                 \
    free(xf);                                                                                         \
    return failed;                                                                                    \
  }

#define TASK(t0, i0, i1, buf) \
  TASK_FN(x, ldx, xf, n_in, n_tok, t0, tile, crow, col, val, scale, rows, y, ldy, i0, i1, buf)
GATHER_F32(i16, int16_t)
GATHER_F32(i32, int32_t)
GATHER_F32(d8, uint8_t)
GATHER_I8(i16, int16_t)
GATHER_I8(i32, int32_t)
GATHER_I8(d8, uint8_t)
#define TASK_FN spmm_task_i16
KERNEL(, i16, int16_t, float, gather, 0)
#undef TASK_FN
#define TASK_FN spmm_task_i32
KERNEL(, i32, int32_t, float, gather, 0)
#undef TASK_FN
#define TASK_FN spmm_task_d8
KERNEL(, d8, uint8_t, float, gather, 0)
#undef TASK_FN
#define TASK_FN spmm_i8_task_i16
KERNEL(_i8, i16, int16_t, int8_t, qgather, 1)
#undef TASK_FN
#define TASK_FN spmm_i8_task_i32
KERNEL(_i8, i32, int32_t, int8_t, qgather, 1)
#undef TASK_FN
#define TASK_FN spmm_i8_task_d8
KERNEL(_i8, d8, uint8_t, int8_t, qgather, 1)
#undef TASK_FN
