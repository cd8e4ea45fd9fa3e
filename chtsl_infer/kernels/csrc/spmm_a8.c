/* The sparse branch with int8 weights AND int8 activations ("a8"): Y = S X with X quantized per token
 * and per page of A8_PAGE input features (symmetric, one fp32 scale each), products summed exactly in
 * int32 within a page, and each page's sum added in fp32 (× its activation scale), then × the row's
 * weight scale. Against the fp32-activation int8 kernels (spmm.c) this is a different number — the
 * product with X rounded to int8 — but not a different model (llama.cpp's Q8_0 and Q4_0 quantize
 * their activations per 32 features the same way). Opted into at run time (runtime/fused.py).
 *
 * Why: one int8 link costs ~1 cycle in spmm.c's gather (column, x load, convert, FMA; AMD Zen 4,
 * llama1b: the gather is the token's bound, not memory). Here the links are laid out for AVX-512
 * VBMI + VNNI: a page's int8 X (256 bytes) sits in four zmm registers, vpermi2b fetches the X bytes of
 * 64 links per instruction, and vpdpbusd multiplies and sums them four links per int32 lane — about
 * 10 instructions per 64 links. Measured on 2 Zen 4 cores, a 5461 × 2048 matrix at 5 % density,
 * 24 copies: 0.106 ns per link against 0.357 for the int16-column gather (3.4×); it then streams
 * its bytes at 31 GB/s, the machine's read bandwidth, so the layout's bytes per link are its speed.
 *
 * Layout (`a8_pack` writes it from a CSR): stored rows in groups of A8_ROWS = 16 (one int32 lane
 * each), input features in pages of 256. For group g and page p, steps[g · P + p] = K steps of
 * A8_STEP = 128 bytes: 64 page-local columns (uint8), then the 64 int8 weights; lane i's four bytes
 * (4i … 4i + 3) are row 16g + i's next four links in that page, padding links have weight 0 (column
 * 0). A row's links past the page's 4K slots "spill": spill_n[g · P + p] entries of 3 bytes (lane,
 * page-local column, int8 weight), added one by one after the page's steps. K is the one of least
 * cost 128 K + spill_cost · (spilled links), spill_cost in bytes (a spilled link reads 3 bytes and
 * costs ~1 cycle, which at a 2-core machine's ~30 GB/s is ~6 bytes' time: 10 by default). A group's
 * steps and spills are contiguous, pages in order; start[g] is its first step, spill_start[g] its
 * first spilled link (start[n_groups], spill_start[n_groups] the totals). llama1b-c4 (5 % density):
 * every row padded to its group's most links per page, 3.20 bytes per link (61 % of the slots
 * filled); with spills (cost 10), 2.56 — against 3 for int8 values with int16 columns. The sparse
 * products of a 1B token then took 0.86× the time on 2 Zen 4 cores (spill cost 6: 0.90×, 16: 0.91×).
 *
 * Without VBMI and VNNI the same loops run in plain C on the same layout (same int32 sums, same fp32
 * operations: the same result, slower). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "csr_tiles.h"
#include "kernels.h"

#if A8_VECTOR /* kernels.h */
#include <immintrin.h>
#endif

static inline int a8_pages(int n_in) { return (n_in + A8_PAGE - 1) / A8_PAGE; }

static inline long a8_col(const void *col, int col_bytes, int32_t k) {
  return col_bytes == 2 ? ((const int16_t *)col)[k] : ((const int32_t *)col)[k];
}

/* The layout above from a CSR of n_rows rows: crow int32, col int16 (col_bytes 2) or int32 (4)
 * absolute columns, val int8; spill_cost: bytes a spilled link counts for in the choice of K.
 * steps, spill_n: (⌈n_rows/16⌉ · pages) bytes; start, spill_start: ⌈n_rows/16⌉ + 1 int32; data:
 * start[n_groups] · 128 bytes, spill: spill_start[n_groups] · 3 bytes (written in full, padding
 * zeroed). Call once with data NULL for the sizes, then with data and spill. Returns 0, 1 for a column
 * outside [0, n_in), 2 for a group past 2^31 steps, 3 when a buffer could not be allocated. */
