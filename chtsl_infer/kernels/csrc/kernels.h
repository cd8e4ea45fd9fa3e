/* The exported kernels that other kernels call: lowrank_fm uses THREAD_ID, and decode.c's
 * decode_layers runs the per-row-range parts of the sparse and low-rank kernels (…_task, …_rows)
 * inside its own parallel regions. spmm.c, spmm_bf16.c and gemv.c include this too, so the compiler
 * checks each definition against the declaration its callers use. Parameters: see the defining file. */
#ifndef CHTSL_KERNELS_H
#define CHTSL_KERNELS_H
#include <stdint.h>

/* This thread's number and the team's size inside a parallel region (0 and 1 without OpenMP). */
#ifdef _OPENMP
#include <omp.h>
#define THREAD_ID() omp_get_thread_num()
#define N_THREADS() omp_get_num_threads()
#else
#define THREAD_ID() 0
#define N_THREADS() 1
#endif

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
void spmm_task_i16(const float *x, long ldx, int n_in, int n_tok, int t0, int tile, const int32_t *crow,
                   const int16_t *col, const float *val, const int32_t *rows, float *y, long ldy, int i0, int i1,
                   float *buf);
void spmm_task_i32(const float *x, long ldx, int n_in, int n_tok, int t0, int tile, const int32_t *crow,
                   const int32_t *col, const float *val, const int32_t *rows, float *y, long ldy, int i0, int i1,
                   float *buf);
void spmm_bf16_task_i16(const uint16_t *x, long ldx, const float *xf, int n_in, int n_tok, int t0, int tile,
                        const int32_t *crow, const int16_t *col, const uint16_t *val, const int32_t *rows, uint16_t *y,
                        long ldy, int i0, int i1, float *buf);
void spmm_bf16_task_i32(const uint16_t *x, long ldx, const float *xf, int n_in, int n_tok, int t0, int tile,
                        const int32_t *crow, const int32_t *col, const uint16_t *val, const int32_t *rows, uint16_t *y,
                        long ldy, int i0, int i1, float *buf);
long lowrank_b_split(const int32_t *outs, const int32_t *ranks, int n_members, int k, int n);
void lowrank_a_rows_f32(const float *a, int n_in, const float *xt, int n_tok, int n_rank, float scale, int act,
                        float *h, int j0, int j1);
void lowrank_a_rows_bf16(const uint16_t *a, int n_in, const float *xt, int n_tok, int n_rank, float scale, int act,
                         float *h, int j0, int j1);
void lowrank_b_rows_f32(const float *b, const int32_t *outs, const int32_t *ranks, int n_members, const float *h,
                        int n_rank, int n_tok, float *y, long ldy, long o0, long o1);
void lowrank_b_rows_bf16(const uint16_t *b, const int32_t *outs, const int32_t *ranks, int n_members, const float *h,
                         int n_rank, int n_tok, uint16_t *y, long ldy, long o0, long o1);
#endif
