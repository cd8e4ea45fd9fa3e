/* The pieces of the gather loops (one or two tokens: decoding), which walk a CSR row's links and
 * multiply each value by x at the link's column, x a token-major fp32 vector:
 *
 *   load8_i8         eight int8 values as floats (vpmovsxbd + vcvtdq2ps with AVX2)
 *   x8_<index>       x at the row's next eight columns, as one 8-float vector
 *   cols16_<index>   (AVX-512) the row's next sixteen columns as 32-bit lanes, for vgatherdps
 *   load16_i8        (AVX-512) sixteen int8 values as floats
 *   GATHER_DOT       a row's dot with x (qdot_<index> for int8 values; spmm_bf16.c's for bf16)
 *
 * <index> is the column encoding (csr_tiles.h's cursors): i16, i32 (the columns themselves) or d8
 * (8-bit deltas; the cursor `c` / `base` carries the last column across calls). Shared by spmm.c
 * (int8 values) and spmm_bf16.c (bf16 values). */
#ifndef CHTSL_GATHER_H
#define CHTSL_GATHER_H
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "csr_tiles.h"
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef int8_t c8u __attribute__((vector_size(8), aligned(1)));

/* Eight int8 values as floats: with AVX2 one 8-byte load, a sign extension and a conversion. */
static inline g8 load8_i8(const int8_t *p) {
#ifdef __AVX2__
  __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
  g8 f;
  memcpy(&f, &v, sizeof f);
  return f;
#else
  return __builtin_convertvector(*(const c8u *)p, g8);
#endif
}

/* x[c[0..7]] as one vector. A link costs three loads in a scalar loop (column, value, x), and on AMD
 * EPYC (Zen 3, AVX2) those loads were the bound: 0.74 ns per link with the data in cache. Here the
 * eight int16 columns come in two 8-byte loads (little-endian: column j is bits 16j..16j+15) and the
 * values in one: 0.48 ns per link. A llama1b token in bf16 took 0.88× the time (interleaved A/B), its
 * sparse part 0.74×. (AVX2's vgatherdps is no help there: 17 cycles per 8 floats.) */
static inline g8 x8_i16(const float *x, const int16_t *c, int *cur) {
  (void)cur; /* absolute columns: the cursor is set by the next col_i16 */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  uint64_t lo, hi;
  memcpy(&lo, c, 8);
  memcpy(&hi, c + 4, 8);
  return (g8){x[lo & 0xffff], x[(lo >> 16) & 0xffff], x[(lo >> 32) & 0xffff], x[lo >> 48],
              x[hi & 0xffff], x[(hi >> 16) & 0xffff], x[(hi >> 32) & 0xffff], x[hi >> 48]};
#else
  return (g8){x[c[0]], x[c[1]], x[c[2]], x[c[3]], x[c[4]], x[c[5]], x[c[6]], x[c[7]]};
#endif
}

static inline g8 x8_i32(const float *x, const int32_t *c, int *cur) {
  (void)cur;
  return (g8){x[c[0]], x[c[1]], x[c[2]], x[c[3]], x[c[4]], x[c[5]], x[c[6]], x[c[7]]};
}

/* Eight deltas in one 8-byte load, summed onto the cursor one by one (a chain of 1-cycle adds). */
static inline g8 x8_d8(const float *x, const uint8_t *d, int *cur) {
  int c0, c1, c2, c3, c4, c5, c6, c7;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  uint64_t w;
  memcpy(&w, d, 8);
  c0 = *cur + (int)(w & 0xff);
  c1 = c0 + (int)((w >> 8) & 0xff);
  c2 = c1 + (int)((w >> 16) & 0xff);
  c3 = c2 + (int)((w >> 24) & 0xff);
  c4 = c3 + (int)((w >> 32) & 0xff);
  c5 = c4 + (int)((w >> 40) & 0xff);
  c6 = c5 + (int)((w >> 48) & 0xff);
  c7 = c6 + (int)(w >> 56);
#else
  c0 = *cur + d[0], c1 = c0 + d[1], c2 = c1 + d[2], c3 = c2 + d[3];
  c4 = c3 + d[4], c5 = c4 + d[5], c6 = c5 + d[6], c7 = c6 + d[7];
#endif
  *cur = c7;
  return (g8){x[c0], x[c1], x[c2], x[c3], x[c4], x[c5], x[c6], x[c7]};
}

#if defined(__AVX512F__)
/* The row's next 16 columns as int32 lanes. `base` (all lanes equal) is the d8 cursor: the column
 * before these links, updated to the last of them; the absolute encodings leave it alone. */
static inline __m512i cols16_i16(const int16_t *p, __m512i *base) {
  (void)base;
  return _mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i *)p));
}

static inline __m512i cols16_i32(const int32_t *p, __m512i *base) {
  (void)base;
  return _mm512_loadu_si512((const void *)p);
}

/* An inclusive prefix sum of 16 deltas in four shift-and-add steps (valignd against zeros shifts the
 * lanes up by 1, 2, 4, 8), plus the base. */
