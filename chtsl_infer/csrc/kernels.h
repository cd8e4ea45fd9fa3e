/* The exported kernels that other kernels call (decode.c's decode_layers calls the sparse and the
 * low-rank ones). spmm.c, spmm_bf16.c and gemv.c include this too, so the compiler checks each
 * definition against the declaration its callers use. Parameters: see the defining file. */
#ifndef CHTSL_KERNELS_H
#define CHTSL_KERNELS_H
#include <stdint.h>

int spmm_i16(const float *x, long ldx, int n_in, int n_tok, const int32_t *crow, const int16_t *col, const float *val,
             const int32_t *rows, float *y, long ldy, int n_out, int tile, int n_chunks, int n_threads);
int spmm_i32(const float *x, long ldx, int n_in, int n_tok, const int32_t *crow, const int32_t *col, const float *val,
             const int32_t *rows, float *y, long ldy, int n_out, int tile, int n_chunks, int n_threads);
int spmm_bf16_i16(const uint16_t *x, long ldx, int n_in, int n_tok, const int32_t *crow, const int16_t *col,
                  const uint16_t *val, const int32_t *rows, uint16_t *y, long ldy, int n_out, int tile, int n_chunks,
                  int n_threads);
int spmm_bf16_i32(const uint16_t *x, long ldx, int n_in, int n_tok, const int32_t *crow, const int32_t *col,
                  const uint16_t *val, const int32_t *rows, uint16_t *y, long ldy, int n_out, int tile, int n_chunks,
                  int n_threads);
int lowrank_fm(const float *a, int n_rank, int n_in, const float *x, long sx_in, long sx_tok, int n_tok, const float *b,
               const int32_t *outs, const int32_t *ranks, int n_members, float scale, int act, float *y, long ldy,
               float *scratch, int threads);
int lowrank_fm_bf16(const uint16_t *a, int n_rank, int n_in, const uint16_t *x, long sx_in, long sx_tok, int n_tok,
                    const uint16_t *b, const int32_t *outs, const int32_t *ranks, int n_members, float scale, int act,
                    uint16_t *y, long ldy, float *scratch, int threads);
#endif
