/* Loops shared by the CPU sparse kernels (spmm.c, spmm_bf16.c, csr_train.c):
 *
 *   col_*        a row's column indices link by link: int16, int32 or 8-bit deltas
 *   CSR_ROW_SUM  one CSR row times a feature-major token tile, in vector accumulators (all three)
 *   TILE_TASK    one task's token tile: fill the buffer, then the rows (spmm.c and spmm_bf16.c)
 *   SPMM_TASKS   the (token tile × row chunk) task loop of spmm.c and spmm_bf16.c
 *
 * Macros, not functions: each expands inside a kernel specialised for one compile-time TILE and
 * vector type, so the accumulators stay in registers and the compiler emits the code it emitted when
 * every kernel spelled these loops out. chtsl_infer/kernels/build.py compiles the .c files with this header
 * next to them and hashes it into the kernel cache key (HEADERS).
 */
#ifndef CHTSL_CSR_TILES_H
#define CHTSL_CSR_TILES_H
#include <stdint.h>

/* The vectors of spmm.c's and spmm_bf16.c's tile loops: TILE_VW floats, one register of the host.
 * 16-float vectors on an AVX2 CPU became pairs of ymm, and GCC kept their accumulators on the stack:
 * the fp32 tile kernel ran 4.6× slower than with 8-float vectors (2 AMD EPYC cores, 5 % density,
 * llama60m shapes, 2048 tokens), below MKL's dense GEMM of the same shape.
 * A build variant may set it (-DCHTSL_TILE_VW=8 on an AVX-512 CPU: 512-bit operations are
 * double-pumped on AMD Zen 4; the tuner, chtsl_infer/kernels/tune.py, times both there). */
#if defined(CHTSL_TILE_VW)
#define TILE_VW CHTSL_TILE_VW
#elif defined(__AVX512F__)
#define TILE_VW 16
#else
#define TILE_VW 8
#endif
#if TILE_VW != 8 && TILE_VW != 16
#error "CHTSL_TILE_VW must be 8 or 16"
#endif
typedef float tile_vec __attribute__((vector_size(TILE_VW * 4)));
typedef float tile_vec_u __attribute__((vector_size(TILE_VW * 4), aligned(4))); /* unaligned */

/* A row's column indices, walked link by link in order from the row's first link with a cursor
 * `c` that starts at 0 in every row: COL(col, k, &c) is link k's column. int16 and int32 indices
 * are the columns themselves; 8-bit deltas (packed format 2, docs/formats.md §2) add to the previous
 * column: col_k = col_{k-1} + delta_k with col_{-1} = 0, gaps over 255 bridged by padding links
 * of value 0. */
static inline int col_i16(const int16_t *col, long k, int *c) { return *c = col[k]; }
static inline int col_i32(const int32_t *col, long k, int *c) { return *c = col[k]; }
static inline int col_d8(const uint8_t *col, long k, int *c) { return *c += col[k]; }

/* Declares VEC acc[V] = Σ over row i's links k (crow[i] ≤ k < crow[i + 1]) of WIDEN(val[k]) ·
 * buf[column k, 0:TILE], where buf is a feature-major (n_in × TILE) fp32 tile aligned for VEC and
 * V = TILE / (floats per VEC), and COL one of the column cursors above (col_i16, col_i32, col_d8).
 * WIDEN turns a stored value into a float: `(float)` for fp32 and int8 values, `bf2f` for bf16 bit
 * patterns. Two accumulator sets, even and odd links, keep two loads in flight;
 * acc is their sum. With 8 or more vectors (8-float vectors at 64 tokens) one set: 16 accumulators
 * would not fit in AVX2's 16 registers (two of them were spilled; one set took ~0.8× the time on 2
 * EPYC cores), and 8 independent sums already hide the FMA latency. */
#define CSR_ROW_SUM(VEC, V, TILE, buf, crow, col, val, WIDEN, COL, i, acc)                        \
  VEC acc[V];                                                                                       \
  {                                                                                                 \
    VEC acc_odd_[V];                                                                                \
    for (int v = 0; v < V; v++) acc[v] = acc_odd_[v] = (VEC){0};                                    \
    int k = crow[i], end = crow[i + 1], c_ = 0;                                                     \
    for (; V >= 8 && k < end; k++) { /* 8+ vectors: one set already hides the FMA latency */        \
      const VEC *p = (const VEC *)(buf + (long)COL(col, k, &c_) * TILE);                            \
      float a = WIDEN(val[k]);                                                                      \
      for (int v = 0; v < V; v++) acc[v] += a * p[v];                                               \
    }                                                                                               \
    for (; k + 1 < end; k += 2) {                                                                   \
      const VEC *p = (const VEC *)(buf + (long)COL(col, k, &c_) * TILE);                            \
      const VEC *q = (const VEC *)(buf + (long)COL(col, k + 1, &c_) * TILE);                        \
      float a = WIDEN(val[k]), b = WIDEN(val[k + 1]);                                               \
      for (int v = 0; v < V; v++) acc[v] += a * p[v];                                               \
      for (int v = 0; v < V; v++) acc_odd_[v] += b * q[v];                                          \
    }                                                                                               \
    if (k < end) {                                                                                  \
      const VEC *p = (const VEC *)(buf + (long)COL(col, k, &c_) * TILE);                            \
      float a = WIDEN(val[k]);                                                                      \
      for (int v = 0; v < V; v++) acc[v] += a * p[v];                                               \
    }                                                                                               \
    for (int v = 0; v < V; v++) acc[v] += acc_odd_[v];                                              \
  }

