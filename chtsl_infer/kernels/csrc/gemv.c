/* Dense matrix times a few vectors, for decoding: Y[t, o] = s_o · Σ_i W[o, i] · X[t, i], t < n_tok ≤ 4.
 * W (n_out × n_in) row-major, fp32 (gemv), bf16 bit patterns (gemv_bf16) or int8 (gemv_i8: symmetric,
 * row o's weights are scale[o] · q); X (n_tok × n_in) fp32 with contiguous rows; Y fp32 at
 * y[t * ldy + o]; s_o = scale[o] where `scale` is given (required for int8), else 1. Sums in fp32.
 *
 * Decoding one token reads every weight once: the lm_head alone is 65 MB (llama60m) to 262 MB
 * (llama1b) per token, so this is a memory-bound loop. torch's fp32 GEMV (MKL) reads 5.3 GB/s on 2
 * AMD EPYC cores where a plain sum reads 13.4 GB/s, and its bf16 matmul with one row 2.3 GB/s; this
 * kernel streams W once, rows split over the OpenMP threads, with n_tok × 4 vector accumulators
 * of 8 floats per row (int8: of TILE_VW floats, 16 with AVX-512, where the widening of 16 int8
 * values is one vpmovsxbd and one vcvtdq2ps).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "activation.h"
#include "bf16.h"
#include "csr_tiles.h"
#include "gather.h"
#include "kernels.h"

/* One output row for NT tokens in vectors VEC of VW floats: 8 (one ymm; small enough that the NT × 4
 * accumulators stay in registers: 16-float ones spilled to the stack with AVX2 and ran 5× slower), or
 * TILE_VW for int8 (16 with AVX-512's 32 registers). */
#define ROW(NAME, W_T, VEC, VW, LOAD, LOADX, HSUM, SCALAR, NT)                                              \
  static void NAME(const W_T *w, const float *x, long ldx, int n_in, float *y, long ldy) {           \
    VEC a[NT], b[NT], c[NT], d[NT];                                                                   \
    for (int t = 0; t < NT; t++) a[t] = b[t] = c[t] = d[t] = (VEC){0};                                \
    int i = 0;                                                                                        \
    for (; i + 4 * VW <= n_in; i += 4 * VW) {                                                         \
      VEC w0 = LOAD(w + i), w1 = LOAD(w + i + VW), w2 = LOAD(w + i + 2 * VW), w3 = LOAD(w + i + 3 * VW); \
      for (int t = 0; t < NT; t++) {                                                                  \
        const float *xt = x + t * ldx + i;                                                            \
        a[t] += w0 * LOADX(xt);                                                                       \
        b[t] += w1 * LOADX(xt + VW);                                                                  \
        c[t] += w2 * LOADX(xt + 2 * VW);                                                              \
        d[t] += w3 * LOADX(xt + 3 * VW);                                                              \
      }                                                                                               \
    }                                                                                                 \
    for (; i + VW <= n_in; i += VW) {                                                                 \
      VEC w0 = LOAD(w + i);                                                                           \
      for (int t = 0; t < NT; t++) a[t] += w0 * LOADX(x + t * ldx + i);                               \
    }                                                                                                 \
    for (int t = 0; t < NT; t++) {                                                                    \
      VEC sum = (a[t] + b[t]) + (c[t] + d[t]);                                                        \
      float s = HSUM(sum);                                                                            \
      for (int j = i; j < n_in; j++) s += SCALAR(w[j]) * x[t * ldx + j];                              \
      y[t * ldy] = s;                                                                                 \
    }                                                                                                 \
  }

/* The horizontal sum of a TILE_VW vector: hsum8 of each 8-float half, added. */
static inline float hsumv(tile_vec v) {
  float s = 0.0f;
  for (int h = 0; h < TILE_VW; h += 8) {
    g8 part;
    memcpy(&part, (const float *)&v + h, sizeof part);
    s += hsum8(part);
  }
  return s;
}

static inline tile_vec loadv_f32(const float *p) { return *(const tile_vec_u *)p; }

/* TILE_VW int8 values as floats. */
static inline tile_vec loadv_i8(const int8_t *p) {
#if TILE_VW == 16
  __m512 v = load16_i8(p);
  tile_vec f;
  memcpy(&f, &v, sizeof f);
  return f;
#else
  return load8_i8(p);
#endif
}

