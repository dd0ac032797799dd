/* Drives every variant of the runtime's kernels (signgrad/runtime/_kernels_core.h) that
 * this CPU runs on the same seeded inputs, without Python, and prints one line per case
 * and variant: a 64-bit FNV-1a hash of every output byte (floats, packed sign bits).
 *
 * tests/test_kernels_arch.py compiles it for this machine and, with Debian's cross
 * compilers, for aarch64 (run under qemu user-mode emulation): the hashes must agree
 * between the variants and between the machines, bit for bit.
 *
 * Each case runs the binary convolution and, on the same shapes, the float one (fused
 * multiply-adds in a fixed order: every machine must round them alike).
 *
 * The binary convolution also runs on copies of its input that touch an inaccessible page
 * at their start and at their end: a read outside the input faults (masked vector loads
 * must leave the words outside the image alone), and the outputs must not change.
 *
 * Build: cc -O3 -std=c11 -I signgrad/runtime tests/kernels_harness.c -o harness -lm
 */
#define _DEFAULT_SOURCE /* mmap's MAP_ANONYMOUS */
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "_kernels_core.h"

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint64_t next_u64(void)
{
    /* xorshift64*: the same stream on every machine */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}

static float next_float(void)
{
    /* in [-2, 2), a multiple of 2^-20: exact in every engine */
    return (float)((int64_t)(next_u64() >> 42) - (1 << 21)) / (float)(1 << 20);
}

static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001B3ull;
    return h;
}

typedef struct {
    int N, H, W, C, O, K, s, p, act, residual, bits, slope_n, special, bits_only;
} case_t;

