/* The whole forward, or the whole backward, of a float32 call in one C call: o = a @ v with
 * a = M * tanh(alpha * q @ k^T), M the causal keep-mask (or none), and its VJP.
 *
 * Why it exists: below a few million multiply-adds, attention on the CPU costs per call, not
 * per FLOP. Each aten op costs microseconds before it computes (on the AVX2 AMD EPYC of
 * benchmarks/RESULTS.md, torch.bmm of 16 x 64 by 64 x 16 takes 4 us for 0.3 us of
 * arithmetic), and a forward or backward through aten is a dozen such calls. This file does
 * each in one call: kernels/native.py builds it with tanh.c and checks it against float64 on
 * load, and kernels/blockwise.py sends it the calls it serves (native.try_attn,
 * native.try_attn_backward). Longer sequences gain too: both run in blocks of rows whose
 * n x m matrices stay in the L2 cache (the backward sums g_k and g_v over them), causal
 * blocks stop at their last row's diagonal, and the forward shares blocks out over threads,
 * so that even one problem uses them all.
 *
 * Layout: q (G, n, d), k (G, m, d), v (G, m, e), o (G, n, e), a (G, n, m) and the gradients
 * (each shaped like its tensor), all contiguous. Entry (i, j) is kept iff j <= i + diagonal
 * (diagonal >= m - 1: all). Masked entries of a are exactly 0 and still multiply their row
 * of v, so a NaN or infinity there propagates through 0 * inf as in a @ v of the composite;
 * their score gradient is exactly 0, whatever flows into it (the definition's where()), and
 * still multiplies q and k. Blocks skip masked columns only where what those zeros would
 * multiply is finite.
 *
 * Arithmetic: every product runs one register-blocked kernel (mm below: R x L outputs held in
 * registers while the inner dimension runs in order, so each output is one float32 sum in
 * index order, as a plain loop would give, or for g_k and g_v one such sum per block of
 * rows, added up). Its left operand is rows of a matrix, read in place (a transposed one is
 * a copy); its right operand is always a packed copy, in panels of L columns each contiguous
 * in memory (a panel stays in L1 while the rows pass; read with a row stride instead, a
 * 4 KiB stride maps every row to one cache set: 50-70 GFLOP/s against 95-100 packed, one
 * core of the AMD EPYC). The scores are scaled in float32 as they enter the tanh (native.h),
 * as the composite's `* scale` does.
 *
 * Threads (OpenMP builds; native.py passes 1 where a call is too small for a parallel region,
 * which costs a few us): shares of the problems, or for the forward of fewer problems than
 * threads, blocks of rows dealt out in turn.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* The vector: VF floats. This file builds as it is with VF = 8 (AVX2's 256 bits), and again
 * through attn_wide.c with VF = 16 (AVX-512's 512 bits), its exported names ending in _wide:
 * on a CPU with AVX-512 the 8-float kernels leave half of each vector unit idle (native.py
 * picks the kernels per call). */
#ifndef VF
#define VF 8
#define NAME(name) name
#endif

/* The register block: R rows by L columns (two vectors): 12 accumulators, two operand
 * vectors and a broadcast fill 15 of AVX2's 16 registers (of AVX-512's 32). */
#define R 6
#define L (2 * VF)

typedef float vec __attribute__((vector_size(4 * VF)));
typedef float vecu __attribute__((vector_size(4 * VF), aligned(4))); /* unaligned access */
typedef uint32_t bits __attribute__((vector_size(4 * VF)));

/* A right operand of mm, packed: panels of L columns, entry (p, j) at
 * at[(j / L) * depth * L + p * L + j % L], zero past its columns (made by `panels` below). */
typedef struct {
    const float *at;
    int64_t depth;
} packed;

#define MAX(x, y) ((x) > (y) ? (x) : (y))
#define MIN(x, y) ((x) < (y) ? (x) : (y))

/* A left operand of mm: entry (r, p) at at[r * ld + p * step] (rows of a matrix: step 1; a
 * transposed one, read in place: ld 1), float32 (or for mm_cache, bfloat16). */
typedef struct {
    const void *at;
    int64_t ld, step;
} lhs;

/* bf16_entry's mask, as an array: a mask the compiler sees is uniform it applies to the
 * scalar before broadcasting it (a load, an AND, a move to a vector register and a
 * broadcast: a decoding step ran 30% slower than with the cache widened into a buffer). */
static const uint32_t HIGH_HALF[16] __attribute__((aligned(64))) = {
    0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u,
    0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u,
    0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u};

/* The bfloat16 entry at x in every lane, as float32 (a bfloat16 is the top half of a
 * float32): the 4 bytes from x - 1 broadcast, their low half cleared (AND `high`,
 * HIGH_HALF); integers throughout, so that no bits change on the way (as a float32, times 1,
 * an infinity with x[-1] below it would be a NaN, and come out quieted: a NaN). A load and
 * an AND, which leave the FMA pipes to the products (a shift, as the aligned pair's lower
 * entry needs, shares one: 66 against 95 GFLOP/s). x[-1] must be readable: no caller
 * passes a tensor's first entry. */
static inline __attribute__((always_inline)) vec bf16_entry(const uint16_t *x, bits high) {
    uint32_t pair;
    memcpy(&pair, x - 1, sizeof pair);
    return (vec)(((bits){0} + pair) & high);
}

/* A strided left operand read once is prefetched this many steps ahead (see mm). */
#define AHEAD 16

/* One block of mm: rows x0..x5 (`height` of them; a short one reads its last row again in
 * the others' place; entry p at x[p * step]) by one panel, into out (row stride ldc, `width`
 * columns; with `add`, added to what out holds). Constants where it is inlined: H, the rows
 * computed (R, or 4 for a last block of at most 4 rows: n = 16 or 64 is 6 + 6 + 4 rows, and
 * two more would be an eighth more arithmetic), T, whether step may differ from 1, B,
 * whether the rows are bfloat16, and A, what to prefetch (see mm): 0 nothing, 1 what comes
 * next (AHEAD steps ahead where strided, else the R rows from `next` on, contiguous), 2 the
 * line at pf + p * pfs bytes at step p (and where strided, what 1 does). */