int a8_pack(const int32_t *crow, const void *col, int col_bytes, const int8_t *val, int n_rows, int n_in,
            int spill_cost, uint8_t *steps, int32_t *start, uint8_t *spill_n, int32_t *spill_start, uint8_t *data,
            uint8_t *spill) {
  int n_pages = a8_pages(n_in), n_groups = (n_rows + A8_ROWS - 1) / A8_ROWS;
  int *count = malloc(sizeof(int) * (size_t)A8_ROWS * n_pages);
  long *page_step = malloc(sizeof(long) * (size_t)n_pages), *page_spill = malloc(sizeof(long) * (size_t)n_pages);
  if (count == NULL || page_step == NULL || page_spill == NULL) {
    free(count);
    free(page_step);
    free(page_spill);
    return 3;
  }
  long total = 0, spilled = 0;
  int status = 0;
  for (int g = 0; g < n_groups && !status; g++) {
    memset(count, 0, sizeof(int) * (size_t)A8_ROWS * n_pages);
    int r_end = (g + 1) * A8_ROWS < n_rows ? (g + 1) * A8_ROWS : n_rows;
    for (int r = g * A8_ROWS; r < r_end && !status; r++)
      for (int32_t k = crow[r]; k < crow[r + 1]; k++) {
        long c = a8_col(col, col_bytes, k);
        if (c < 0 || c >= n_in) {
          status = 1;
          break;
        }
        count[(r - g * A8_ROWS) * n_pages + c / A8_PAGE]++;
      }
    if (status) break;
    start[g] = (int32_t)total;
    spill_start[g] = (int32_t)spilled;
    for (int p = 0; p < n_pages; p++) {
      int most = 0;
      for (int i = 0; i < A8_ROWS; i++) most = count[i * n_pages + p] > most ? count[i * n_pages + p] : most;
      int best_k = (most + 3) / 4, best_over = 0; /* ≤ 64 steps: a page has 256 columns */
      long best_cost = (long)A8_STEP * best_k;
      for (int k = best_k - 1; k >= 0; k--) { /* fewer steps, more spilled links (at most 255 a page) */
        int over = 0;
        for (int i = 0; i < A8_ROWS; i++) over += count[i * n_pages + p] > 4 * k ? count[i * n_pages + p] - 4 * k : 0;
        long cost = (long)A8_STEP * k + (long)spill_cost * over;
        if (over > 255) break;
        if (cost < best_cost) best_k = k, best_over = over, best_cost = cost;
      }
      page_step[p] = total - start[g];
      page_spill[p] = spilled - spill_start[g];
      steps[(long)g * n_pages + p] = (uint8_t)best_k;
      spill_n[(long)g * n_pages + p] = (uint8_t)best_over;
      total += best_k;
      spilled += best_over;
    }
    if (total > INT32_MAX || spilled > INT32_MAX) {
      status = 2;
      break;
    }
    if (data == NULL) continue;
    uint8_t *d = data + (long)start[g] * A8_STEP, *o = spill + (long)spill_start[g] * 3;
    memset(d, 0, (size_t)(total - start[g]) * A8_STEP);
    /* spills go page by page, lanes in order within a page: fill them page-major */
    for (int p = 0; p < n_pages; p++) {
      int k_p = steps[(long)g * n_pages + p];
      uint8_t *sp = o + page_spill[p] * 3;
      for (int r = g * A8_ROWS; r < r_end; r++) {
        int lane = r - g * A8_ROWS, j = 0;
        for (int32_t k = crow[r]; k < crow[r + 1]; k++) {
          long c = a8_col(col, col_bytes, k);
          if (c / A8_PAGE != p) continue;
          if (j < 4 * k_p) {
            uint8_t *s = d + (page_step[p] + j / 4) * A8_STEP;
            s[lane * 4 + j % 4] = (uint8_t)(c % A8_PAGE);
            s[64 + lane * 4 + j % 4] = (uint8_t)val[k];
          } else {
            sp[0] = (uint8_t)lane, sp[1] = (uint8_t)(c % A8_PAGE), sp[2] = (uint8_t)val[k];
            sp += 3;
          }
          j++;
        }
      }
    }
  }
  if (!status) start[n_groups] = (int32_t)total, spill_start[n_groups] = (int32_t)spilled;
  free(count);
  free(page_step);
  free(page_spill);
  return status;
}

