/* The library's interface, declared once. Every .c file includes this header, so the compiler checks
 * each definition against its declaration here.
 *
 *   CHTSL_EXPORT  the functions Python binds: one entry each in chtsl_infer/kernels/table.py, whose
 *                 argument names and types tests/test_kernel_table.py reads from this file and
 *                 compares, and which are the only symbols the built library exports (the build
 *                 compiles with -fvisibility=hidden; a test lists the library's symbols with nm).
 *   the rest      kernels' parts that other files call inside their own parallel regions (decode.c
 *                 runs the per-row-range parts of the sparse and low-rank kernels): hidden.
 *
 * Parameters: see the defining file. Pointers are bound as void pointers (c_void_p), so an fp32 and a
 * bf16 (uint16_t) variant of a kernel have one argument list. */
#ifndef CHTSL_KERNELS_H
#define CHTSL_KERNELS_H
#include <stdint.h>

#ifndef CHTSL_EXPORT /* tests/test_kernel_table.py preprocesses this file with CHTSL_EXPORT kept as a word */
#if defined(__GNUC__)
#define CHTSL_EXPORT __attribute__((visibility("default")))
#else
#define CHTSL_EXPORT
#endif
#endif

/* This thread's number and the team's size inside a parallel region (0 and 1 without OpenMP). */
#ifdef _OPENMP
#include <omp.h>
#define THREAD_ID() omp_get_thread_num()
#define N_THREADS() omp_get_num_threads()
#else
#define THREAD_ID() 0
#define N_THREADS() 1
#endif

/* S in spmm_a8.c's int8-activation layout: per (group of 16 rows, page) its 128-byte steps and spilled
 * links; each group's first step and first spilled link (spmm_a8.c describes it). */
typedef struct {
  const uint8_t *steps, *data;
  const int32_t *start;
  const uint8_t *spill_n, *spill;
  const int32_t *spill_start;
} a8_layout;

/* decode_layers' per-group and per-block arguments (decode.c). Python fills the same structs through
 * ctypes (table.py: DecGroup, DecLayer); kernel_probe reports their layout, which the loader compares. */
typedef struct {
  int n_in, n_out;
  const int32_t *crow; /* NULL: no sparse part (the group's base is zero) */
  const void *col, *values;
  const int32_t *rows;
  int index;          /* the column encoding: 0 int16, 1 int32, 2 8-bit deltas (csr_tiles.h) */
  const void *lora_a; /* NULL: no low-rank branch */
  const void *lora_b; /* the members' B blocks (out_m × r_m) back to back */
  const int32_t *outs, *ranks;
  int n_rank, n_members;
  float scale;
  int act;
  int int8; /* 1: values, lora_a and lora_b are int8 with the per-row scales below (fp32 activations only) */
  const float *values_scale, *a_scale, *b_scale; /* (stored rows of S,), (Σ r_m,), (Σ out_m,) */
  /* index 3: S in spmm_a8.c's int8-activation layout instead of a CSR (crow NULL; int8 1), and the
   * group's buffers for its quantized input: GEMV_MAX_TOKENS × pages × 256 bytes, × pages floats */
  a8_layout a8;
  int8_t *a8_x;
  float *a8_xs;
} dec_group;

typedef struct {
  const void *norm1, *norm2; /* input_layernorm, post_attention_layernorm weights (hidden) */
  dec_group group[4];        /* (q, k, v), o, (gate, up), down */
} dec_layer;

/* ------------------------------------------------------------------------------------ exported */

/* spmm.c, spmm_bf16.c: Y = S X, feature-major (the inference runtime): fp32 or int8 values with fp32 X and Y,
 * bf16 values with bf16 X and Y; int16, int32 or 8-bit delta (d8) columns. Every variant once:
 * V_(prefix, column encoding, X, C, V, Y) with X/Y the activation types, C the column and V the value
 * type, declared as the export prefix_<enc> here and as its per-row-range part prefix_task_<enc> among
 * the internal functions. (tests/test_kernel_table.py reads the preprocessed declarations.) */