static inline __attribute__((always_inline)) void block(
    const void *x0, const void *x1, const void *x2, const void *x3, const void *x4,
    const void *x5, int64_t step, const char *next, const char *pf, int64_t pfs,
    const float *restrict panel, int64_t inner, float *restrict out, int64_t ldc, int64_t height,
    int64_t width, int add, const int H, const int T, const int B, const int A) {
    const int64_t s = T ? step : 1, size = B ? 2 : 4;
    const bits high = B ? *(const volatile bits *)HIGH_HALF : (bits){0};
    vec c00 = {0}, c01 = {0}, c10 = {0}, c11 = {0}, c20 = {0}, c21 = {0};
    vec c30 = {0}, c31 = {0}, c40 = {0}, c41 = {0}, c50 = {0}, c51 = {0};
#define ROW(x, c0, c1)                                                                       \
    if (B) {                                                                                 \
        const vec b = bf16_entry((const uint16_t *)(x) + p * s, high);                       \
        c0 += b * y0, c1 += b * y1;                                                          \
    } else {                                                                                 \
        const float b = ((const float *)(x))[p * s];                                         \
        c0 += b * y0, c1 += b * y1;                                                          \
    }
    for (int64_t p = 0; p < inner; p++) {
        if (A == 1)
            __builtin_prefetch(T ? (const char *)x0 + (p + AHEAD) * s * size
                                 : next + p * R * size);
        if (A == 2) {
            __builtin_prefetch(pf + p * pfs);
            /* (a strided operand's own lines as well: 2% faster, from L2) */
            if (T) __builtin_prefetch((const char *)x0 + (p + AHEAD) * s * size);
        }
        const vec y0 = *(const vecu *)(panel + p * L);
        const vec y1 = *(const vecu *)(panel + p * L + VF);
        ROW(x0, c00, c01) ROW(x1, c10, c11) ROW(x2, c20, c21) ROW(x3, c30, c31)
        if (H > 4) {
            ROW(x4, c40, c41) ROW(x5, c50, c51)
        }
    }
#undef ROW
    if (height == H && height == R && width == L) {
#define STORE(x0, x1)                                                                        \
    if (add) x0 += *(const vecu *)out, x1 += *(const vecu *)(out + VF);                     \
    *(vecu *)out = x0, *(vecu *)(out + VF) = x1, out += ldc;
        STORE(c00, c01) STORE(c10, c11) STORE(c20, c21) STORE(c30, c31) STORE(c40, c41)
        STORE(c50, c51)
#undef STORE
        return;
    }
    /* (a last block: through a tile, copied without calls to memcpy, which cost as much as a
     * small problem's products) */
    float tile[R][L];
    *(vecu *)tile[0] = c00, *(vecu *)(tile[0] + VF) = c01;
    *(vecu *)tile[1] = c10, *(vecu *)(tile[1] + VF) = c11;
    *(vecu *)tile[2] = c20, *(vecu *)(tile[2] + VF) = c21;
    *(vecu *)tile[3] = c30, *(vecu *)(tile[3] + VF) = c31;
    *(vecu *)tile[4] = c40, *(vecu *)(tile[4] + VF) = c41;
    *(vecu *)tile[5] = c50, *(vecu *)(tile[5] + VF) = c51;
    for (int64_t r = 0; r < height; r++, out += ldc) {
        if (width == L) {
            vec t0 = *(const vecu *)tile[r], t1 = *(const vecu *)(tile[r] + VF);
            if (add) t0 += *(const vecu *)out, t1 += *(const vecu *)(out + VF);
            *(vecu *)out = t0, *(vecu *)(out + VF) = t1;
        } else {
            for (int64_t j = 0; j < width; j++) out[j] = add ? out[j] + tile[r][j] : tile[r][j];
        }
    }
}

/* The inner dimension runs in chunks of at most this many terms, each summed apart and added
 * to the output: float32 sums of 4096 terms in order erred 7x the composite's blocked BLAS
 * sums (1 x 1 x 4096 x 64 forward, o against float64: 4.8e-4 against 6.5e-5). */
#define CHUNK 256

/* c = x @ y (with `add`, c += x @ y): x (rows, inner >= 1; with B, bfloat16); y (inner <=
 * y.depth, cols) packed; c (rows, cols) with row stride ldc; any rows and cols, and no
 * copies of the operands for padding. (The body of mm and mm_cache.) */
static inline __attribute__((always_inline)) void products(lhs x, packed y, float *restrict c,
                                                          int64_t ldc, int64_t rows,
                                                          int64_t inner, int64_t cols, int add,
                                                          const char *stream,
                                                          int64_t stream_bytes, const int B) {
    const int64_t ld = x.ld, step = x.step, size = B ? 2 : 4;
    /* With one panel, each entry of x is read once, from memory (a decoding step's k and v):
     * prefetched, as the hardware does not for its short rows, that step ran 35% faster.
     * With more panels x's rows stay in L1 while they pass, and prefetching slowed the
     * backward's strided products (1 x 1 x 1024 x 64: 8.4 ms, 9.1-9.9 prefetched). Rows in
     * place are prefetched where the next block's follow these (ld == inner), a strided
     * operand AHEAD steps ahead; or mm_cache's stream, per_step bytes a step. */
    const int ahead = cols > L ? 0 : stream ? 2 : step != 1 || ld == inner; /* (block's A) */
    const int64_t blocks = (rows + R - 1) / R;
    const int64_t per_step =
        stream ? (stream_bytes + blocks * inner - 1) / (blocks * inner) : 0;
    for (int64_t p0 = 0; p0 < inner; p0 += CHUNK) {
        const int64_t depth = MIN(CHUNK, inner - p0);
        const int sum = add || p0 > 0;
        for (int64_t i0 = 0; i0 < rows; i0 += R) {
            const int64_t height = MIN(R, rows - i0);
            /* (addresses in bytes: the rows may be bfloat16) */
            const char *x0 = (const char *)x.at + (i0 * ld + p0 * step) * size;
            const char *x1 = x0 + MIN(1, height - 1) * ld * size;
            const char *x2 = x0 + MIN(2, height - 1) * ld * size;
            const char *x3 = x0 + MIN(3, height - 1) * ld * size;
            const char *x4 = x0 + MIN(4, height - 1) * ld * size;
            const char *x5 = x0 + MIN(5, height - 1) * ld * size;
            for (int64_t j0 = 0; j0 < cols; j0 += L) {
                const float *panel = y.at + j0 * y.depth + p0 * L;
                float *out = c + i0 * ldc + j0;
                const int64_t w = MIN(L, cols - j0);
                const char *next = x0 + R * ld * size;
                /* (the stream's address: computed only where it is prefetched) */
#define BLOCK(H, T, A)                                                                         \
    block(x0, x1, x2, x3, x4, x5, step, next,                                                  \
          A == 2 ? stream + (p0 * blocks + i0 / R * depth) * per_step : NULL, per_step, panel,   \
          depth, out, ldc, height, w, sum, H, T, B, A)
#define BLOCKS(T, A)                                                                           \
    {                                                                                          \
        if (height > 4) BLOCK(R, T, A);                                                        \
        else BLOCK(4, T, A);                                                                   \
    }
#define PREFETCHING(T)                                                                         \
    {                                                                                          \
        if (ahead == 2) BLOCKS(T, 2)                                                           \
        else if (ahead) BLOCKS(T, 1)                                                           \
        else BLOCKS(T, 0)                                                                      \
    }
                if (step == 1) PREFETCHING(0) else PREFETCHING(1)
#undef PREFETCHING
#undef BLOCKS
#undef BLOCK
            }
        }
    }
}

