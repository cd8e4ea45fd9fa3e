/* The low-rank branch's activations in C, by the codes kernels.LOWRANK_ACTIVATIONS gives them
 * (layers.activation_fn is the torch side): 0 silu, 1 relu, 2 gelu (erf form, torch's default), 3 identity.
 * Used by gemv.c (the low-rank decode kernel) and decode.c (the MLP's SiLU at decode). */
#ifndef CHTSL_ACTIVATION_H
#define CHTSL_ACTIVATION_H
#include <math.h>

static inline float activate(float v, int act) {
  switch (act) {
    case 0: return v / (1.0f + expf(-v));
    case 1: return v > 0.0f ? v : 0.0f;
    case 2: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    default: return v;
  }
}
#endif