#define CHTSL_SPMM_VARIANTS(V_)                                    \
  V_(spmm, i16, float, int16_t, float, float)                      \
  V_(spmm, i32, float, int32_t, float, float)                      \
  V_(spmm, d8, float, uint8_t, float, float)                       \
  V_(spmm_bf16, i16, uint16_t, int16_t, uint16_t, uint16_t)        \
  V_(spmm_bf16, i32, uint16_t, int32_t, uint16_t, uint16_t)        \
  V_(spmm_bf16, d8, uint16_t, uint8_t, uint16_t, uint16_t)         \
  V_(spmm_i8, i16, float, int16_t, int8_t, float)                  \
  V_(spmm_i8, i32, float, int32_t, int8_t, float)                  \
  V_(spmm_i8, d8, float, uint8_t, int8_t, float)
#define SPMM(prefix, enc, X, C, V, Y)                                                                               \
  CHTSL_EXPORT int prefix##_##enc(const X *x, long ldx, int n_in, int n_tok, const int32_t *crow, const C *col,     \
                                  const V *val, const float *scale, const int32_t *rows, Y *y, long ldy, int n_out, \
                                  int tile, int n_chunks, int n_threads);
CHTSL_SPMM_VARIANTS(SPMM)
#undef SPMM

/* csr_train.c: token-major products of sparse-native training. */
CHTSL_EXPORT int csr_mm_tm(const float *x, long ldx, int n_tok, int n_cols, const int32_t *crow, const int32_t *col,
                           const float *val, int n_rows, float *y, long ldy, int tile, int n_chunks, int n_threads);
CHTSL_EXPORT int csr_sddmm_tm(const float *dy, long lddy, const float *x, long ldx, int n_tok, int n_rows, int n_cols,
                              const int32_t *crow, const int32_t *col, float *out, int tile, int n_threads);
CHTSL_EXPORT int csr_transpose(const int32_t *crow, const int32_t *col, int n_rows, int n_cols, int32_t *t_crow,
                               int32_t *t_row, int32_t *t_perm);

/* ch_scores.c: one half of the CH2-L3n regrowth scores. */
CHTSL_EXPORT int ch2_l3n_half(const int32_t *crow, const int32_t *col, const int32_t *tcrow, const int32_t *tcol,
                              int n_rows, int n_cols, double *out, int threads);

/* gemv.c: decoding's dense GEMV and a fused group's low-rank branch, 1–4 tokens; int8 weights with per-row scales. */
CHTSL_EXPORT int gemv(const float *w, const float *scale, int n_out, int n_in, const float *x, long ldx, int n_tok,
                      float *y, long ldy, int threads);
CHTSL_EXPORT int gemv_bf16(const uint16_t *w, const float *scale, int n_out, int n_in, const float *x, long ldx,
                           int n_tok, float *y, long ldy, int threads);
CHTSL_EXPORT int gemv_i8(const int8_t *w, const float *scale, int n_out, int n_in, const float *x, long ldx, int n_tok,
                         float *y, long ldy, int threads);
CHTSL_EXPORT int lowrank_fm(const float *a, const float *a_scale, int n_rank, int n_in, const float *x, long sx_in,
                            long sx_tok, int n_tok, const float *b, const float *b_scale, const int32_t *outs,
                            const int32_t *ranks, int n_members, float scale, int act, float *y, long ldy,
                            float *scratch, int threads);
CHTSL_EXPORT int lowrank_fm_bf16(const uint16_t *a, const float *a_scale, int n_rank, int n_in, const uint16_t *x,
                                 long sx_in, long sx_tok, int n_tok, const uint16_t *b, const float *b_scale,
                                 const int32_t *outs, const int32_t *ranks, int n_members, float scale, int act,
                                 uint16_t *y, long ldy, float *scratch, int threads);
