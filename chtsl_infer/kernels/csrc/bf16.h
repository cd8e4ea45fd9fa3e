/* bfloat16 as uint16 bit patterns: widening (exact, a shift) and rounding to nearest-even as torch does;
 * the 8-float vectors (one ymm with AVX2) the decoding kernels load fp32 or bf16 rows into; and the
 * token-major fp32 copy of X they read.
 * Shared by spmm_bf16.c, gemv.c and decode.c. */
#ifndef CHTSL_BF16_H
#define CHTSL_BF16_H
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

/* 1 where the compiler targets AVX512-BF16: spmm_bf16.c's gather then uses vdpbf16ps. */
#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__)
#define BF16_DP 1
#else
#define BF16_DP 0
#endif

static inline float bf2f(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t f2bf(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

typedef float g8 __attribute__((vector_size(32)));
typedef float g8u __attribute__((vector_size(32), aligned(4)));
typedef uint16_t h8u __attribute__((vector_size(16), aligned(2)));
typedef uint32_t u8v __attribute__((vector_size(32)));

static inline g8 load8_f32(const float *p) { return *(const g8u *)p; }

/* Eight bf16 values as floats. With AVX2, one vpmovzxwd from memory and a shift: GCC lowers the
 * portable conversion to two 4-wide widenings, a byte shift and an insert (five operations per 8
 * values), and the bf16 loops are bound by operations, not bytes: a llama1b bf16 token took 0.95× the
 * time with the intrinsics (interleaved A/B), the lm_head's bf16 GEMV read 23.9 GB/s instead of 16.7. */
static inline g8 load8_bf16(const uint16_t *p) {
#ifdef __AVX2__
  __m256i wide = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
#else
  u8v wide = __builtin_convertvector(*(const h8u *)p, u8v) << 16;
#endif
  g8 f;
  memcpy(&f, &wide, sizeof f);
  return f;
}

/* xf[t * n + j] = x[j * s_in + t * s_tok] as fp32 for features j0 ≤ j < j1: a token-major fp32 copy of
 * (a slice of) X, which the gather loops and the low-rank rows read. */
#define TOKEN_MAJOR(NAME, T, LD)                                                                     \
  static inline void NAME(const T *x, long s_in, long s_tok, int n, int n_tok, float *xf, int j0, int j1) { \
    for (int j = j0; j < j1; j++)                                                                    \
      for (int t = 0; t < n_tok; t++) xf[(long)t * n + j] = LD(x[j * s_in + t * s_tok]);             \
  }
static inline float f32_same(float v) { return v; }
TOKEN_MAJOR(widen_tm, uint16_t, bf2f)
TOKEN_MAJOR(copy_tm, float, f32_same)

static inline float hsum8(g8 v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }
#endif