static const case_t CASES[] = {
    {1, 8, 8, 3, 16, 3, 1, 1, ACT_NONE, 0, 0, 0},
    {2, 8, 8, 64, 64, 3, 1, 1, ACT_RELU, 1, 1, 0},
    {1, 9, 7, 70, 17, 3, 2, 1, ACT_HARDTANH, 0, 1, 0},
    {1, 6, 6, 130, 130, 3, 1, 0, ACT_PRELU, 1, 1, 130},
    {1, 5, 5, 33, 1, 1, 1, 0, ACT_PRELU, 0, 0, 1},
    {1, 4, 4, 200, 24, 3, 1, 1, ACT_NONE, 1, 1, 0},
    {3, 1, 1, 512, 10, 1, 1, 0, ACT_NONE, 0, 0, 0},
    {1, 7, 7, 16, 35, 5, 2, 2, ACT_RELU, 0, 1, 0},
    /* narrow layers: 16 and 32 channels, 5 x 5 taps over 20 channels */
    {2, 9, 9, 16, 16, 3, 1, 1, ACT_HARDTANH, 1, 1, 0},
    {1, 8, 8, 32, 64, 3, 2, 1, ACT_RELU, 0, 1, 0},
    {1, 7, 7, 20, 24, 5, 1, 2, ACT_NONE, 1, 1, 0},
    /* AVX-512's paths of 16 and 32 pixels (C <= 32 or 16, O % 16 == 0, stride 1 or 2
     * along x): rows of more than 16 and 32 pixels, several blocks of 16 channels, a second
     * output word, 1 x 1 and 5 x 5 windows, per-channel PReLU */
    {1, 5, 21, 32, 32, 3, 1, 1, ACT_PRELU, 1, 1, 32},
    {2, 6, 19, 7, 48, 1, 1, 0, ACT_RELU, 0, 1, 0},
    {1, 3, 18, 30, 80, 3, 1, 1, ACT_HARDTANH, 1, 1, 0},
    {1, 7, 7, 20, 32, 5, 1, 2, ACT_NONE, 0, 1, 0},
    {1, 3, 40, 12, 16, 3, 1, 1, ACT_HARDTANH, 1, 1, 0}, /* C <= 16: 32 pixels, then 6 */
    {1, 4, 37, 16, 32, 3, 2, 1, ACT_PRELU, 1, 1, 32}, /* stride 2: 16 pixels, then 1 */
    {1, 3, 20, 9, 16, 1, 2, 0, ACT_RELU, 0, 1, 0},
    /* padding beyond the kernel: rows whose window lies wholly in the padding */
    {1, 4, 6, 8, 16, 2, 1, 3, ACT_RELU, 1, 1, 0},
    /* special values: NaN and infinite scales, -0 shifts, so that outputs are -0 and NaN
     * (each engine must keep the sign of zero and pass NaN through the activations) */
    {1, 4, 4, 2, 24, 1, 1, 0, ACT_RELU, 0, 1, 0, 1},
    {1, 4, 4, 2, 24, 1, 1, 0, ACT_HARDTANH, 1, 1, 0, 1},
    {1, 4, 4, 2, 24, 1, 1, 0, ACT_PRELU, 0, 1, 24, 1},
    {1, 4, 4, 2, 24, 1, 1, 0, ACT_NONE, 0, 1, 0, 1},
    {1, 4, 4, 2, 16, 1, 1, 0, ACT_RELU, 1, 1, 0, 1},
    {1, 4, 4, 2, 16, 1, 1, 0, ACT_HARDTANH, 0, 1, 0, 1},
    {1, 4, 4, 2, 32, 1, 1, 0, ACT_PRELU, 1, 1, 32, 1},
    /* only the signs wanted (bits_only; the float output is not compared): the decision
     * from a threshold on the count on every AVX-512 path (16 and 32 pixels, one and
     * two), and the float epilogue where a threshold cannot be exact (NaN scales, a
     * residual, negative PReLU slopes) */
    {1, 6, 40, 16, 16, 3, 1, 1, ACT_HARDTANH, 0, 1, 0, 0, 1},
    {1, 5, 37, 32, 32, 3, 2, 1, ACT_RELU, 0, 1, 0, 0, 1},
    {2, 5, 9, 24, 48, 3, 1, 1, ACT_NONE, 0, 1, 0, 0, 1},
    {1, 5, 7, 100, 72, 3, 1, 1, ACT_PRELU, 0, 1, 72, 0, 1},
    {2, 8, 12, 34, 32, 3, 1, 1, ACT_NONE, 0, 1, 0, 0, 1},
    {1, 9, 9, 40, 16, 3, 2, 1, ACT_RELU, 0, 1, 0, 0, 1},
    {1, 5, 20, 16, 16, 3, 1, 1, ACT_PRELU, 0, 1, 1, 0, 1},
    {1, 4, 4, 2, 16, 1, 1, 0, ACT_HARDTANH, 0, 1, 0, 1, 1},
    {1, 5, 20, 16, 16, 3, 1, 1, ACT_RELU, 1, 1, 0, 0, 1},
    /* signs only over several output words a pixel (16 and 32 pixels) */
    {1, 4, 35, 16, 80, 3, 1, 1, ACT_HARDTANH, 0, 1, 0, 0, 1},
    {1, 5, 19, 32, 96, 3, 2, 1, ACT_NONE, 0, 1, 0, 0, 1},
    /* signs only with d in {-2, 0, 2}: channels negative for every d or for none */
    {1, 4, 4, 2, 16, 1, 1, 0, ACT_HARDTANH, 0, 1, 0, 0, 1},
    {1, 4, 4, 2, 16, 1, 1, 0, ACT_RELU, 0, 1, 0, 0, 1},
    /* signs only with C odd: the totals' parity differs between pixels, so the pixel-lane
     * paths compare d itself (16 and 32 pixels) */
    {1, 5, 36, 15, 16, 3, 1, 1, ACT_HARDTANH, 0, 1, 0, 0, 1},
    {1, 5, 19, 25, 32, 3, 2, 1, ACT_RELU, 0, 1, 0, 0, 1},
    /* 11 x 11 windows at 16-bit lanes: a row's window of 42 words, past 40 */
    {1, 12, 40, 8, 16, 11, 1, 5, ACT_RELU, 1, 1, 0},
    {1, 13, 37, 14, 16, 11, 1, 5, ACT_HARDTANH, 0, 1, 0, 0, 1},
    /* images taller than one plane of input rows (the pixel-lane paths take 32 output
     * rows of a 3 x 3 window at a time, 16 at stride 2): chunks inside an image */
    {2, 40, 35, 16, 16, 3, 1, 1, ACT_HARDTANH, 1, 1, 0},
    {1, 45, 20, 16, 32, 3, 1, 1, ACT_RELU, 0, 1, 0, 0, 1},
    {2, 34, 18, 24, 16, 3, 1, 1, ACT_PRELU, 1, 1, 16},
    {2, 37, 33, 32, 32, 3, 2, 1, ACT_NONE, 1, 1, 0},
    /* padding wider than a block's window: blocks wholly in the padding */
    {1, 4, 6, 16, 16, 3, 1, 20, ACT_RELU, 1, 1, 0},
    {1, 3, 5, 20, 16, 3, 2, 60, ACT_HARDTANH, 0, 1, 0, 0, 1},
    /* rows of 16 pixels (16-bit lanes) or 8 (32-bit): two rows a register, the last one
     * of an odd count alone; at both strides, across chunks, and with rows wholly in
     * the padding */
    {1, 7, 16, 16, 16, 3, 1, 1, ACT_HARDTANH, 1, 1, 0},
    {2, 5, 16, 12, 32, 3, 1, 1, ACT_RELU, 0, 1, 0, 0, 1},
    {1, 9, 32, 16, 32, 3, 2, 1, ACT_RELU, 0, 1, 0, 0, 1},
    {2, 32, 32, 16, 16, 3, 2, 1, ACT_PRELU, 1, 1, 16},
    {1, 5, 8, 32, 32, 3, 1, 1, ACT_NONE, 1, 1, 0},
    {2, 40, 8, 24, 16, 3, 1, 1, ACT_HARDTANH, 0, 1, 0, 0, 1},
    {1, 11, 16, 32, 64, 3, 2, 1, ACT_RELU, 0, 1, 0, 0, 1},
    {1, 7, 15, 20, 16, 3, 2, 1, ACT_HARDTANH, 1, 1, 0},
    {1, 3, 4, 16, 16, 3, 1, 7, ACT_RELU, 1, 1, 0},
    {1, 3, 2, 30, 16, 3, 1, 4, ACT_HARDTANH, 0, 1, 0, 0, 1},
    /* 33 to 64 channels: 8 pixels in 64-bit lanes, across chunks, C odd and even */
    {1, 35, 19, 64, 64, 3, 1, 1, ACT_HARDTANH, 1, 1, 0},
    {1, 6, 10, 50, 32, 5, 1, 2, ACT_PRELU, 0, 1, 32, 0, 1},
    {1, 5, 9, 63, 16, 3, 1, 1, ACT_RELU, 0, 1, 0, 0, 1},
    /* two rows a register across chunks: 16 + 4 rows at stride 2; an odd chunk size
     * (4 x 4 windows: 31 rows) made even, 30 + 9 */
    {1, 40, 32, 16, 16, 3, 2, 1, ACT_HARDTANH, 1, 1, 0},
    {1, 40, 17, 12, 16, 4, 1, 1, ACT_RELU, 1, 1, 0},
};