CHTSL_EXPORT int lowrank_fm_i8(const int8_t *a, const float *a_scale, int n_rank, int n_in, const float *x, long sx_in,
                               long sx_tok, int n_tok, const int8_t *b, const float *b_scale, const int32_t *outs,
                               const int32_t *ranks, int n_members, float scale, int act, float *y, long ldy,
                               float *scratch, int threads);

/* decode.c: a decoder block's glue at 1–4 tokens, and every block of a decoding step in one call. */
CHTSL_EXPORT void rms_norm_fm(const float *h, long ldh, int n_feat, int n_tok, const float *w, float eps, float *out,
                              long ldo);
CHTSL_EXPORT void rms_norm_fm_bf16(const uint16_t *h, long ldh, int n_feat, int n_tok, const uint16_t *w, float eps,
                                   uint16_t *out, long ldo);
CHTSL_EXPORT void silu_mul_fm(float *gu, long ld, int ffn, int n_tok, int act);
CHTSL_EXPORT void silu_mul_fm_bf16(uint16_t *gu, long ld, int ffn, int n_tok, int act);
CHTSL_EXPORT int attn_decode(const float *qkv, long ldq, int batch, int seq, int n_heads, int n_kv, int head_dim,
                             const float *cos, const float *sin, float *kcache, float *vcache, int cap, int start,
                             float scale, float *o, long ldo, long min_work, int threads);
CHTSL_EXPORT int attn_decode_bf16(const uint16_t *qkv, long ldq, int batch, int seq, int n_heads, int n_kv,
                                  int head_dim, const uint16_t *cos, const uint16_t *sin, uint16_t *kcache,
                                  uint16_t *vcache, int cap, int start, float scale, uint16_t *o, long ldo,
                                  long min_work, int threads);
CHTSL_EXPORT int decode_layers(float *h, int hidden, int batch, int seq, const dec_layer *layers, int n_layers,
                               float *const *kcache, float *const *vcache, float eps, int n_heads, int n_kv,
                               int head_dim, const float *cos, const float *sin, int cap, int start, float attn_scale,
                               int tile, long item_bytes, long attn_min_work, float *work, float *scratch,
                               int threads);
CHTSL_EXPORT int decode_layers_bf16(uint16_t *h, int hidden, int batch, int seq, const dec_layer *layers,
                                    int n_layers, uint16_t *const *kcache, uint16_t *const *vcache, float eps,
                                    int n_heads, int n_kv, int head_dim, const uint16_t *cos, const uint16_t *sin,
                                    int cap, int start, float attn_scale, int tile, long item_bytes,
                                    long attn_min_work, uint16_t *work, float *scratch, int threads);

/* spmm_a8.c: the sparse branch with int8 weights and int8 activations, in its own layout. */
CHTSL_EXPORT int a8_pack(const int32_t *crow, const void *col, int col_bytes, const int8_t *val, int n_rows, int n_in,
                         int spill_cost, uint8_t *steps, int32_t *start, uint8_t *spill_n, int32_t *spill_start,
                         uint8_t *data, uint8_t *spill);
CHTSL_EXPORT int spmm_a8(const float *x, long ldx, int n_in, int n_tok, const uint8_t *steps, const int32_t *start,
                         const uint8_t *data, const uint8_t *spill_n, const int32_t *spill_start, const uint8_t *spill,
                         const float *scale, const int32_t *rows, int n_rows, float *y, long ldy, int n_chunks,
                         int n_threads);
CHTSL_EXPORT int gemv_a8(const int8_t *w, const float *scale, int n_out, int n_in, const float *x, long ldx,
                         int n_tok, float *y, long ldy, int threads);
CHTSL_EXPORT int lowrank_fm_a8(const int8_t *a, const float *a_scale, int n_rank, int n_in, const float *x,
                               long sx_in, long sx_tok, int n_tok, const int8_t *b, const float *b_scale,
                               const int32_t *outs, const int32_t *ranks, int n_members, float scale, int act,
                               float *y, long ldy, float *scratch, int threads);

/* probe.c: what this build is (instruction sets, compile-time choices, struct layouts), as text. */
CHTSL_EXPORT int kernel_probe(char *buf, int size);

