/* CPU kernels of sparse-native training (chtsl_infer/model/csr.py), token-major activations:
 *
 *   csr_mm_tm      Y (N × R) = X (N × K) Aᵀ,  A (R × K) in CSR     forward y = x Sᵀ; on the transposed
 *                                                                   structure, dx = dy S
 *   csr_sddmm_tm   out[k] = Σ_n DY[n, row_k] · X[n, col_k]          dvalues (the links of A only)
 *
 * Built with spmm.c into one library by chtsl_infer/kernels/build.py (-O3 -march=native, OpenMP when the
 * compiler has it), called through ctypes (which releases the GIL). Portable C with GCC/Clang vector
 * extensions (`v8` = 8 floats: one ymm with AVX/AVX2, two xmm otherwise); the 8 × 8 transposes and the
 * 8-way horizontal sums use AVX intrinsics when the host has AVX, plain loops otherwise.
 *
 * Training activations are token-major (N × K, a row per token), but a link (i, c) multiplies column c
 * of X across tokens, which token-major rows scatter K floats apart. Both kernels therefore work on
 * feature-major tiles of TILE tokens, transposed from X in 8 × 8 blocks (at
 * training densities the transposes — K·N floats moved vs 2·nnz·N flops — take 5–20 % of a kernel):
 *
 * csr_mm_tm: tasks = (token tile × row chunk). A task transposes X[t0:t0+TILE, :] into a (K × TILE)
 * buffer, then for each row i accumulates acc[0:TILE] += v · buf[c, 0:TILE] over its links (two
 * accumulator sets, even and odd links, so two loads are in flight) into a (16 × TILE) block, and
 * transposes each finished block of 16 rows into Y[t0:t0+TILE, i:i+16] (whole 64-byte lines of Y).
 * TILE = 32 on AVX2 (64 needs 16 ymm accumulators and spills: measured 10–40 % slower).
 *
 * csr_sddmm_tm: each thread takes a contiguous range of rows holding ~nnz/threads links (so it owns
 * those outputs: no atomics, no barriers) and walks all token tiles: it transposes the X tile
 * (K × TILE, kept in L2) and, 64 rows at a time, its own rows of the DY tile (64 × TILE, in L1),
 * then for each row i computes 8 links at a time — 8 accumulators acc_l += DYᵀ[i] · Xᵀ[c_l] over the
 * tile's vectors, reduced horizontally into 8 sums added to out[k:k+8]. Every thread transposes the
 * whole X tile (duplicate work, from cache); the first version shared one transposed block between
 * threads and was 1.7× slower: its (K + R) × 1024-token buffers lived in L3, not L2.
 *
 * Measured on one AMD EPYC core (AVX2, loaded machine), 512 tokens, 5 % density, llama60m/130m
 * shapes: 22–27 GFLOP/s for each kernel (dense MKL GEMM: ~60), i.e. each 0.05–0.06× the time of the
 * dense layer's forward + backward (benchmarks/train_kernels.py).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "csr_tiles.h"
#include "kernels.h"

#if defined(__AVX__)
#include <immintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4))); /* unaligned loads/stores */

static inline long round_up(long n, long m) { return (n + m - 1) / m * m; }

enum { SDDMM_ROW_CHUNK = 64 }; /* rows of DY transposed at once by csr_sddmm_tm (a tile of them stays in L1) */

