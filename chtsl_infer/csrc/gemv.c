/* Dense matrix times a few vectors, for decoding: Y[t, o] = Σ_i W[o, i] · X[t, i], t < n_tok ≤ 4.
 * W (n_out × n_in) row-major, fp32 (gemv_f32) or bf16 bit patterns (gemv_bf16); X (n_tok × n_in)
 * fp32 with contiguous rows; Y fp32 at y[t * ldy + o]. Sums in fp32.
 *
 * Decoding one token reads every weight once: the lm_head alone is 65 MB (llama60m) to 262 MB
 * (llama1b) per token, so this is a memory-bound loop. torch's fp32 GEMV (MKL) reads 5.3 GB/s on 2
 * AMD EPYC cores where a plain sum reads 13.4 GB/s, and its bf16 matmul with one row 2.3 GB/s; this
 * kernel streams W once, rows split over the OpenMP threads, with n_tok × 4 vector accumulators
 * of 8 floats per row.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "activation.h"
#include "bf16.h"
#include "kernels.h"

/* One output row for NT tokens, 8-float vectors (one ymm; small enough that the NT × 4 accumulators
 * stay in registers: 16-float ones spilled to the stack with AVX2 and ran 5× slower). */
#define ROW(NAME, W_T, LOAD, SCALAR, NT)                                                              \
  static void NAME(const W_T *w, const float *x, long ldx, int n_in, float *y, long ldy) {           \
    g8 a[NT], b[NT], c[NT], d[NT];                                                                    \
    for (int t = 0; t < NT; t++) a[t] = b[t] = c[t] = d[t] = (g8){0};                                 \
    int i = 0;                                                                                        \
    for (; i + 32 <= n_in; i += 32) {                                                                 \
      g8 w0 = LOAD(w + i), w1 = LOAD(w + i + 8), w2 = LOAD(w + i + 16), w3 = LOAD(w + i + 24);        \
      for (int t = 0; t < NT; t++) {                                                                  \
        const float *xt = x + t * ldx + i;                                                            \
        a[t] += w0 * load8_f32(xt);                                                                   \
        b[t] += w1 * load8_f32(xt + 8);                                                               \
        c[t] += w2 * load8_f32(xt + 16);                                                              \
        d[t] += w3 * load8_f32(xt + 24);                                                              \
      }                                                                                               \
    }                                                                                                 \
    for (; i + 8 <= n_in; i += 8) {                                                                   \
      g8 w0 = LOAD(w + i);                                                                            \
      for (int t = 0; t < NT; t++) a[t] += w0 * load8_f32(x + t * ldx + i);                           \
    }                                                                                                 \
    for (int t = 0; t < NT; t++) {                                                                    \
      float s = hsum8((a[t] + b[t]) + (c[t] + d[t]));                                                 \
      for (int j = i; j < n_in; j++) s += SCALAR(w[j]) * x[t * ldx + j];                              \
      y[t * ldy] = s;                                                                                 \
    }                                                                                                 \
  }

