/* CH2-L3n regrowth scores of a bipartite mask from its CSR structure (train/topology.py).
 *
 * One "half" of the score, for a 0/1 matrix M (n_rows × n_cols) given as CSR (crow, col) and as
 * its transpose (tcrow, tcol):
 *
 *   out[u, j] = Σ_v P[u, v] · M[v, j],   P[u, v] = (D[u, v] + 1) / max(deg[v] − D[u, v], 1)  where D ≠ 0,
 *
 * with D = M Mᵀ (shared neighbours) and deg = row degrees (docs/method.md §3). The full score is
 * half(M) + half(Mᵀ)ᵀ. Per row u the kernel counts D[u, :] from the structure (Σ_b |column b|²
 * operations in all) and scatters P[u, v] into the row of u for the v that share a neighbour
 * with u: ~nnz·n_rows·density work where the dense products cost n_rows²·n_cols, and no
 * (n_rows × n_rows) matrix is ever formed. Sums run in double, over v ascending, so scores equal
 * in exact arithmetic come out equal after the caller's rounding to float32, as with the dense
 * float64 products. Rows are independent: OpenMP over u, a counter buffer per thread.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

int ch2_l3n_half(const int32_t *crow, const int32_t *col, const int32_t *tcrow, const int32_t *tcol,
                 int n_rows, int n_cols, double *out, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        int32_t *shared = calloc((size_t)n_rows, sizeof(int32_t)); /* D[u, v] for the current u */
        int32_t *touched = malloc((size_t)n_rows * sizeof(int32_t)); /* the v with D[u, v] != 0 */
        if (shared == NULL || touched == NULL) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(dynamic, 16)
            for (int u = 0; u < n_rows; u++) {
                int n_touched = 0;
                for (int32_t k = crow[u]; k < crow[u + 1]; k++) {
                    const int32_t b = col[k];
                    for (int32_t t = tcrow[b]; t < tcrow[b + 1]; t++) {
                        const int32_t v = tcol[t];
                        if (shared[v]++ == 0) touched[n_touched++] = v;
                    }
                }
                /* ascending v: the summation order depends on the structure only */
                int32_t *v_sorted = touched;
                if (n_touched > 1) {
                    /* counting order without a sort: walk v = 0..n_rows-1 when dense enough */
                    if ((int64_t)n_touched * 16 > n_rows) {
                        int m = 0;
                        for (int v = 0; v < n_rows; v++)
                            if (shared[v]) v_sorted[m++] = v;
                    } else {
                        /* insertion sort of a short list */
                        for (int i = 1; i < n_touched; i++) {
                            int32_t x = v_sorted[i];
                            int j = i - 1;
                            while (j >= 0 && v_sorted[j] > x) {
                                v_sorted[j + 1] = v_sorted[j];
                                j--;
                            }
                            v_sorted[j + 1] = x;
                        }
                    }
                }
                double *row = out + (size_t)u * n_cols;
                for (int i = 0; i < n_touched; i++) {
                    const int32_t v = v_sorted[i];
                    const int32_t d = shared[v];
                    shared[v] = 0;
                    const int32_t deg = crow[v + 1] - crow[v];
                    const double p = (double)(d + 1) / (double)(deg - d > 1 ? deg - d : 1);
                    for (int32_t k = crow[v]; k < crow[v + 1]; k++) row[col[k]] += p;
                }
            }
        }
        free(shared);
        free(touched);
    }
    return failed;
}