/* d[c * ldd + r] = s[r * lds + c] for r < nr, c < nc (nr, nc ≤ 8); full 8 × 8 blocks in registers. */
static inline void transpose8(const float *s, long lds, float *d, long ldd, int nr, int nc) {
#if defined(__AVX__)
  if (nr == 8 && nc == 8) {
    __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + lds), r2 = _mm256_loadu_ps(s + 2 * lds),
           r3 = _mm256_loadu_ps(s + 3 * lds), r4 = _mm256_loadu_ps(s + 4 * lds),
           r5 = _mm256_loadu_ps(s + 5 * lds), r6 = _mm256_loadu_ps(s + 6 * lds),
           r7 = _mm256_loadu_ps(s + 7 * lds);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(d + ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(d + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(d + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(d + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(d + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(d + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(d + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
    return;
  }
#endif
  for (int r = 0; r < nr; r++)
    for (int c = 0; c < nc; c++) d[(long)c * ldd + r] = s[(long)r * lds + c];
}

/* d (nc × nr, row stride ldd) = sᵀ for s (nr × nc, row stride lds), in 8 × 8 blocks. Columns are
 * taken 64 at a time, so each pass over 8 source rows reads whole cache lines and writes a
 * destination slab (64 rows) that stays in L1. */
static void transpose(const float *s, long lds, float *d, long ldd, int nr, int nc) {
  for (int c0 = 0; c0 < nc; c0 += 64) {
    int c1 = c0 + 64 < nc ? c0 + 64 : nc;
    for (int r = 0; r < nr; r += 8)
      for (int c = c0; c < c1; c += 8)
        transpose8(s + (long)r * lds + c, lds, d + (long)c * ldd + r, ldd, nr - r < 8 ? nr - r : 8,
                   c1 - c < 8 ? c1 - c : 8);
  }
}

/* The same for a small source (in L1) and a wide destination: for each 8 columns of s, all of its
 * rows, so destination lines (16 floats of one row) are completed one after another. */
static void transpose_out(const float *s, long lds, float *d, long ldd, int nr, int nc) {
  for (int c = 0; c < nc; c += 8)
    for (int r = 0; r < nr; r += 8)
      transpose8(s + (long)r * lds + c, lds, d + (long)c * ldd + r, ldd, nr - r < 8 ? nr - r : 8,
                 nc - c < 8 ? nc - c : 8);
}

/* Rows i0..i1 of Y[t0:t0+nt, :] from the (K × TILE) feature-major tile `buf`. */
#define MM_ROWS(TILE)                                                                                 \
  static void mm_rows_##TILE(const float *buf, const int32_t *crow, const int32_t *col,              \
                             const float *val, float *y, long ldy, int i0, int i1, int nt) {         \
    enum { V = TILE / 8 };                                                                            \
    float block[16 * TILE] __attribute__((aligned(32)));                                              \
    for (int ib = i0; ib < i1; ib += 16) {                                                            \
      int nr = i1 - ib < 16 ? i1 - ib : 16;                                                           \
      for (int r = 0; r < nr; r++) {                                                                  \
        int i = ib + r;                                                                               \
        CSR_ROW_SUM(v8, V, TILE, buf, crow, col, val, (float), col_i32, i, acc);                      \
        for (int v = 0; v < V; v++) ((v8 *)(block + r * TILE))[v] = acc[v];                          \
      }                                                                                               \
      transpose_out(block, TILE, y + ib, ldy, nr, nt);                                                \
    }                                                                                                 \
  }
MM_ROWS(16)
MM_ROWS(32)
MM_ROWS(64)

/* Returns 0, or 1 when a tile buffer could not be allocated (Y is then incomplete). */
int csr_mm_tm(const float *x, long ldx, int n_tok, int n_cols, const int32_t *crow, const int32_t *col,
              const float *val, int n_rows, float *y, long ldy, int tile, int n_chunks, int n_threads) {
  int n_tiles = (n_tok + tile - 1) / tile;
  int rows_per_chunk = (n_rows + n_chunks - 1) / n_chunks;
  rows_per_chunk = (int)round_up(rows_per_chunk, 16); /* whole 16-row output blocks: full lines of Y */
  int failed = 0;
  (void)n_threads;
#pragma omp parallel num_threads(n_threads) reduction(| : failed)
  {
    float *buf = aligned_alloc(64, sizeof(float) * round_up((long)n_cols * tile, 16));
    int ok = buf != NULL;
    failed = !ok;
    if (ok) memset(buf, 0, sizeof(float) * (size_t)n_cols * tile); /* padding tokens of a tail tile */
#pragma omp for schedule(static)
    for (int task = 0; task < n_tiles * n_chunks; task++) {
      int t0 = (task / n_chunks) * tile, chunk = task % n_chunks;
      int i0 = chunk * rows_per_chunk, i1 = i0 + rows_per_chunk < n_rows ? i0 + rows_per_chunk : n_rows;
      if (!ok || i0 >= i1) continue;
      int nt = n_tok - t0 < tile ? n_tok - t0 : tile;
      transpose(x + (long)t0 * ldx, ldx, buf, tile, nt, n_cols);
      float *yt = y + (long)t0 * ldy;
      if (tile == 64)
        mm_rows_64(buf, crow, col, val, yt, ldy, i0, i1, nt);
      else if (tile == 32)
        mm_rows_32(buf, crow, col, val, yt, ldy, i0, i1, nt);
      else
        mm_rows_16(buf, crow, col, val, yt, ldy, i0, i1, nt);
    }
    free(buf);
  }
  return failed;
}

/* The 8 horizontal sums of a[0..7], in order. */
static inline v8 hsum8(const v8 *a) {
#if defined(__AVX__)
  __m256 h01 = _mm256_hadd_ps((__m256)a[0], (__m256)a[1]), h23 = _mm256_hadd_ps((__m256)a[2], (__m256)a[3]);
  __m256 h45 = _mm256_hadd_ps((__m256)a[4], (__m256)a[5]), h67 = _mm256_hadd_ps((__m256)a[6], (__m256)a[7]);
  __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
  return (v8)_mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20),
                           _mm256_permute2f128_ps(h0123, h4567, 0x31));
#else
  v8 s;
  for (int l = 0; l < 8; l++) {
    float t = 0.0f;
    for (int j = 0; j < 8; j++) t += a[l][j];
    s[l] = t;
  }
  return s;
#endif
}

static inline float hsum1(v8 a) {
  float t = 0.0f;
  for (int j = 0; j < 8; j++) t += a[j];
  return t;
}

/* out[crow[i0] .. crow[i1]) += the links' dot products over one tile of TILE tokens. */
#define SDDMM_ROWS(TILE)                                                                              \
  static void sddmm_rows_##TILE(const float *dyt, int row0, const float *xt, const int32_t *crow,   \
                                const int32_t *col, float *out, int i0, int i1) {                    \
    enum { ld = TILE };                                                                               \
    enum { V = TILE / 8 };                                                                            \
    for (int i = i0; i < i1; i++) {                                                                   \
      int k = crow[i], end = crow[i + 1];                                                             \
      if (k == end) continue;                                                                         \
      const v8 *d = (const v8 *)(dyt + (long)(i - row0) * ld);                                        \
      for (; k + 7 < end; k += 8) {                                                                   \
        const v8 *p[8];                                                                               \
        v8 acc[8];                                                                                    \
        for (int l = 0; l < 8; l++) {                                                                 \
          p[l] = (const v8 *)(xt + (long)col[k + l] * ld);                                            \
          acc[l] = (v8){0};                                                                           \
        }                                                                                             \
        for (int v = 0; v < V; v++) {                                                                 \
          v8 dv = d[v];                                                                               \
          for (int l = 0; l < 8; l++) acc[l] += dv * p[l][v];                                         \
        }                                                                                             \
        *(v8u *)(out + k) += hsum8(acc);                                                              \
      }                                                                                               \
      for (; k < end; k++) {                                                                          \
        const v8 *p = (const v8 *)(xt + (long)col[k] * ld);                                           \
        v8 acc = (v8){0};                                                                             \
        for (int v = 0; v < V; v++) acc += d[v] * p[v];                                               \
        out[k] += hsum1(acc);                                                                         \
      }                                                                                               \
    }                                                                                                 \
  }
SDDMM_ROWS(16)
SDDMM_ROWS(32)
SDDMM_ROWS(64)

/* First row whose links start at or after link `target` (crow is non-decreasing). */
static int row_at_link(const int32_t *crow, int n_rows, long target) {
  int lo = 0, hi = n_rows;
  while (lo < hi) {
    int mid = lo + (hi - lo) / 2;
    if (crow[mid] < target) lo = mid + 1; else hi = mid;
  }
  return lo;
}

/* out (nnz) is overwritten. Returns 0, or 1 when a tile buffer could not be allocated. */
int csr_sddmm_tm(const float *dy, long lddy, const float *x, long ldx, int n_tok, int n_rows, int n_cols,
                 const int32_t *crow, const int32_t *col, float *out, int tile, int n_threads) {
  long nnz = crow[n_rows];
  memset(out, 0, sizeof(float) * (size_t)nnz);
  if (n_tok == 0 || nnz == 0) return 0;
  int failed = 0;
  (void)n_threads;
#pragma omp parallel num_threads(n_threads) reduction(| : failed)
  {
    int n_thr = 1, tid = 0;
#if defined(_OPENMP)
    n_thr = omp_get_num_threads();
    tid = omp_get_thread_num();
#endif
    int i0 = row_at_link(crow, n_rows, nnz * tid / n_thr);
    int i1 = tid == n_thr - 1 ? n_rows : row_at_link(crow, n_rows, nnz * (tid + 1) / n_thr);
    float *xt = aligned_alloc(64, sizeof(float) * round_up((long)n_cols * tile, 16));
    float *dyt = aligned_alloc(64, sizeof(float) * SDDMM_ROW_CHUNK * tile);
    failed = xt == NULL || dyt == NULL;
    for (int t0 = 0; t0 < n_tok && !failed && i0 < i1; t0 += tile) {
      int nt = n_tok - t0 < tile ? n_tok - t0 : tile;
      transpose(x + (long)t0 * ldx, ldx, xt, tile, nt, n_cols);
      if (nt < tile) /* a tail tile: zero tokens nt..tile (garbage there could be Inf · 0) */
        for (int f = 0; f < n_cols; f++) memset(xt + (long)f * tile + nt, 0, sizeof(float) * (tile - nt));
      for (int r0 = i0; r0 < i1; r0 += SDDMM_ROW_CHUNK) {
        int r1 = r0 + SDDMM_ROW_CHUNK < i1 ? r0 + SDDMM_ROW_CHUNK : i1;
        transpose(dy + (long)t0 * lddy + r0, lddy, dyt, tile, nt, r1 - r0);
        if (nt < tile)
          for (int f = 0; f < r1 - r0; f++) memset(dyt + (long)f * tile + nt, 0, sizeof(float) * (tile - nt));
        if (tile == 64)
          sddmm_rows_64(dyt, r0, xt, crow, col, out, r0, r1);
        else if (tile == 32)
          sddmm_rows_32(dyt, r0, xt, crow, col, out, r0, r1);
        else
          sddmm_rows_16(dyt, r0, xt, crow, col, out, r0, r1);
      }
    }
    free(xt);
    free(dyt);
  }
  return failed;
}

/* The transpose of a CSR pattern (R × K) by a stable counting sort, O(nnz + K), single-threaded:
 * t_crow (K + 1), t_row (nnz) the rows of each column ascending, t_perm (nnz) the value index of
 * each transposed entry. Replaces torch's stable argsort (far slower at these sizes).
 * Returns 0, or 1 when its (K) work array could not be allocated (outputs incomplete). */
int csr_transpose(const int32_t *crow, const int32_t *col, int n_rows, int n_cols, int32_t *t_crow,
                  int32_t *t_row, int32_t *t_perm) {
  int32_t *next = malloc(sizeof(int32_t) * ((size_t)n_cols + 1));
  if (next == NULL) return 1;
  memset(t_crow, 0, sizeof(int32_t) * ((size_t)n_cols + 1));
  int32_t nnz = crow[n_rows];
  for (int32_t k = 0; k < nnz; k++) t_crow[col[k] + 1]++;
  for (int c = 0; c < n_cols; c++) t_crow[c + 1] += t_crow[c];
  memcpy(next, t_crow, sizeof(int32_t) * (size_t)n_cols);
  for (int i = 0; i < n_rows; i++)
    for (int32_t k = crow[i]; k < crow[i + 1]; k++) {
      int32_t e = next[col[k]]++;
      t_row[e] = i;
      t_perm[e] = k;
    }
  free(next);
  return 0;
}
