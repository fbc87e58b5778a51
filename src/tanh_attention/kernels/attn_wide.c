/* attn.c again with vectors of 16 floats (register blocks of 6 x 32), for CPUs with AVX-512:
 * there attn.c's own 8-float vectors fill half of each vector register, and the products run
 * at half the rate the CPU reaches (AMD EPYC with AVX-512, benchmarks/RESULTS.md: oneDNN's
 * 512-bit products 210 GFLOP/s on one core, MKL's 256-bit ones 95).
 *
 * The exported names end in _wide. Built for every CPU (the same per-CPU clones as attn.c;
 * without AVX-512 a vector of 16 is computed piece by piece, many times slower but the same
 * arithmetic, which is how the tests run these kernels on any machine);
 * ta_attn_vector_floats() below says which build this CPU runs at full width. */
#define VF 16
#define NAME(name) name##_wide
#include "attn.c"

/* The floats a vector holds in the build of attn.c this CPU runs at its full width: 16 with
 * AVX-512 (x86-64-v4), 8 with AVX2 and FMA (x86-64-v3), else 0 (then neither build pays:
 * GCC computes vectors wider than the machine's piece by piece through memory, 30-40x
 * slower than attn.c's AVX2 clone on the AMD EPYC of benchmarks/RESULTS.md). The levels are
 * those of the clones native.h's TA_CLONES picks among. */
int ta_attn_vector_floats(void) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(TA_NO_CLONES)
    __builtin_cpu_init();
#ifdef __clang__
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
        return 16;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 8 : 0;
#else
    if (__builtin_cpu_supports("x86-64-v4")) return 16;
    return __builtin_cpu_supports("x86-64-v3") ? 8 : 0;
#endif
#else
    return 0;
#endif
}