TA_CLONES
static void mm(lhs x, packed y, float *restrict c, int64_t ldc, int64_t rows, int64_t inner,
               int64_t cols, int add) {
    products(x, y, c, ldc, rows, inner, cols, add, NULL, 0, 0);
}

/* The size in floats of a packed operand of depth inner and cols columns. */
static int64_t panels_size(int64_t inner, int64_t cols) { return (cols + L - 1) / L * L * inner; }

/* src (inner x cols, row stride lds), or with `transpose` src^T (src: cols x inner, row
 * stride lds), as a right operand of mm of depth inner packed in buf (zero past cols). */
TA_CLONES
static packed panels(float *buf, const float *src, int64_t lds, int64_t inner, int64_t cols,
                     int transpose) {
    for (int64_t j0 = 0; j0 < cols; j0 += L) {
        float *panel = buf + j0 * inner;
        const int64_t width = MIN(L, cols - j0);
        if (transpose) {
            /* (src's rows read in order: each is one column of the panel) */
            for (int64_t j = 0; j < width; j++)
                for (int64_t p = 0; p < inner; p++) panel[p * L + j] = src[(j0 + j) * lds + p];
        } else if (width == L) {
            for (int64_t p = 0; p < inner; p++) {
                const float *row = src + p * lds + j0;
                *(vecu *)(panel + p * L) = *(const vecu *)row;
                *(vecu *)(panel + p * L + VF) = *(const vecu *)(row + VF);
            }
        } else {
            for (int64_t p = 0; p < inner; p++)
                for (int64_t j = 0; j < width; j++) panel[p * L + j] = src[p * lds + j0 + j];
        }
        for (int64_t p = 0; width < L && p < inner; p++)
            for (int64_t j = width; j < L; j++) panel[p * L + j] = 0.0f;
    }
    return (packed){buf, inner};
}

/* Keep-mask: entries (i, j) with j < kept(i) are kept. */
static int64_t kept(int64_t i, int64_t m, int64_t diagonal) {
    const int64_t last = i + diagonal + 1;
    return last < 0 ? 0 : (last > m ? m : last);
}

/* Whether all count floats of x are finite (x * 0 is 0 for finite x, NaN else). */
TA_CLONES
static int all_finite(const float *x, int64_t count) {
    vec acc0 = {0}, acc1 = {0}; /* (two sums: half the wait on each addition) */
    int64_t i = 0;
    for (; i + 2 * VF <= count; i += 2 * VF) {
        acc0 += *(const vecu *)(x + i) * 0.0f;
        acc1 += *(const vecu *)(x + i + VF) * 0.0f;
    }
    acc0 += acc1;
    float rest = 0.0f;
    for (; i < count; i++) rest += x[i] * 0.0f;
    for (int lane = 0; lane < VF; lane++) rest += acc0[lane];
    return rest == 0.0f;
}

/* The sizes of one problem. */
typedef struct {
    int64_t n, m, d, e;
} sizes;

/* Rows [i0, i0 + rows) of one problem's weights, columns [0, cols): s (row stride m) =
 * M * tanh(alpha q k^T), from kt (k^T packed). */
TA_CLONES
static void weights(float *s, const float *q, packed kt, int64_t i0, int64_t rows, int64_t cols,
                    sizes z, float alpha, int64_t diagonal) {
    mm((lhs){q + i0 * z.d, z.d, 1}, kt, s, z.m, rows, z.d, cols, 0);
    for (int64_t i = 0; i < rows; i++) {
        float *si = s + i * z.m;
        const int64_t last = MIN(kept(i0 + i, z.m, diagonal), cols);
        for (int64_t j = 0; j < last; j++) si[j] = ta_tanh(alpha * si[j]);
        for (int64_t j = last; j < cols; j++) si[j] = 0.0f;
    }
}

/* Rows of a block: its scores take at most this many floats, a quarter of a 512 KiB L2, so
 * that they are still there when they multiply v (the backward's blocks: at least
 * BACKWARD_ROWS rows, see ta_attn_backward_f32). Causal blocks are at most CAUSAL_ROWS rows,
 * which stop close to each row's diagonal (keys are packed once per problem, so a block costs
 * little more than its products). */
#define BLOCK_FLOATS (32 * 1024)
#define BACKWARD_ROWS (8 * R)
#define CAUSAL_ROWS (4 * R)

/* One problem's keys as its forward blocks use them: k^T and v packed, and whether blocks
 * stop at their last row's diagonal (causal, and v finite: otherwise a masked 0 must still
 * meet a NaN or infinity of v). */
typedef struct {
    packed kt, v;
    int skip;
} keys;

static keys keys_of(const float *k, const float *v, sizes z, int64_t rb, int64_t diagonal,
                    float *kt, float *vp) {
    /* (v is read for that only where a block would stop short: the first block's last row
     * keeps fewer than m keys) */
    const int skip = kept(rb - 1, z.m, diagonal) < z.m && all_finite(v, z.m * z.e);
    return (keys){panels(kt, k, z.d, z.d, z.m, 1), panels(vp, v, z.e, z.m, z.e, 0), skip};
}

/* Rows of a block (a multiple of R unless all of n): at most BLOCK_FLOATS scores but at
 * least `least`, at most CAUSAL_ROWS where causal, and at least one block for each of
 * `threads` threads. */
static int64_t block_rows(sizes z, int64_t G, int64_t diagonal, int threads, int64_t least) {
    int64_t rows = MAX(BLOCK_FLOATS / z.m / R * R, least);
    if (diagonal < z.m - 1) rows = MIN(rows, CAUSAL_ROWS);
    if (G < threads) {
        const int64_t parts = (threads + G - 1) / G; /* blocks a problem */
        rows = MIN(rows, MAX((z.n + parts - 1) / parts + R - 1, R) / R * R);
    }
    return MIN(rows, z.n);
}

/* Rows [i0, i0 + rows) of one problem's forward (q, o, a: the problem's), with scratch s
 * (rows x m). */
static void forward_rows(const float *q, keys kv, float *o, float *a, int64_t i0, int64_t rows,
                         sizes z, float alpha, int64_t diagonal, float *s) {
    /* the keys these rows meet: all, or those up to the last row's diagonal */
    const int64_t cols = kv.skip ? kept(i0 + rows - 1, z.m, diagonal) : z.m;
    if (a) s = a + i0 * z.m; /* the weights go straight into a */
    /* (whole panels of keys where the row has room: no narrow last tile) */
    weights(s, q, kv.kt, i0, rows, MIN((cols + L - 1) / L * L, z.m), z, alpha, diagonal);
    for (int64_t i = 0; a && cols < z.m && i < rows; i++)
        memset(s + i * z.m + cols, 0, sizeof(float) * (z.m - cols));
    if (cols == 0) {
        memset(o + i0 * z.e, 0, sizeof(float) * rows * z.e);
        return;
    }
    mm((lhs){s, z.m, 1}, kv.v, o + i0 * z.e, z.e, rows, cols, z.e, 0);
}