#define AS_FLOAT(v) (v)
#define KERNELS(SUFFIX, W_T, LOAD, SCALAR)                                                            \
  ROW(row1_##SUFFIX, W_T, LOAD, SCALAR, 1)                                                            \
  ROW(row2_##SUFFIX, W_T, LOAD, SCALAR, 2)                                                            \
  ROW(row3_##SUFFIX, W_T, LOAD, SCALAR, 3)                                                            \
  ROW(row4_##SUFFIX, W_T, LOAD, SCALAR, 4)                                                            \
  int gemv_##SUFFIX(const W_T *w, int n_out, int n_in, const float *x, long ldx, int n_tok, float *y,  \
                    long ldy, int threads) {                                                          \
    if (n_tok < 1 || n_tok > 4) return 1;                                                             \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                                 \
    for (int o = 0; o < n_out; o++) {                                                                 \
      const W_T *row = w + (long)o * n_in;                                                            \
      switch (n_tok) {                                                                                \
        case 1: row1_##SUFFIX(row, x, ldx, n_in, y + o, ldy); break;                                  \
        case 2: row2_##SUFFIX(row, x, ldx, n_in, y + o, ldy); break;                                  \
        case 3: row3_##SUFFIX(row, x, ldx, n_in, y + o, ldy); break;                                  \
        default: row4_##SUFFIX(row, x, ldx, n_in, y + o, ldy); break;                                 \
      }                                                                                               \
    }                                                                                                 \
    return 0;                                                                                         \
  }

KERNELS(f32, float, load8_f32, AS_FLOAT)
KERNELS(bf16, uint16_t, load8_bf16, bf2f)

/* The low-rank branch of a fused group for a few tokens (decoding), added into the group's output:
 *
 *     Y[o, t] += scale · Σ_j Bt_m[j, o - off_m] · act(Σ_i A[r0_m + j, i] · X[i, t])
 *
 * A (R × n_in) row-major, the members' A stacked (R = Σ r_m); Bt the members' Bᵀ blocks (r_m × out_m,
 * row-major) one after the other, so the second product is r_m vector updates of contiguous
 * outputs (no horizontal sums over a short rank); X element (i, t) at x[i * sx_in + t * sx_tok];
 * Y (Σ out_m × n_tok) feature-major, element (o, t) at y[o * ldy + t]. It replaces the 4–6 small
 * torch calls (~15 µs each) the same work takes from Python; groups under 2¹⁸ multiply-adds
 * (llama60m) run on one thread, where an OpenMP fork/join would cost more than the work, larger
 * ones (llama1b: 8·10⁵) split A's rows, then B's output chunks, over `threads`. `scratch`:
 * n_tok × (n_in + R) floats. act: the codes of activation.h. Returns 1 for n_tok outside 1..4.
 */

/* Y rows o .. o + width of one member (width ≤ LR_CHUNK) for every token: Σ_j h[t, j] · Bt[j, o:o+width].
 * Walks Bᵀ a row segment at a time (contiguous: the hardware prefetcher streams it; reading 16-column
 * blocks down all r rows instead touched r lines per block and read 6 GB/s at llama1b), two rows per
 * pass so the accumulators are read and written once per pair. */
enum { LR_CHUNK = 1024 };
static inline void yadd_f32(float *p, float v) { *p += v; }
static inline void yadd_bf16(uint16_t *p, float v) { *p = f2bf(bf2f(*p) + v); }

#define LOWRANK_CHUNK(SUFFIX, W_T, LOAD, SCALAR, Y_T)                                                 \
  static void lowrank_chunk_##SUFFIX(const W_T *bt, int n_out, int r, const float *h, long ldh, int n_tok, int o, \
                                     int width, Y_T *y, long ldy) {                                   \
    float acc[4][LR_CHUNK] __attribute__((aligned(32)));                                              \
    for (int t = 0; t < n_tok; t++) memset(acc[t], 0, sizeof(float) * width);                        \
    int vec = width & ~7, j = 0;                                                                      \
    for (; j + 1 < r; j += 2) {                                                                       \
      const W_T *w0 = bt + (long)j * n_out + o, *w1 = w0 + n_out;                                     \
      for (int t = 0; t < n_tok; t++) {                                                               \
        float h0 = h[t * ldh + j], h1 = h[t * ldh + j + 1];                                           \
        float *a = acc[t];                                                                            \
        for (int k = 0; k < vec; k += 8) *(g8 *)(a + k) += h0 * LOAD(w0 + k) + h1 * LOAD(w1 + k);     \
        for (int k = vec; k < width; k++) a[k] += h0 * SCALAR(w0[k]) + h1 * SCALAR(w1[k]);            \
      }                                                                                               \
    }                                                                                                 \
    for (; j < r; j++) {                                                                              \
      const W_T *w0 = bt + (long)j * n_out + o;                                                       \
      for (int t = 0; t < n_tok; t++) {                                                               \
        float h0 = h[t * ldh + j];                                                                    \
        float *a = acc[t];                                                                            \
        for (int k = 0; k < vec; k += 8) *(g8 *)(a + k) += h0 * LOAD(w0 + k);                         \
        for (int k = vec; k < width; k++) a[k] += h0 * SCALAR(w0[k]);                                 \
      }                                                                                               \
    }                                                                                                 \
    for (int k = 0; k < width; k++)                                                                   \
      for (int t = 0; t < n_tok; t++) yadd_##SUFFIX(y + (long)(o + k) * ldy + t, acc[t][k]);          \
  }

/* lowrank_fm (fp32 A, Bᵀ, X, Y) and lowrank_fm_bf16 (all four bf16; sums, h and the addition into Y
 * in fp32, Y rounded once). */
#define LOWRANK_FM(NAME, SUFFIX, W_T, LOAD, SCALAR)                                                   \
  LOWRANK_CHUNK(SUFFIX, W_T, LOAD, SCALAR, W_T)                                                       \
  int NAME(const W_T *a, int n_rank, int n_in, const W_T *x, long sx_in, long sx_tok, int n_tok, const W_T *bt, \
           const int32_t *outs, const int32_t *ranks, int n_members, float scale, int act, W_T *y, long ldy,  \
           float *scratch, int threads) {                                                             \
    if (n_tok < 1 || n_tok > 4) return 1;                                                             \
    float *xt = scratch, *h = xt + (long)n_tok * n_in; /* X, h token-major: (n_tok × n_in), (n_tok × R) */ \
    for (int t = 0; t < n_tok; t++)                                                                   \
      for (int i = 0; i < n_in; i++) xt[(long)t * n_in + i] = SCALAR(x[i * sx_in + t * sx_tok]);      \
    long work = (long)n_rank * n_in;                                                                  \
    for (int m = 0; m < n_members; m++) work += (long)outs[m] * ranks[m];                             \
    int n_threads = work >= (1L << 18) ? threads : 1; /* small groups (llama60m): a fork/join costs more */ \
    _Pragma("omp parallel num_threads(n_threads)") {                                                  \
      float tmp[4];                                                                                   \
      _Pragma("omp for schedule(static)") for (int j = 0; j < n_rank; j++) {                          \
        const W_T *row = a + (long)j * n_in;                                                          \
        switch (n_tok) {                                                                              \
          case 1: row1_##SUFFIX(row, xt, n_in, n_in, tmp, 1); break;                                  \
          case 2: row2_##SUFFIX(row, xt, n_in, n_in, tmp, 1); break;                                  \
          case 3: row3_##SUFFIX(row, xt, n_in, n_in, tmp, 1); break;                                  \
          default: row4_##SUFFIX(row, xt, n_in, n_in, tmp, 1); break;                                 \
        }                                                                                             \
        for (int t = 0; t < n_tok; t++) h[(long)t * n_rank + j] = scale * activate(tmp[t], act);     \
      } /* implicit barrier: h is complete */                                                         \
      const W_T *b = bt;                                                                              \
      long o0 = 0, r0 = 0;                                                                            \
      for (int m = 0; m < n_members; m++) { /* members write disjoint rows of Y: no barrier between */ \
        int n_out = outs[m], r = ranks[m];                                                            \
        /* a multiple of n_threads chunks, each at most LR_CHUNK wide and of whole 8-float vectors: \
           equal shares (ceil-sized LR_CHUNK chunks left one thread 1.29x the other's at llama1b's gate) */ \
        int per = n_out > 0 ? n_threads * ((n_out + n_threads * LR_CHUNK - 1) / (n_threads * LR_CHUNK)) : 1; \
        int width = (((n_out + per - 1) / per) + 7) & ~7;                                             \
        _Pragma("omp for schedule(static) nowait") for (int c = 0; c < (n_out + width - 1) / width; c++) { \
          int o = c * width;                                                                          \
          lowrank_chunk_##SUFFIX(b, n_out, r, h + r0, n_rank, n_tok, o, n_out - o < width ? n_out - o : width, \
                                 y + o0 * ldy, ldy);                                                  \
        }                                                                                             \
        b += (long)n_out * r;                                                                         \
        o0 += n_out;                                                                                  \
        r0 += r;                                                                                      \
      }                                                                                               \
    }                                                                                                 \
    return 0;                                                                                         \
  }

LOWRANK_FM(lowrank_fm, f32, float, load8_f32, AS_FLOAT)
LOWRANK_FM(lowrank_fm_bf16, bf16, uint16_t, load8_bf16, bf2f)
