/* The whole forward of a small float32 call in one C call: o = a @ v with
 * a = M * tanh(alpha * q @ k^T), M the causal keep-mask (or none).
 *
 * Why it exists: below a few million multiply-adds, attention on the CPU costs per call, not
 * per FLOP. Each aten op costs microseconds before it computes (on the AVX2 AMD EPYC of
 * benchmarks/RESULTS.md, torch.bmm of 16 x 64 by 64 x 16 takes 4 us for 0.3 us of
 * arithmetic), and the forward through aten is a dozen such calls. This file does all of it
 * in one call: kernels/native.py builds it with tanh.c and checks it against float64 on load,
 * and kernels/blockwise.py sends it the calls it serves best (native.SMALL_MAX_WORK).
 *
 * Layout: q (G, n, d), k (G, m, d), v (G, m, e), o (G, n, e) and a (G, n, m) or NULL, all
 * contiguous. Entry (i, j) is kept iff j <= i + diagonal (diagonal >= m - 1: all). Masked
 * entries of a are exactly 0 and still multiply their row of v, so a NaN or infinity there
 * propagates through 0 * inf as in a @ v of the composite.
 *
 * Arithmetic: both products run one register-blocked kernel (mm below: R x L outputs held in
 * registers while the inner dimension runs in order, so each output is one float32 sum in
 * index order, as a plain loop would give). Its operands are padded copies where the shapes
 * need them: q's rows to a multiple of R, k transposed with its rows (the columns of the
 * scores) padded to a multiple of L, v's and o's columns to a multiple of L. The scores are
 * scaled in float32 as they enter the tanh (native.h), as the composite's `* scale` does.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* The register block: R rows by L columns (two vectors of 8 floats). */
#define R 4
#define L 16

/* Below this much work (G * n * m * (d + e) multiply-adds) one thread does every problem
 * (a parallel region costs a few us). */
#define TA_SMALL_PARALLEL_MIN 1048576

typedef float vec8 __attribute__((vector_size(32)));
typedef float vec8u __attribute__((vector_size(32), aligned(4))); /* unaligned access */

/* c = x @ y: x (rows, inner) with row stride ldx, y (inner, cols) with row stride ldy,
 * c (rows, cols) with row stride ldc; rows a multiple of R, cols a multiple of L. */
TA_CLONES
static void mm(const float *restrict x, int64_t ldx, const float *restrict y, int64_t ldy,
               float *restrict c, int64_t ldc, int64_t rows, int64_t inner, int64_t cols) {
    for (int64_t i0 = 0; i0 < rows; i0 += R) {
        const float *x0 = x + i0 * ldx, *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
        for (int64_t j0 = 0; j0 < cols; j0 += L) {
            vec8 c00 = {0}, c01 = {0}, c10 = {0}, c11 = {0};
            vec8 c20 = {0}, c21 = {0}, c30 = {0}, c31 = {0};
            for (int64_t p = 0; p < inner; p++) {
                const vec8 y0 = *(const vec8u *)(y + p * ldy + j0);
                const vec8 y1 = *(const vec8u *)(y + p * ldy + j0 + 8);
                c00 += x0[p] * y0, c01 += x0[p] * y1;
                c10 += x1[p] * y0, c11 += x1[p] * y1;
                c20 += x2[p] * y0, c21 += x2[p] * y1;
                c30 += x3[p] * y0, c31 += x3[p] * y1;
            }
            float *out = c + i0 * ldc + j0;
            *(vec8u *)out = c00, *(vec8u *)(out + 8) = c01;
            *(vec8u *)(out + ldc) = c10, *(vec8u *)(out + ldc + 8) = c11;
            *(vec8u *)(out + 2 * ldc) = c20, *(vec8u *)(out + 2 * ldc + 8) = c21;
            *(vec8u *)(out + 3 * ldc) = c30, *(vec8u *)(out + 3 * ldc + 8) = c31;
        }
    }
}

static int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