/* ------------------------------------------------------------------- internal (other files call) */

/* The per-row-range parts of spmm (decode.c's groups call them). */
#define SPMM_TASK(prefix, enc, X, C, V, Y)                                                                        \
  void prefix##_task_##enc(const X *x, long ldx, const float *xf, int n_in, int n_tok, int t0, int tile,          \
                           const int32_t *crow, const C *col, const V *val, const float *scale, const int32_t *rows, \
                           Y *y, long ldy, int i0, int i1, float *buf);
CHTSL_SPMM_VARIANTS(SPMM_TASK)
#undef SPMM_TASK
/* The low-rank branch (lowrank_fm*, gemv.c and spmm_a8.c) runs on one thread below this many
 * multiply-adds: at llama60m's groups (under 2^18) an OpenMP fork/join costs more than the work. */
#define LOWRANK_THREADS_FROM (1L << 18)
long lowrank_b_split(const int32_t *outs, const int32_t *ranks, int n_members, int k, int n);
void lowrank_a_rows_f32(const float *a, const float *a_scale, int n_in, const float *xt, int n_tok, int n_rank,
                        float scale, int act, float *h, int j0, int j1);
void lowrank_a_rows_bf16(const uint16_t *a, const float *a_scale, int n_in, const float *xt, int n_tok, int n_rank,
                         float scale, int act, float *h, int j0, int j1);
void lowrank_a_rows_i8(const int8_t *a, const float *a_scale, int n_in, const float *xt, int n_tok, int n_rank,
                       float scale, int act, float *h, int j0, int j1);
void lowrank_b_rows_f32(const float *b, const float *b_scale, const int32_t *outs, const int32_t *ranks, int n_members,
                        const float *h, int n_rank, int n_tok, float *y, long ldy, long o0, long o1);
void lowrank_b_rows_bf16(const uint16_t *b, const float *b_scale, const int32_t *outs, const int32_t *ranks,
                         int n_members, const float *h, int n_rank, int n_tok, uint16_t *y, long ldy, long o0, long o1);
void lowrank_b_rows_i8(const int8_t *b, const float *b_scale, const int32_t *outs, const int32_t *ranks, int n_members,
                       const float *h, int n_rank, int n_tok, float *y, long ldy, long o0, long o1);
/* spmm_a8.c's layout: pages of input features, groups of stored rows, bytes per step; dec_group.index
 * of a group in it. */
enum { A8_PAGE = 256, A8_ROWS = 16, A8_STEP = 128, A8_INDEX = 3 };
/* 1: spmm_a8.c's loops are the AVX-512 VBMI + VNNI byte gathers; 0: plain C on the same layout */
#if defined(__AVX512VBMI__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define A8_VECTOR 1
#else
#define A8_VECTOR 0
#endif
/* 1: spmm_a8.c's dense int8 rows are AVX-512 VNNI (vpdpbusd) loops; 0: plain C */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define A8_DOT_VECTOR 1
#else
#define A8_DOT_VECTOR 0
#endif
void a8_quantize(const float *xt, int n_in, int8_t *q, float *s, int p0, int p1);
void a8_groups(const int8_t *xq, const float *xs, int n_in, int n_tok, const a8_layout *S, const float *scale,
               const int32_t *rows, int n_rows, float *y, long ldy, int g0, int g1);
void a8_rows(const int8_t *w, const float *w_scale, int n_in, const int8_t *xq, const float *xs, int n_tok, float *y,
             long ldy, int r0, int r1);
float a8_round_block(const float *x, int n, int8_t *q);
void a8_lowrank_b_rows(const int8_t *panel, const float *b_scale, const int32_t *outs, const int32_t *ranks,
                       int n_members, const float *h, int n_rank, int n_tok, float *y, long ldy, long o0, long o1);
void a8_lowrank_a_rows(const int8_t *a, const float *a_scale, int n_in, const int8_t *xq, const float *xs, int n_tok,
                       int n_rank, float scale, int act, float *h, int j0, int j1);
#endif
