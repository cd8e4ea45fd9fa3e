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
#include "kernels.h"

static inline float same(float v) { return v; }

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
  /* out[i, t] = w[i] · (h[i, t] / sqrt(mean_i h[i, t]² + eps)), as LlamaRMSNorm (sum in double). */   \
  void rms_norm_fm##SUFFIX(const T *h, long ldh, int n_feat, int n_tok, const T *w, float eps, T *out, long ldo) { \
    for (int t = 0; t < n_tok; t++) {                                                                 \
      double sum = 0.0;                                                                               \
      for (int i = 0; i < n_feat; i++) {                                                              \
        float v = LD(h[(long)i * ldh + t]);                                                           \
        sum += (double)(v * v);                                                                       \
      }                                                                                               \
      float r = 1.0f / sqrtf((float)(sum / n_feat) + eps);                                            \
      for (int i = 0; i < n_feat; i++)                                                                \
        out[(long)i * ldo + t] = ST(LD(w[i]) * LD(ST(LD(h[(long)i * ldh + t]) * r)));                 \
    }                                                                                                 \
  }                                                                                                   \
  /* gu rows [0, ffn) become act(gate) · up, up = rows [ffn, 2 ffn); n_tok columns, row stride ld. */  \
  void silu_mul_fm##SUFFIX(T *gu, long ld, int ffn, int n_tok, int act) {                              \
    for (int i = 0; i < ffn; i++)                                                                     \
      for (int t = 0; t < n_tok; t++) {                                                               \
        T *g = gu + (long)i * ld + t;                                                                 \
        *g = ST(LD(ST(activate(LD(*g), act))) * LD(g[(long)ffn * ld]));                               \
      }                                                                                               \
  }                                                                                                   \
  int attn_decode##SUFFIX(const T *qkv, long ldq, int batch, int seq, int n_heads, int n_kv, int head_dim, \
                          const T *cos, const T *sin, T *kcache, T *vcache, int cap, int start, float scale, T *o, \
                          long ldo, int threads) {                                                    \
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
    int n_threads = work >= (1L << 18) ? threads : 1, failed = 0;                                     \
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
 * (batch, head) pairs split over the threads when the cache is large enough to pay for it.
 * Returns 1 when a buffer could not be allocated (o is then incomplete). */
GLUE(, f32, float, same, same, load8_f32)
GLUE(_bf16, bf16, uint16_t, bf2f, f2bf, load8_bf16)

/* ---------------------------------------------------------------- all decoder blocks in one call
 *
 * decode_layers[_bf16] runs every block of a decoding step, the same operations in the same order as
 * feature_major.forward's loop with the kernels above (which is its reference in the tests):
 *
 *   x = rms_norm(h); qkv = G_qkv(x); o = attention(qkv, cache); h += G_o(o);
 *   x = rms_norm(h); gu = G_gate_up(x); gu[:ffn] = silu(gu[:ffn]) · gu[ffn:]; h += G_down(gu[:ffn])
 *
 * with G(x) = S x + scale · B act(A x) of a fused group (spmm_* of spmm.c / spmm_bf16.c and
 * lowrank_fm* of gemv.c). Why: at one token each block is ~14 calls from Python, and with the
 * weights streaming through the caches each costs tens of µs (llama1b: 1/6 of a token). The final
 * norm and the lm_head stay in Python (one call each).
 *
 * h (hidden × n_tok) feature-major, contiguous; n_tok = batch · seq ≤ 4. Groups whose base is a dense
 * weight are not handled here (the caller keeps torch's GEMM for them). `work`: n_tok × (hidden +
 * qkv rows + q rows + hidden + 2 ffn) elements; `scratch`: n_tok × (max n_in + max rank) floats. */
typedef struct {
  int n_in, n_out;
  const int32_t *crow; /* NULL: no sparse part (the group's base is zero) */
  const void *col, *values;
  const int32_t *rows;
  int col_i32;
  const void *lora_a; /* NULL: no low-rank branch */
  const void *lora_b; /* the members' B blocks (out_m × r_m) back to back */
  const int32_t *outs, *ranks;
  int n_rank, n_members;
  float scale;
  int act;
} dec_group;

typedef struct {
  const void *norm1, *norm2; /* input_layernorm, post_attention_layernorm weights (hidden) */
  dec_group group[4];        /* (q, k, v), o, (gate, up), down */
} dec_layer;

#define DECODE_LAYERS(SUFFIX, T, LD, ST, SPMM16, SPMM32, LOWRANK)                                         \
  /* y (n_out × n_tok) = G x (n_in × n_tok), both contiguous. Returns non-zero on a failed allocation. */ \
  static int group##SUFFIX(const dec_group *g, const T *x, T *y, int n_tok, int tile, int n_chunks,     \
                           float *scratch, int threads) {                                               \
    if (g->crow == NULL)                                                                                \
      memset(y, 0, sizeof(T) * (size_t)g->n_out * n_tok);                                               \
    else if (g->col_i32 ? SPMM32(x, n_tok, g->n_in, n_tok, g->crow, g->col, g->values, g->rows, y, n_tok, \
                                 g->n_out, tile, n_chunks, threads)                                     \
                        : SPMM16(x, n_tok, g->n_in, n_tok, g->crow, g->col, g->values, g->rows, y, n_tok, \
                                 g->n_out, tile, n_chunks, threads))                                    \
      return 1;                                                                                         \
    if (g->lora_a != NULL)                                                                              \
      return LOWRANK(g->lora_a, g->n_rank, g->n_in, x, n_tok, 1, n_tok, g->lora_b, g->outs, g->ranks,  \
                     g->n_members, g->scale, g->act, y, n_tok, scratch, threads);                       \
    return 0;                                                                                           \
  }                                                                                                     \
  static void add_into##SUFFIX(T *h, const T *y, long n) {                                              \
    for (long i = 0; i < n; i++) h[i] = ST(LD(h[i]) + LD(y[i]));                                        \
  }                                                                                                     \
  int decode_layers##SUFFIX(T *h, int hidden, int batch, int seq, const dec_layer *layers, int n_layers, \
                            T *const *kcache, T *const *vcache, float eps, int n_heads, int n_kv, int head_dim, \
                            const T *cos, const T *sin, int cap, int start, float attn_scale, int ffn, int tile, \
                            int n_chunks, T *work, float *scratch, int threads) {                       \
    int n_tok = batch * seq, q_rows = n_heads * head_dim, qkv_rows = q_rows + 2 * n_kv * head_dim;      \
    T *x = work, *qkv = x + (long)hidden * n_tok, *o = qkv + (long)qkv_rows * n_tok;                    \
    T *y = o + (long)q_rows * n_tok, *gu = y + (long)hidden * n_tok;                                    \
    for (int l = 0; l < n_layers; l++) {                                                                \
      const dec_layer *L = layers + l;                                                                  \
      rms_norm_fm##SUFFIX(h, n_tok, hidden, n_tok, L->norm1, eps, x, n_tok);                            \
      if (group##SUFFIX(&L->group[0], x, qkv, n_tok, tile, n_chunks, scratch, threads) ||               \
          attn_decode##SUFFIX(qkv, n_tok, batch, seq, n_heads, n_kv, head_dim, cos, sin, kcache[l], vcache[l], cap, \
                              start, attn_scale, o, n_tok, threads) ||                                  \
          group##SUFFIX(&L->group[1], o, y, n_tok, tile, n_chunks, scratch, threads))                   \
        return 1;                                                                                       \
      add_into##SUFFIX(h, y, (long)hidden * n_tok);                                                     \
      rms_norm_fm##SUFFIX(h, n_tok, hidden, n_tok, L->norm2, eps, x, n_tok);                            \
      if (group##SUFFIX(&L->group[2], x, gu, n_tok, tile, n_chunks, scratch, threads)) return 1;        \
      silu_mul_fm##SUFFIX(gu, n_tok, ffn, n_tok, 0);                                                    \
      if (group##SUFFIX(&L->group[3], gu, y, n_tok, tile, n_chunks, scratch, threads)) return 1;        \
      add_into##SUFFIX(h, y, (long)hidden * n_tok);                                                     \
    }                                                                                                   \
    return 0;                                                                                           \
  }

DECODE_LAYERS(, float, same, same, spmm_i16, spmm_i32, lowrank_fm)
DECODE_LAYERS(_bf16, uint16_t, bf2f, f2bf, spmm_bf16_i16, spmm_bf16_i32, lowrank_fm_bf16)