/* Token t's pages p0 … p1 of xt (token-major fp32, n_in features) as int8: q (pages × 256, zero past
 * n_in) and one scale per page, s[p] = max |x| / 127, q = x / s rounded to nearest (ties to even),
 * all zero where the page is. */
void a8_quantize(const float *xt, int n_in, int8_t *q, float *s, int p0, int p1) {
  for (int p = p0; p < p1; p++) {
    int i0 = p * A8_PAGE, i1 = i0 + A8_PAGE < n_in ? i0 + A8_PAGE : n_in;
    float most = 0.0f;
    for (int i = i0; i < i1; i++) most = fabsf(xt[i]) > most ? fabsf(xt[i]) : most;
    float scale = most / 127.0f;
    s[p] = scale;
    for (int i = i0; i < i1; i++) {
      float v = scale > 0.0f ? nearbyintf(xt[i] / scale) : 0.0f;
      q[i] = (int8_t)(v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v);
    }
    for (int i = i1; i < i0 + A8_PAGE; i++) q[i] = 0;
  }
}

/* Groups g0 … g1 of Y = S X for n_tok tokens: xq (n_tok × pages × 256) and xs (n_tok × pages) from
 * a8_quantize; y (output row rows[r], token t) at y[rows[r] · ldy + t]. */
void a8_groups(const int8_t *xq, const float *xs, int n_in, int n_tok, const a8_layout *S, const float *scale,
               const int32_t *rows, int n_rows, float *y, long ldy, int g0, int g1) {
  int n_pages = a8_pages(n_in);
  for (int g = g0; g < g1; g++) {
    const uint8_t *step_of = S->steps + (long)g * n_pages, *spill_of = S->spill_n + (long)g * n_pages;
    for (int t = 0; t < n_tok; t++) {
      const uint8_t *d = S->data + (long)S->start[g] * A8_STEP, *o = S->spill + (long)S->spill_start[g] * 3;
      const int8_t *xt = xq + (long)t * n_pages * A8_PAGE;
      const float *st = xs + (long)t * n_pages;
      float sum[A8_ROWS];
      int32_t part[A8_ROWS];
#if A8_VECTOR
      __m512 total = _mm512_setzero_ps();
      const __m512i zero = _mm512_setzero_si512();
      for (int p = 0; p < n_pages; p++) {
        int n_steps = step_of[p], n_spill = spill_of[p];
        if (n_steps == 0 && n_spill == 0) continue;
        const int8_t *page = xt + p * A8_PAGE;
        __m512i acc = zero;
        if (n_steps) {
          __m512i t0 = _mm512_loadu_si512(page), t1 = _mm512_loadu_si512(page + 64);
          __m512i t2 = _mm512_loadu_si512(page + 128), t3 = _mm512_loadu_si512(page + 192);
          for (int k = 0; k < n_steps; k++, d += A8_STEP) {
            __m512i idx = _mm512_loadu_si512(d), w = _mm512_loadu_si512(d + 64);
            /* X bytes of 64 links: columns < 128 from (t0, t1), ≥ 128 from (t2, t3), by the index's top bit */
            __m512i xv = _mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), _mm512_permutex2var_epi8(t0, idx, t1),
                                                _mm512_permutex2var_epi8(t2, idx, t3));
            /* vpdpbusd multiplies unsigned by signed bytes: |x| times w with x's sign moved onto w */
            w = _mm512_mask_sub_epi8(w, _mm512_movepi8_mask(xv), zero, w);
            acc = _mm512_dpbusd_epi32(acc, _mm512_abs_epi8(xv), w);
          }
        }
        if (n_spill) {
          _mm512_storeu_si512(part, acc);
          for (int e = 0; e < n_spill; e++, o += 3) part[o[0]] += (int32_t)page[o[1]] * (int8_t)o[2];
          acc = _mm512_loadu_si512(part);
        }
        total = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(st[p]), total);
      }
      _mm512_storeu_ps(sum, total);