/* The forward's blocks first, first + stride, ... below end of G problems' blocks
 * (problem-major): 0, or 1 where scratch memory cannot be had. */
static int forward(const float *q, const float *k, const float *v, float *o, float *a,
                   int64_t first, int64_t end, int64_t stride, int64_t rb, sizes z, float alpha,
                   int64_t diagonal) {
    const int64_t blocks = (z.n + rb - 1) / rb;
    const int64_t kt_size = panels_size(z.d, z.m), v_size = panels_size(z.m, z.e);
    float *scratch = malloc(sizeof(float) * (rb * z.m + kt_size + v_size));
    if (scratch == NULL) return 1;
    float *s = scratch, *kt = s + rb * z.m, *vp = kt + kt_size;
    keys kv = {0};
    int64_t keys_of_g = -1;
    for (int64_t u = first; u < end; u += stride) {
        const int64_t g = u / blocks, i0 = (u % blocks) * rb;
        if (g != keys_of_g) {
            kv = keys_of(k + g * z.m * z.d, v + g * z.m * z.e, z, rb, diagonal, kt, vp);
            keys_of_g = g;
        }
        forward_rows(q + g * z.n * z.d, kv, o + g * z.n * z.e, a ? a + g * z.n * z.m : NULL, i0,
                     MIN(rb, z.n - i0), z, alpha, diagonal, s);
    }
    free(scratch);
    return 0;
}

/* Problems [g0, g1) of the backward: g_v = a^T g_o, g_s = M * alpha (g_o v^T + g_a)
 * (1 - a^2), g_q = g_s k, g_k = g_s^T q (g_o or g_a NULL: zero; a NULL: recomputed), in
 * blocks of rb rows as the forward's, those numbered first, first + stride, ... (g_k and g_v:
 * their sums over those blocks). Causal blocks stop at their last row's diagonal where q, k
 * and g_o are finite (the masked zeros of g_s and a meet them). */
TA_CLONES
static int backward(const float *q, const float *k, const float *v, const float *a,
                    const float *g_o, const float *g_a, float *g_q, float *g_k, float *g_v,
                    int64_t g0, int64_t g1, int64_t first, int64_t stride, int64_t rb, sizes z,
                    float alpha, int64_t diagonal) {
    const int64_t block_size = rb * z.m;
    const int64_t kt_size = panels_size(z.d, z.m), vt_size = panels_size(z.e, z.m);
    const int64_t kp_size = panels_size(z.m, z.d), y_size = panels_size(rb, MAX(z.d, z.e));
    float *scratch =
        malloc(sizeof(float) * (2 * block_size + kt_size + vt_size + kp_size + y_size));
    if (scratch == NULL) return 1;
    float *w = scratch, *gs = w + block_size, *kt = gs + block_size;
    float *vt = kt + kt_size, *kp = vt + vt_size, *y = kp + kp_size;
    for (int64_t g = g0; g < g1; g++) {
        const float *qg = q + g * z.n * z.d, *kg = k + g * z.m * z.d, *vg = v + g * z.m * z.e;
        const float *gog = g_o ? g_o + g * z.n * z.e : NULL;
        const float *gag = g_a ? g_a + g * z.n * z.m : NULL, *ag = a ? a + g * z.n * z.m : NULL;
        float *gqg = g_q + g * z.n * z.d, *gkg = g_k + g * z.m * z.d, *gvg = g_v + g * z.m * z.e;
        const packed ktp = ag ? (packed){0} : panels(kt, kg, z.d, z.d, z.m, 1);
        const packed vtp = gog ? panels(vt, vg, z.e, z.e, z.m, 1) : (packed){0};
        const packed kpp = panels(kp, kg, z.d, z.m, z.d, 0);
        memset(gkg, 0, sizeof(float) * z.m * z.d);
        memset(gvg, 0, sizeof(float) * z.m * z.e);
        const int skip = kept(rb - 1, z.m, diagonal) < z.m && all_finite(qg, z.n * z.d) &&
                         all_finite(kg, z.m * z.d) && (!gog || all_finite(gog, z.n * z.e));
        for (int64_t i0 = first * rb; i0 < z.n; i0 += stride * rb) {
            const int64_t rows = MIN(rb, z.n - i0);
            /* the keys these rows meet: all, or those up to the last row's diagonal */
            const int64_t cols = skip ? kept(i0 + rows - 1, z.m, diagonal) : z.m;
            if (cols == 0) {
                memset(gqg + i0 * z.d, 0, sizeof(float) * rows * z.d);
                continue;
            }
            const int64_t cols_p = MIN((cols + L - 1) / L * L, z.m);
            /* the block's weights (rows x m, given or recomputed) and gs = g_o v^T */
            const float *wb = ag ? ag + i0 * z.m : w;
            if (!ag) weights(w, qg, ktp, i0, rows, cols_p, z, alpha, diagonal);
            if (gog) mm((lhs){gog + i0 * z.e, z.e, 1}, vtp, gs, z.m, rows, z.e, cols_p, 0);
            for (int64_t i = 0; i < rows; i++) {
                float *gsi = gs + i * z.m;
                const float *wi = wb + i * z.m, *gai = gag ? gag + (i0 + i) * z.m : NULL;
                const int64_t last = kept(i0 + i, z.m, diagonal);
                for (int64_t j = 0; j < last; j++) {
                    const float total = (gog ? gsi[j] : 0.0f) + (gai ? gai[j] : 0.0f);
                    gsi[j] = alpha * (total * (1.0f - wi[j] * wi[j]));
                }
                for (int64_t j = last; j < cols_p; j++) gsi[j] = 0.0f;
            }
            /* g_q = gs k; g_v += w^T g_o, g_k += gs^T q (w^T and gs^T read in place) */
            mm((lhs){gs, z.m, 1}, kpp, gqg + i0 * z.d, z.d, rows, cols, z.d, 0);
            if (gog) {
                mm((lhs){wb, 1, z.m}, panels(y, gog + i0 * z.e, z.e, rows, z.e, 0), gvg, z.e, cols,
                   rows, z.e, 1);
            }
            mm((lhs){gs, 1, z.m}, panels(y, qg + i0 * z.d, z.d, rows, z.d, 0), gkg, z.d, cols,
               rows, z.d, 1);
        }
    }
    free(scratch);
    return 0;
}

/* Decoding steps: a few queries (n <= L) against a long cache, o only. The forward above
 * packs each problem's k^T and v, a copy as large as the cache, and computes at least four
 * rows for one query. Here the products run transposed, so that k and v are read in place,
 * once, a piece of keys at a time: s^T = k q^T (rows: keys; q^T is one packed panel),
 * a^T = M * tanh(alpha s^T), then o^T += v^T a^T (v^T read in place). A bfloat16 cache is
 * read as it is, each entry widened to float32 as the products broadcast it (bf16_entry;
 * or as few_keys loads a row; or on CPUs with AVX512-BF16, the scores multiply bfloat16
 * pairs: scores_pairs): the cache is read once, at half the bytes, and every sum is
 * float32. The pieces' sums are added up in groups of DECODE_KEYS keys, and the groups'
 * sums in turn. */