/* Problems [g0, g1) with one buffer of their padded operands; 0, or 1 where it cannot be had. */
TA_CLONES
static int problems(const float *q, const float *k, const float *v, float *o, float *a,
                    int64_t g0, int64_t g1, int64_t n, int64_t m, int64_t d, int64_t e,
                    float alpha, int64_t diagonal) {
    const int64_t np = round_up(n, R), mp = round_up(m, L), ep = round_up(e, L);
    /* Copies only where a shape needs padding: q's rows, v's and o's columns. */
    const int pad_rows = np != n, pad_cols = ep != e;
    float *buffer = malloc(sizeof(float) * (d * mp + np * mp + (pad_rows ? np * d : 0) +
                                            (pad_cols ? m * ep : 0) +
                                            (pad_rows || pad_cols ? np * ep : 0)));
    if (buffer == NULL) return 1;
    float *kt = buffer, *s = kt + d * mp, *rest = s + np * mp;
    float *qp = pad_rows ? rest : NULL;
    rest += pad_rows ? np * d : 0;
    float *vp = pad_cols ? rest : NULL;
    rest += pad_cols ? m * ep : 0;
    float *op = pad_rows || pad_cols ? rest : NULL;
    if (qp) memset(qp + n * d, 0, sizeof(float) * (np - n) * d);
    for (int64_t g = g0; g < g1; g++) {
        const float *qg = q + g * n * d, *kg = k + g * m * d, *vg = v + g * m * e;
        float *og = o + g * n * e;
        if (qp) memcpy(qp, qg, sizeof(float) * n * d);
        for (int64_t p = 0; p < d; p++) {
            for (int64_t j = 0; j < m; j++) kt[p * mp + j] = kg[j * d + p];
            for (int64_t j = m; j < mp; j++) kt[p * mp + j] = 0.0f;
        }
        if (vp) {
            for (int64_t j = 0; j < m; j++) {
                memcpy(vp + j * ep, vg + j * e, sizeof(float) * e);
                memset(vp + j * ep + e, 0, sizeof(float) * (ep - e));
            }
        }
        mm(qp ? qp : qg, d, kt, mp, s, mp, np, d, mp);
        for (int64_t i = 0; i < n; i++) {
            float *si = s + i * mp;
            int64_t kept = i + diagonal + 1;
            kept = kept < 0 ? 0 : (kept > m ? m : kept);
            for (int64_t j = 0; j < kept; j++) si[j] = ta_tanh(alpha * si[j]);
            for (int64_t j = kept; j < m; j++) si[j] = 0.0f;
            if (a) memcpy(a + (g * n + i) * m, si, sizeof(float) * m);
        }
        /* The padded rows of s (from q's zero rows) only make padded rows of o. */
        mm(s, mp, vp ? vp : vg, vp ? ep : e, op ? op : og, op ? ep : e, np, m, ep);
        if (op) {
            for (int64_t i = 0; i < n; i++) memcpy(og + i * e, op + i * ep, sizeof(float) * e);
        }
    }
    free(buffer);
    return 0;
}

/* The forward of G problems (layout above) on up to `threads` threads (OpenMP builds; others
 * run one): 0, or 1 where memory for the padded operands could not be had (then o and a
 * hold nothing meaningful). */
int ta_attn_small_f32(const float *q, const float *k, const float *v, float *o, float *a,
                      int64_t G, int64_t n, int64_t m, int64_t d, int64_t e, float alpha,
                      int64_t diagonal, int threads) {
    int failed = 0;
#ifdef _OPENMP
    const int64_t work = G * n * m * (d + e);
    if (threads > 1 && G > 1 && work >= TA_SMALL_PARALLEL_MIN) {
#pragma omp parallel num_threads(threads) reduction(| : failed)
        {
            const int64_t parts = omp_get_num_threads(), me = omp_get_thread_num();
            const int64_t g0 = G * me / parts, g1 = G * (me + 1) / parts;
            if (g0 < g1) failed = problems(q, k, v, o, a, g0, g1, n, m, d, e, alpha, diagonal);
        }
        return failed;
    }
#endif
    (void)threads;
    return problems(q, k, v, o, a, 0, G, n, m, d, e, alpha, diagonal);
}
