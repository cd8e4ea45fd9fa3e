/* The parts of a decoder block between its linears, for a few tokens at a time (decoding), fp32,
 * activations feature-major (features × tokens, element (i, t) at p[i * ld + t]):
 *
 *   rms_norm_fm   LlamaRMSNorm of every token's column
 *   attn_decode   RoPE on q and k, k and v written into the KV cache, attention over the cache
 *   silu_mul_fm   the MLP's act(gate) · up, in place
 *
 * fp32 (the names above) or bf16 (`…_bf16`: bf16 in memory, fp32 arithmetic, rounded where torch's
 * bf16 operations round: the normalised h before the weight, the activation before the product, the
 * keys written into the cache and the attention output).
 *
 * At one token these are tiny (a few thousand floats), yet as torch operations they cost more than
 * the sparse linears of the block: ~30 dispatches per block, each re-fetching code and metadata that
 * the weights streamed through the caches evicted (llama1b: 35 of 128 ms per token; an RMSNorm
 * takes 34 µs warm and ~400 µs after a 256 MB sweep). One C call each keeps that to a few
 * cache misses. feature_major.forward uses them for ≤ kernels.GEMV_MAX_TOKENS CPU tokens and
 * torch otherwise; tests compare both with transformers' Llama.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "activation.h"
#include "bf16.h"
#include "csr_tiles.h"
#include "kernels.h"

/* RoPE of one head vector x (head_dim, element d at x[d * sx]) at position pos into fp32 out:
 * x·cos + rotate_half(x)·sin, rotate_half(x) = (-x[half:], x[:half]) (transformers'
 * apply_rotary_pos_emb); cos/sin element (d, pos) at d * ld_rope + pos. */
#define ROPE(SUFFIX, T, LD)                                                                           \
  static void rope_##SUFFIX(const T *x, long sx, int head_dim, const T *cos, const T *sin, long ld_rope, int pos, \
                            float *out) {                                                             \
    int half = head_dim / 2;                                                                          \
    for (int d = 0; d < half; d++) {                                                                  \
      float c = LD(cos[(long)d * ld_rope + pos]), s = LD(sin[(long)d * ld_rope + pos]);               \
      out[d] = LD(x[d * sx]) * c - LD(x[(d + half) * sx]) * s;                                        \
    }                                                                                                 \
    for (int d = half; d < head_dim; d++) {                                                           \
      float c = LD(cos[(long)d * ld_rope + pos]), s = LD(sin[(long)d * ld_rope + pos]);               \
      out[d] = LD(x[d * sx]) * c + LD(x[(d - half) * sx]) * s;                                        \
    }                                                                                                 \
  }

/* Σ q[d] · k[d], q fp32, k stored: two 8-float accumulators (a plain loop is one serial chain). */
#define DOT(SUFFIX, T, LD, LOAD8)                                                                     \
  static inline float dot_##SUFFIX(const float *q, const T *k, int n) {                               \
    g8 s0 = {0}, s1 = {0};                                                                            \
    int d = 0;                                                                                        \
    for (; d + 16 <= n; d += 16) {                                                                    \
      s0 += load8_f32(q + d) * LOAD8(k + d);                                                          \
      s1 += load8_f32(q + d + 8) * LOAD8(k + d + 8);                                                  \
    }                                                                                                 \
    for (; d + 8 <= n; d += 8) s0 += load8_f32(q + d) * LOAD8(k + d);                                 \
    float r = hsum8(s0 + s1);                                                                          \
    for (; d < n; d++) r += q[d] * LD(k[d]);                                                          \
    return r;                                                                                         \
  }

