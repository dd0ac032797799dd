/* The kernels without Python: the argument block of a convolution, the variants of
 * _kernels_impl.h for each instruction set, and the choice among them. _net.h runs whole
 * networks on them; _kernels.c adds the threads and the Python glue;
 * tests/kernels_harness.c drives the same code without Python (it is cross-compiled for
 * aarch64 and run under qemu to check the NEON variant bit for bit).
 */
#ifndef SIGNGRAD_KERNELS_CORE_H
#define SIGNGRAD_KERNELS_CORE_H
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* GCC and Clang take the attributes and builtins used below; any other C99 compiler (the
 * C export goes into firmware built with whatever compiler it uses) gets plain forms. */
#if !defined(__GNUC__)
#define __attribute__(x)
static inline int sg_popcount64(uint64_t v)
{
    v = v - ((v >> 1) & 0x5555555555555555ull);
    v = (v & 0x3333333333333333ull) + ((v >> 2) & 0x3333333333333333ull);
    v = (v + (v >> 4)) & 0x0F0F0F0F0F0F0F0Full;
    return (int)((v * 0x0101010101010101ull) >> 56);
}
#define __builtin_popcountll(v) sg_popcount64(v)
#endif

enum { ACT_NONE = 0, ACT_RELU = 1, ACT_HARDTANH = 2, ACT_PRELU = 3 };

typedef struct {
    const uint64_t *x; /* binary convolution: packed input and weights */
    const uint64_t *w;
    const float *xf, *wf; /* float convolution: NHWC input, KH x KW x C x O weights */
    int sign_input;       /* float convolution of sign(x) */
    int N, H, W, Cw, C, O, KH, KW, sh, sw, ph, pw, Ho, Wo;
    const float *scale, *shift; /* per output channel, always given */
    const float *residual, *slope;
    int act, slope_n;
    float lo, hi;
    float *out;
    uint64_t *out_bits; /* optional: the signs of the output, packed (O channels) */
    /* a hint: nothing reads out afterwards, only out_bits; a kernel may leave out unwritten */
    int bits_only;
    /* set by the AVX-512 bconv_rows for itself: each channel's sign decision as a
     * threshold on the integer d (bit o is (d < sign_t[o]) XOR bit o of sign_flip, packed
     * as out_bits is), or NULL */
    const int32_t *sign_t;
    const uint64_t *sign_flip;
    /* and, where C is even, floor(-sign_t[o] / 2) (see bconv_rows), or NULL */
    const int32_t *sign_k;
    /* The offsets of a window's taps inside the image (KH * KW each), set by the caller. */
    const int64_t *rel, *woff_all;
} bconv_args;

/* Heap scratch (int64) one thread needs for a binary convolution: xoff and woff of
 * KH * KW taps, then O accumulators. */
static inline int64_t bconv_scratch(int64_t taps, int64_t O) { return 2 * taps + O; }

/* Heap scratch (int64) one thread needs for a float convolution: four patches of
 * KH * KW * C floats. */
static inline int64_t fconv_scratch(int64_t taps, int64_t C) { return 2 * taps * C; }

/* Threads' scratch lies this many int64 (128 bytes) apart or a multiple of it, from a
 * 64-byte line: a thread writes its window offsets for every pixel while the next one
 * reads its own, and sharing a cache line (or the pair a prefetcher fetches together)
 * would make each write evict the other thread's line. */
#define SCRATCH_SPACING 16

/* A thread's share of scratch for need int64 (need >= 0, not near INT64_MAX). */
static inline int64_t scratch_spaced(int64_t need)
{
    return (need + SCRATCH_SPACING - 1) / SCRATCH_SPACING * SCRATCH_SPACING;
}

/* The first 64-byte line of a block from malloc that is 64 bytes longer than needed. */
static inline int64_t *scratch_line(void *block)
{
    return (int64_t *)(((uintptr_t)block + 63) & ~(uintptr_t)63);
}

/* rel and woff_all of a (2 * KH * KW int64 at rel) for its shape. */
static inline void bconv_set_offsets(bconv_args *a, int64_t *rel)
{
    const int64_t taps = (int64_t)a->KH * a->KW;
    for (int64_t t = 0; t < taps; t++) {
        rel[t] = ((t / a->KW) * a->W + t % a->KW) * a->Cw;
        rel[taps + t] = t * a->Cw * a->O;
    }
    a->rel = rel;
    a->woff_all = rel + taps;
}

/* (GCC's target pragmas: Clang and other compilers build the portable variant) */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(SIGNGRAD_PORTABLE)
#define X86 1
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq,avx512bitalg,avx512vbmi2,avx2,fma,popcnt")
#define SUFFIX avx512
#define USE_AVX512 1
#include "_kernels_impl.h"
#undef USE_AVX512
#undef SUFFIX
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,popcnt")
#define SUFFIX avx2
#define USE_AVX2 1
#include "_kernels_impl.h"
#undef USE_AVX2
#undef SUFFIX
#pragma GCC pop_options
#endif

#if defined(__aarch64__) && defined(__GNUC__) && !defined(SIGNGRAD_PORTABLE)
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

/* One instruction set's kernels. */
typedef struct {
    const char *name;
    void (*bconv_rows)(const bconv_args *, int64_t r0, int64_t r1, int64_t *scratch);
    void (*fconv_rows)(const bconv_args *, int64_t r0, int64_t r1, float *patch);
    void (*pack_rows)(const float *x, int64_t p0, int64_t p1, int C, uint64_t *out);
    uint64_t (*popcount_peak)(int64_t iters); /* 8192 bit operations per round */
} kernel_impl;

#define KERNEL_IMPL(label, suffix)                                                         \
    ((kernel_impl){label, bconv_rows_##suffix, fconv_rows_##suffix, pack_rows_##suffix,       \
                   popcount_peak_##suffix})

static kernel_impl impl;
static const char *impl_name = "generic";

/* Pick the best variant this CPU runs: AVX-512 VPOPCNTDQ (with BITALG and VBMI2, which
 * every CPU with both VPOPCNTDQ and BITALG has: Ice Lake and later, Zen 4 and later),
 * then AVX2+POPCNT on x86-64; NEON on aarch64, where every CPU has it. */
static void select_impl(void)
{
    impl = KERNEL_IMPL("generic", generic);
#ifdef X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("avx512bitalg") &&
        __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        impl = KERNEL_IMPL("avx512-vpopcntdq", avx512);
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("popcnt"))
        impl = KERNEL_IMPL("avx2-popcnt", avx2);
#elif defined(ARM64)
    impl = KERNEL_IMPL("neon", neon);
#endif
    impl_name = impl.name;
}

#endif
