/* The whole forward, or the whole backward, of a small float32 call in one C call: o = a @ v
 * with a = M * tanh(alpha * q @ k^T), M the causal keep-mask (or none), and its VJP.
 *
 * Why it exists: below a few million multiply-adds, attention on the CPU costs per call, not
 * per FLOP. Each aten op costs microseconds before it computes (on the AVX2 AMD EPYC of
 * benchmarks/RESULTS.md, torch.bmm of 16 x 64 by 64 x 16 takes 4 us for 0.3 us of
 * arithmetic), and a forward or backward through aten is a dozen such calls. This file does
 * each in one call: kernels/native.py builds it with tanh.c and checks it against float64 on
 * load, and kernels/blockwise.py sends it the calls it serves best (native.SMALL_MAX_WORK).
 *
 * Layout: q (G, n, d), k (G, m, d), v (G, m, e), o (G, n, e), a (G, n, m) and the gradients
 * (each shaped like its tensor), all contiguous. Entry (i, j) is kept iff j <= i + diagonal
 * (diagonal >= m - 1: all). Masked entries of a are exactly 0 and still multiply their row
 * of v, so a NaN or infinity there propagates through 0 * inf as in a @ v of the composite;
 * their score gradient is exactly 0, whatever flows into it (the definition's where()).
 *
 * Arithmetic: every product runs one register-blocked kernel (mm below: R x L outputs held in
 * registers while the inner dimension runs in order, so each output is one float32 sum in
 * index order, as a plain loop would give). Its operands are zero-padded copies where the
 * shapes need them (the left one's rows to a multiple of R, the right one's columns to a
 * multiple of L; transposed operands are always copies). The scores are scaled in float32
 * as they enter the tanh (native.h), as the composite's `* scale` does.
 *
 * Threads: problems are split over `threads` threads (OpenMP builds; native.py passes 1 where
 * a call is too small for a parallel region, which costs a few us).
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

#define MAX(x, y) ((x) > (y) ? (x) : (y))

/* A matrix operand of mm: rows x cols floats with row stride ld. */
typedef struct {
    const float *at;
    int64_t ld;
} operand;

/* src (rows x cols, contiguous) as an operand with rows_p >= rows rows and cols_p >= cols
 * columns: itself where no padding is needed, else a zero-padded copy in buf. */
static operand padded(float *buf, const float *src, int64_t rows, int64_t cols, int64_t rows_p,
                      int64_t cols_p) {
    if (rows == rows_p && cols == cols_p) return (operand){src, cols};
    for (int64_t r = 0; r < rows; r++) {
        memcpy(buf + r * cols_p, src + r * cols, sizeof(float) * cols);
        memset(buf + r * cols_p + cols, 0, sizeof(float) * (cols_p - cols));
    }
    memset(buf + rows * cols_p, 0, sizeof(float) * (rows_p - rows) * cols_p);
    return (operand){buf, cols_p};
}

/* src^T (src: rows x cols with row stride lds) as a zero-padded cols_p x rows_p copy in buf. */
static operand transposed(float *buf, const float *src, int64_t lds, int64_t rows, int64_t cols,
                          int64_t cols_p, int64_t rows_p) {
    for (int64_t c = 0; c < cols; c++) {
        for (int64_t r = 0; r < rows; r++) buf[c * rows_p + r] = src[r * lds + c];
        for (int64_t r = rows; r < rows_p; r++) buf[c * rows_p + r] = 0.0f;
    }
    memset(buf + cols * rows_p, 0, sizeof(float) * (cols_p - cols) * rows_p);
    return (operand){buf, rows_p};
}

/* dst (rows x cols, contiguous) = x (rows x inner) @ y (inner x cols), through the padded
 * output buffer out where the shape needs padding. */
static void product(float *dst, operand x, operand y, float *out, int64_t rows, int64_t inner,
                    int64_t cols) {
    const int64_t rows_p = round_up(rows, R), cols_p = round_up(cols, L);
    if (rows == rows_p && cols == cols_p) {
        mm(x.at, x.ld, y.at, y.ld, dst, cols, rows, inner, cols);
        return;
    }
    mm(x.at, x.ld, y.at, y.ld, out, cols_p, rows_p, inner, cols_p);
    for (int64_t r = 0; r < rows; r++) memcpy(dst + r * cols, out + r * cols_p, sizeof(float) * cols);
}

/* Keep-mask: entries (i, j) with j < kept(i) are kept. */
static int64_t kept(int64_t i, int64_t m, int64_t diagonal) {
    const int64_t last = i + diagonal + 1;
    return last < 0 ? 0 : (last > m ? m : last);
}