#define GLUE(SUFFIX, TAG, T, LD, ST, LOAD8)                                                                \
  ROPE(TAG, T, LD)                                                                                    \
  DOT(TAG, T, LD, LOAD8)                                                                              \
  /* 1 / sqrt(mean_i h[i, t]² + eps) of token t's column (the sum in double, as LlamaRMSNorm). */      \
  static float rms_inv_##TAG(const T *h, long ldh, int n_feat, int t, float eps) {                    \
    double sum = 0.0;                                                                                 \
    for (int i = 0; i < n_feat; i++) {                                                                \
      float v = LD(h[(long)i * ldh + t]);                                                             \
      sum += (double)(v * v);                                                                         \
    }                                                                                                 \
    return 1.0f / sqrtf((float)(sum / n_feat) + eps);                                                \
  }                                                                                                   \
  /* The normalised element: w · (h · r), rounded where torch rounds. */                              \
  static inline T norm_elt_##TAG(T h, T w, float r) { return ST(LD(w) * LD(ST(LD(h) * r))); }        \
  /* act(gate) · up of rows i0 ≤ i < i1 in place: gate rows [0, ffn) of gu, up rows [ffn, 2 ffn). */  \
  static void silu_rows_##TAG(T *gu, long ld, int ffn, int n_tok, int act, int i0, int i1) {          \
    for (int i = i0; i < i1; i++)                                                                     \
      for (int t = 0; t < n_tok; t++) {                                                               \
        T *g = gu + (long)i * ld + t;                                                                 \
        *g = ST(LD(ST(activate(LD(*g), act))) * LD(g[(long)ffn * ld]));                               \
      }                                                                                               \
  }                                                                                                   \
  /* out[i, t] = w[i] · (h[i, t] / sqrt(mean_i h[i, t]² + eps)), as LlamaRMSNorm. */                    \
  void rms_norm_fm##SUFFIX(const T *h, long ldh, int n_feat, int n_tok, const T *w, float eps, T *out, long ldo) { \
    for (int t = 0; t < n_tok; t++) {                                                                 \
      float r = rms_inv_##TAG(h, ldh, n_feat, t, eps);                                                \
      for (int i = 0; i < n_feat; i++) out[(long)i * ldo + t] = norm_elt_##TAG(h[(long)i * ldh + t], w[i], r); \
    }                                                                                                 \
  }                                                                                                   \
  /* gu rows [0, ffn) become act(gate) · up, up = rows [ffn, 2 ffn); n_tok columns, row stride ld. */  \
  void silu_mul_fm##SUFFIX(T *gu, long ld, int ffn, int n_tok, int act) {                              \
    silu_rows_##TAG(gu, ld, ffn, n_tok, act, 0, ffn);                                                 \
  }                                                                                                   \
  int attn_decode##SUFFIX(const T *qkv, long ldq, int batch, int seq, int n_heads, int n_kv, int head_dim, \
                          const T *cos, const T *sin, T *kcache, T *vcache, int cap, int start, float scale, T *o, \
                          long ldo, long min_work, int threads) {                                     \
    int q_rows = n_heads * head_dim, kv_rows = n_kv * head_dim, rep = n_heads / n_kv, end = start + seq; \
    float *rot = malloc(sizeof(float) * (size_t)head_dim);                                            \
    if (rot == NULL) return 1;                                                                        \
    for (int b = 0; b < batch; b++)                                                                   \
      for (int s = 0; s < seq; s++) {                                                                 \
        int t = b * seq + s;                                                                          \
        for (int kvh = 0; kvh < n_kv; kvh++) {                                                        \
          long slot = (((long)b * n_kv + kvh) * cap + start + s) * head_dim;                          \
          rope_##TAG(qkv + (long)(q_rows + kvh * head_dim) * ldq + t, ldq, head_dim, cos, sin, cap, start + s, rot); \
          for (int d = 0; d < head_dim; d++) kcache[slot + d] = ST(rot[d]);                           \
          for (int d = 0; d < head_dim; d++) vcache[slot + d] = qkv[(long)(q_rows + kv_rows + kvh * head_dim + d) * ldq + t]; \
        }                                                                                             \
      }                                                                                               \
    free(rot);                                                                                        \
    long work = (long)batch * n_heads * end * head_dim * seq;                                         \
    int n_threads = work >= min_work ? threads : 1, failed = 0; /* a fork/join costs more */      \
    _Pragma("omp parallel num_threads(n_threads) reduction(| : failed)") {                            \
      float *buf = malloc(sizeof(float) * ((size_t)end + 2 * (size_t)head_dim)); /* scores, q, output */ \
      failed = buf == NULL;                                                                           \
      _Pragma("omp for schedule(static)") for (int pair = 0; pair < batch * n_heads; pair++) {        \
        if (buf == NULL) continue;                                                                    \
        int b = pair / n_heads, h = pair % n_heads;                                                   \
        const T *keys = kcache + ((long)b * n_kv + h / rep) * cap * head_dim;                         \
        const T *vals = vcache + ((long)b * n_kv + h / rep) * cap * head_dim;                         \
        float *scores = buf, *q = buf + end, *acc = q + head_dim;                                     \
        for (int s = 0; s < seq; s++) {                                                               \
          int t = b * seq + s, n_pos = start + s + 1;                                                 \
          rope_##TAG(qkv + (long)h * head_dim * ldq + t, ldq, head_dim, cos, sin, cap, start + s, q); \
          float top = -INFINITY;                                                                      \
          for (int j = 0; j < n_pos; j++) {                                                           \
            scores[j] = dot_##TAG(q, keys + (long)j * head_dim, head_dim) * scale;                 \
            top = scores[j] > top ? scores[j] : top;                                                  \
          }                                                                                           \
          float total = 0.0f;                                                                         \
          for (int j = 0; j < n_pos; j++) total += scores[j] = expf(scores[j] - top);                 \
          for (int d = 0; d < head_dim; d++) acc[d] = 0.0f;                                           \
          for (int j = 0; j < n_pos; j++) {                                                           \
            const T *v = vals + (long)j * head_dim;                                                   \
            float p = scores[j];                                                                      \
            for (int d = 0; d < head_dim; d++) acc[d] += p * LD(v[d]);                                \
          }                                                                                           \
          float inv = 1.0f / total;                                                                   \
          for (int d = 0; d < head_dim; d++) o[(long)(h * head_dim + d) * ldo + t] = ST(acc[d] * inv); \
        }                                                                                             \
      }                                                                                               \
      free(buf);                                                                                      \
    }                                                                                                 \
    return failed;                                                                                    \
  }