#else
      for (int i = 0; i < A8_ROWS; i++) sum[i] = 0.0f;
      for (int p = 0; p < n_pages; p++) {
        int n_steps = step_of[p], n_spill = spill_of[p];
        if (n_steps == 0 && n_spill == 0) continue;
        const int8_t *page = xt + p * A8_PAGE;
        for (int i = 0; i < A8_ROWS; i++) part[i] = 0;
        for (int k = 0; k < n_steps; k++, d += A8_STEP)
          for (int b = 0; b < 64; b++) part[b / 4] += (int32_t)page[d[b]] * (int8_t)d[64 + b];
        for (int e = 0; e < n_spill; e++, o += 3) part[o[0]] += (int32_t)page[o[1]] * (int8_t)o[2];
        for (int i = 0; i < A8_ROWS; i++) sum[i] = fmaf((float)part[i], st[p], sum[i]);
      }
#endif
      for (int i = 0; i < A8_ROWS; i++) {
        int r = g * A8_ROWS + i;
        if (r >= n_rows) break;
        y[(long)rows[r] * ldy + t] = sum[i] * scale[r];
      }
    }
  }
}

/* Y (n_rows output rows × n_tok, row stride ldy) = S X, X (n_in × n_tok) fp32 feature-major (row
 * stride ldx, tokens contiguous), S in the layout above (steps, start, data, spill_n, spill_start,
 * spill) with its stored rows' weight scales and output rows (stored row r is output row rows[r]). X
 * is quantized first (a8_quantize), then the groups run in n_chunks chunks of equal steps over
 * n_threads threads. Returns 0, or 1 when a buffer could not be allocated (Y is then incomplete). */
int spmm_a8(const float *x, long ldx, int n_in, int n_tok, const uint8_t *steps, const int32_t *start,
            const uint8_t *data, const uint8_t *spill_n, const int32_t *spill_start, const uint8_t *spill,
            const float *scale, const int32_t *rows, int n_rows, float *y, long ldy, int n_chunks, int n_threads) {
  int n_pages = a8_pages(n_in), n_groups = (n_rows + A8_ROWS - 1) / A8_ROWS, failed = 0;
  const a8_layout S = {steps, data, start, spill_n, spill, spill_start};
  int8_t *xq = aligned_alloc(64, (size_t)n_tok * n_pages * A8_PAGE);
  float *xs = malloc(sizeof(float) * (size_t)n_tok * n_pages), *xt = malloc(sizeof(float) * (size_t)n_tok * n_in);
  if (xq == NULL || xs == NULL || xt == NULL) {
    failed = 1;
  } else {
    _Pragma("omp parallel num_threads(n_threads)") {
      /* X token-major in blocks of 16 features × 64 tokens: whole lines written, the read lines reused
       * (a plain column-by-column copy took 9 % of a llama1b 2 × 256 forward, on one thread) */
      _Pragma("omp for schedule(static)") for (int j0 = 0; j0 < n_in; j0 += 16)
        for (int t0 = 0; t0 < n_tok; t0 += 64)
          for (int t = t0; t < t0 + 64 && t < n_tok; t++)
            for (int j = j0; j < j0 + 16 && j < n_in; j++) xt[(long)t * n_in + j] = x[(long)j * ldx + t];
      _Pragma("omp for schedule(static)") for (int t = 0; t < n_tok; t++)
        a8_quantize(xt + (long)t * n_in, n_in, xq + (long)t * n_pages * A8_PAGE, xs + (long)t * n_pages, 0, n_pages);
    }
    _Pragma("omp parallel for num_threads(n_threads) schedule(dynamic)") for (int c = 0; c < n_chunks; c++) {
      int g0 = csr_chunk_start(start, n_groups, c, n_chunks), g1 = csr_chunk_start(start, n_groups, c + 1, n_chunks);
      if (g0 < g1) a8_groups(xq, xs, n_in, n_tok, &S, scale, rows, n_rows, y, ldy, g0, g1);
    }
  }
  free(xq);
  free(xs);
  free(xt);
  return failed;
}
