/* The parts of a decoder block between its linears, for a few tokens at a time (decoding), fp32,
 * activations feature-major (features × tokens, element (i, t) at p[i * ld + t]):
 *
 *   rms_norm_fm   LlamaRMSNorm of every token's column
 *   attn_decode   RoPE on q and k, k and v written into the KV cache, attention over the cache
 *   silu_mul_fm   the MLP's act(gate) · up, in place
 *
 * At one token these are tiny (a few thousand floats), yet as torch operations they cost more than
 * the sparse linears of the block: ~30 dispatches per block, each re-fetching code and metadata that
 * the weights streamed through the caches evicted (llama1b: 35 of 128 ms per token; an RMSNorm
 * takes 34 µs warm and ~400 µs after a 256 MB sweep). One C call each keeps that to a few
 * cache misses. feature_major.forward uses them for ≤ kernels.GEMV_MAX_TOKENS fp32 CPU tokens and
 * torch otherwise; tests compare both with transformers' Llama.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "activation.h"

typedef float d8 __attribute__((vector_size(32)));
typedef float d8u __attribute__((vector_size(32), aligned(4)));

/* Σ a[d] · b[d] in two 8-float accumulators (a plain loop is a serial chain: no reordering without
 * -ffast-math). */
static inline float dot(const float *a, const float *b, int n) {
  d8 s0 = {0}, s1 = {0};
  int d = 0;
  for (; d + 16 <= n; d += 16) {
    s0 += *(const d8u *)(a + d) * *(const d8u *)(b + d);
    s1 += *(const d8u *)(a + d + 8) * *(const d8u *)(b + d + 8);
  }
  for (; d + 8 <= n; d += 8) s0 += *(const d8u *)(a + d) * *(const d8u *)(b + d);
  s0 += s1;
  float r = ((s0[0] + s0[1]) + (s0[2] + s0[3])) + ((s0[4] + s0[5]) + (s0[6] + s0[7]));
  for (; d < n; d++) r += a[d] * b[d];
  return r;
}

/* out[i, t] = w[i] · (h[i, t] / sqrt(mean_i h[i, t]² + eps)), as LlamaRMSNorm (sum in double). */
void rms_norm_fm(const float *h, long ldh, int n_feat, int n_tok, const float *w, float eps, float *out, long ldo) {
  for (int t = 0; t < n_tok; t++) {
    double sum = 0.0;
    for (int i = 0; i < n_feat; i++) {
      float v = h[(long)i * ldh + t];
      sum += (double)(v * v);
    }
    float r = 1.0f / sqrtf((float)(sum / n_feat) + eps);
    for (int i = 0; i < n_feat; i++) out[(long)i * ldo + t] = w[i] * (h[(long)i * ldh + t] * r);
  }
}

/* gu rows [0, ffn) become act(gate) · up, up = rows [ffn, 2 ffn); n_tok columns, row stride ld. */
void silu_mul_fm(float *gu, long ld, int ffn, int n_tok, int act) {
  for (int i = 0; i < ffn; i++)
    for (int t = 0; t < n_tok; t++) gu[(long)i * ld + t] = activate(gu[(long)i * ld + t], act) * gu[(long)(ffn + i) * ld + t];
}

/* RoPE of one head vector x (head_dim) at position pos into out: x·cos + rotate_half(x)·sin, where
 * rotate_half(x) = (-x[half:], x[:half]) (transformers' apply_rotary_pos_emb); cos/sin element (d, pos)
 * at d * ld_rope + pos. */
static void rope(const float *x, long sx, int head_dim, const float *cos, const float *sin, long ld_rope, int pos,
                 float *out) {
  int half = head_dim / 2;
  for (int d = 0; d < half; d++) {
    float c = cos[(long)d * ld_rope + pos], s = sin[(long)d * ld_rope + pos];
    out[d] = x[d * sx] * c - x[(d + half) * sx] * s;
  }
  for (int d = half; d < head_dim; d++) {
    float c = cos[(long)d * ld_rope + pos], s = sin[(long)d * ld_rope + pos];
    out[d] = x[d * sx] * c + x[(d - half) * sx] * s;
  }
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
 * Returns 1 when a score buffer could not be allocated (o is then incomplete). */
int attn_decode(const float *qkv, long ldq, int batch, int seq, int n_heads, int n_kv, int head_dim,
                const float *cos, const float *sin, float *kcache, float *vcache, int cap, int start, float scale,
                float *o, long ldo, int threads) {
  int q_rows = n_heads * head_dim, kv_rows = n_kv * head_dim, rep = n_heads / n_kv;
  int end = start + seq;
  for (int b = 0; b < batch; b++)
    for (int s = 0; s < seq; s++) {
      int t = b * seq + s;
      for (int kvh = 0; kvh < n_kv; kvh++) {
        long slot = (((long)b * n_kv + kvh) * cap + start + s) * head_dim;
        rope(qkv + (long)(q_rows + kvh * head_dim) * ldq + t, ldq, head_dim, cos, sin, cap, start + s, kcache + slot);
        for (int d = 0; d < head_dim; d++) vcache[slot + d] = qkv[(long)(q_rows + kv_rows + kvh * head_dim + d) * ldq + t];
      }
    }
  long work = (long)batch * n_heads * end * head_dim * seq;
  int n_threads = work >= (1L << 18) ? threads : 1, failed = 0;
#pragma omp parallel num_threads(n_threads) reduction(| : failed)
  {
    float *buf = malloc(sizeof(float) * ((size_t)end + 2 * (size_t)head_dim)); /* scores, q, output */
    failed = buf == NULL;
#pragma omp for schedule(static)
    for (int pair = 0; pair < batch * n_heads; pair++) {
      if (buf == NULL) continue;
      int b = pair / n_heads, h = pair % n_heads;
      const float *keys = kcache + ((long)b * n_kv + h / rep) * cap * head_dim;
      const float *vals = vcache + ((long)b * n_kv + h / rep) * cap * head_dim;
      float *scores = buf, *q = buf + end, *acc = q + head_dim;
      for (int s = 0; s < seq; s++) {
        int t = b * seq + s, n_pos = start + s + 1;
        rope(qkv + (long)h * head_dim * ldq + t, ldq, head_dim, cos, sin, cap, start + s, q);
        float top = -INFINITY;
        for (int j = 0; j < n_pos; j++) {
          scores[j] = dot(q, keys + (long)j * head_dim, head_dim) * scale;
          top = scores[j] > top ? scores[j] : top;
        }
        float total = 0.0f;
        for (int j = 0; j < n_pos; j++) total += scores[j] = expf(scores[j] - top);
        for (int d = 0; d < head_dim; d++) acc[d] = 0.0f;
        for (int j = 0; j < n_pos; j++) {
          const float *v = vals + (long)j * head_dim;
          float p = scores[j];
          for (int d = 0; d < head_dim; d++) acc[d] += p * v[d];
        }
        float inv = 1.0f / total;
        for (int d = 0; d < head_dim; d++) o[(long)(h * head_dim + d) * ldo + t] = acc[d] * inv;
      }
    }
    free(buf);
  }
  return failed;
}
