/* What the compiled kernels (tanh.c, attn.c; built by native.py) share: per-CPU clones and
 * tanh(u) of one float32 value, inline, so that each caller's loop vectorizes it.
 *
 * The tanh.  With u clamped to [-10, 10] (tanh(10) rounds to 1 in float32) and
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
#ifndef TA_NATIVE_H
#define TA_NATIVE_H

#include <stdint.h>
#include <string.h>

/* One build runs the widest vector unit of the CPU it finds (GCC and Clang on x86-64 pick a
 * clone at load time), so a cached library is safe on any x86-64 machine. The AVX-512 clone
 * is x86-64-v4, not "avx512f" alone: that one lacks FMA and AVX512VL, so its 256-bit
 * vectors multiply and add apart, at half the rate. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(TA_NO_CLONES)
#define TA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TA_CLONES
#endif

/* AVX512-BF16's pairs (vdpbf16ps: attn.c's decoding scores, pairs.c's blocks): only an x86-64
 * GCC 11 or clang 12 and later has the intrinsics and the CPU test (with an older one the
 * whole library would fail to build); elsewhere TA_PAIRS is 0. Callers check the CPU at run
 * time. */
#if defined(__clang__)
#define TA_PAIRS_COMPILER (__clang_major__ >= 12)
#elif defined(__GNUC__)
#define TA_PAIRS_COMPILER (__GNUC__ >= 11)
#else
#define TA_PAIRS_COMPILER 0
#endif
#if defined(__x86_64__) && TA_PAIRS_COMPILER && !defined(TA_NO_CLONES)
#define TA_PAIRS 1
#define TA_PAIRS_TARGET                                                                      \
    __attribute__((target("avx512bf16,avx512vl,avx512bw,avx512dq,avx512f,avx2,fma")))
#else
#define TA_PAIRS 0
#endif

/* A's and B's coefficients, highest power first (their constant terms are 1). */
#define TA_TANH_A3 5.203882062e-06f
#define TA_TANH_A2 2.512674503e-03f
#define TA_TANH_A1 1.255203799e-01f
#define TA_TANH_B3 1.694701191e-04f
#define TA_TANH_B2 2.213125154e-02f
#define TA_TANH_B1 4.588533015e-01f

static inline float ta_tanh(float u) {
    u = u < -10.0f ? -10.0f : (u > 10.0f ? 10.0f : u); /* NaN passes */
    float y = 0.5f * u; /* (the numerator takes u: y of the tiniest u underflows to 0) */
    float y2 = y * y;
    float a = TA_TANH_A3;
    a = a * y2 + TA_TANH_A2;
    a = a * y2 + TA_TANH_A1;
    a = a * y2 + 1.0f;
    float b = TA_TANH_B3;
    b = b * y2 + TA_TANH_B2;
    b = b * y2 + TA_TANH_B1;
    b = b * y2 + 1.0f;
    float ya = y * a; /* tanh(y) = ya / b */
    return u * a * b / (b * b + ya * ya);
}

/* A bfloat16 value (its bits) as float32: a bfloat16 is the top half of a float32. */
static inline float ta_from_bf16(uint16_t x) {
    const uint32_t word = (uint32_t)x << 16;
    float f;
    memcpy(&f, &word, sizeof f);
    return f;
}

/* Round to nearest even, NaN to the quiet NaN 0x7fc0: as PyTorch's float-to-bfloat16. */
static inline uint16_t ta_to_bf16(float f) {
    uint32_t word;
    memcpy(&word, &f, sizeof word);
    const uint32_t rounded = (word + 0x7fffu + ((word >> 16) & 1u)) >> 16;
    return f != f ? (uint16_t)0x7fc0u : (uint16_t)rounded;
}

#endif