/* The sizes of one problem and their padded sizes (np, mp, dp, ep: rows of the left operand
 * to a multiple of R or columns of the right one to a multiple of L; mr: m rows to R). */
typedef struct {
    int64_t n, m, d, e, np, mp, mr, dp, ep;
} sizes;

static sizes sizes_of(int64_t n, int64_t m, int64_t d, int64_t e) {
    return (sizes){n, m, d, e, round_up(n, R), round_up(m, L), round_up(m, R),
                   round_up(d, L), round_up(e, L)};
}

/* a (np x mp, row stride mp; padded rows and columns garbage or 0) = M * tanh(alpha q k^T) of
 * one problem, from scratch x (np * d) and kt (d * mp). */
TA_CLONES
static void weights(float *a, const float *q, const float *k, sizes z, float alpha,
                    int64_t diagonal, float *x, float *kt) {
    operand qo = padded(x, q, z.n, z.d, z.np, z.d);
    operand ko = transposed(kt, k, z.d, z.m, z.d, z.d, z.mp);
    mm(qo.at, qo.ld, ko.at, ko.ld, a, z.mp, z.np, z.d, z.mp);
    for (int64_t i = 0; i < z.n; i++) {
        float *ai = a + i * z.mp;
        const int64_t last = kept(i, z.m, diagonal);
        for (int64_t j = 0; j < last; j++) ai[j] = ta_tanh(alpha * ai[j]);
        for (int64_t j = last; j < z.mp; j++) ai[j] = 0.0f;
    }
}

/* Problems [g0, g1) of the forward: 0, or 1 where scratch memory cannot be had. */
static int forward(const float *q, const float *k, const float *v, float *o, float *a,
                   int64_t g0, int64_t g1, sizes z, float alpha, int64_t diagonal) {
    const int64_t s_size = z.np * z.mp;
    float *scratch =
        malloc(sizeof(float) * (s_size + z.np * z.d + z.d * z.mp + z.m * z.ep + z.np * z.ep));
    if (scratch == NULL) return 1;
    float *s = scratch, *x = s + s_size, *kt = x + z.np * z.d, *vp = kt + z.d * z.mp;
    float *out = vp + z.m * z.ep;
    for (int64_t g = g0; g < g1; g++) {
        weights(s, q + g * z.n * z.d, k + g * z.m * z.d, z, alpha, diagonal, x, kt);
        if (a) {
            for (int64_t i = 0; i < z.n; i++)
                memcpy(a + (g * z.n + i) * z.m, s + i * z.mp, sizeof(float) * z.m);
        }
        /* (The padded rows of s only make padded rows of the product.) */
        operand so = {s, z.mp}, vo = padded(vp, v + g * z.m * z.e, z.m, z.e, z.m, z.ep);
        product(o + g * z.n * z.e, so, vo, out, z.n, z.m, z.e);
    }
    free(scratch);
    return 0;
}

/* Problems [g0, g1) of the backward: g_v = a^T g_o, g_s = M * alpha (g_o v^T + g_a)
 * (1 - a^2), g_q = g_s k, g_k = g_s^T q (g_o or g_a NULL: zero; a NULL: recomputed). */
