/* bfloat16 as uint16 bit patterns: widening (exact, a shift) and rounding to nearest-even as torch does.
 * Shared by spmm_bf16.c and gemv.c. */
#ifndef CHTSL_BF16_H
#define CHTSL_BF16_H
#include <stdint.h>
#include <string.h>

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
#endif