static inline __m512i cols16_d8(const uint8_t *p, __m512i *base) {
  __m512i z = _mm512_setzero_si512();
  __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
  v = _mm512_add_epi32(v, _mm512_alignr_epi32(v, z, 15));
  v = _mm512_add_epi32(v, _mm512_alignr_epi32(v, z, 14));
  v = _mm512_add_epi32(v, _mm512_alignr_epi32(v, z, 12));
  v = _mm512_add_epi32(v, _mm512_alignr_epi32(v, z, 8));
  v = _mm512_add_epi32(v, *base);
  *base = _mm512_permutexvar_epi32(_mm512_set1_epi32(15), v);
  return v;
}

static inline __m512 load16_i8(const int8_t *p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

static inline int base_col(__m512i base) { return _mm_cvtsi128_si32(_mm512_castsi512_si128(base)); }
#endif

/* Whether the gather loops take 16 links per vgatherdps (int8 values; bf16 with vdpbf16ps). Build
 * variant `g8` (CHTSL_GATHER16=0) keeps the 8-link loops of x values loaded one by one on an AVX-512
 * build: the tuner keeps whichever decodes faster on the machine (vgatherdps's cost differs by CPU). */
#if defined(__AVX512F__) && !(defined(CHTSL_GATHER16) && CHTSL_GATHER16 == 0)
#define GATHER16 1
#else
#define GATHER16 0
#endif

/* NAME(xt, col, val, k, end) = Σ over links k ≤ link < end of WIDEN(val[link]) · xt[its column], in
 * fp32, for values VAL_T and columns COL_T (cursor suffix SUFFIX): first WIDE(SUFFIX), a loop over
 * whole runs of 16 or 32 links with AVX-512 that leaves its sum in s0, the cursor in c and k past
 * its links (or nothing); then 8 links at a time in two chains of 8-float vectors (LOAD8 widens 8
 * values); the last few links one by one, in two scalar chains. */
#define GATHER_DOT(NAME, SUFFIX, COL_T, VAL_T, LOAD8, WIDEN, WIDE)                                   \
  static inline float NAME(const float *xt, const COL_T *col, const VAL_T *val, int k, int end) {    \
    int c = 0;                                                                                        \
    float s0 = 0.0f, s1 = 0.0f;                                                                       \
    WIDE(SUFFIX)                                                                                      \
    g8 a0 = {0}, a1 = {0}; /* two chains: an FMA's latency */                                         \
    for (; k + 16 <= end; k += 16) {                                                                  \
      a0 += LOAD8(val + k) * x8_##SUFFIX(xt, col + k, &c);                                            \
      a1 += LOAD8(val + k + 8) * x8_##SUFFIX(xt, col + k + 8, &c);                                    \
    }                                                                                                 \
    if (k + 8 <= end) {                                                                               \
      a0 += LOAD8(val + k) * x8_##SUFFIX(xt, col + k, &c);                                            \
      k += 8;                                                                                         \
    }                                                                                                 \
    for (; k + 1 < end; k += 2) {                                                                     \
      float x0 = xt[col_##SUFFIX(col, k, &c)];                                                        \
      float x1 = xt[col_##SUFFIX(col, k + 1, &c)];                                                    \
      s0 += WIDEN(val[k]) * x0;                                                                       \
      s1 += WIDEN(val[k + 1]) * x1;                                                                   \
    }                                                                                                 \
    if (k < end) s0 += WIDEN(val[k]) * xt[col_##SUFFIX(col, k, &c)];                                  \
    return hsum8(a0 + a1) + (s0 + s1);                                                                \
  }

/* int8 values with AVX-512: 16 links per vgatherdps, two chains. */
#if GATHER16
#define QDOT16(SUFFIX)                                                                                \
  {                                                                                                   \
    __m512 q0 = _mm512_setzero_ps(), q1 = _mm512_setzero_ps();                                        \
    __m512i base = _mm512_setzero_si512();                                                            \
    for (; k + 32 <= end; k += 32) {                                                                  \
      __m512i lo = cols16_##SUFFIX(col + k, &base), hi = cols16_##SUFFIX(col + k + 16, &base);        \
      q0 = _mm512_fmadd_ps(load16_i8(val + k), _mm512_i32gather_ps(lo, xt, 4), q0);                    \
      q1 = _mm512_fmadd_ps(load16_i8(val + k + 16), _mm512_i32gather_ps(hi, xt, 4), q1);               \
    }                                                                                                 \
    if (k + 16 <= end) {                                                                              \
      __m512i lo = cols16_##SUFFIX(col + k, &base);                                                   \
      q0 = _mm512_fmadd_ps(load16_i8(val + k), _mm512_i32gather_ps(lo, xt, 4), q0);                    \
      k += 16;                                                                                        \
    }                                                                                                 \
    c = base_col(base);                                                                               \
    s0 = _mm512_reduce_add_ps(_mm512_add_ps(q0, q1));                                                 \
  }
#else
#define QDOT16(SUFFIX)
#endif

#define I8_TO_FLOAT(v) ((float)(v))
GATHER_DOT(qdot_i16, i16, int16_t, int8_t, load8_i8, I8_TO_FLOAT, QDOT16)
GATHER_DOT(qdot_i32, i32, int32_t, int8_t, load8_i8, I8_TO_FLOAT, QDOT16)
GATHER_DOT(qdot_d8, d8, uint8_t, int8_t, load8_i8, I8_TO_FLOAT, QDOT16)
#endif
