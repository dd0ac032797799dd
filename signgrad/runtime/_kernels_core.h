/* The kernels without Python: the argument block of the convolution, the variants of
 * _kernels_impl.h for each instruction set, and the choice among them. _kernels.c adds
 * the Python glue; tests/kernels_harness.c drives the same code without Python (it is
 * cross-compiled for aarch64 and run under qemu to check the NEON variant bit for bit).
 */
#ifndef SIGNGRAD_KERNELS_CORE_H
#define SIGNGRAD_KERNELS_CORE_H
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

enum { ACT_NONE = 0, ACT_RELU = 1, ACT_HARDTANH = 2, ACT_PRELU = 3 };

typedef struct {
    const uint64_t *x;
    const uint64_t *w;
    int N, H, W, Cw, C, O, KH, KW, sh, sw, ph, pw, Ho, Wo;
    const float *scale, *shift; /* per output channel, always given */
    const float *residual, *slope;
    int act, slope_n;
    float lo, hi;
    float *out;
    uint64_t *out_bits; /* optional: the signs of the output, packed (O channels) */
    int threads;
    /* Heap scratch, sized by the glue: per thread, scratch_stride int64 (xoff and woff of
     * KH * KW taps, then O accumulators); shared, the offsets of a window inside the image. */
    int64_t *scratch;
    int64_t scratch_stride;
    const int64_t *rel, *woff_all;
} bconv_args;

/* The most threads a call may ask for: signgrad.runtime.model.MAX_THREADS checks the same
 * bound with a clear message; this is the glue's own defence. */
#define MAX_THREADS 1024

#if defined(__x86_64__) && defined(__GNUC__)
#define X86 1
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq,avx2,fma,popcnt")
#define SUFFIX avx512
#define USE_AVX512 1
#include "_kernels_impl.h"
#undef USE_AVX512
#undef SUFFIX
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,popcnt")
#define SUFFIX avx2
#include "_kernels_impl.h"
#undef SUFFIX
#pragma GCC pop_options
#endif

#if defined(__aarch64__) && defined(__GNUC__)
#define ARM64 1
#include <arm_neon.h>
#define SUFFIX neon
#define USE_NEON 1
#include "_kernels_impl.h"
#undef USE_NEON
#undef SUFFIX
#endif

#define SUFFIX generic
#include "_kernels_impl.h"
#undef SUFFIX

static void (*bconv_impl)(const bconv_args *) = bconv_generic;
static void (*pack_impl)(const float *, int64_t, int, uint64_t *, int) = pack_generic;
static const char *impl_name = "generic";

/* Pick the best variant this CPU runs: AVX-512 VPOPCNTDQ, then AVX2+POPCNT on x86-64;
 * NEON on aarch64, where every CPU has it. */
static void select_impl(void)
{
#ifdef X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
        bconv_impl = bconv_avx512;
        pack_impl = pack_avx512;
        impl_name = "avx512-vpopcntdq";
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")) {
        bconv_impl = bconv_avx2;
        pack_impl = pack_avx2;
        impl_name = "avx2-popcnt";
    }
#elif defined(ARM64)
    bconv_impl = bconv_neon;
    pack_impl = pack_neon;
    impl_name = "neon";
#endif
}

#endif
