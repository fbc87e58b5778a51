/* tanh(alpha * x) of float32 scores, in place: the CPU kernels' "compiled" tanh method.
 *
 * Why it exists: on CPUs without a fast tanh in PyTorch (torch.tanh costs 3.0 ns an entry on
 * the AVX2 AMD EPYC of benchmarks/RESULTS.md, 2 * sigmoid(2x) - 1 1.2) tanh costs a quarter
 * of an attention forward at n = 256. A rational function, vectorized by the compiler, takes
 * 0.26-0.48 ns an entry there (benchmarks/tanh_methods.py, one thread). kernels/native.py
 * compiles this file on first use (no compiler, or a failed build: the kernels keep their
 * other methods) and checks its accuracy.
 *
 * The method. With u = alpha * x clamped to [-10, 10] (tanh(10) rounds to 1 in float32) and
 * y = u / 2:
 *   t = tanh(y) ~ y * A(y^2) / B(y^2),   A and B cubic, all coefficients positive,
 *   tanh(u) = 2t / (1 + t^2) = u A B / (B^2 + (y A)^2)     (one division).
 * The coefficients are a fit of tanh(y) / y on [0, 5] to the relative error, A(0) = B(0) = 1
 * (benchmarks/fit_tanh.py: 7e-8 in exact arithmetic). The doubling formula damps the
 * error of t where tanh saturates (its derivative in t vanishes at t = 1), so float32
 * rounding decides the error: within 5 ulp of tanh for every float32 input and below 2**-22
 * absolutely (4.9 ulp and 1.9e-7 at most over all of them: benchmarks/compiled_tanh_error.py;
 * tests/test_tanh_accuracy.py sweeps a dense sample). NaN stays NaN, -0.0 stays -0.0, and
 * +-inf (and scores beyond +-10) give exactly +-1.
 */
#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* One build runs the widest vector unit of the CPU it finds (GCC and Clang on x86-64 pick a
 * clone at load time), so a cached library is safe on any x86-64 machine. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(TA_NO_CLONES)
#define TA_CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#else
#define TA_CLONES
#endif

/* Below this many entries one thread does the whole span (a parallel region costs a few us). */
#define TA_PARALLEL_MIN 65536

TA_CLONES
static void tanh_span(float *restrict x, int64_t n, float alpha) {
    for (int64_t i = 0; i < n; i++) {
        float u = alpha * x[i];
        u = u < -10.0f ? -10.0f : (u > 10.0f ? 10.0f : u); /* NaN passes */
        float y = 0.5f * u; /* (the numerator takes u: y of the tiniest u underflows to 0) */
        float y2 = y * y;
        float a = 5.203882062e-06f;
        a = a * y2 + 2.512674503e-03f;
        a = a * y2 + 1.255203799e-01f;
        a = a * y2 + 1.0f;
        float b = 1.694701191e-04f;
        b = b * y2 + 2.213125154e-02f;
        b = b * y2 + 4.588533015e-01f;
        b = b * y2 + 1.0f;
        float ya = y * a; /* tanh(y) = ya / b */
        x[i] = u * a * b / (b * b + ya * ya);
    }
}

/* x[r * row_stride + c] = tanh(alpha * x[...]) for r < rows, c < cols, on up to `threads`
 * threads (OpenMP builds; others run one). */
void ta_tanh_f32(float *x, int64_t rows, int64_t cols, int64_t row_stride, float alpha,
                 int threads) {
        if (rows == 1 || row_stride == cols) { /* one contiguous span */
        const int64_t n = rows * cols;
#ifdef _OPENMP
        if (threads > 1 && n >= TA_PARALLEL_MIN) {
#pragma omp parallel num_threads(threads)
            {
                /* Equal shares, each starting on a 64-byte line (16 floats). */
                const int64_t parts = omp_get_num_threads(), me = omp_get_thread_num();
                const int64_t lines = (n + 15) / 16;
                int64_t begin = lines * me / parts * 16, end = lines * (me + 1) / parts * 16;
                end = end < n ? end : n;
                if (begin < end) tanh_span(x + begin, end - begin, alpha);
            }
            return;
        }
#endif
        tanh_span(x, n, alpha);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && rows * cols >= TA_PARALLEL_MIN)
#endif
    for (int64_t r = 0; r < rows; r++) tanh_span(x + r * row_stride, cols, alpha);
}