static int backward(const float *q, const float *k, const float *v, const float *a,
                    const float *g_o, const float *g_a, float *g_q, float *g_k, float *g_v,
                    int64_t g0, int64_t g1, sizes z, float alpha, int64_t diagonal) {
    const int64_t s_size = z.np * z.mp, t_size = z.mr * z.n;
    const int64_t x_size = z.np * MAX(z.d, z.e), y_size = z.n * MAX(z.dp, z.ep);
    const int64_t out_size = MAX(z.mr, z.np) * MAX(z.dp, z.ep);
    float *scratch = malloc(sizeof(float) * (2 * s_size + t_size + z.e * z.mp + z.d * z.mp +
                                             z.m * z.dp + x_size + y_size + out_size));
    if (scratch == NULL) return 1;
    float *w = scratch, *gs = w + s_size, *t = gs + s_size, *vt = t + t_size;
    float *kt = vt + z.e * z.mp, *kp = kt + z.d * z.mp, *x = kp + z.m * z.dp;
    float *y = x + x_size, *out = y + y_size;
    for (int64_t g = g0; g < g1; g++) {
        const float *qg = q + g * z.n * z.d, *kg = k + g * z.m * z.d, *vg = v + g * z.m * z.e;
        const float *gog = g_o ? g_o + g * z.n * z.e : NULL;
        /* wa: the weights (np x mp, row stride mp), given or recomputed */
        const float *wa = w;
        if (a) {
            wa = padded(w, a + g * z.n * z.m, z.n, z.m, z.np, z.mp).at;
        } else {
            weights(w, qg, kg, z, alpha, diagonal, x, kt);
        }
        /* gs = g_o v^T (np x mp), then g_v = w^T g_o */
        if (gog) {
            operand go = padded(x, gog, z.n, z.e, z.np, z.e);
            operand vo = transposed(vt, vg, z.e, z.m, z.e, z.e, z.mp);
            mm(go.at, go.ld, vo.at, vo.ld, gs, z.mp, z.np, z.e, z.mp);
            operand wt = transposed(t, wa, z.mp, z.n, z.m, z.mr, z.n);
            operand gop = padded(y, gog, z.n, z.e, z.n, z.ep);
            product(g_v + g * z.m * z.e, wt, gop, out, z.m, z.n, z.e);
        } else {
            memset(gs, 0, sizeof(float) * s_size);
            memset(g_v + g * z.m * z.e, 0, sizeof(float) * z.m * z.e);
        }
        for (int64_t i = 0; i < z.n; i++) {
            float *gsi = gs + i * z.mp;
            const float *wi = wa + i * z.mp;
            const float *gai = g_a ? g_a + (g * z.n + i) * z.m : NULL;
            const int64_t last = kept(i, z.m, diagonal);
            for (int64_t j = 0; j < last; j++) {
                const float total = gai ? gsi[j] + gai[j] : gsi[j];
                gsi[j] = alpha * (total * (1.0f - wi[j] * wi[j]));
            }
            for (int64_t j = last; j < z.mp; j++) gsi[j] = 0.0f;
        }
        /* g_q = gs k (the padded rows of gs only make padded rows), g_k = gs^T q */
        operand gso = {gs, z.mp};
        product(g_q + g * z.n * z.d, gso, padded(kp, kg, z.m, z.d, z.m, z.dp), out, z.n, z.m,
                z.d);
        operand gst = transposed(t, gs, z.mp, z.n, z.m, z.mr, z.n);
        product(g_k + g * z.m * z.d, gst, padded(y, qg, z.n, z.d, z.n, z.dp), out, z.m, z.n,
                z.d);
    }
    free(scratch);
    return 0;
}

/* Problems split over threads: each runs `run` on its share of [0, G). */
#ifdef _OPENMP
#define SPLIT(G, threads, failed, run)                                                       \
    if (threads > 1 && G > 1) {                                                              \
        _Pragma("omp parallel num_threads(threads) reduction(| : failed)") {                \
            const int64_t parts = omp_get_num_threads(), me = omp_get_thread_num();          \
            const int64_t g0 = G * me / parts, g1 = G * (me + 1) / parts;                    \
            if (g0 < g1) failed |= run;                                                      \
        }                                                                                    \
        return failed;                                                                       \
    }
#else
#define SPLIT(G, threads, failed, run) (void)threads;
#endif

/* The forward of G problems (layout above): 0, or 1 where scratch memory could not be had
 * (then o and a hold nothing meaningful). */
int ta_attn_small_f32(const float *q, const float *k, const float *v, float *o, float *a,
                      int64_t G, int64_t n, int64_t m, int64_t d, int64_t e, float alpha,
                      int64_t diagonal, int threads) {
    const sizes z = sizes_of(n, m, d, e);
    int failed = 0;
    SPLIT(G, threads, failed, forward(q, k, v, o, a, g0, g1, z, alpha, diagonal))
    return forward(q, k, v, o, a, 0, G, z, alpha, diagonal);
}

/* The backward of G problems: g_q, g_k, g_v from g_o and g_a (either NULL: zero) and a (NULL:
 * recomputed); 0, or 1 where scratch memory could not be had. */
int ta_attn_small_backward_f32(const float *q, const float *k, const float *v, const float *a,
                               const float *g_o, const float *g_a, float *g_q, float *g_k,
                               float *g_v, int64_t G, int64_t n, int64_t m, int64_t d,
                               int64_t e, float alpha, int64_t diagonal, int threads) {
    const sizes z = sizes_of(n, m, d, e);
    int failed = 0;
    SPLIT(G, threads, failed,
          backward(q, k, v, a, g_o, g_a, g_q, g_k, g_v, g0, g1, z, alpha, diagonal))
    return backward(q, k, v, a, g_o, g_a, g_q, g_k, g_v, 0, G, z, alpha, diagonal);
}
