/* tanh(alpha * x) of float32 scores, in place: the CPU kernels' "compiled" tanh method.
 *
 * Why it exists: on CPUs without a fast tanh in PyTorch (torch.tanh costs 3.0 ns an entry on
 * the AVX2 AMD EPYC of benchmarks/RESULTS.md, 2 * sigmoid(2x) - 1 1.2) tanh costs a quarter
 * of an attention forward at n = 256. A rational function, vectorized by the compiler, takes
 * 0.26-0.48 ns an entry there (benchmarks/tanh_methods.py, one thread). kernels/native.py
 * compiles this file on first use (no compiler, or a failed build: the kernels keep their
 * other methods) and checks its accuracy.
 *
 * The method (rational, with one division) and its accuracy: native.h, which attn.c shares.
 */
#include <stdint.h>

#include "native.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* Below this many entries one thread does the whole span (a parallel region costs a few us). */
#define TA_PARALLEL_MIN 65536

TA_CLONES
static void tanh_span(float *restrict x, int64_t n, float alpha) {
    for (int64_t i = 0; i < n; i++) x[i] = ta_tanh(alpha * x[i]);
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