#define AS_FLOAT(v) ((float)(v))
#define KERNELS(SUFFIX, NAME, W_T, VEC, VW, LOAD, LOADX, HSUM, SCALAR)                                \
  ROW(row1_##SUFFIX, W_T, VEC, VW, LOAD, LOADX, HSUM, SCALAR, 1)                                      \
  ROW(row2_##SUFFIX, W_T, VEC, VW, LOAD, LOADX, HSUM, SCALAR, 2)                                      \
  ROW(row3_##SUFFIX, W_T, VEC, VW, LOAD, LOADX, HSUM, SCALAR, 3)                                      \
  ROW(row4_##SUFFIX, W_T, VEC, VW, LOAD, LOADX, HSUM, SCALAR, 4)                                      \
  /* out[t * ldo] = Σ_i w[i] · x[t * ldx + i] for n_tok (1..4) tokens: one row of W, A or B. */       \
  static inline void dot_rows_##SUFFIX(const W_T *w, const float *x, long ldx, int n, int n_tok, float *out, \
                                       long ldo) {                                                    \
    switch (n_tok) {                                                                                  \
      case 1: row1_##SUFFIX(w, x, ldx, n, out, ldo); break;                                           \
      case 2: row2_##SUFFIX(w, x, ldx, n, out, ldo); break;                                           \
      case 3: row3_##SUFFIX(w, x, ldx, n, out, ldo); break;                                           \
      default: row4_##SUFFIX(w, x, ldx, n, out, ldo); break;                                          \
    }                                                                                                 \
  }                                                                                                   \
  int NAME(const W_T *w, const float *scale, int n_out, int n_in, const float *x, long ldx, int n_tok, float *y, \
           long ldy, int threads) {                                                                   \
    if (n_tok < 1 || n_tok > 4) return 1;                                                             \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                                 \
    for (int o = 0; o < n_out; o++) {                                                                 \
      dot_rows_##SUFFIX(w + (long)o * n_in, x, ldx, n_in, n_tok, y + o, ldy);                         \
      if (scale)                                                                                      \
        for (int t = 0; t < n_tok; t++) y[(long)t * ldy + o] *= scale[o];                             \
    }                                                                                                 \
    return 0;                                                                                         \
  }

KERNELS(f32, gemv, float, g8, 8, load8_f32, load8_f32, hsum8, AS_FLOAT)
KERNELS(bf16, gemv_bf16, uint16_t, g8, 8, load8_bf16, load8_f32, hsum8, bf2f)
KERNELS(i8, gemv_i8, int8_t, tile_vec, TILE_VW, loadv_i8, loadv_f32, hsumv, AS_FLOAT)

/* The low-rank branch of a fused group for a few tokens (decoding), added into the group's output:
 *
 *     Y[o, t] += scale · Σ_j B_m[o - off_m, j] · act(Σ_i A[r0_m + j, i] · X[i, t])
 *
 * A (R × n_in) row-major, the members' A stacked (R = Σ r_m); B the members' B blocks (out_m × r_m,
 * row-major) one after the other, so both products are GEMVs over contiguous rows: a thread's share
 * of either factor is one contiguous stretch of memory, which the hardware prefetcher streams. (Bᵀ
 * walked in output-column chunks instead read r_m short row segments per chunk: 7 GB/s in bf16 at
 * llama1b's shapes, against 11 GB/s for these rows; a bf16 token took 0.92× the time, fp32 0.97–1.02×.)
 * X element (i, t) at x[i * sx_in + t * sx_tok]; Y (Σ out_m × n_tok) feature-major, element (o, t)
 * at y[o * ldy + t]. It replaces the 4–6 small torch calls (~15 µs each) the same work takes from
 * Python; groups under 2¹⁸ multiply-adds (llama60m) run on one thread, where an OpenMP fork/join
 * would cost more than the work, larger ones (llama1b: 8·10⁵) split A's rows, then B's rows (equal
 * bytes each), over `threads`. `scratch`: n_tok × (n_in + R) floats. act: the codes of
 * activation.h. Returns 1 for n_tok outside 1..4.
 *
 * int8 factors: A row j is a_scale[j] · q, B row o is b_scale[o] · q (per output row of each factor).
 *
 * The two halves are exported for decode.c, which runs them inside its own parallel region:
 *   lowrank_a_rows_*  h[t · R + j] = scale · act(A[j] · xt[t]) for rows j0 ≤ j < j1; xt token-major fp32
 *   lowrank_b_rows_*  Y[o] += B[o] · h for output rows o0 ≤ o < o1 (Σ out_m of them, across members)
 *   lowrank_b_split   the first output row of thread k's share of B (k of n; k = n: Σ out_m)
 */
static inline void yadd_f32(float *p, float v) { *p += v; }
static inline void yadd_bf16(uint16_t *p, float v) { *p = f2bf(bf2f(*p) + v); }

long lowrank_b_split(const int32_t *outs, const int32_t *ranks, int n_members, int k, int n) {
  long total = 0, o = 0;
  for (int m = 0; m < n_members; m++) total += (long)outs[m] * ranks[m];
  long target = total * k / n; /* elements of B before the share */
  for (int m = 0; m < n_members; m++) {
    long size = (long)outs[m] * ranks[m];
    if (target < size) return o + (target + ranks[m] - 1) / ranks[m];
    target -= size;
    o += outs[m];
  }
  return o;
}

#define LOWRANK_ROWS(SUFFIX, W_T, Y_T)                                                                \
  void lowrank_a_rows_##SUFFIX(const W_T *a, const float *a_scale, int n_in, const float *xt, int n_tok, int n_rank, \
                               float scale, int act, float *h, int j0, int j1) {                      \
    float tmp[4];                                                                                     \
    for (int j = j0; j < j1; j++) {                                                                   \
      dot_rows_##SUFFIX(a + (long)j * n_in, xt, n_in, n_in, n_tok, tmp, 1);                           \
      for (int t = 0; t < n_tok; t++)                                                                 \
        h[(long)t * n_rank + j] = scale * activate(a_scale ? a_scale[j] * tmp[t] : tmp[t], act);     \
    }                                                                                                 \
  }                                                                                                   \
  void lowrank_b_rows_##SUFFIX(const W_T *b, const float *b_scale, const int32_t *outs, const int32_t *ranks, \
                               int n_members, const float *h, int n_rank, int n_tok, Y_T *y, long ldy, long o0, \
                               long o1) {                                                             \
    float tmp[4];                                                                                     \
    const W_T *bm = b;                                                                                \
    long off = 0, r0 = 0;                                                                             \
    for (int m = 0; m < n_members; m++) {                                                             \
      long r = ranks[m], lo = o0 > off ? o0 : off, hi = o1 < off + outs[m] ? o1 : off + outs[m];      \
      for (long o = lo; o < hi; o++) {                                                                \
        dot_rows_##SUFFIX(bm + (o - off) * r, h + r0, n_rank, (int)r, n_tok, tmp, 1);                 \
        for (int t = 0; t < n_tok; t++) yadd_##SUFFIX(y + o * ldy + t, b_scale ? b_scale[o] * tmp[t] : tmp[t]); \
      }                                                                                               \
      bm += outs[m] * r;                                                                              \
      off += outs[m];                                                                                 \
      r0 += r;                                                                                        \
    }                                                                                                 \
  }

static inline void yadd_i8(float *p, float v) { *p += v; }
LOWRANK_ROWS(f32, float, float)
LOWRANK_ROWS(bf16, uint16_t, uint16_t)
LOWRANK_ROWS(i8, int8_t, float)

/* lowrank_fm (fp32 A, B, X, Y), lowrank_fm_bf16 (all four bf16; sums, h and the addition into Y in
 * fp32, Y rounded once) and lowrank_fm_i8 (int8 A and B with per-row scales a_scale (R,) and
 * b_scale (Σ out_m,); X and Y fp32). a_scale / b_scale: NULL for the float variants. */
#define LOWRANK_FM(NAME, SUFFIX, W_T, X_T, TOKEN_MAJOR_COPY)                                          \
  int NAME(const W_T *a, const float *a_scale, int n_rank, int n_in, const X_T *x, long sx_in, long sx_tok, \
           int n_tok, const W_T *b, const float *b_scale, const int32_t *outs, const int32_t *ranks, int n_members, \
           float scale, int act, X_T *y, long ldy, float *scratch, int threads) {                     \
    if (n_tok < 1 || n_tok > 4) return 1;                                                             \
    float *xt = scratch, *h = xt + (long)n_tok * n_in; /* X, h token-major: (n_tok × n_in), (n_tok × R) */ \
    TOKEN_MAJOR_COPY(x, sx_in, sx_tok, n_in, n_tok, xt, 0, n_in);                                     \
    long work = (long)n_rank * n_in;                                                                  \
    for (int m = 0; m < n_members; m++) work += (long)outs[m] * ranks[m];                             \
    int n_threads = work >= LOWRANK_THREADS_FROM ? threads : 1; /* small groups: see kernels.h */       \
    _Pragma("omp parallel num_threads(n_threads)") {                                                  \
      int k = THREAD_ID(), n = N_THREADS();                                                           \
      lowrank_a_rows_##SUFFIX(a, a_scale, n_in, xt, n_tok, n_rank, scale, act, h,                     \
                              (int)((long)n_rank * k / n), (int)((long)n_rank * (k + 1) / n));        \
      _Pragma("omp barrier") /* h is complete */                                                      \
      lowrank_b_rows_##SUFFIX(b, b_scale, outs, ranks, n_members, h, n_rank, n_tok, y, ldy,           \
                              lowrank_b_split(outs, ranks, n_members, k, n),                          \
                              lowrank_b_split(outs, ranks, n_members, k + 1, n));                     \
    }                                                                                                 \
    return 0;                                                                                         \
  }

LOWRANK_FM(lowrank_fm, f32, float, float, copy_tm)
LOWRANK_FM(lowrank_fm_bf16, bf16, uint16_t, uint16_t, widen_tm)
LOWRANK_FM(lowrank_fm_i8, i8, int8_t, float, copy_tm)
