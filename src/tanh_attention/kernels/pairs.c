/* The bfloat16 backward's and forward's n x m blocks by AVX512-BF16 pairs: out = f(alpha *
 * x @ y^T) for x (rows x d) and y (cols x d), bfloat16, with d small (a head's size), in one
 * pass that rounds to bfloat16 once. f is one of
 *   TA_PLAIN     s                          (a block's product alone),
 *   TA_TANH      tanh(s)                    (the forward's weights; native.h's tanh),
 *   TA_BACKWARD  (s + g_a) * (1 - a^2)      (the backward's score gradient, g_a optional).
 *
 * Why it exists: oneDNN's product of such a block is fast, but its tanh epilogue is not,
 * and the backward's score gradient took a second pass over the block (tanh.c's
 * ta_tanh_backward). One core of the AMD EPYC with AVX512-BF16 of benchmarks/RESULTS.md, a
 * 1024 x 512 block of d = 64, hot: the product alone 0.32 ms either way; with the tanh 0.56
 * ms by oneDNN, 0.48 here; the score gradient 0.44 by oneDNN and tanh.c, 0.37 here (more in
 * situ, where the blocks of a and g_a are strided and cold). vdpbf16ps multiplies 16
 * bfloat16 pairs and adds each pair's two products to a float32 sum in one instruction,
 * twice the multiply-adds of an FMA on float32. Every product of two bfloat16 values is
 * exact in float32; only the order of the float32 additions differs from a plain loop
 * (pairs first), and bfloat16 inputs and products below float32's normal range count as 0
 * (the instruction's rule; 1e-38 against bfloat16's rounding error of 2^-9 of a sum).
 *
 * The register block: RB rows of x by CB tiles of 16 columns (64 columns of y), 24 float32
 * accumulators; y is packed in panels of 64 of its rows, pair p of each of them side by side
 * (one vector load per tile and step), x's pairs are broadcast from its rows in place. Each
 * block's sums go through a small float32 tile to the epilogue, 16 lanes at a time.
 * Threads (OpenMP builds): the y panels are packed in shares, then the rows of
 * each problem are dealt out in chunks.
 *
 * Only an x86-64 GCC 11 or clang 12 and later builds it (older ones lack the intrinsics);
 * ta_pairs_available() says whether this build has it and this CPU runs it.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native.h"

#ifdef _OPENMP
#include <omp.h>
#endif

enum { TA_PLAIN = 0, TA_TANH = 1, TA_BACKWARD = 2 };

#if TA_PAIRS
#include <immintrin.h>

#define RB 6
#define CB 4
#define PANEL (16 * CB)
/* Rows a thread takes at a time (a multiple of RB): small, so that threads get equal
 * shares of a block's rows (512 rows: 43 chunks). */
#define CHUNK (2 * RB)

/* y's rows j0 .. j0 + PANEL as the block reads them: word (p, l) the pair (y[j0 + l][2p],
 * y[j0 + l][2p + 1]), zero past the last row. */
static void pack_panel(uint32_t *restrict yp, const uint16_t *y, int64_t ldy, int64_t j0,
                       int64_t cols, int64_t half) {
    const int64_t keys = cols - j0 < PANEL ? cols - j0 : PANEL;
    for (int64_t l = 0; l < PANEL; l++) {
        const uint16_t *row = y + (j0 + (l < keys ? l : 0)) * ldy;
        for (int64_t p = 0; p < half; p++) {
            uint32_t word = 0;
            if (l < keys) memcpy(&word, row + 2 * p, sizeof word);
            yp[p * PANEL + l] = word;
        }
    }
}

/* The sums of one register block: t[r][c] = x_r . y_c over d = 2 * half entries, for the
 * RB rows at x (row stride ldx; past `rows` the last row again) and a packed panel. */
TA_PAIRS_TARGET
static void block(const uint16_t *x, int64_t ldx, int64_t rows, const uint32_t *yp,
                  int64_t half, float t[RB][PANEL]) {
    const uint16_t *xr[RB];
    for (int r = 0; r < RB; r++) xr[r] = x + (r < rows ? r : rows - 1) * ldx;
    __m512 c[RB][CB];
    for (int r = 0; r < RB; r++)
        for (int j = 0; j < CB; j++) c[r][j] = _mm512_setzero_ps();
    for (int64_t p = 0; p < half; p++) {
        __m512bh y[CB];
        for (int j = 0; j < CB; j++)
            y[j] = (__m512bh)_mm512_loadu_si512((const void *)(yp + p * PANEL + 16 * j));
        for (int r = 0; r < RB; r++) {
            uint32_t word;
            memcpy(&word, xr[r] + 2 * p, sizeof word);
            const __m512bh b = (__m512bh)_mm512_set1_epi32((int)word);
            for (int j = 0; j < CB; j++) c[r][j] = _mm512_dpbf16_ps(c[r][j], b, y[j]);
        }
    }
    for (int r = 0; r < RB; r++)
        for (int j = 0; j < CB; j++) _mm512_storeu_ps(t[r] + 16 * j, c[r][j]);
}