/* One decoding step's attention for batch × seq tokens (token t = b · seq + s at position start + s):
 *
 *   qkv (q_rows + 2 kv_rows, n_tok) feature-major, row stride ldq: q row h·D + d, then k, then v rows;
 *   kcache, vcache (batch, n_kv, cap, D) contiguous: the rotated keys and the values of every token
 *     are written at position start + s, then each query head attends (causally, scale · q·k, softmax)
 *     to positions ≤ start + s of its key/value head (head / (n_heads / n_kv), as repeat_kv);
 *   cos, sin: the cache's RoPE tables, element (d, pos) at d · cap + pos;
 *   o (n_heads · D, n_tok) feature-major, row stride ldo.
 *
 * (batch, head) pairs split over the threads once the attention's multiply-adds (batch · heads ·
 * positions · head_dim · seq) reach min_work (KernelSettings.attn_min_work; below it one thread: a
 * fork/join would cost more than the work).
 * Returns 1 when a buffer could not be allocated (o is then incomplete). */
GLUE(, f32, float, f32_same, f32_same, load8_f32)
GLUE(_bf16, bf16, uint16_t, bf2f, f2bf, load8_bf16)

/* ---------------------------------------------------------------- all decoder blocks in one call
 *
 * decode_layers[_bf16] runs every block of a decoding step, the same operations in the same order as
 * feature_major.forward's loop with the kernels above (which is its reference in the tests):
 *
 *   x = rms_norm(h); qkv = G_qkv(x); o = attention(qkv, cache); h += G_o(o);
 *   x = rms_norm(h); gu = G_gate_up(x); gu[:ffn] = silu(gu[:ffn]) · gu[ffn:]; h += G_down(gu[:ffn])
 *
 * with G(x) = S x + scale · B act(A x) of a fused group (the row kernels of spmm.c / spmm_bf16.c and
 * gemv.c). Why: at one token each block is ~14 calls from Python, and with the weights streaming
 * through the caches each costs tens of µs (llama1b: 1/6 of a token). The final norm and the
 * lm_head stay in Python (one call each).
 *
 * Each group is one parallel region of three phases (see group_*), so the glue between the linears
 * (the norm before a group, the SiLU product before down_proj, the residual add after o_proj and
 * down_proj, X widened to fp32) runs split over the threads inside it instead of on one thread
 * between regions, and the sparse rows and A's rows share one phase as work items (dec_run).
 * Interleaved A/B on 2 AMD EPYC cores against separate sparse and low-rank regions with the glue
 * between them: 0.94–0.96× the time per token (llama60m, llama1b; fp32 and bf16), 0.92× at llama130m.
 *
 * h (hidden × n_tok) feature-major, contiguous; n_tok = batch · seq ≤ 4; tile: the sparse kernel's
 * token tile for n_tok (KernelSettings.token_tile; 0 = gather), attn_min_work attn_decode's min_work.
 * Groups whose base is a dense weight are not handled here (the caller keeps torch's GEMM for them). A group's weights are in the activations'
 * dtype, or int8 with per-row scales (dec_group.int8; fp32 activations only: decode_layers_bf16
 * returns 2 for such a group and computes nothing). `work`: n_tok × (hidden + qkv rows + q rows
 * + hidden + 2 ffn) elements; `scratch`: n_tok × (max n_in + max rank) floats. */