#define DECODE_KEYS 1024
#define PIECE 256

/* One thread's scratch for decode_keys: q^T packed, a piece's s^T (or few_keys' rows of o),
 * a group's o^T, and a bfloat16 piece's k and v widened (where it is not read in place). */
typedef struct {
    float *qt, *st, *part, *k, *v;
    uint32_t *qp; /* q^T as bfloat16 pairs, for scores_pairs (bfloat16 caches only) */
} decode_scratch;

/* x (count bfloat16 values) as float32 in buf (a bfloat16 is the top half of a float32). */
static const float *widen(float *buf, const uint16_t *x, int64_t count) {
    uint32_t *bits = (uint32_t *)buf;
    for (int64_t i = 0; i < count; i++) bits[i] = (uint32_t)x[i] << 16;
    return buf;
}

/* At most this many queries take few_keys: the panel's products compute L queries for any n
 * (32 x 1 x 4096 x 128, one thread: the same 16 ms for n = 1 to 16), few_keys' cost grows
 * with n (n = 1, 2, 3: 13.4, 16.1, 18.8 ms). */
#define FEW 4

/* VF entries from x, float32 or with B, bfloat16 (each the top half of its float32). */
typedef uint16_t halves __attribute__((vector_size(2 * VF)));
static inline __attribute__((always_inline)) vec load_row(const void *x, int64_t at, const int B) {
    if (!B) return *(const vecu *)((const float *)x + at);
    halves h;
    memcpy(&h, (const uint16_t *)x + at, sizeof h);
    return (vec)(__builtin_convertvector(h, bits) << 16);
}

/* Entry `at` of x, float32 or with B, bfloat16. */
static inline __attribute__((always_inline)) float load_one(const void *x, int64_t at,
                                                            const int B) {
    return B ? ta_from_bf16(((const uint16_t *)x)[at]) : ((const float *)x)[at];
}

/* The sum of v's lanes, halves added pairwise (a tree, not a chain of VF additions, each
 * waiting for the last: a decoding step's scores wait for these sums), in registers
 * (through memory, each sum waited for a store's forwarding). Full-width shuffles: GCC
 * before 12 has no __builtin_shufflevector, clang no __builtin_shuffle. */