/* native.h's tanh on 16 lanes, its one division as a reciprocal to 14 bits (vrcp14ps; the
 * denominator is at least 1) and a Newton step, which costs less than vdivps and keeps
 * float32's accuracy (without the step, 2^-14 of the result moved some weights to the other
 * bfloat16 neighbour: largest error 2.00e-3 where rounding alone gives 1.95e-3). NaN stays
 * NaN (max and min return their second operand where one is NaN). */
TA_PAIRS_TARGET
static inline __m512 tanh16(__m512 u) {
    const __m512 one = _mm512_set1_ps(1.0f);
    u = _mm512_min_ps(_mm512_set1_ps(10.0f), _mm512_max_ps(_mm512_set1_ps(-10.0f), u));
    const __m512 y = _mm512_mul_ps(_mm512_set1_ps(0.5f), u), y2 = _mm512_mul_ps(y, y);
    __m512 a = _mm512_fmadd_ps(_mm512_set1_ps(TA_TANH_A3), y2, _mm512_set1_ps(TA_TANH_A2));
    a = _mm512_fmadd_ps(a, y2, _mm512_set1_ps(TA_TANH_A1));
    a = _mm512_fmadd_ps(a, y2, one);
    __m512 b = _mm512_fmadd_ps(_mm512_set1_ps(TA_TANH_B3), y2, _mm512_set1_ps(TA_TANH_B2));
    b = _mm512_fmadd_ps(b, y2, _mm512_set1_ps(TA_TANH_B1));
    b = _mm512_fmadd_ps(b, y2, one);
    const __m512 ya = _mm512_mul_ps(y, a);
    const __m512 den = _mm512_fmadd_ps(ya, ya, _mm512_mul_ps(b, b));
    __m512 r = _mm512_rcp14_ps(den);
    r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(den, r, one), r);
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(u, a), b), r);
}

/* 16 bfloat16 values (the lanes of `keep`) as float32. */
TA_PAIRS_TARGET
static inline __m512 load16(const uint16_t *x, __mmask16 keep) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(keep, x));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* The epilogue of one row of a block: `count` sums at t, written to out as bfloat16
 * (vcvtneps2bf16: to nearest even, NaN kept; float32 below the normal range counts as 0,
 * the instruction's rule, as the products' own). */
TA_PAIRS_TARGET
static void finish_row(const float *restrict t, uint16_t *restrict out, int64_t count,
                       float alpha, int mode, const uint16_t *restrict a,
                       const uint16_t *restrict g_a) {
    const __m512 scale = _mm512_set1_ps(alpha), one = _mm512_set1_ps(1.0f);
    for (int64_t c = 0; c < count; c += 16) {
        const __mmask16 keep = count - c >= 16 ? 0xffff : (__mmask16)((1u << (count - c)) - 1);
        __m512 s = _mm512_mul_ps(scale, _mm512_loadu_ps(t + c));
        if (mode == TA_TANH) {
            s = tanh16(s);
        } else if (mode == TA_BACKWARD) {
            const __m512 w = load16(a + c, keep);
            if (g_a) s = _mm512_add_ps(s, load16(g_a + c, keep));
            s = _mm512_mul_ps(s, _mm512_fnmadd_ps(w, w, one));
        }
        _mm256_mask_storeu_epi16(out + c, keep, (__m256i)_mm512_cvtneps_pbh(s));
    }
}

/* Rows i0 .. i1 of one problem against every packed panel of its y. A block of rows takes
 * every panel in turn, so that the epilogue walks rows of a, g_a and out from end to end (a
 * panel taking every block of rows in turn read them 128 bytes a row, one row a page apart:
 * 645 against 505 us a 512 x 1024 block of the backward, strided blocks of a and g_a out of
 * cache, one core of the AMD EPYC with AVX512-BF16). */