/* The first row i of a CSR with crow[i] >= target links (n_out if none). */
static inline int csr_row_at(const int32_t *crow, int n_out, long target) {
  int lo = 0, hi = n_out;
  while (lo < hi) {
    int mid = lo + (hi - lo) / 2;
    if (crow[mid] < target) lo = mid + 1; else hi = mid;
  }
  return lo;
}

/* The first row of chunk c of n_chunks over rows 0..n_out: chunks hold equal shares of the links, not of
 * the rows (rows are stored by link count, so equal row ranges gave the last thread up to 1.17× the
 * links of the first at llama1b). Chunk n_chunks starts at n_out. */
static inline int csr_chunk_start(const int32_t *crow, int n_out, int c, int n_chunks) {
  return c >= n_chunks ? n_out : csr_row_at(crow, n_out, (long)crow[n_out] * c / n_chunks);
}

/* The tile path of spmm[_i8]_task_<suffix> and spmm_bf16_task_<suffix>: it reads their parameters by
 * name (x, ldx, n_in, n_tok, t0, tile, crow, col, val, scale, rows, y, ldy, i0, i1, buf), fills buf row
 * by row with FILL(dst, src, nt, tile) — nt tokens of X's row from column t0, zeros up to tile — and
 * calls ROWS16, ROWS32 or ROWS64 (buf, crow, col, val, scale, rows, y + t0, ldy, i0, i1, nt) by tile. */
#define TILE_TASK(ROWS16, ROWS32, ROWS64, FILL)                                                     \
  {                                                                                                 \
    int nt = n_tok - t0 < tile ? n_tok - t0 : tile;                                                 \
    for (int j = 0; j < n_in; j++) FILL(buf + (long)j * tile, x + (long)j * ldx + t0, nt, tile);    \
    if (tile == 64)                                                                                 \
      ROWS64(buf, crow, col, val, scale, rows, y + t0, ldy, i0, i1, nt);                                   \
    else if (tile == 32)                                                                            \
      ROWS32(buf, crow, col, val, scale, rows, y + t0, ldy, i0, i1, nt);                                   \
    else                                                                                            \
      ROWS16(buf, crow, col, val, scale, rows, y + t0, ldy, i0, i1, nt);                                   \
  }

/* The body of spmm_<suffix> and spmm_bf16_<suffix>: it reads their parameters by name (n_in, n_tok,
 * crow, n_out, tile, n_chunks, n_threads) and ORs 1 into the caller's `int failed` when a thread could
 * not allocate its tile buffer.
 *
 * Tasks are (token tile × row chunk), statically scheduled over the threads; each is one
 * TASK(t0, i0, i1, buf) call, the kernel's `…_task` function: tokens t0 … t0 + tile of rows i0 … i1,
 * with the thread's (n_in × tile) fp32 buffer (NULL at tile 0: one or two tokens, decoding, where
 * there is one token "tile" and the rows are split into n_chunks). decode.c calls the same task
 * functions on its own share of the rows. */
#define SPMM_TASKS(TASK)                                                                            \
  {                                                                                                 \
    int small = tile == 0; /* gather path */                                                        \
    int n_tiles = small ? 1 : (n_tok + tile - 1) / tile;                                            \
    (void)n_threads;                                                                                \
    _Pragma("omp parallel num_threads(n_threads) reduction(| : failed)") {                          \
      float *buf = small ? NULL : aligned_alloc(64, sizeof(float) * (size_t)n_in * tile);           \
      int ok = small || buf != NULL;                                                                \
      failed = !ok;                                                                                 \
      _Pragma("omp for schedule(static)") for (int task = 0; task < n_tiles * n_chunks; task++) {   \
        int t0 = (task / n_chunks) * tile, chunk = task % n_chunks;                                 \
        int i0 = csr_chunk_start(crow, n_out, chunk, n_chunks), i1 = csr_chunk_start(crow, n_out, chunk + 1, n_chunks); \
        if (ok && i0 < i1) TASK(t0, i0, i1, buf);                                                   \
      }                                                                                             \
      free(buf);                                                                                    \
    }                                                                                               \
  }

#endif