#define GUARD 256 /* bytes */

/* n bytes of output and GUARD bytes of a fixed pattern after them */
static void *guarded(size_t n)
{
    unsigned char *p = malloc(n + GUARD);
    memset(p + n, 0xA5, GUARD);
    return p;
}

/* A copy of n bytes from src whose first byte follows an inaccessible page (at_end 0) or
 * whose last byte precedes one (at_end 1); *map and *len give the mapping to unmap. */
static void *fenced_copy(const void *src, size_t n, int at_end, void **map, size_t *len)
{
    const size_t page = (size_t)sysconf(_SC_PAGESIZE), inner = (n + page - 1) / page * page;
    *len = inner + 2 * page;
    unsigned char *b = mmap(NULL, *len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (b == MAP_FAILED || mprotect(b, page, PROT_NONE) || mprotect(b + page + inner, page, PROT_NONE)) {
        perror("fenced_copy");
        exit(1);
    }
    *map = b;
    unsigned char *p = at_end ? b + page + inner - n : b + page;
    memcpy(p, src, n);
    return p;
}

static void run_case(int k, const case_t *c, const kernel_impl *v)
{
    rng_state = 0x9E3779B97F4A7C15ull + (uint64_t)k;
    bconv_args a;
    memset(&a, 0, sizeof a);
    a.N = c->N, a.H = c->H, a.W = c->W, a.C = c->C, a.O = c->O;
    a.KH = a.KW = c->K, a.sh = a.sw = c->s, a.ph = a.pw = c->p;
    a.Cw = (a.C + 63) / 64;
    a.Ho = (a.H + 2 * a.ph - a.KH) / a.sh + 1;
    a.Wo = (a.W + 2 * a.pw - a.KW) / a.sw + 1;
    a.act = c->act, a.lo = -0.75f, a.hi = 1.25f;
    const int64_t taps = (int64_t)a.KH * a.KW, pix = (int64_t)a.N * a.Ho * a.Wo;
    const int64_t nx = (int64_t)a.N * a.H * a.W, Ow = (a.O + 63) / 64;
    /* activations as floats (some zeros, to check sign(0) = +1), packed by the variant */
    float *xf = malloc(sizeof(float) * (size_t)(nx * a.C));
    for (int64_t i = 0; i < nx * a.C; i++) xf[i] = (next_u64() % 7 == 0) ? 0.0f : next_float();
    uint64_t *x = malloc(sizeof(uint64_t) * (size_t)(nx * a.Cw));
    v->pack_rows(xf, 0, nx, a.C, x);
    const int64_t nw = taps * a.Cw * a.O;
    uint64_t *w = malloc(sizeof(uint64_t) * (size_t)nw);
    for (int64_t i = 0; i < nw; i++) {
        const int64_t word = (i / a.O) % a.Cw; /* pad bits of the last word stay 0 */
        const int used = word == a.Cw - 1 ? a.C - 64 * (a.Cw - 1) : 64;
        w[i] = next_u64() & (used == 64 ? ~0ull : ((1ull << used) - 1));
    }
    float *scale = malloc(sizeof(float) * (size_t)a.O), *shift = malloc(sizeof(float) * (size_t)a.O);
    float *slope = malloc(sizeof(float) * (size_t)a.O);
    for (int o = 0; o < a.O; o++) scale[o] = next_float(), shift[o] = next_float(), slope[o] = next_float();
    /* signs only: non-negative slopes where the case has several (a monotone PReLU) */
    if (c->bits_only && c->slope_n > 1)
        for (int o = 0; o < a.O; o++) slope[o] = fabsf(slope[o]);
    if (c->special)
        for (int o = 0; o < a.O; o++) {
            shift[o] = -0.0f; /* with C = 2 the count is 0 for half the bits: -0 outputs */
            scale[o] = o % 6 == 0 ? NAN : o % 6 == 1 ? INFINITY : o % 6 == 2 ? -1.0f : scale[o];
            slope[o] = o % 4 == 0 ? -0.0f : slope[o];
        }
    float *residual = NULL;
    if (c->residual) {
        residual = malloc(sizeof(float) * (size_t)(pix * a.O));
        for (int64_t i = 0; i < pix * a.O; i++) residual[i] = next_float();
    }
    /* GUARD words past each output's end, hashed with it: a write beyond its end shows */
    float *out = guarded(sizeof(float) * (size_t)(pix * a.O));
    uint64_t *bits = c->bits ? guarded(sizeof(uint64_t) * (size_t)(pix * Ow)) : NULL;
    const int64_t need = bconv_scratch(taps, a.O);
    int64_t *scratch = malloc(sizeof(int64_t) * (size_t)(need + 2 * taps));
    bconv_set_offsets(&a, scratch + need);
    a.x = x, a.w = w, a.scale = scale, a.shift = shift, a.residual = residual;
    a.slope = c->slope_n ? slope : NULL, a.slope_n = c->slope_n;
    a.out = out, a.out_bits = bits, a.bits_only = c->bits_only;
    v->bconv_rows(&a, 0, (int64_t)a.N * a.Ho, scratch);
    for (int at_end = 0; at_end < 2; at_end++) {
        const size_t xb = sizeof(uint64_t) * (size_t)(nx * a.Cw);
        const size_t ob = sizeof(float) * (size_t)(pix * a.O), bb = sizeof(uint64_t) * (size_t)(pix * Ow);
        void *map;
        size_t len;
        bconv_args e = a;
        e.x = fenced_copy(x, xb, at_end, &map, &len);
        e.out = malloc(ob), e.out_bits = bits ? malloc(bb) : NULL;
        v->bconv_rows(&e, 0, (int64_t)a.N * a.Ho, scratch);
        if ((!c->bits_only && memcmp(e.out, out, ob)) || (bits && memcmp(e.out_bits, bits, bb))) {
            fprintf(stderr, "case %d, %s: another output from a fenced copy of the input\n", k, v->name);
            exit(1);
        }
        munmap(map, len), free(e.out), free(e.out_bits);
    }
    /* The float convolution on the same shapes: float weights, the float input (its
     * sign on odd cases), into a second output. */
    float *wf = malloc(sizeof(float) * (size_t)(taps * a.C * a.O));
    for (int64_t i = 0; i < taps * a.C * a.O; i++) wf[i] = next_float();
    float *fout = guarded(sizeof(float) * (size_t)(pix * a.O));
    uint64_t *fbits = c->bits ? guarded(sizeof(uint64_t) * (size_t)(pix * Ow)) : NULL;
    bconv_args f = a;
    f.xf = xf, f.wf = wf, f.sign_input = k % 2, f.out = fout, f.out_bits = fbits, f.bits_only = 0;
    float *patch = malloc(sizeof(float) * (size_t)(4 * taps * a.C));
    v->fconv_rows(&f, 0, (int64_t)a.N * a.Ho, patch);
    free(patch);
    uint64_t h = fnv(0xCBF29CE484222325ull, x, sizeof(uint64_t) * (size_t)(nx * a.Cw));
    /* One NaN for all: x86 makes the NaN of an invalid operation (0 * inf) negative, ARM
     * positive; every other bit pattern (the sign of zero included) must agree. */
    const uint32_t canonical_nan = 0x7FC00000u;
    for (int64_t i = 0; !c->bits_only && i < pix * a.O; i++)
        if (isnan(out[i])) memcpy(&out[i], &canonical_nan, sizeof canonical_nan);
    for (int64_t i = 0; i < pix * a.O; i++)
        if (isnan(fout[i])) memcpy(&fout[i], &canonical_nan, sizeof canonical_nan);
    if (!c->bits_only) h = fnv(h, out, sizeof(float) * (size_t)(pix * a.O) + GUARD);
    h = fnv(h, fout, sizeof(float) * (size_t)(pix * a.O) + GUARD);
    if (bits) h = fnv(h, bits, sizeof(uint64_t) * (size_t)(pix * Ow) + GUARD);
    if (fbits) h = fnv(h, fbits, sizeof(uint64_t) * (size_t)(pix * Ow) + GUARD);
    printf("case %d %016llx %s\n", k, (unsigned long long)h, v->name);
    free(xf), free(x), free(w), free(scale), free(shift), free(slope), free(residual);
    free(out), free(bits), free(scratch), free(wf), free(fout), free(fbits);
}

int main(void)
{
    kernel_impl variants[4];
    int nv = 0;
    variants[nv++] = KERNEL_IMPL("generic", generic);
#ifdef X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("popcnt"))
        variants[nv++] = KERNEL_IMPL("avx2-popcnt", avx2);
    if (__builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("avx512bitalg") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq"))
        variants[nv++] = KERNEL_IMPL("avx512-vpopcntdq", avx512);
#endif
#ifdef ARM64
    variants[nv++] = KERNEL_IMPL("neon", neon);
#endif
    select_impl();
    printf("selected %s\n", impl_name);
    for (int k = 0; k < (int)(sizeof CASES / sizeof CASES[0]); k++)
        for (int i = 0; i < nv; i++) run_case(k, &CASES[k], &variants[i]);
    return 0;
}