TA_PAIRS_TARGET
static void rows_of(const uint16_t *x, int64_t ldx, const uint32_t *yp, uint16_t *out,
                    int64_t ldo, const uint16_t *a, int64_t lda, const uint16_t *g_a,
                    int64_t ldg_a, int64_t i0, int64_t i1, int64_t cols, int64_t half,
                    float alpha, int mode) {
    float t[RB][PANEL] __attribute__((aligned(64)));
    for (int64_t r0 = i0; r0 < i1; r0 += RB) {
        const int64_t rows = i1 - r0 < RB ? i1 - r0 : RB;
        for (int64_t j0 = 0; j0 < cols; j0 += PANEL) {
            const int64_t count = cols - j0 < PANEL ? cols - j0 : PANEL;
            block(x + r0 * ldx, ldx, rows, yp + j0 / PANEL * half * PANEL, half, t);
            for (int64_t r = 0; r < rows; r++) {
                const int64_t i = r0 + r;
                finish_row(t[r], out + i * ldo + j0, count, alpha, mode,
                           a ? a + i * lda + j0 : NULL, g_a ? g_a + i * ldg_a + j0 : NULL);
            }
        }
    }
}

int ta_pairs_available(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512f");
}

/* out[g] = f(alpha * x[g] @ y[g]^T) for g < groups: x (groups, rows, d), y (groups, cols, d)
 * (y_step 0: one y for all), out, a and g_a (groups, rows, cols; a and g_a only for
 * TA_BACKWARD, g_a may be NULL), all bfloat16 with contiguous rows: *_ld the row strides,
 * *_step the problems'. d even. Returns nonzero (and writes nothing) where it cannot run:
 * this CPU lacks AVX512-BF16, d is odd, or memory for the packed y ran out. */
int ta_pairs_block(const uint16_t *x, const uint16_t *y, uint16_t *out, const uint16_t *a,
                   const uint16_t *g_a, int64_t groups, int64_t rows, int64_t cols, int64_t d,
                   int64_t ldx, int64_t x_step, int64_t ldy, int64_t y_step, int64_t ldo,
                   int64_t o_step, int64_t lda, int64_t a_step, int64_t ldg_a, int64_t g_a_step,
                   float alpha, int mode, int threads) {
    if (!ta_pairs_available() || d % 2 || d <= 0) return 1;
    if (groups <= 0 || rows <= 0 || cols <= 0) return 0;
    const int64_t half = d / 2, panels = (cols + PANEL - 1) / PANEL;
    const int64_t packs = y_step ? groups : 1, per_pack = panels * half * PANEL;
    uint32_t *yp = aligned_alloc(64, (size_t)(packs * per_pack) * sizeof(uint32_t));
    if (!yp) return 1;
    const int64_t chunks = (rows + CHUNK - 1) / CHUNK;
#ifdef _OPENMP
    if (threads > 1 && groups * rows * cols * d < (1 << 20)) threads = 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
    {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t w = 0; w < packs * panels; w++) {
            const int64_t g = w / panels, j = w % panels;
            pack_panel(yp + g * per_pack + j * half * PANEL, y + g * y_step, ldy, j * PANEL,
                       cols, half);
        }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t w = 0; w < groups * chunks; w++) {
            const int64_t g = w / chunks, i0 = w % chunks * CHUNK;
            const int64_t i1 = i0 + CHUNK < rows ? i0 + CHUNK : rows;
            rows_of(x + g * x_step, ldx, yp + (y_step ? g : 0) * per_pack, out + g * o_step, ldo,
                    a ? a + g * a_step : NULL, lda, g_a ? g_a + g * g_a_step : NULL, ldg_a, i0,
                    i1, cols, half, alpha, mode);
        }
    }
    free(yp);
    return 0;
}

#else
int ta_pairs_available(void) { return 0; }

int ta_pairs_block(const uint16_t *x, const uint16_t *y, uint16_t *out, const uint16_t *a,
                   const uint16_t *g_a, int64_t groups, int64_t rows, int64_t cols, int64_t d,
                   int64_t ldx, int64_t x_step, int64_t ldy, int64_t y_step, int64_t ldo,
                   int64_t o_step, int64_t lda, int64_t a_step, int64_t ldg_a, int64_t g_a_step,
                   float alpha, int mode, int threads) {
    (void)x, (void)y, (void)out, (void)a, (void)g_a, (void)groups, (void)rows, (void)cols;
    (void)d, (void)ldx, (void)x_step, (void)ldy, (void)y_step, (void)ldo, (void)o_step;
    (void)lda, (void)a_step, (void)ldg_a, (void)g_a_step, (void)alpha, (void)mode;
    (void)threads;
    return 1;
}
#endif