/* dec_group and dec_layer (one group's and one block's arguments) are declared in kernels.h. */

enum { PLAIN, NORM, SILU }; /* what a group's first phase does to its input */

/* A group's second phase is a list of items: chunks of ~item_bytes of the sparse rows (equal links),
 * then of A's rows. They are dealt to the threads in contiguous runs, each run a packed (next, end)
 * pair: a thread takes items from the front of its own run and, once that is empty, from the back of
 * another's. So each thread streams long stretches of memory, and none waits while another has work
 * left: the gather and A's rows cost different times per byte, by CPU. (AMD EPYC, llama1b bf16: split
 * by bytes, the thread left with A's rows idled in 12 % of its samples, with these items in 6 %; a
 * token took 0.97× the time, fp32 0.98×. 16 KiB to 256 KiB items measured the same, within noise.)
 * item_bytes: KernelSettings.decode_item_bytes (chtsl_infer/kernels/settings.py). */
typedef struct {
  _Alignas(64) uint64_t run; /* next | end << 32; a cache line each */
} dec_run;

static long take_item(dec_run *runs, int k, int n) {
  for (int d = 0; d < n; d++) { /* own run from the front, then the others' from the back */
    dec_run *r = runs + (k + d) % n;
    uint64_t v = __atomic_load_n(&r->run, __ATOMIC_RELAXED);
    for (;;) {
      uint64_t next = v & 0xffffffffu, end = v >> 32;
      if (next >= end) break;
      uint64_t want = d == 0 ? v + 1 : (end - 1) << 32 | next;
      if (__atomic_compare_exchange_n(&r->run, &v, want, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        return d == 0 ? (long)next : (long)end - 1;
    }
  }
  return -1;
}

/* Stored rows r0..r1 of y = S x: the spmm task functions of the group's value type and column encoding
 * (fp32 or int8 values with fp32 activations, bf16 with bf16), with the group's arguments. */
#define SPARSE_TASK(FN) \
  FN(x, n_tok, xf, g->n_in, n_tok, 0, tile, g->crow, g->col, g->values, g->values_scale, g->rows, y, n_tok, r0, r1, buf)
#define BY_INDEX(PREFIX)                          \
  switch (g->index) {                             \
    case 0: SPARSE_TASK(PREFIX##_task_i16); break; \
    case 1: SPARSE_TASK(PREFIX##_task_i32); break; \
    default: SPARSE_TASK(PREFIX##_task_d8); break; \
  }

static void sparse_rows_f32(const dec_group *g, const float *x, const float *xf, int n_tok, int tile, float *y, int r0,
                            int r1, float *buf) {
  if (g->int8) {
    BY_INDEX(spmm_i8)
  } else {
    BY_INDEX(spmm)
  }
}

static void sparse_rows_bf16(const dec_group *g, const uint16_t *x, const float *xf, int n_tok, int tile, uint16_t *y,
                             int r0, int r1, float *buf) {
  BY_INDEX(spmm_bf16)
}

/* The low-rank halves (gemv.c; spmm_a8.c with int8 activations) with the group's arguments: h = scale ·
 * act(A x) for A's rows j0..j1, and y += B h for output rows o0..o1; int8 factors with their row scales
 * where the group is int8. */
static void a_rows_f32(const dec_group *g, const float *xf, int n_tok, float *hl, int j0, int j1) {
  if (g->index == A8_INDEX) /* int8 activations: A takes the input S took, rounded in phase 1 */
    a8_lowrank_a_rows(g->lora_a, g->a_scale, g->n_in, g->a8_x, g->a8_xs, n_tok, g->n_rank, g->scale, g->act, hl, j0,
                      j1);
  else if (g->int8)
    lowrank_a_rows_i8(g->lora_a, g->a_scale, g->n_in, xf, n_tok, g->n_rank, g->scale, g->act, hl, j0, j1);
  else
    lowrank_a_rows_f32(g->lora_a, NULL, g->n_in, xf, n_tok, g->n_rank, g->scale, g->act, hl, j0, j1);
}

static void a_rows_bf16(const dec_group *g, const float *xf, int n_tok, float *hl, int j0, int j1) {
  lowrank_a_rows_bf16(g->lora_a, NULL, g->n_in, xf, n_tok, g->n_rank, g->scale, g->act, hl, j0, j1);
}

static void b_rows_f32(const dec_group *g, const float *hl, int n_tok, float *y, long o0, long o1) {
  if (g->index == A8_INDEX) /* int8 activations: B in panels, h rounded per member */
    a8_lowrank_b_rows(g->lora_b, g->b_scale, g->outs, g->ranks, g->n_members, hl, g->n_rank, n_tok, y, n_tok, o0, o1);
  else if (g->int8)
    lowrank_b_rows_i8(g->lora_b, g->b_scale, g->outs, g->ranks, g->n_members, hl, g->n_rank, n_tok, y, n_tok, o0, o1);
  else
    lowrank_b_rows_f32(g->lora_b, NULL, g->outs, g->ranks, g->n_members, hl, g->n_rank, n_tok, y, n_tok, o0, o1);
}

static void b_rows_bf16(const dec_group *g, const float *hl, int n_tok, uint16_t *y, long o0, long o1) {
  lowrank_b_rows_bf16(g->lora_b, NULL, g->outs, g->ranks, g->n_members, hl, g->n_rank, n_tok, y, n_tok, o0, o1);
}

#define DECODE_LAYERS(SUFFIX, TAG, T, LD, ST, TOKEN_MAJOR_COPY, INT8_OK)                                            \
  /* y (n_out × n_tok) = G x for one group, in one parallel region of three phases, each thread on     \
   * its share:                                                                                         \
   *   1. x's rows: x = rms_norm(h) with norm_w (NORM) or act(gate) · up in place (SILU: x holds the    \
   *      gate rows, then the up rows); xf = x as fp32 token-major; y's rows = 0 if S is absent;       \
   *   2. the items (see dec_run) of the sparse rows and of A's rows: y = S x, hl = scale · act(A x);   \
   *   3. equal bytes of B's rows: y += B hl; with `resid`, h += y on the same rows.                   \
   * The two barriers make each phase see the previous one complete. Returns non-zero on a failed      \
   * allocation. */                                                                                     \
  static int group##SUFFIX(const dec_group *g, int pro, T *x, T *h, const T *norm_w, float eps, T *y, int resid, \
                           int n_tok, int tile, long item_bytes, float *scratch, dec_run *runs,       \
                           int threads) {                                                               \
    int n_in = g->n_in, n_out = g->n_out, failed = 0;                                                   \
    float *xf = scratch, *hl = scratch + (long)n_tok * n_in;                                            \
    /* a8: S in spmm_a8.c's layout, x quantized per page in phase 1 (each thread whole pages) */        \
    int a8 = g->index == A8_INDEX, has_sparse = g->crow != NULL || a8, unit = a8 ? A8_PAGE : 1;         \
    int n_groups = (n_out + A8_ROWS - 1) / A8_ROWS, n_pages = (n_in + A8_PAGE - 1) / A8_PAGE;           \
    long w_size = g->int8 ? 1 : (long)sizeof(T), col_size = g->index == 1 ? 4 : g->index == 2 ? 1 : 2;   \
    long sparse_bytes = a8 ? (long)g->a8.start[n_groups] * A8_STEP + 3L * g->a8.spill_start[n_groups]    \
                           : g->crow ? g->crow[n_out] * (col_size + w_size) : 0;                        \
    long a_bytes = g->lora_a ? (long)g->n_rank * n_in * w_size : 0;                                     \
    int n_sparse = has_sparse ? (int)(sparse_bytes / item_bytes) + 1 : 0;                              \
    int n_a = g->lora_a ? (int)(a_bytes / item_bytes) + 1 : 0;                                          \
    n_a = n_a < g->n_rank ? n_a : g->n_rank;                                                            \
    _Pragma("omp parallel num_threads(threads) reduction(| : failed)") {                               \
      int k = THREAD_ID(), n = N_THREADS();                                                             \
      int n_units = (n_in + unit - 1) / unit;                                                           \
      int i0 = (int)((long)n_units * k / n) * unit, i1 = (int)((long)n_units * (k + 1) / n) * unit;     \
      i0 = i0 < n_in ? i0 : n_in, i1 = i1 < n_in ? i1 : n_in;                                           \
      if (pro == NORM) {                                                                                \
        float r[4];                                                                                     \
        for (int t = 0; t < n_tok; t++) r[t] = rms_inv_##TAG(h, n_tok, n_in, t, eps);                  \
        for (int i = i0; i < i1; i++)                                                                   \
          for (int t = 0; t < n_tok; t++) x[i * n_tok + t] = norm_elt_##TAG(h[i * n_tok + t], norm_w[i], r[t]); \
      } else if (pro == SILU) {                                                                         \
        silu_rows_##TAG(x, n_tok, n_in, n_tok, 0, i0, i1);                                              \
      }                                                                                                 \
      TOKEN_MAJOR_COPY(x, n_tok, 1, n_in, n_tok, xf, i0, i1);                                           \
      if (a8 && i0 < i1)                                                                                \
        for (int t = 0; t < n_tok; t++)                                                                 \
          a8_quantize(xf + (long)t * n_in, n_in, g->a8_x + (long)t * n_pages * A8_PAGE, g->a8_xs + (long)t * n_pages, \
                      i0 / A8_PAGE, (i1 + A8_PAGE - 1) / A8_PAGE);                                      \
      if (!has_sparse) {                                                                                \
        long o0 = (long)n_out * k / n, o1 = (long)n_out * (k + 1) / n;                                  \
        memset(y + o0 * n_tok, 0, sizeof(T) * (size_t)((o1 - o0) * n_tok));                            \
      }                                                                                                 \
      int items = n_sparse + n_a;                                                                       \
      runs[k].run = (uint64_t)((long)items * (k + 1) / n) << 32 | (uint64_t)((long)items * k / n);      \
      _Pragma("omp barrier")                                                                            \
      float *buf = NULL;                                                                                \
      for (long item; (item = take_item(runs, k, n)) >= 0;) {                                           \
        if (item < n_sparse && a8) {                                                                    \
          int g0 = csr_chunk_start(g->a8.start, n_groups, (int)item, n_sparse);                         \
          int g1 = csr_chunk_start(g->a8.start, n_groups, (int)item + 1, n_sparse);                     \
          if (g0 < g1)                                                                                  \
            a8_groups(g->a8_x, g->a8_xs, n_in, n_tok, &g->a8, g->values_scale, g->rows, n_out, (float *)y, n_tok, \
                      g0, g1);                                                                          \
        } else if (item < n_sparse) {                                                                   \
          int r0 = csr_chunk_start(g->crow, n_out, (int)item, n_sparse);                                \
          int r1 = csr_chunk_start(g->crow, n_out, (int)item + 1, n_sparse);                            \
          if (tile && buf == NULL && (buf = aligned_alloc(64, sizeof(float) * (size_t)n_in * tile)) == NULL) \
            failed = 1;                                                                                 \
          else if (r0 < r1)                                                                             \
            sparse_rows_##TAG(g, x, xf, n_tok, tile, y, r0, r1, buf);                                   \
        } else {                                                                                        \
          long a = item - n_sparse;                                                                     \
          a_rows_##TAG(g, xf, n_tok, hl, (int)(g->n_rank * a / n_a), (int)(g->n_rank * (a + 1) / n_a));  \
        }                                                                                               \
      }                                                                                                 \
      free(buf);                                                                                        \
      _Pragma("omp barrier")                                                                            \
      long o0 = (long)n_out * k / n, o1 = (long)n_out * (k + 1) / n;                                    \
      if (g->lora_a != NULL) {                                                                          \
        o0 = lowrank_b_split(g->outs, g->ranks, g->n_members, k, n);                                    \
        o1 = lowrank_b_split(g->outs, g->ranks, g->n_members, k + 1, n);                                \
        b_rows_##TAG(g, hl, n_tok, y, o0, o1);                                                          \
      }                                                                                                 \
      if (resid)                                                                                        \
        for (long e = o0 * n_tok; e < o1 * n_tok; e++) h[e] = ST(LD(h[e]) + LD(y[e]));                  \
    }                                                                                                   \
    return failed;                                                                                      \
  }                                                                                                     \
  int decode_layers##SUFFIX(T *h, int hidden, int batch, int seq, const dec_layer *layers, int n_layers, \
                            T *const *kcache, T *const *vcache, float eps, int n_heads, int n_kv, int head_dim, \
                            const T *cos, const T *sin, int cap, int start, float attn_scale, int tile,         \
                            long item_bytes, long attn_min_work, T *work, float *scratch, int threads) { \
    int n_tok = batch * seq, q_rows = n_heads * head_dim, qkv_rows = q_rows + 2 * n_kv * head_dim;      \
    T *x = work, *qkv = x + (long)hidden * n_tok, *o = qkv + (long)qkv_rows * n_tok;                    \
    T *y = o + (long)q_rows * n_tok, *gu = y + (long)hidden * n_tok;                                    \
    for (int l = 0; l < n_layers; l++) /* int8 groups need fp32 activations */                          \
      for (int j = 0; j < 4; j++)                                                                       \
        if (layers[l].group[j].int8 && !INT8_OK) return 2;                                              \
    dec_run *runs = aligned_alloc(64, sizeof(dec_run) * (size_t)(threads > 1 ? threads : 1));          \
    int failed = runs == NULL;                                                                          \
    for (int l = 0; l < n_layers && !failed; l++) {                                                     \
      const dec_layer *L = layers + l;                                                                  \
      const dec_group *G = L->group;                                                                    \
      if (group##SUFFIX(G + 0, NORM, x, h, L->norm1, eps, qkv, 0, n_tok, tile, item_bytes, scratch, runs, threads) || \
          attn_decode##SUFFIX(qkv, n_tok, batch, seq, n_heads, n_kv, head_dim, cos, sin, kcache[l], vcache[l], cap, \
                              start, attn_scale, o, n_tok, attn_min_work, threads) ||                   \
          group##SUFFIX(G + 1, PLAIN, o, h, NULL, eps, y, 1, n_tok, tile, item_bytes, scratch, runs, threads) ||      \
          group##SUFFIX(G + 2, NORM, x, h, L->norm2, eps, gu, 0, n_tok, tile, item_bytes, scratch, runs, threads) ||  \
          group##SUFFIX(G + 3, SILU, gu, h, NULL, eps, y, 1, n_tok, tile, item_bytes, scratch, runs, threads))      \
        failed = 1;                                                                                     \
    }                                                                                                   \
    free(runs);                                                                                         \
    return failed;                                                                                      \
  }

DECODE_LAYERS(, f32, float, f32_same, f32_same, copy_tm, 1)
DECODE_LAYERS(_bf16, bf16, uint16_t, bf2f, f2bf, widen_tm, 0)