#if defined(__clang__)
#define SWAP(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define SWAP(v, ...) __builtin_shuffle(v, (bits){__VA_ARGS__})
#endif
static inline __attribute__((always_inline)) float hsum(vec v) {
#if VF == 16
    v += SWAP(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += SWAP(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v += SWAP(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v += SWAP(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
#else
    v += SWAP(v, 4, 5, 6, 7, 0, 1, 2, 3);
    v += SWAP(v, 2, 3, 0, 1, 6, 7, 4, 5);
    v += SWAP(v, 1, 0, 3, 2, 5, 4, 7, 6);
#endif
    return v[0];
}
#undef SWAP

/* Where entry c of a row of `cols` entries sits when each of its whole pieces of 2 VF
 * entries is held split (its even entries, then its odd ones; the entries past the last
 * whole piece as they are): how few_keys holds q's rows and o's for a bfloat16 cache. */
static inline int64_t split_at(int64_t c, int64_t cols) {
    const int64_t r = c % (2 * VF);
    return c >= cols / (2 * VF) * (2 * VF) ? c : c - r + (r % 2 ? VF + r / 2 : r / 2);
}

/* A whole piece of 2 VF bfloat16 entries at x, split: its even entries as one vector of
 * float32 and its odd ones as another. A 32-bit word holds two entries: the even one in
 * its low half (shifted up, it is that entry as a float32), the odd one in its high half
 * (the low half cleared): two operations for two vectors, where widening entries in order
 * (load_row) takes a zero extension of each half of the piece and a shift. */
static inline __attribute__((always_inline)) void load_split(const uint16_t *x, vec *even,
                                                            vec *odd) {
    bits words;
    memcpy(&words, x, sizeof words);
    *even = (vec)(words << 16);
    *odd = (vec)(words & 0xffff0000u);
}

/* Entries c .. c + 2 VF of row x as two vectors: float32 in order, or with B, bfloat16 split
 * (load_split). */
static inline __attribute__((always_inline)) void load_piece(const void *x, int64_t c, vec *lo,
                                                            vec *hi, const int B) {
    if (B) load_split((const uint16_t *)x + c, lo, hi);
    else *lo = load_row(x, c, 0), *hi = load_row(x, c + VF, 0);
}

/* Keys p0 .. p0 + keys - 1 of one problem (rows kp, vp: float32, or with B, bfloat16 read
 * in place, every entry converted as it is loaded) for N <= FEW queries: pb (N x e) = their
 * weighted rows of v. In runs of FEW_RUN keys: their scores first (a row of k loaded once
 * for the N dot products, each vectorized over d), then their weights (the tanh vectorized
 * over the run), then their rows of v, each loaded once for the N queries and read from end
 * to end (a masked weight is 0 and still multiplies its row). With B, q's rows (N x d) and
 * pb's come split (split_at), as load_piece reads rows of k and v. Key by key, each
 * row of v waited for its weight (a dot product's sum, then the tanh): 32 x 1 x 1024 x 128,
 * bfloat16, one thread, 1.31 ms against 1.10 for the composite; and each query loaded and
 * converted the rows again, so that two queries took twice one's time (RESULTS.md). */
#define FEW_RUN 64
static inline __attribute__((always_inline)) void few_keys_of(
    const float *q, const void *kp, const void *vp, int64_t p0, int64_t keys, sizes z,
    float alpha, int64_t diagonal, float *restrict pb, const int B, const int N) {
    const int64_t size = B ? 2 : 4;
    float w[FEW][FEW_RUN];
    memset(pb, 0, sizeof(float) * N * z.e);
    for (int64_t r0 = 0; r0 < keys; r0 += FEW_RUN) {
        const int64_t run = MIN(FEW_RUN, keys - r0);
        for (int64_t p = 0; p < run; p++) {
            const char *kj = (const char *)kp + (r0 + p) * z.d * size;
            vec s[FEW][2] = {{{0}}};
            int64_t c = 0;
            for (; c + 2 * VF <= z.d; c += 2 * VF) {
                vec k0, k1;
                load_piece(kj, c, &k0, &k1, B);
                for (int i = 0; i < N; i++) {
                    s[i][0] += *(const vecu *)(q + i * z.d + c) * k0;
                    s[i][1] += *(const vecu *)(q + i * z.d + c + VF) * k1;
                }
            }
            for (int i = 0; i < N; i++) {
                float sum = hsum(s[i][0] + s[i][1]);
                for (int64_t t = c; t < z.d; t++) sum += q[i * z.d + t] * load_one(kj, t, B);
                w[i][p] = sum;
            }
        }
        for (int i = 0; i < N; i++) {
            /* (keys up to the row's diagonal keep their weight) */
            const int64_t kept = MAX(0, MIN(run, i + diagonal - p0 - r0 + 1));
            for (int64_t p = 0; p < run; p++) w[i][p] = ta_tanh(alpha * w[i][p]);
            for (int64_t p = kept; p < run; p++) w[i][p] = 0.0f;
        }
        for (int64_t p = 0; p < run; p++) {
            const char *vj = (const char *)vp + (r0 + p) * z.e * size;
            int64_t c = 0;
            for (; c + 2 * VF <= z.e; c += 2 * VF) {
                vec v0, v1;
                load_piece(vj, c, &v0, &v1, B);
                for (int i = 0; i < N; i++) {
                    *(vecu *)(pb + i * z.e + c) += w[i][p] * v0;
                    *(vecu *)(pb + i * z.e + c + VF) += w[i][p] * v1;
                }
            }
            for (; c < z.e; c++)
                for (int i = 0; i < N; i++) pb[i * z.e + c] += w[i][p] * load_one(vj, c, B);
        }
    }
}

/* few_keys_of for this many queries (1 .. FEW), each a function the compiler specializes. */
#define FEW_KEYS_OF(N)                                                                       \
    (bf16 ? few_keys_of(q, kp, vp, p0, keys, z, alpha, diagonal, pb, 1, N)                  \
          : few_keys_of(q, kp, vp, p0, keys, z, alpha, diagonal, pb, 0, N))

TA_CLONES
static void few_keys(const float *q, const void *kp, const void *vp, int bf16, int64_t p0,
                     int64_t keys, sizes z, float alpha, int64_t diagonal, float *restrict pb) {
    switch (z.n) {
    case 1: FEW_KEYS_OF(1); break;
    case 2: FEW_KEYS_OF(2); break;
    case 3: FEW_KEYS_OF(3); break;
    default: FEW_KEYS_OF(4); break;
    }
}
#undef FEW_KEYS_OF

/* mm of a decoding step's cache (x: a piece of k or v, read once, float32 or with `bf16`
 * bfloat16: see bf16_entry), prefetching stream_bytes from `stream` (or NULL) while it
 * runs, spread over its steps in place of x's next rows: the piece read next (x's own
 * rows, prefetched as they are read, came too late from memory). A function of its own,
 * so that mm's code for the forward and backward stays as it was. */
TA_CLONES
static void mm_cache(lhs x, int bf16, const char *stream, int64_t stream_bytes, packed y,
                     float *restrict c, int64_t ldc, int64_t rows, int64_t inner, int64_t cols,
                     int add) {
    if (bf16) products(x, y, c, ldc, rows, inner, cols, add, stream, stream_bytes, 1);
    else products(x, y, c, ldc, rows, inner, cols, add, stream, stream_bytes, 0);
}

/* Scores of a bfloat16 cache by pairs of bfloat16 products: AVX512-BF16's vdpbf16ps
 * multiplies 16 bfloat16 pairs and adds each pair's two products to a float32 sum in one
 * instruction, twice the multiply-adds of an FMA on float32 (AMD EPYC with AVX512-BF16:
 * benchmarks/RESULTS.md). The scores s^T = k q^T of a decoding step qualify where q's
 * entries are bfloat16 values (as a bfloat16 call's are) and d is even: then each product
 * is exact in float32, as when the entries are widened, and only the order of the float32
 * additions differs (pairs summed first). The weights and o = a v stay float32.
 * Only the 8-float build has it, where native.h's TA_PAIRS says the compiler does; elsewhere
 * PAIRS is 0. A product sums all d terms in order, without CHUNK's pieces (d is a head's
 * size, not a sequence's). */
#if VF == 8 && TA_PAIRS
#include <immintrin.h>
#define PAIRS 1

/* Whether scores_pairs may run: the CPU has AVX512-BF16 and ta_attn_decode_pairs left it
 * on (for measuring and testing both ways). */
static int pairs_wanted = 1;

static int pairs_here(void) {
    __builtin_cpu_init();
    return pairs_wanted && __builtin_cpu_supports("avx512bf16") &&
           __builtin_cpu_supports("avx512vl");
}

/* One step of row r of a scores_pairs block: k's entries 2p and 2p + 1 of that row, as one
 * 32-bit word in every lane, times the 16 queries' pairs, added to their two sums. */
#define PAIR_BLOCK(r)                                                                        \
    {                                                                                        \
        uint32_t word;                                                                       \
        memcpy(&word, x##r + 2 * p, sizeof word);                                            \
        const __m256bh b = (__m256bh)_mm256_set1_epi32((int)word);                           \
        c##r##0 = _mm256_dpbf16_ps(c##r##0, b, y0), c##r##1 = _mm256_dpbf16_ps(c##r##1, b, y1); \
    }

/* st (keys x L, row stride L) = k (keys x d bfloat16, read in place) @ q^T, q^T given as
 * qp: entry (p, i) the pair (q[i][2p], q[i][2p + 1]) as one 32-bit word, L words a step.
 * R keys at a time by 16 queries in 12 float32 accumulators, as mm's blocks; prefetches
 * stream_bytes from `stream` (or NULL) spread over its steps, as mm_cache does. */
TA_PAIRS_TARGET
static void scores_pairs(const uint16_t *k, int64_t keys, int64_t d, const uint32_t *qp,
                         float *restrict st, const char *stream, int64_t stream_bytes) {
    const int64_t half = d / 2, blocks = (keys + R - 1) / R;
    const int64_t per_step = stream ? (stream_bytes + blocks * half - 1) / (blocks * half) : 0;
    for (int64_t j0 = 0; j0 < keys; j0 += R) {
        const int64_t height = MIN(R, keys - j0);
        const uint16_t *x0 = k + j0 * d, *x1 = x0 + MIN(1, height - 1) * d;
        const uint16_t *x2 = x0 + MIN(2, height - 1) * d, *x3 = x0 + MIN(3, height - 1) * d;
        const uint16_t *x4 = x0 + MIN(4, height - 1) * d, *x5 = x0 + MIN(5, height - 1) * d;
        const char *pf = stream ? stream + j0 / R * half * per_step : NULL;
        __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
        __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
        for (int64_t p = 0; p < half; p++) {
            if (pf) __builtin_prefetch(pf + p * per_step);
            const __m256bh y0 = (__m256bh)_mm256_loadu_si256((const __m256i *)(qp + p * L));
            const __m256bh y1 = (__m256bh)_mm256_loadu_si256((const __m256i *)(qp + p * L + 8));
            PAIR_BLOCK(0) PAIR_BLOCK(1) PAIR_BLOCK(2) PAIR_BLOCK(3) PAIR_BLOCK(4) PAIR_BLOCK(5)
        }
        float tile[R][L];
        _mm256_storeu_ps(tile[0], c00), _mm256_storeu_ps(tile[0] + 8, c01);
        _mm256_storeu_ps(tile[1], c10), _mm256_storeu_ps(tile[1] + 8, c11);
        _mm256_storeu_ps(tile[2], c20), _mm256_storeu_ps(tile[2] + 8, c21);
        _mm256_storeu_ps(tile[3], c30), _mm256_storeu_ps(tile[3] + 8, c31);
        _mm256_storeu_ps(tile[4], c40), _mm256_storeu_ps(tile[4] + 8, c41);
        _mm256_storeu_ps(tile[5], c50), _mm256_storeu_ps(tile[5] + 8, c51);
        memcpy(st + j0 * L, tile, sizeof(float) * height * L);
    }
}
#undef PAIR_BLOCK
#else
#define PAIRS 0
static int pairs_here(void) { return 0; }
#endif

/* q^T as scores_pairs reads it (qp, d / 2 steps of L words; zero past n), or 0 where it
 * cannot be: d odd, or an entry of q is no bfloat16 value (its low 16 bits not zero). */
static int pack_pairs(uint32_t *qp, const float *q, int64_t n, int64_t d) {
    if (!PAIRS || d % 2) return 0;
    for (int64_t i = 0; i < n * d; i++) {
        uint32_t word;
        memcpy(&word, q + i, sizeof word);
        if (word & 0xffffu) return 0;
    }
    for (int64_t p = 0; p < d / 2; p++) {
        for (int64_t i = 0; i < L; i++) {
            uint32_t lo = 0, hi = 0;
            if (i < n) memcpy(&lo, q + i * d + 2 * p, 4), memcpy(&hi, q + i * d + 2 * p + 1, 4);
            qp[p * L + i] = (lo >> 16) | (hi & 0xffff0000u);
        }
    }
    return 1;
}

/* Keys [j0, j1) of one problem into ot (e x L, row stride L; column i: query i's share of
 * o, past n: meaningless); k and v float32, or with `bf16`, bfloat16, read in place, but
 * where k and v begin their tensors for the products (`first`: the piece's first entry has
 * nothing before it for bf16_entry to read): that piece is widened into w.k and w.v. */
TA_CLONES
static void decode_keys(const float *q, const void *k, const void *v, int bf16, int first,
                        int pairs, float *ot, int64_t j0, int64_t j1, sizes z, float alpha,
                        int64_t diagonal, decode_scratch w) {
    const int64_t size = bf16 ? 2 : 4;
    const packed qt = z.n <= FEW ? (packed){0} : panels(w.qt, q, z.d, z.d, z.n, 1);
    /* (few_keys of a bfloat16 cache: q's rows split, as it reads k's and v's; in w.qt) */
    const int split = bf16 && z.n <= FEW;
    if (split)
        for (int64_t i = 0; i < z.n; i++)
            for (int64_t c = 0; c < z.d; c++) w.qt[i * z.d + split_at(c, z.d)] = q[i * z.d + c];
    /* (pairs: this CPU has scores_pairs; then q's pairs, where q and d allow them) */
    pairs = pairs && bf16 && z.n > FEW && pack_pairs(w.qp, q, z.n, z.d);
    if (j0 >= j1) memset(ot, 0, sizeof(float) * z.e * L); /* (a thread's share of no keys) */
    for (int64_t c0 = j0; c0 < j1; c0 += DECODE_KEYS) {
        float *sum = c0 == j0 ? ot : w.part;
        for (int64_t p0 = c0; p0 < MIN(c0 + DECODE_KEYS, j1); p0 += PIECE) {
            const int64_t keys = MIN(PIECE, j1 - p0);
            const char *kb = (const char *)k + p0 * z.d * size;
            const char *vb = (const char *)v + p0 * z.e * size;
            /* (few_keys reads every entry as it is; the products but the first piece) */
            const int in_place = bf16 && (z.n <= FEW || !(first && p0 == 0));
            const int wide = bf16 && !in_place;
            const void *kp = wide ? widen(w.k, (const uint16_t *)kb, keys * z.d) : (const void *)kb;
            const void *vp = wide ? widen(w.v, (const uint16_t *)vb, keys * z.e) : (const void *)vb;
            float *st = w.st;
            if (z.n <= FEW) {
                few_keys(split ? w.qt : q, kp, vp, in_place, p0, keys, z, alpha, diagonal, st);
                for (int64_t i = 0; i < z.n; i++) {
                    for (int64_t c = 0; c < z.e; c++) {
                        const float x = st[i * z.e + (split ? split_at(c, z.e) : c)];
                        sum[c * L + i] = p0 > c0 ? sum[c * L + i] + x : x;
                    }
                }
                continue;
            }
            /* (while k's products run, v's piece is prefetched, and while v's run, k's next) */
            const int64_t next = MIN(PIECE, j1 - p0 - keys);
#if PAIRS
            if (pairs && in_place)
                scores_pairs((const uint16_t *)kp, keys, z.d, w.qp, st, vb, keys * z.e * size);
            else
#endif
                mm_cache((lhs){kp, z.d, 1}, in_place, wide ? NULL : vb, keys * z.e * size, qt,
                         st, L, keys, z.d, L, 0);
            for (int64_t t = 0; t < keys * L; t++) st[t] = ta_tanh(alpha * st[t]);
            /* query i keeps key j iff j <= i + diagonal: zeros where j - diagonal > i */
            for (int64_t p = MAX(0, diagonal + 1 - p0); p < keys; p++)
                for (int64_t i = 0; i < MIN(z.n, p0 + p - diagonal); i++) st[p * L + i] = 0.0f;
            mm_cache((lhs){vp, 1, z.e}, in_place, wide || next == 0 ? NULL : kb + keys * z.d * size,
                     next * z.d * size, (packed){st, keys}, sum, L, z.e, keys, L, p0 > c0);
        }
        for (int64_t t = 0; c0 > j0 && t < z.e * L; t++) ot[t] += w.part[t];
    }
}

/* Whether the decoding steps multiply bfloat16 scores by pairs (scores_pairs) here, after
 * turning that on (`enable` 1; the default) or off (0; -1 leaves it): for measuring and
 * testing both ways. */
int NAME(ta_attn_decode_pairs)(int enable) {
#if PAIRS
    if (enable >= 0) pairs_wanted = enable;
#endif
    return pairs_here();
}

/* The decoding step of G problems (layout above, no a; n <= L; k and v float32, or with
 * `bf16`, bfloat16): 0, or 1 where scratch memory could not be had or n is too large.
 * Threads take shares of the problems, or where there are fewer problems than threads,
 * shares of each problem's keys, whose sums are added at the end. */
int NAME(ta_attn_decode_f32)(const float *q, const void *k, const void *v, float *o,
                             int64_t G, int64_t n, int64_t m, int64_t d, int64_t e,
                             float alpha, int64_t diagonal, int threads, int bf16) {
    const sizes z = {n, m, d, e};
    if (n > L) return 1;
#ifndef _OPENMP
    threads = 1;
#endif
    /* qt, st (or few_keys' rows of o), part, k, v, then ot */
    const int64_t st_size = MAX(PIECE * L, FEW * e), widened = bf16 ? PIECE * (d + e) : 0;
    const int64_t pairs_size = bf16 ? d * L / 2 : 0; /* (qp: d / 2 steps of L words) */
    const int64_t ot_at = d * L + st_size + e * L + widened, each = ot_at + e * L + pairs_size;
    const int pairs = bf16 && pairs_here(); /* (asked once, outside the threads) */
    float *scratch = malloc(sizeof(float) * each * threads);
    if (scratch == NULL) return 1;
    const int split = threads > 1 && G < threads; /* keys shared out */
    const int64_t q_size = n * d, k_size = m * d * (bf16 ? 2 : 4), v_size = m * e * (bf16 ? 2 : 4);
    for (int64_t g0 = 0; g0 < G; g0 += split ? 1 : G) {
        int parts = 1;
#ifdef _OPENMP
        _Pragma("omp parallel num_threads(threads) if (threads > 1)")
#endif
        {
            int me = 0, count = 1;
#ifdef _OPENMP
            me = omp_get_thread_num(), count = omp_get_num_threads();
            if (me == 0) parts = count;
#endif
            float *mine = scratch + me * each;
            decode_scratch w = {mine, mine + d * L, mine + d * L + st_size, NULL, NULL, NULL};
            w.k = w.part + e * L, w.v = w.k + PIECE * d;
            float *ot = w.part + e * L + widened;
            w.qp = (uint32_t *)(ot + e * L);
            const int64_t g_end = split ? g0 + 1 : G * (me + 1) / count;
            const int64_t j0 = split ? m * me / count : 0, j1 = split ? m * (me + 1) / count : m;
            for (int64_t g = split ? g0 : G * me / count; g < g_end; g++) {
                decode_keys(q + g * q_size, (const char *)k + g * k_size,
                            (const char *)v + g * v_size, bf16, g == 0, pairs, ot, j0, j1, z,
                            alpha, diagonal, w);
                for (int64_t i = 0; !split && i < n; i++)
                    for (int64_t c = 0; c < e; c++) o[(g * n + i) * e + c] = ot[c * L + i];
            }
        }
        for (int64_t i = 0; split && i < n; i++) {
            for (int64_t c = 0; c < e; c++) {
                float sum = 0.0f;
                for (int t = 0; t < parts; t++) sum += scratch[t * each + ot_at + c * L + i];
                o[(g0 * n + i) * e + c] = sum;
            }
        }
    }
    free(scratch);
    return 0;
}

/* The forward of G problems (layout above): 0, or 1 where scratch memory could not be had
 * (then o and a hold nothing meaningful). Threads take shares of the problems, or where
 * there are fewer problems than threads, blocks of rows in turn (so that a causal problem's
 * short and long blocks are shared out). */
int NAME(ta_attn_f32)(const float *q, const float *k, const float *v, float *o, float *a,
                      int64_t G, int64_t n, int64_t m, int64_t d, int64_t e, float alpha,
                      int64_t diagonal, int threads) {
    const sizes z = {n, m, d, e};
#ifndef _OPENMP
    threads = 1;
#endif
    const int64_t rb = block_rows(z, G, diagonal, threads, R), blocks = (n + rb - 1) / rb;
#ifdef _OPENMP
    if (threads > 1) {
        int failed = 0;
        _Pragma("omp parallel num_threads(threads) reduction(| : failed)") {
            const int64_t parts = omp_get_num_threads(), me = omp_get_thread_num();
            /* (each thread packs the keys of each problem it visits: a share of problems
             * packs each problem's once) */
            if (G >= parts) {
                failed |= forward(q, k, v, o, a, G * me / parts * blocks,
                                  G * (me + 1) / parts * blocks, 1, rb, z, alpha, diagonal);
            } else {
                failed |= forward(q, k, v, o, a, me, G * blocks, parts, rb, z, alpha, diagonal);
            }
        }
        return failed;
    }
#endif
    return forward(q, k, v, o, a, 0, G * blocks, 1, rb, z, alpha, diagonal);
}

/* The backward of G problems: g_q, g_k, g_v from g_o and g_a (either NULL: zero) and a (NULL:
 * recomputed); 0, or 1 where scratch memory could not be had. Threads take shares of the
 * problems, or where there are fewer problems than threads, blocks of rows in turn, each
 * summing its g_k and g_v apart (the first thread's into them), added up at the end. */
int NAME(ta_attn_backward_f32)(const float *q, const float *k, const float *v,
                               const float *a, const float *g_o, const float *g_a, float *g_q,
                               float *g_k, float *g_v, int64_t G, int64_t n, int64_t m,
                               int64_t d, int64_t e, float alpha, int64_t diagonal,
                               int threads) {
    const sizes z = {n, m, d, e};
#ifndef _OPENMP
    threads = 1;
#endif
    /* (blocks of at least BACKWARD_ROWS: g_k and g_v are sums over blocks, which at m = 4096
     * would be blocks of 6 rows: 683 sums in turn, g_k 2x the composite's error against
     * float64, and each block's products too short to pay for reading g_k and g_v again) */
    const int64_t rb = block_rows(z, G, diagonal, threads, BACKWARD_ROWS);
    const int64_t k_size = G * m * d, v_size = G * m * e;
    float *own = threads > 1 && G < threads
                     ? malloc(sizeof(float) * (threads - 1) * (k_size + v_size))
                     : NULL;
    if (threads > 1 && G < threads && own == NULL) threads = 1;
#ifdef _OPENMP
    if (threads > 1) {
        int failed = 0, parts_run = 1;
        _Pragma("omp parallel num_threads(threads) reduction(| : failed)") {
            const int64_t parts = omp_get_num_threads(), me = omp_get_thread_num();
            if (me == 0) parts_run = (int)parts;
            if (own == NULL) {
                const int64_t g0 = G * me / parts, g1 = G * (me + 1) / parts;
                if (g0 < g1) failed |= backward(q, k, v, a, g_o, g_a, g_q, g_k, g_v, g0, g1, 0,
                                                1, rb, z, alpha, diagonal);
            } else {
                float *mine = me ? own + (me - 1) * (k_size + v_size) : NULL;
                failed |= backward(q, k, v, a, g_o, g_a, g_q, me ? mine : g_k,
                                   me ? mine + k_size : g_v, 0, G, me, parts, rb, z, alpha,
                                   diagonal);
            }
        }
        for (int64_t t = 0; own != NULL && t < parts_run - 1; t++) {
            const float *theirs = own + t * (k_size + v_size);
            for (int64_t i = 0; i < k_size; i++) g_k[i] += theirs[i];
            for (int64_t i = 0; i < v_size; i++) g_v[i] += theirs[k_size + i];
        }
        free(own);
        return failed;
    }
#endif
    free(own);
    return backward(q, k, v, a, g_o, g_a, g_q, g_k, g_v, 0, G, 0, 1, rb, z, alpha, diagonal);
}
