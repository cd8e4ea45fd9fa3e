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

#include "activation.h"
#include "bf16.h"
#include "csr_tiles.h"
#include "kernels.h"

#if A8_VECTOR || A8_DOT_VECTOR /* kernels.h */
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
    s[p] = a8_round_block(xt + i0, i1 - i0, q + i0);
    for (int i = i1; i < i0 + A8_PAGE; i++) q[i] = 0;
  }
}

/* x[0 … n) as int8 q with one scale (returned): max |x| / 127, q = x / scale rounded to nearest (ties
 * to even), all zero where x is. */
float a8_round_block(const float *x, int n, int8_t *q) {
  float most = 0.0f;
  for (int i = 0; i < n; i++) most = fabsf(x[i]) > most ? fabsf(x[i]) : most;
  float scale = most / 127.0f;
  for (int i = 0; i < n; i++) {
    float v = scale > 0.0f ? nearbyintf(x[i] / scale) : 0.0f;
    q[i] = (int8_t)(v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v);
  }
  return scale;
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

/* X (n_in × n_tok fp32, element (i, t) at x[i · sx_in + t · sx_tok]) rounded as a8_quantize rounds
 * it, into fresh buffers *xq (n_tok × pages × 256) and *xs (n_tok × pages), on `threads` threads. X is
 * first copied token-major into xt (n_tok × n_in floats, the caller's) unless its tokens already are
 * rows (sx_in 1), in blocks of 16 features × 64 tokens: whole lines written, the read lines reused (a
 * plain column-by-column copy took 9 % of a llama1b 2 × 256 forward, on one thread). Returns 1 when
 * a buffer could not be allocated (the caller frees both pointers either way). */
static int a8_round_x(const float *x, long sx_in, long sx_tok, int n_in, int n_tok, float *xt, int8_t **xq,
                      float **xs, int threads) {
  int n_pages = a8_pages(n_in);
  *xq = aligned_alloc(64, (size_t)n_tok * n_pages * A8_PAGE);
  *xs = malloc(sizeof(float) * (size_t)n_tok * n_pages);
  if (*xq == NULL || *xs == NULL) return 1;
  const float *rows = sx_in == 1 ? x : xt; /* token t's features at rows + t · ldt */
  long ldt = sx_in == 1 ? sx_tok : n_in;
  _Pragma("omp parallel num_threads(threads) if (threads > 1)") {
    if (sx_in != 1) {
      _Pragma("omp for schedule(static)") for (int j0 = 0; j0 < n_in; j0 += 16)
        for (int t0 = 0; t0 < n_tok; t0 += 64)
          for (int t = t0; t < t0 + 64 && t < n_tok; t++)
            for (int j = j0; j < j0 + 16 && j < n_in; j++) xt[(long)t * n_in + j] = x[j * sx_in + t * sx_tok];
    }
    _Pragma("omp for schedule(static)") for (int t = 0; t < n_tok; t++)
      a8_quantize(rows + t * ldt, n_in, *xq + (long)t * n_pages * A8_PAGE, *xs + (long)t * n_pages, 0, n_pages);
  }
  return 0;
}

/* Y (n_rows output rows × n_tok, row stride ldy) = S X, X (n_in × n_tok) fp32 feature-major (row
 * stride ldx, tokens contiguous), S in the layout above (steps, start, data, spill_n, spill_start,
 * spill) with its stored rows' weight scales and output rows (stored row r is output row rows[r]). X
 * is quantized first (a8_round_x), then the groups run in n_chunks chunks of equal steps over
 * n_threads threads. Returns 0, or 1 when a buffer could not be allocated (Y is then incomplete). */
int spmm_a8(const float *x, long ldx, int n_in, int n_tok, const uint8_t *steps, const int32_t *start,
            const uint8_t *data, const uint8_t *spill_n, const int32_t *spill_start, const uint8_t *spill,
            const float *scale, const int32_t *rows, int n_rows, float *y, long ldy, int n_chunks, int n_threads) {
  int n_groups = (n_rows + A8_ROWS - 1) / A8_ROWS;
  const a8_layout S = {steps, data, start, spill_n, spill, spill_start};
  int8_t *xq = NULL;
  float *xs = NULL, *xt = malloc(sizeof(float) * (size_t)n_tok * n_in);
  int failed = xt == NULL || a8_round_x(x, ldx, 1, n_in, n_tok, xt, &xq, &xs, n_threads);
  if (!failed) {
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

/* ------------------------------------------------------------ dense int8 rows, int8 activations
 *
 * The dense int8 matrices of an int8-activation model — the low-rank A of each group and the lm_head —
 * take the same rounded input as its sparse products (a8_quantize: per token, per page of 256
 * features): row r's product is w_scale[r] · Σ_p xs[p] · Σ_{i in page p} w[r, i] · q[i], int32 within
 * a page. With AVX-512 VNNI, 64 weights are one vpdpbusd (x's sign moved onto the weights, as above)
 * where the fp32-activation int8 rows (gemv.c) widen 16 at a time to floats: 2 Zen 4 cores, the
 * llama1b lm_head (32,000 × 2,048, streamed from memory) took 1.4–1.8 ms per token against 3.8–4.2,
 * the llama60m one (32,000 × 512, in L3) 0.18–0.24 ms against 0.33–0.41.
 *
 * a8_dot: out[t] for n_tok (1..4) tokens of one row w (n_in int8); xq, xs as a8_quantize writes them
 * for n_pages pages per token (xq zero past n_in, so a page's last vector may read zeros). */
#if A8_DOT_VECTOR
static inline __attribute__((always_inline)) void a8_dot_nt(const int8_t *w, int n_in, const int8_t *xq,
                                                             const float *xs, int n_pages, int nt, float *out) {
  const __m512i zero = _mm512_setzero_si512();
  __m512 total[4];
  for (int t = 0; t < nt; t++) total[t] = _mm512_setzero_ps();
  for (int p = 0; p < n_pages; p++) {
    int i0 = p * A8_PAGE;
    __m512i acc[4], acc2[4];
    for (int t = 0; t < nt; t++) acc[t] = acc2[t] = zero;
    if (i0 + A8_PAGE <= n_in) { /* a whole page: four vectors, two chains per token */
      for (int i = i0; i < i0 + A8_PAGE; i += 128) {
        __m512i w0 = _mm512_loadu_si512(w + i), w1 = _mm512_loadu_si512(w + i + 64);
        for (int t = 0; t < nt; t++) {
          const int8_t *q = xq + (long)t * n_pages * A8_PAGE + i;
          __m512i q0 = _mm512_loadu_si512(q), q1 = _mm512_loadu_si512(q + 64);
          acc[t] = _mm512_dpbusd_epi32(acc[t], _mm512_abs_epi8(q0),
                                       _mm512_mask_sub_epi8(w0, _mm512_movepi8_mask(q0), zero, w0));
          acc2[t] = _mm512_dpbusd_epi32(acc2[t], _mm512_abs_epi8(q1),
                                        _mm512_mask_sub_epi8(w1, _mm512_movepi8_mask(q1), zero, w1));
        }
      }
    } else { /* the last page, cut short: the weights past n_in are not read */
      for (int i = i0; i < n_in; i += 64) {
        __mmask64 keep = n_in - i >= 64 ? ~0ULL : (1ULL << (n_in - i)) - 1;
        __m512i w0 = _mm512_maskz_loadu_epi8(keep, w + i);
        for (int t = 0; t < nt; t++) {
          __m512i q0 = _mm512_loadu_si512(xq + (long)t * n_pages * A8_PAGE + i);
          acc[t] = _mm512_dpbusd_epi32(acc[t], _mm512_abs_epi8(q0),
                                       _mm512_mask_sub_epi8(w0, _mm512_movepi8_mask(q0), zero, w0));
        }
      }
    }
    for (int t = 0; t < nt; t++)
      total[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc[t], acc2[t])),
                                 _mm512_set1_ps(xs[(long)t * n_pages + p]), total[t]);
  }
  for (int t = 0; t < nt; t++) out[t] = _mm512_reduce_add_ps(total[t]);
}

static void a8_dot(const int8_t *w, int n_in, const int8_t *xq, const float *xs, int n_pages, int n_tok, float *out) {
  switch (n_tok) { /* constant token counts: the accumulators stay in registers */
    case 1: a8_dot_nt(w, n_in, xq, xs, n_pages, 1, out); break;
    case 2: a8_dot_nt(w, n_in, xq, xs, n_pages, 2, out); break;
    case 3: a8_dot_nt(w, n_in, xq, xs, n_pages, 3, out); break;
    default: a8_dot_nt(w, n_in, xq, xs, n_pages, 4, out); break;
  }
}
#else
static void a8_dot(const int8_t *w, int n_in, const int8_t *xq, const float *xs, int n_pages, int n_tok, float *out) {
  for (int t = 0; t < n_tok; t++) {
    const int8_t *q = xq + (long)t * n_pages * A8_PAGE;
    float total = 0.0f;
    for (int p = 0; p < n_pages; p++) {
      int i1 = (p + 1) * A8_PAGE < n_in ? (p + 1) * A8_PAGE : n_in;
      int32_t part = 0;
      for (int i = p * A8_PAGE; i < i1; i++) part += (int32_t)w[i] * q[i];
      total = fmaf((float)part, xs[(long)t * n_pages + p], total);
    }
    out[t] = total;
  }
}
#endif

/* y[t · ldy + r] = w_scale[r] · (row r of W) · x_t for rows r0 ≤ r < r1 of W (n_in int8 per row). */
void a8_rows(const int8_t *w, const float *w_scale, int n_in, const int8_t *xq, const float *xs, int n_tok, float *y,
             long ldy, int r0, int r1) {
  int n_pages = a8_pages(n_in);
  float dot[4];
  for (int r = r0; r < r1; r++) {
    a8_dot(w + (long)r * n_in, n_in, xq, xs, n_pages, n_tok, dot);
    for (int t = 0; t < n_tok; t++) y[(long)t * ldy + r] = w_scale[r] * dot[t];
  }
}

/* h[t · n_rank + j] = scale · act(a_scale[j] · A[j] · x_t) for A's rows j0 ≤ j < j1: the low-rank
 * branch's first half with int8 activations (gemv.c's lowrank_a_rows_* with fp32 ones). */
void a8_lowrank_a_rows(const int8_t *a, const float *a_scale, int n_in, const int8_t *xq, const float *xs, int n_tok,
                       int n_rank, float scale, int act, float *h, int j0, int j1) {
  a8_rows(a, a_scale, n_in, xq, xs, n_tok, h, n_rank, j0, j1);
  for (int t = 0; t < n_tok; t++)
    for (int j = j0; j < j1; j++) h[(long)t * n_rank + j] = scale * activate(h[(long)t * n_rank + j], act);
}

/* Y[t, o] = scale[o] · W[o] · x_t with x rounded as a8_quantize does: gemv.c's gemv_i8 with int8
 * activations (the lm_head of an int8-activation model). W (n_out × n_in) int8 row-major, x (n_tok ≤ 4
 * rows of n_in fp32, row stride ldx), y at y[t · ldy + o]. Returns 1 for n_tok outside 1..4, 2 when a
 * buffer could not be allocated. */
int gemv_a8(const int8_t *w, const float *scale, int n_out, int n_in, const float *x, long ldx, int n_tok, float *y,
            long ldy, int threads) {
  if (n_tok < 1 || n_tok > 4) return 1;
  int8_t *xq = NULL;
  float *xs = NULL;
  int failed = a8_round_x(x, 1, ldx, n_in, n_tok, NULL, &xq, &xs, 1); /* x's tokens are rows: no copy */
  if (!failed) {
    _Pragma("omp parallel num_threads(threads)") {
      int k = THREAD_ID(), n = N_THREADS();
      a8_rows(w, scale, n_in, xq, xs, n_tok, y, ldy, (int)((long)n_out * k / n), (int)((long)n_out * (k + 1) / n));
    }
  }
  free(xq);
  free(xs);
  return failed ? 2 : 0;
}

/* The low-rank B of an int8-activation group, y += B h, with h rounded to int8 too: per token and
 * member, one scale for the member's r_m values of h (a8_round_block). B's rows are short (rank 65
 * at llama1b): gemv.c's row loop spent more on each row's horizontal sum and scalar tail than on its
 * 65 weights (14 % of a 1B token on 2 Zen 4 cores). Here B is held in panels: per member, per block
 * of 16 rows, ⌈r_m/4⌉ steps of 64 bytes, byte 4i + j of step s being B_m[16 · block + i, 4s + j]
 * (zero past the member's rows or rank; `a8_panels` in kernels/sparse.py writes them), so one vpdpbusd
 * takes four ranks of 16 rows and a block's 16 sums end in one vector, no horizontal sum.
 *
 * Rows o0 ≤ o < o1 of Y (Σ out_m rows, feature-major: element (o, t) at y[o · ldy + t]); h token-major
 * (n_tok × n_rank, member m's values at its rank offset). A block cut by o0 or o1 is computed whole
 * and stored in part (threads share no output row). */
void a8_lowrank_b_rows(const int8_t *panel, const float *b_scale, const int32_t *outs, const int32_t *ranks,
                       int n_members, const float *h, int n_rank, int n_tok, float *y, long ldy, long o0, long o1) {
  const int8_t *pm = panel;
  long off = 0, r0 = 0;
  for (int m = 0; m < n_members; m++) {
    int r = ranks[m], n_steps = (r + 3) / 4;
    long lo = o0 > off ? o0 : off, hi = o1 < off + outs[m] ? o1 : off + outs[m];
    if (lo < hi) {
      int8_t hq[4][n_steps * 4]; /* this member's h as int8, padded to whole steps; one scale per token */
      float hs[4];
      for (int t = 0; t < n_tok; t++) {
        hs[t] = a8_round_block(h + (long)t * n_rank + r0, r, hq[t]);
        for (int k = r; k < n_steps * 4; k++) hq[t][k] = 0;
      }
      for (long b = (lo - off) / A8_ROWS; b * A8_ROWS < hi - off; b++) {
        const int8_t *w = pm + b * A8_ROWS * n_steps * 4;
        float sum[4][A8_ROWS];
#if A8_DOT_VECTOR
        const __m512i zero = _mm512_setzero_si512();
        __m512i acc[4];
        for (int t = 0; t < n_tok; t++) acc[t] = zero;
        for (int k = 0; k < n_steps; k++) {
          __m512i wv = _mm512_loadu_si512(w + k * 64);
          for (int t = 0; t < n_tok; t++) {
            int32_t four;
            memcpy(&four, hq[t] + 4 * k, 4);
            __m512i hv = _mm512_set1_epi32(four); /* ranks 4k … 4k + 3 of h, for every row */
            acc[t] = _mm512_dpbusd_epi32(acc[t], _mm512_abs_epi8(hv),
                                         _mm512_mask_sub_epi8(wv, _mm512_movepi8_mask(hv), zero, wv));
          }
        }
        for (int t = 0; t < n_tok; t++) _mm512_storeu_ps(sum[t], _mm512_cvtepi32_ps(acc[t]));
#else
        for (int t = 0; t < n_tok; t++)
          for (int i = 0; i < A8_ROWS; i++) {
            int32_t part = 0;
            for (int k = 0; k < n_steps * 4; k++) part += (int32_t)w[(k / 4) * 64 + 4 * i + k % 4] * hq[t][k];
            sum[t][i] = (float)part;
          }
#endif
        for (int i = 0; i < A8_ROWS; i++) {
          long o = off + b * A8_ROWS + i;
          if (o < lo || o >= hi) continue;
          for (int t = 0; t < n_tok; t++) y[o * ldy + t] += b_scale[o] * (hs[t] * sum[t][i]);
        }
      }
    }
    pm += (long)(outs[m] + A8_ROWS - 1) / A8_ROWS * A8_ROWS * n_steps * 4;
    off += outs[m];
    r0 += r;
  }
}

/* gemv.c's lowrank_fm_i8 with A's input rounded as a8_quantize does, and B in panels with its input
 * rounded too (a8_lowrank_b_rows): the low-rank branch of an int8-activation group, same arguments
 * (b: the panels) and threading, for any number of tokens (a prompt too: the rows run 4 tokens at a
 * time, A and B staying in cache; the float path it replaces dequantized and multiplied in torch,
 * 0.46× the prefill speed of fp32 at llama60m). scratch: n_tok × (n_in + R) floats. Returns 1 for
 * n_tok < 1, 2 when a buffer could not be allocated. */
int lowrank_fm_a8(const int8_t *a, const float *a_scale, int n_rank, int n_in, const float *x, long sx_in, long sx_tok,
                  int n_tok, const int8_t *b, const float *b_scale, const int32_t *outs, const int32_t *ranks,
                  int n_members, float scale, int act, float *y, long ldy, float *scratch, int threads) {
  if (n_tok < 1) return 1;
  int n_pages = a8_pages(n_in);
  float *xt = scratch, *h = xt + (long)n_tok * n_in; /* X, h token-major: (n_tok × n_in), (n_tok × R) */
  long work = (long)n_rank * n_in;
  for (int m = 0; m < n_members; m++) work += (long)outs[m] * ranks[m];
  int n_threads = work * n_tok >= LOWRANK_THREADS_FROM ? threads : 1; /* as lowrank_fm */
  int8_t *xq = NULL;
  float *xs = NULL;
  int failed = a8_round_x(x, sx_in, sx_tok, n_in, n_tok, xt, &xq, &xs, n_tok > 4 ? n_threads : 1);
  if (!failed) {
    _Pragma("omp parallel num_threads(n_threads)") {
      int k = THREAD_ID(), n = N_THREADS();
      for (int t0 = 0; t0 < n_tok; t0 += 4) {
        int nt = n_tok - t0 < 4 ? n_tok - t0 : 4;
        a8_lowrank_a_rows(a, a_scale, n_in, xq + (long)t0 * n_pages * A8_PAGE, xs + (long)t0 * n_pages, nt, n_rank,
                          scale, act, h + (long)t0 * n_rank, (int)((long)n_rank * k / n),
                          (int)((long)n_rank * (k + 1) / n));
      }
      _Pragma("omp barrier") /* h is complete */
      long o0 = lowrank_b_split(outs, ranks, n_members, k, n), o1 = lowrank_b_split(outs, ranks, n_members, k + 1, n);
      for (int t0 = 0; t0 < n_tok; t0 += 4)
        a8_lowrank_b_rows(b, b_scale, outs, ranks, n_members, h + (long)t0 * n_rank, n_rank,
                          n_tok - t0 < 4 ? n_tok - t0 : 4, y + t0, ldy, o0, o1);
    }
  }
  free(xq);
  free(xs);
  return failed ? 2 : 0;
}
