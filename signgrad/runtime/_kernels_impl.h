/* The kernels' bodies, included by _kernels_core.h once per instruction set with SUFFIX
 * (a name suffix) defined, USE_AVX512 for the AVX-512 VPOPCNTDQ variant and USE_NEON for
 * aarch64; each x86 inclusion sits under its own "#pragma GCC target", so every function
 * here is compiled for that instruction set. Each works on a range of rows: the caller
 * (the glue's threads, or one thread alone) splits the work. */
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SUFFIX)

/* Signs of C floats packed into ceil(C / 64) words, 1 for negative (and NaN). */
static inline __attribute__((always_inline)) void
FN(pack_row)(const float *xp, int C, uint64_t *out)
{
    const int Cw = (C + 63) / 64;
    for (int k = 0; k < Cw; k++) {
        uint64_t bits = 0;
#ifdef USE_AVX512
        for (int j = 0; j < 4 && k * 64 + j * 16 < C; j++) {
            const int c = k * 64 + j * 16, left = C - c;
            const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
            const __m512 v = _mm512_maskz_loadu_ps(m, xp + c);
            const __mmask16 neg = _mm512_mask_cmp_ps_mask(m, v, _mm512_setzero_ps(), _CMP_NGE_UQ);
            bits |= (uint64_t)neg << (16 * j);
        }
#else
        const int end = (k + 1) * 64 < C ? (k + 1) * 64 : C;
        for (int c = k * 64; c < end; c++)
            bits |= (uint64_t)(!(xp[c] >= 0.0f)) << (c - k * 64);
#endif
        out[k] = bits;
    }
}

/* The offsets of the valid (not padding) taps of output pixel (n, oy, ox). */
static inline __attribute__((always_inline)) int
FN(valid_taps)(const bconv_args *a, int n, int oy, int ox, int64_t *xoff, int64_t *woff)
{
    int valid = 0;
    for (int ky = 0; ky < a->KH; ky++) {
        const int iy = oy * a->sh - a->ph + ky;
        if (iy < 0 || iy >= a->H) continue;
        for (int kx = 0; kx < a->KW; kx++) {
            const int ix = ox * a->sw - a->pw + kx;
            if (ix < 0 || ix >= a->W) continue;
            xoff[valid] = (((int64_t)n * a->H + iy) * a->W + ix) * a->Cw;
            woff[valid] = (int64_t)(ky * a->KW + kx) * a->Cw * a->O;
            valid++;
        }
    }
    return valid;
}

#ifdef USE_NEON
/* Popcounts of NV x 2 output channels from ob (NV a constant after inlining: the
 * accumulators stay in registers). One CNT counts the bits of 16 bytes, two weight words;
 * the pairwise widening adds turn the byte counts into one 64-bit sum per word. */
static inline __attribute__((always_inline)) void
FN(neon_block)(const bconv_args *a, const int NV, int valid, const int64_t *xoff,
               const int64_t *woff, int ob, uint64_t *acc)
{
    const int O = a->O, Cw = a->Cw;
    uint64x2_t s[8];
    for (int j = 0; j < NV; j++) s[j] = vdupq_n_u64(0);
    for (int t = 0; t < valid; t++)
        for (int c = 0; c < Cw; c++) {
            const uint64x2_t v = vdupq_n_u64(a->x[xoff[t] + c]);
            const uint64_t *wr = a->w + woff[t] + (int64_t)c * O + ob;
            for (int j = 0; j < NV; j++) {
                const uint8x16_t bits = vreinterpretq_u8_u64(veorq_u64(v, vld1q_u64(wr + 2 * j)));
                s[j] = vpadalq_u32(s[j], vpaddlq_u16(vpaddlq_u8(vcntq_u8(bits))));
            }
        }
    for (int j = 0; j < NV; j++) vst1q_u64(acc + ob + 2 * j, s[j]);
}

/* The epilogue of the first O - O % 4 channels, four at a time, with the same IEEE
 * operations in the same order as the portable loops (multiply, then add: no fused
 * multiply-add; the activations as compare-and-select, so that -0 and NaN come out as
 * there); returns the first channel it left to them. The count converts to float
 * through double, exactly for |count| < 2^53, so with the one rounding of the portable
 * int64 -> float conversion. */
static inline __attribute__((always_inline)) int
FN(neon_epilogue)(const bconv_args *a, const uint64_t *acc, int64_t total, float *y,
                  const float *rp)
{
    const int O4 = a->O & ~3;
    const int64x2_t t = vdupq_n_s64(total);
    const float32x4_t zero = vdupq_n_f32(0.0f), lo = vdupq_n_f32(a->lo), hi = vdupq_n_f32(a->hi);
    for (int o = 0; o < O4; o += 4) {
        const int64x2_t d0 = vsubq_s64(t, vshlq_n_s64(vreinterpretq_s64_u64(vld1q_u64(acc + o)), 1));
        const int64x2_t d1 =
            vsubq_s64(t, vshlq_n_s64(vreinterpretq_s64_u64(vld1q_u64(acc + o + 2)), 1));
        float32x4_t v = vcombine_f32(vcvt_f32_f64(vcvtq_f64_s64(d0)), vcvt_f32_f64(vcvtq_f64_s64(d1)));
        v = vaddq_f32(vmulq_f32(v, vld1q_f32(a->scale + o)), vld1q_f32(a->shift + o));
        if (rp) v = vaddq_f32(v, vld1q_f32(rp + o));
        if (a->act == ACT_RELU) v = vbslq_f32(vcltq_f32(v, zero), zero, v);
        else if (a->act == ACT_HARDTANH)
            v = vbslq_f32(vcltq_f32(v, lo), lo, vbslq_f32(vcgtq_f32(v, hi), hi, v));
        else if (a->act == ACT_PRELU) {
            const float32x4_t sl = a->slope_n == 1 ? vdupq_n_f32(a->slope[0]) : vld1q_f32(a->slope + o);
            v = vbslq_f32(vcgeq_f32(v, zero), v, vmulq_f32(v, sl));
        }
        vst1q_f32(y + o, v);
    }
    return O4;
}
#endif

/* acc[o] = the sum over the valid taps and channel words of popcount(x XOR w[o]). */
static inline __attribute__((always_inline)) void
FN(popcounts)(const bconv_args *a, int valid, const int64_t *xoff, const int64_t *woff,
              uint64_t *acc)
{
    const int O = a->O, Cw = a->Cw;
    int o0 = 0;
#ifdef USE_NEON
    for (; o0 + 16 <= O; o0 += 16) FN(neon_block)(a, 8, valid, xoff, woff, o0, acc);
    switch ((O - o0) / 2) {
    case 7: FN(neon_block)(a, 7, valid, xoff, woff, o0, acc); break;
    case 6: FN(neon_block)(a, 6, valid, xoff, woff, o0, acc); break;
    case 5: FN(neon_block)(a, 5, valid, xoff, woff, o0, acc); break;
    case 4: FN(neon_block)(a, 4, valid, xoff, woff, o0, acc); break;
    case 3: FN(neon_block)(a, 3, valid, xoff, woff, o0, acc); break;
    case 2: FN(neon_block)(a, 2, valid, xoff, woff, o0, acc); break;
    case 1: FN(neon_block)(a, 1, valid, xoff, woff, o0, acc); break;
    default: break;
    }
    o0 += (O - o0) / 2 * 2;
#endif
    /* The portable loop (and NEON's odd last channel). */
    memset(acc + o0, 0, sizeof(uint64_t) * (size_t)(O - o0));
    for (int t = 0; t < valid; t++)
        for (int c = 0; c < Cw; c++) {
            const uint64_t v = a->x[xoff[t] + c];
            const uint64_t *wr = a->w + woff[t] + (int64_t)c * O;
            for (int o = o0; o < O; o++) acc[o] += (uint64_t)__builtin_popcountll(v ^ wr[o]);
        }
}

/* The end of an output pixel's epilogue, once y holds count * scale + shift (or, for a
 * float convolution, sum * scale + shift) from channel o0 on: the residual, the activation
 * and the packed signs. Shared by the binary and the float convolutions so that both
 * treat -0 and NaN alike. */
static inline __attribute__((always_inline)) void
FN(finish_pixel)(const bconv_args *a, int64_t pix, int o0, float *y, const float *rp)
{
    const int O = a->O, Ow = (O + 63) / 64;
    if (rp)
        for (int o = o0; o < O; o++) y[o] += rp[o];
    /* NaN passes through relu and hardtanh, as in numpy's maximum and clip. */
    if (a->act == ACT_RELU)
        for (int o = o0; o < O; o++) y[o] = y[o] < 0.0f ? 0.0f : y[o];
    else if (a->act == ACT_HARDTANH)
        for (int o = o0; o < O; o++) y[o] = y[o] < a->lo ? a->lo : (y[o] > a->hi ? a->hi : y[o]);
    else if (a->act == ACT_PRELU)
        for (int o = o0; o < O; o++)
            y[o] = y[o] >= 0.0f ? y[o] : y[o] * a->slope[a->slope_n == 1 ? 0 : o];
    if (a->out_bits) FN(pack_row)(y, O, a->out_bits + pix * Ow);
}

/* Portable row: popcounts into acc, then the epilogue as simple loops (vectorizable). */
static inline __attribute__((always_inline)) void
FN(bconv_row_plain)(const bconv_args *a, int64_t r, uint64_t *acc, int64_t *xoff, int64_t *woff)
{
    const int O = a->O;
    const int n = (int)(r / a->Ho), oy = (int)(r % a->Ho);
    for (int ox = 0; ox < a->Wo; ox++) {
        const int valid = FN(valid_taps)(a, n, oy, ox, xoff, woff);
        FN(popcounts)(a, valid, xoff, woff, acc);
        const int64_t pix = r * a->Wo + ox, total = (int64_t)valid * a->C;
        float *y = a->out + pix * O;
        const float *rp = a->residual ? a->residual + pix * O : NULL;
        int o0 = 0;
#ifdef USE_NEON
        o0 = FN(neon_epilogue)(a, acc, total, y, rp);
#endif
        for (int o = o0; o < O; o++)
            y[o] = (float)(total - 2 * (int64_t)acc[o]) * a->scale[o] + a->shift[o];
        FN(finish_pixel)(a, pix, o0, y, rp);
    }
}

/* nc <= 16 output channels from ob of four pixels' patches (K values each): the sums in
 * registers, each a chain of fused multiply-adds in patch order (the same roundings in
 * every variant: one per multiply-add). acc[p][j] for j >= nc is left undefined. `full`
 * (nc == 16, a constant after inlining) keeps masks out of the loop. */
static inline __attribute__((always_inline)) void
FN(fconv_block)(const float *patch, int K, const float *w, int O, int ob, int nc,
                 float acc[4][16], const int full)
{
#if defined(USE_AVX512)
    __m512 s[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                   _mm512_setzero_ps()};
    const __mmask16 m = nc >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nc) - 1);
    for (int k = 0; k < K; k++) {
        const __m512 wv = full ? _mm512_loadu_ps(w + (int64_t)k * O + ob)
                                : _mm512_maskz_loadu_ps(m, w + (int64_t)k * O + ob);
        for (int p = 0; p < 4; p++) s[p] = _mm512_fmadd_ps(_mm512_set1_ps(patch[p * K + k]), wv, s[p]);
    }
    for (int p = 0; p < 4; p++) _mm512_storeu_ps(acc[p], s[p]);
#elif defined(USE_AVX2)
    __m256 s[8];
    for (int i = 0; i < 8; i++) s[i] = _mm256_setzero_ps();
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(nc), lane);
    const __m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(nc - 8), lane);
    for (int k = 0; k < K; k++) {
        const float *wr = w + (int64_t)k * O + ob;
        const __m256 w0 = full ? _mm256_loadu_ps(wr) : _mm256_maskload_ps(wr, m0);
        const __m256 w1 = full ? _mm256_loadu_ps(wr + 8) : _mm256_maskload_ps(wr + 8, m1);
        for (int p = 0; p < 4; p++) {
            const __m256 v = _mm256_set1_ps(patch[p * K + k]);
            s[2 * p] = _mm256_fmadd_ps(v, w0, s[2 * p]);
            s[2 * p + 1] = _mm256_fmadd_ps(v, w1, s[2 * p + 1]);
        }
    }
    for (int p = 0; p < 4; p++) {
        _mm256_storeu_ps(acc[p], s[2 * p]);
        _mm256_storeu_ps(acc[p] + 8, s[2 * p + 1]);
    }
#elif defined(USE_NEON)
    if (!full) { /* the portable loop below */
        for (int p = 0; p < 4; p++)
            for (int j = 0; j < nc; j++) acc[p][j] = 0.0f;
        for (int k = 0; k < K; k++) {
            const float *wr = w + (int64_t)k * O + ob;
            for (int p = 0; p < 4; p++)
                for (int j = 0; j < nc; j++) acc[p][j] = fmaf(patch[p * K + k], wr[j], acc[p][j]);
        }
        return;
    }
    float32x4_t s[16];
    for (int i = 0; i < 16; i++) s[i] = vdupq_n_f32(0.0f);
    for (int k = 0; k < K; k++) {
        const float *wr = w + (int64_t)k * O + ob;
        const float32x4_t w0 = vld1q_f32(wr), w1 = vld1q_f32(wr + 4);
        const float32x4_t w2 = vld1q_f32(wr + 8), w3 = vld1q_f32(wr + 12);
        for (int p = 0; p < 4; p++) {
            const float32x4_t v = vdupq_n_f32(patch[p * K + k]);
            s[4 * p] = vfmaq_f32(s[4 * p], v, w0);
            s[4 * p + 1] = vfmaq_f32(s[4 * p + 1], v, w1);
            s[4 * p + 2] = vfmaq_f32(s[4 * p + 2], v, w2);
            s[4 * p + 3] = vfmaq_f32(s[4 * p + 3], v, w3);
        }
    }
    for (int p = 0; p < 4; p++)
        for (int q = 0; q < 4; q++) vst1q_f32(acc[p] + 4 * q, s[4 * p + q]);
#else
    (void)full;
    for (int p = 0; p < 4; p++)
        for (int j = 0; j < nc; j++) acc[p][j] = 0.0f;
    for (int k = 0; k < K; k++) {
        const float *wr = w + (int64_t)k * O + ob;
        for (int p = 0; p < 4; p++) {
            const float v = patch[p * K + k];
            for (int j = 0; j < nc; j++) acc[p][j] = fmaf(v, wr[j], acc[p][j]);
        }
    }
#endif
}

#ifdef USE_AVX512
/* The per-channel parameters of channels ob .. ob + 15, loaded once for many pixels (the
 * compiler cannot keep them across the output's stores, which might alias them). */
typedef struct {
    __m512 scale, shift, slope, lo, hi;
} FN(params16);

static inline __attribute__((always_inline)) FN(params16) FN(avx512_params16)(const bconv_args *a, int ob)
{
    FN(params16) q;
    q.scale = _mm512_loadu_ps(a->scale + ob);
    q.shift = _mm512_loadu_ps(a->shift + ob);
    q.slope = a->act != ACT_PRELU ? _mm512_setzero_ps()
              : a->slope_n == 1   ? _mm512_set1_ps(a->slope[0])
                                  : _mm512_loadu_ps(a->slope + ob);
    q.lo = _mm512_set1_ps(a->lo);
    q.hi = _mm512_set1_ps(a->hi);
    return q;
}

/* The activation of 16 channels, with the result of finish_pixel's loops (max/min return
 * their second operand when one is NaN: v second, so a NaN passes through as in numpy's
 * maximum and clip). */
static inline __attribute__((always_inline)) __m512
FN(avx512_act16)(const int act, const FN(params16) *q, __m512 v)
{
    const __m512 zero = _mm512_setzero_ps();
    if (act == ACT_RELU) return _mm512_max_ps(zero, v);
    if (act == ACT_HARDTANH) return _mm512_min_ps(q->hi, _mm512_max_ps(q->lo, v));
    if (act == ACT_PRELU)
        return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, zero, _CMP_GE_OQ), _mm512_mul_ps(v, q->slope), v);
    return v;
}

/* The epilogue of channels ob .. ob + 15 of output pixel pix from their sums or counts v:
 * v * scale + shift, the residual, the activation, the store and the sign bits. */
static inline __attribute__((always_inline)) void
FN(avx512_finish16)(const bconv_args *a, const FN(params16) *q, int64_t pix, int ob, __m512 v)
{
    const int O = a->O, Ow = (O + 63) / 64;
    const __m512 zero = _mm512_setzero_ps();
    v = _mm512_add_ps(_mm512_mul_ps(v, q->scale), q->shift);
    if (a->residual) v = _mm512_add_ps(v, _mm512_loadu_ps(a->residual + pix * O + ob));
    v = FN(avx512_act16)(a->act, q, v);
    _mm512_storeu_ps(a->out + pix * O + ob, v);
    if (a->out_bits) {
        const uint64_t bits = (uint64_t)_mm512_cmp_ps_mask(v, zero, _CMP_NGE_UQ) << (ob % 64);
        uint64_t *word = a->out_bits + pix * Ow + ob / 64;
        *word = ob % 64 ? *word | bits : bits;
    }
}

/* The sign bits of channels o .. o + 15 of a binary convolution for the integers d (C
 * minus twice the count), without a residual: the epilogue of avx512_finish16. */
static inline __attribute__((always_inline)) __mmask16
FN(signs16)(const bconv_args *a, const FN(params16) *q, __m512i d)
{
    const __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), q->scale), q->shift);
    return _mm512_cmp_ps_mask(FN(avx512_act16)(a->act, q, v), _mm512_setzero_ps(), _CMP_NGE_UQ);
}

#define SIGN_MAX_O 1024 /* channels whose thresholds bconv_rows keeps on its stack */

/* For a convolution whose output only binary layers read (a->bits_only), each channel's
 * sign decision as one threshold on d (see bconv_args), found by bisection over
 * |d| <= KH KW C, sixteen channels at a time. That is exact where the decision is
 * monotone in d: d * scale + shift, each rounding monotone, then a monotone activation
 * (no residual; finite scale and shift, so no NaN; hardtanh with lo <= hi, PReLU slopes
 * >= 0). A monotone decision is a prefix or a suffix of the d's: d < t, or its negation
 * d >= t (flip), or always (t above every d), or never (t below). Returns 0 elsewhere:
 * the float epilogue runs. The thresholds fit 16-bit lanes: |d| <= 16384. */
static int FN(sign_thresholds)(const bconv_args *a, int32_t *t, uint64_t *flip)
{
    const int O = a->O;
    if (!a->bits_only || !a->out_bits || a->residual || O > SIGN_MAX_O || O % 16 ||
        (int64_t)a->KH * a->KW * a->C > 16384)
        return 0;
    const int D = a->KH * a->KW * a->C;
    if (a->act == ACT_HARDTANH && !(a->lo <= a->hi)) return 0;
    for (int o = 0; o < O; o++) {
        if (!isfinite(a->scale[o]) || !isfinite(a->shift[o])) return 0;
        if (a->act == ACT_PRELU && !(a->slope[a->slope_n == 1 ? 0 : o] >= 0.0f)) return 0;
    }
    for (int o = 0; o < O; o += 16) {
        const FN(params16) q = FN(avx512_params16)(a, o);
        __m512i l = _mm512_set1_epi32(-D), h = _mm512_set1_epi32(D);
        const __mmask16 first = FN(signs16)(a, &q, l);
        const __mmask16 last = FN(signs16)(a, &q, h);
        /* keep signs16(l) == first and signs16(h) == last while h - l > 1 */
        for (int span = 2 * D; span > 1; span = (span + 1) / 2) {
            const __m512i m = _mm512_add_epi32(l, _mm512_srai_epi32(_mm512_sub_epi32(h, l), 1));
            const __mmask16 at_last = ~(FN(signs16)(a, &q, m) ^ last);
            h = _mm512_mask_mov_epi32(h, at_last, m);
            l = _mm512_mask_mov_epi32(l, (__mmask16)~at_last, m);
        }
        const __mmask16 same = (__mmask16)~(first ^ last);
        /* first 1, last 0: 1 below h; first 0, last 1: 1 from h on (flipped); the same at
         * both ends: 1 for every d (always below INT16_MAX) or none (below INT16_MIN) */
        __m512i vt = _mm512_mask_mov_epi32(h, same & first, _mm512_set1_epi32(INT16_MAX));
        vt = _mm512_mask_mov_epi32(vt, same & (__mmask16)~first, _mm512_set1_epi32(INT16_MIN));
        _mm512_storeu_si512((void *)(t + o), vt);
        const uint64_t bits = (uint64_t)(uint16_t)(~same & ~first) << (o % 64);
        flip[o / 64] = o % 64 ? flip[o / 64] | bits : bits;
    }
    return 1;
}

/* The sign words of lanes' pixels, m of them from pixel ox of row r, into channels ob ..
 * ob + 15: lane p of res holds pixel ox + p's bits in its low 16 bits (lanes of LB
 * bits: 32 pixels of 16 bits, 16 of 32 or 8 of 64). With one word a pixel (O <= 64)
 * they are widened eight at a time and stored as they lie (ob % 64 == 0, the first to
 * write the word) or OR-ed in; otherwise a word at a time. */
static inline __attribute__((always_inline)) void
FN(lanes_store_bits)(const bconv_args *a, const int LB, int64_t r, int ox, int m, int ob,
                     __m512i res)
{
    const int Ow = (a->O + 63) / 64, sh = ob % 64;
    uint64_t *out = a->out_bits + (r * a->Wo + ox) * Ow + ob / 64;
    uint16_t words[32] __attribute__((aligned(64)));
    if (LB == 16) _mm512_store_si512((void *)words, res);
    else if (LB == 32) _mm256_store_si256((__m256i *)words, _mm512_cvtepi32_epi16(res));
    else _mm_store_si128((__m128i *)words, _mm512_cvtepi64_epi16(res));
    if (Ow == 1) {
        for (int g = 0; g * 8 < m; g++) {
            const __m512i v = _mm512_sll_epi64(_mm512_cvtepu16_epi64(_mm_load_si128((const __m128i *)(words + 8 * g))),
                                               _mm_cvtsi32_si128(sh));
            const __mmask8 k = (__mmask8)(m - 8 * g >= 8 ? 0xFF : (1u << (m - 8 * g)) - 1);
            uint64_t *o = out + 8 * g;
            if (sh) _mm512_mask_storeu_epi64(o, k, _mm512_or_si512(_mm512_maskz_loadu_epi64(k, o), v));
            else _mm512_mask_storeu_epi64(o, k, v);
        }
        return;
    }
    for (int p = 0; p < m; p++) {
        const uint64_t bits = (uint64_t)words[p] << sh;
        out[p * Ow] = sh ? out[p * Ow] | bits : bits;
    }
}

/* fconv_block for 16 channels of four pixels whose windows lie inside the image, read
 * where they are instead of from a patch: pixel p's window starts at x + p * step, its
 * KH rows of KWC floats `row` apart. The same chains in the same (patch) order. */
static inline __attribute__((always_inline)) void
FN(fconv_block_inside)(const float *x, int64_t step, int64_t row, int KH, int KWC, const float *w,
                       int O, int ob, float acc[4][16])
{
    __m512 s[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                   _mm512_setzero_ps()};
    for (int ky = 0; ky < KH; ky++) {
        const float *xr = x + ky * row, *wr = w + (int64_t)ky * KWC * O + ob;
        for (int j = 0; j < KWC; j++) {
            const __m512 wv = _mm512_loadu_ps(wr + (int64_t)j * O);
            for (int p = 0; p < 4; p++) s[p] = _mm512_fmadd_ps(_mm512_set1_ps(xr[p * step + j]), wv, s[p]);
        }
    }
    for (int p = 0; p < 4; p++) _mm512_storeu_ps(acc[p], s[p]);
}
#endif

#ifdef USE_AVX512
/* The epilogue of channels ob .. ob + 15 of pb neighbouring output pixels from pix0, from
 * their sums acc[p]. */
static inline __attribute__((always_inline)) void
FN(fconv_finish16)(const bconv_args *a, int64_t pix0, int pb, int ob, float acc[4][16])
{
    const FN(params16) q = FN(avx512_params16)(a, ob);
    for (int p = 0; p < pb; p++) FN(avx512_finish16)(a, &q, pix0 + p, ob, _mm512_loadu_ps(acc[p]));
}
#endif

/* Float convolution rows [r0, r1) (r = n * Ho + oy) of NHWC a->xf with weights a->wf laid
 * out KH x KW x C x O, four output pixels at a time through a per-thread patch buffer
 * (4 x KH * KW * C floats). Each output is a chain of fused multiply-adds in patch order,
 * tap by tap and channel by channel; a tap in the padding holds 0, which adds nothing.
 * fmaf rounds once wherever it runs and the order is fixed, so every variant and machine
 * gives the same bits; it is also the order and rounding of PyTorch's CPU convolution
 * (oneDNN) of a first layer, whose results it then matches bit for bit, so that a sign
 * taken of them agrees. With a->sign_input the patch holds sign(x) (+1 at 0; the padding
 * still 0). */
static void FN(fconv_rows)(const bconv_args *a, int64_t r0, int64_t r1, float *patch)
{
    const int O = a->O, C = a->C, K = a->KH * a->KW * a->C;
    for (int64_t r = r0; r < r1; r++) {
        const int n = (int)(r / a->Ho), oy = (int)(r % a->Ho);
        for (int ox0 = 0; ox0 < a->Wo; ox0 += 4) {
            const int pb = a->Wo - ox0 < 4 ? a->Wo - ox0 : 4;
#ifdef USE_AVX512
            /* four windows inside the image: no patch */
            const int iy0 = oy * a->sh - a->ph, ix0 = ox0 * a->sw - a->pw;
            if (!a->sign_input && O % 16 == 0 && pb == 4 && iy0 >= 0 && iy0 + a->KH <= a->H &&
                ix0 >= 0 && ix0 + 3 * a->sw + a->KW <= a->W) {
                const float *x0 = a->xf + (((int64_t)n * a->H + iy0) * a->W + ix0) * C;
                for (int ob = 0; ob < O; ob += 16) {
                    float acc[4][16];
                    FN(fconv_block_inside)(x0, (int64_t)a->sw * C, (int64_t)a->W * C, a->KH, a->KW * C,
                                           a->wf, O, ob, acc);
                    FN(fconv_finish16)(a, r * a->Wo + ox0, 4, ob, acc);
                }
                continue;
            }
#endif
            for (int p = 0; p < 4; p++) {
                float *pp = patch + (int64_t)p * K;
                const int ix0 = (ox0 + p) * a->sw - a->pw;
                for (int ky = 0; ky < a->KH; ky++) {
                    const int iy = oy * a->sh - a->ph + ky;
                    if (p < pb && iy >= 0 && iy < a->H && ix0 >= 0 && ix0 + a->KW <= a->W) {
                        /* the window's row inside the image: KW pixels side by side */
                        const float *xp = a->xf + (((int64_t)n * a->H + iy) * a->W + ix0) * C;
                        const int len = a->KW * C;
                        if (a->sign_input)
                            for (int i = 0; i < len; i++) pp[i] = xp[i] >= 0.0f ? 1.0f : -1.0f;
                        else
                            for (int i = 0; i < len; i++) pp[i] = xp[i];
                        pp += len;
                        continue;
                    }
                    for (int kx = 0; kx < a->KW; kx++, pp += C) {
                        const int ix = (ox0 + p) * a->sw - a->pw + kx;
                        if (p >= pb || iy < 0 || iy >= a->H || ix < 0 || ix >= a->W) {
                            for (int c = 0; c < C; c++) pp[c] = 0.0f;
                            continue;
                        }
                        const float *xp = a->xf + (((int64_t)n * a->H + iy) * a->W + ix) * C;
                        if (a->sign_input)
                            for (int c = 0; c < C; c++) pp[c] = xp[c] >= 0.0f ? 1.0f : -1.0f;
                        else
                            for (int c = 0; c < C; c++) pp[c] = xp[c];
                    }
                }
            }
            float *y[4];
            for (int p = 0; p < pb; p++) y[p] = a->out + (r * a->Wo + ox0 + p) * O;
            int ob = 0;
            for (; ob + 16 <= O; ob += 16) {
                float acc[4][16];
                FN(fconv_block)(patch, K, a->wf, O, ob, 16, acc, 1);
#ifdef USE_AVX512
                if (O % 16 == 0) { /* the whole epilogue here */
                    FN(fconv_finish16)(a, r * a->Wo + ox0, pb, ob, acc);
                    continue;
                }
#endif
                for (int p = 0; p < pb; p++)
                    for (int j = 0; j < 16; j++) y[p][ob + j] = acc[p][j];
            }
#ifdef USE_AVX512
            if (O % 16 == 0) continue;
#endif
            if (ob < O) { /* the last O % 16 channels */
                float acc[4][16];
                FN(fconv_block)(patch, K, a->wf, O, ob, O - ob, acc, 0);
                for (int p = 0; p < pb; p++)
                    for (int j = 0; j < O - ob; j++) y[p][ob + j] = acc[p][j];
            }
            for (int p = 0; p < pb; p++) {
                for (int o = 0; o < O; o++) y[p][o] = y[p][o] * a->scale[o] + a->shift[o];
                const int64_t pix = r * a->Wo + ox0 + p;
                FN(finish_pixel)(a, pix, 0, y[p], a->residual ? a->residual + pix * O : NULL);
            }
        }
    }
}

#ifdef USE_AVX512
/* The epilogue of 8 channels from o whose counts are acc; returns their 8 sign bits. */
static inline __attribute__((always_inline)) uint64_t
FN(avx512_finish8)(const bconv_args *a, __m512i acc, __m512i total, int o, float *y,
                   const float *rp)
{
    const __m256 zero = _mm256_setzero_ps();
    const __m512i d = _mm512_sub_epi64(total, _mm512_slli_epi64(acc, 1));
    __m256 v = _mm512_cvtepi64_ps(d);
    v = _mm256_add_ps(_mm256_mul_ps(v, _mm256_loadu_ps(a->scale + o)), _mm256_loadu_ps(a->shift + o));
    if (rp) v = _mm256_add_ps(v, _mm256_loadu_ps(rp + o));
    /* max/min return their second operand when one is NaN: v second, so a NaN passes
     * through as in numpy's maximum and clip (the numpy backend). */
    if (a->act == ACT_RELU) v = _mm256_max_ps(zero, v);
    else if (a->act == ACT_HARDTANH)
        v = _mm256_min_ps(_mm256_set1_ps(a->hi), _mm256_max_ps(_mm256_set1_ps(a->lo), v));
    else if (a->act == ACT_PRELU) {
        const __m256 s = a->slope_n == 1 ? _mm256_set1_ps(a->slope[0]) : _mm256_loadu_ps(a->slope + o);
        v = _mm256_blendv_ps(_mm256_mul_ps(v, s), v, _mm256_cmp_ps(v, zero, _CMP_GE_OQ));
    }
    _mm256_storeu_ps(y + o, v);
    return (uint64_t)_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_NGE_UQ));
}

/* One block of NV x 8 output channels of PX pixels (1 or 2; NV and PX constants after
 * inlining, so the accumulators stay in registers and no lane is tested per tap): the
 * popcounts, then the epilogue. One VPOPCNTQ does 8 channels x 64 input bits; with two
 * pixels, whose words lie `step` apart, each weight load serves both. Sets each pixel's
 * output sign bits of the block. */
static inline __attribute__((always_inline)) void
FN(avx512_block)(const bconv_args *a, const int NV, const int PX, int valid, const int64_t *xoff,
                 int64_t step, const int64_t *woff, int ob, float *const *y,
                 const float *const *rp, uint64_t *bits)
{
    const int O = a->O, Cw = a->Cw;
    __m512i acc[2][8];
    for (int p = 0; p < PX; p++)
        for (int j = 0; j < NV; j++) acc[p][j] = _mm512_setzero_si512();
    for (int t = 0; t < valid; t++)
        for (int c = 0; c < Cw; c++) {
            __m512i v[2];
            for (int p = 0; p < PX; p++) v[p] = _mm512_set1_epi64((long long)a->x[xoff[t] + c + p * step]);
            const uint64_t *wr = a->w + woff[t] + (int64_t)c * O + ob;
            for (int j = 0; j < NV; j++) {
                const __m512i w = _mm512_loadu_si512((const void *)(wr + 8 * j));
                for (int p = 0; p < PX; p++)
                    acc[p][j] = _mm512_add_epi64(acc[p][j], _mm512_popcnt_epi64(_mm512_xor_si512(v[p], w)));
            }
        }
    const __m512i total = _mm512_set1_epi64((int64_t)valid * a->C);
    for (int p = 0; p < PX; p++) {
        uint64_t word = 0;
        if (a->sign_t) { /* only the signs, from the thresholds on d (ob % 64 == 0) */
            /* eight 8-channel masks joined in the mask registers (unused ones 0), then
             * moved into the word at once */
            __mmask8 below[8] = {0};
            for (int j = 0; j < NV; j++) {
                const __m512i d = _mm512_sub_epi64(total, _mm512_slli_epi64(acc[p][j], 1));
                const __m512i t = _mm512_cvtepi32_epi64(_mm256_loadu_si256((const __m256i *)(a->sign_t + ob + 8 * j)));
                below[j] = _mm512_cmplt_epi64_mask(d, t);
            }
            const __mmask32 lo = _mm512_kunpackw(_mm512_kunpackb(below[3], below[2]), _mm512_kunpackb(below[1], below[0]));
            const __mmask32 hi = _mm512_kunpackw(_mm512_kunpackb(below[7], below[6]), _mm512_kunpackb(below[5], below[4]));
            word = _cvtmask64_u64(_mm512_kunpackd(hi, lo));
            word ^= a->sign_flip[ob / 64] & (~0ull >> (64 - 8 * NV));
        } else {
            for (int j = 0; j < NV; j++)
                word |= FN(avx512_finish8)(a, acc[p][j], total, ob + 8 * j, y[p], rp[p]) << (8 * j);
        }
        bits[p] = word;
    }
}

/* Output pixels ox .. ox + PX - 1 (PX 1, or 2 when both have every tap inside the image)
 * of row r through avx512_block: any shape with O % 8 == 0. */
static inline __attribute__((always_inline)) void
FN(avx512_pixels)(const bconv_args *a, const int PX, int64_t r, int ox, int inside,
                  int64_t *xoff, int64_t *woff)
{
    const int O = a->O, Ow = (O + 63) / 64, taps = a->KH * a->KW;
    const int n = (int)(r / a->Ho), oy = (int)(r % a->Ho);
    int valid;
    const int64_t *wo = woff;
    /* Inside the image every tap is valid and the offsets follow from the first one
     * (a->rel, a->woff_all: computed once per call by the caller). */
    if (inside) {
        const int iy0 = oy * a->sh - a->ph, ix0 = ox * a->sw - a->pw;
        const int64_t base = (((int64_t)n * a->H + iy0) * a->W + ix0) * a->Cw;
        for (int t = 0; t < taps; t++) xoff[t] = base + a->rel[t];
        valid = taps;
        wo = a->woff_all;
    } else {
        valid = FN(valid_taps)(a, n, oy, ox, xoff, woff);
    }
    float *y[2];
    const float *rp[2];
    uint64_t bits[2];
    for (int p = 0; p < PX; p++) {
        const int64_t pix = r * a->Wo + ox + p;
        y[p] = a->out + pix * O;
        rp[p] = a->residual ? a->residual + pix * O : NULL;
    }
    const int64_t step = (int64_t)a->sw * a->Cw;
    for (int ob = 0; ob < O; ob += 64) {
        switch (O - ob >= 64 ? 8 : (O - ob) / 8) {
        case 8: FN(avx512_block)(a, 8, PX, valid, xoff, step, wo, ob, y, rp, bits); break;
        case 7: FN(avx512_block)(a, 7, PX, valid, xoff, step, wo, ob, y, rp, bits); break;
        case 6: FN(avx512_block)(a, 6, PX, valid, xoff, step, wo, ob, y, rp, bits); break;
        case 5: FN(avx512_block)(a, 5, PX, valid, xoff, step, wo, ob, y, rp, bits); break;
        case 4: FN(avx512_block)(a, 4, PX, valid, xoff, step, wo, ob, y, rp, bits); break;
        case 3: FN(avx512_block)(a, 3, PX, valid, xoff, step, wo, ob, y, rp, bits); break;
        case 2: FN(avx512_block)(a, 2, PX, valid, xoff, step, wo, ob, y, rp, bits); break;
        default: FN(avx512_block)(a, 1, PX, valid, xoff, step, wo, ob, y, rp, bits); break;
        }
        if (a->out_bits)
            for (int p = 0; p < PX; p++) a->out_bits[(r * a->Wo + ox + p) * Ow + ob / 64] = bits[p];
    }
}

/* Transposes 16 x 16 int32: r[i] lane j becomes r[j] lane i (unpacks of 32 and 64 bits,
 * then two rounds of 128-bit lane shuffles). */
static inline __attribute__((always_inline)) void FN(transpose16)(__m512i r[16])
{
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    /* u[4i + k], 128-bit lane L: rows 4i..4i+3 at column 4L + k */
    for (int i = 0; i < 4; i++) {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int k = 0; k < 4; k++) {
        const __m512i v0 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x44);
        const __m512i v1 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xEE);
        const __m512i v2 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x44);
        const __m512i v3 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xEE);
        r[k] = _mm512_shuffle_i32x4(v0, v2, 0x88);
        r[4 + k] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
        r[8 + k] = _mm512_shuffle_i32x4(v1, v3, 0x88);
        r[12 + k] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
    }
}

/* The epilogue of channels ob .. ob + 15 of m output pixels from pix, from their d (C
 * times the valid taps minus twice the count; d[p][j]: pixel pix + p, channel ob + j),
 * with the activation act: a constant after inlining, and the pointers in locals, so that
 * the loop holds only its own operations (a store through out could alias *a). The same
 * operations as avx512_finish16, written out: through a shared helper taking the pointers,
 * GCC compiled a slower loop. */
static inline __attribute__((always_inline)) void
FN(lanes_finish_act)(const bconv_args *a, const int act, int64_t pix, int m, int ob,
                     const int32_t (*d)[16])
{
    const FN(params16) q = FN(avx512_params16)(a, ob);
    const int O = a->O, Ow = (O + 63) / 64, sh = ob % 64;
    float *out = a->out + pix * O + ob;
    const float *res = a->residual ? a->residual + pix * O + ob : NULL;
    uint64_t *bits = a->out_bits ? a->out_bits + pix * Ow + ob / 64 : NULL;
    for (int p = 0; p < m; p++) {
        __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512((const void *)d[p]));
        v = _mm512_add_ps(_mm512_mul_ps(v, q.scale), q.shift);
        if (res) v = _mm512_add_ps(v, _mm512_loadu_ps(res + (int64_t)p * O));
        v = FN(avx512_act16)(act, &q, v);
        _mm512_storeu_ps(out + (int64_t)p * O, v);
        if (bits) {
            const uint64_t b = (uint64_t)_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NGE_UQ) << sh;
            bits[(int64_t)p * Ow] = sh ? bits[(int64_t)p * Ow] | b : b;
        }
    }
}

/* Out of line: inlined into the pixel-lane kernel, whose accumulators hold most registers,
 * GCC kept the loop's pointers on the stack and reloaded one per pixel. */
static __attribute__((noinline)) void
FN(avx512_lanes_finish)(const bconv_args *a, int64_t pix, int m, int ob, const int32_t (*d)[16])
{
    switch (a->act) {
    case ACT_RELU: FN(lanes_finish_act)(a, ACT_RELU, pix, m, ob, d); break;
    case ACT_HARDTANH: FN(lanes_finish_act)(a, ACT_HARDTANH, pix, m, ob, d); break;
    case ACT_PRELU: FN(lanes_finish_act)(a, ACT_PRELU, pix, m, ob, d); break;
    default: FN(lanes_finish_act)(a, ACT_NONE, pix, m, ob, d); break;
    }
}

#define LANES_MAX_KW 16 /* the widest (and tallest) window the pixel-lane paths take */

/* Of a block of m pixels from ox, stride S along x, for each tap column kx: the pixels
 * whose tap lies in the padding (bit p: pixel ox + p). */
static inline __attribute__((always_inline)) void
FN(lane_taps)(const bconv_args *a, int S, int ox, int m, uint32_t *padded)
{
    for (int kx = 0; kx < a->KW; kx++) {
        const int first = ox * S - a->pw + kx; /* the image column of pixel ox's tap */
        /* pixels p < p0 read left of the image, p >= p1 right of it */
        const int p0 = first < 0 ? (-first + S - 1) / S : 0;
        const int p1 = a->W - first <= 0 ? 0 : (a->W - first + S - 1) / S;
        const uint32_t all = m >= 32 ? 0xFFFFFFFFu : (1u << m) - 1;
        const uint32_t left = p0 >= 32 ? 0xFFFFFFFFu : (1u << p0) - 1;
        const uint32_t right = p1 >= 32 ? 0 : ~((1u << p1) - 1);
        padded[kx] = all & (left | right);
    }
}

/* The pixel-lane paths read their input as a plane: for a block of output pixels, each
 * input row's words from the block's first window column on, one a lane (the low 16,
 * 32 or all 64 bits of each), so that a tap's lanes are one unaligned load. A plane row
 * of PLANE_COLS 32-bit lanes covers a block's widest window (32 pixels and 15 more words
 * at stride 1, or 16 at stride 2: 2 x 15 + 16; with 64-bit lanes 8 pixels and 15 more);
 * PLANE_ROWS rows make a chunk of output rows: 34 take a whole image of 32 rows through
 * a 3 x 3 window, or of 16 at stride 2, at once. */
#define PLANE_COLS 48
#define PLANE_ROWS 34

/* One plane row (see PLANE_COLS): the words of row from image column c0 on, those outside
 * the image (and all of them for a row outside it, NULL) as 0 (masked loads: no other
 * word is touched); at stride 2 the even columns (from c0) in lanes 0 .. 23 and the odd
 * ones in lanes 24 .. 47, so that the stride-2 pixels of one tap lie side by side. */
static inline __attribute__((always_inline)) void
FN(lanes_plane_row)(const bconv_args *a, const int LB, const int S, const uint64_t *row, int c0,
                    uint32_t *dst)
{
    const int i0 = c0 >= 0 ? 0 : -c0 < PLANE_COLS ? -c0 : PLANE_COLS;
    const int i1 = a->W - c0 < PLANE_COLS ? a->W - c0 : PLANE_COLS;
    const uint64_t inside = row && i1 > i0 ? ((1ull << i1) - 1) & ~((1ull << i0) - 1) : 0;
    const uint64_t *xp = row ? row + c0 : a->x;
    if (LB == 64) { /* the words themselves: 8 pixels and 15 more (stride 1 only) */
        for (int g = 0; g < PLANE_COLS / 16; g++)
            _mm512_store_si512((uint64_t *)dst + 8 * g, _mm512_maskz_loadu_epi64((__mmask8)(inside >> (8 * g)), xp + 8 * g));
    } else if (LB == 16 && S == 2) { /* the low words of the even words, then of the odd ones */
        const __m512i even = _mm512_setr_epi64(0x0018001000080000, 0x0038003000280020, 0, 0, 0, 0, 0, 0);
        const __m512i odd = _mm512_setr_epi64(0x001C0014000C0004, 0x003C0034002C0024, 0, 0, 0, 0, 0, 0);
        uint16_t *d16 = (uint16_t *)dst;
        for (int g = 0; g < PLANE_COLS / 16; g++) {
            const __m512i w0 = _mm512_maskz_loadu_epi64((__mmask8)(inside >> (16 * g)), xp + 16 * g);
            const __m512i w1 = _mm512_maskz_loadu_epi64((__mmask8)(inside >> (16 * g + 8)), xp + 16 * g + 8);
            _mm_storeu_si128((__m128i *)(d16 + 8 * g), _mm512_castsi512_si128(_mm512_permutex2var_epi16(w0, even, w1)));
            _mm_storeu_si128((__m128i *)(d16 + PLANE_COLS / 2 + 8 * g),
                             _mm512_castsi512_si128(_mm512_permutex2var_epi16(w0, odd, w1)));
        }
    } else if (LB == 16) {
        for (int g = 0; g < PLANE_COLS / 8; g++)
            _mm_store_si128((__m128i *)dst + g,
                            _mm512_cvtepi64_epi16(_mm512_maskz_loadu_epi64((__mmask8)(inside >> (8 * g)), xp + 8 * g)));
    } else if (S == 1) { /* a block of 16 pixels reads at most 15 + 16 columns */
        for (int g = 0; g < 4; g++)
            _mm256_store_si256((__m256i *)dst + g,
                               _mm512_cvtepi64_epi32(_mm512_maskz_loadu_epi64((__mmask8)(inside >> (8 * g)), xp + 8 * g)));
    } else { /* the low dwords of the even words, then of the odd ones, of 16 words */
        const __m512i even = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 0, 0, 0, 0, 0, 0, 0);
        const __m512i odd = _mm512_setr_epi32(2, 6, 10, 14, 18, 22, 26, 30, 0, 0, 0, 0, 0, 0, 0, 0);
        for (int g = 0; g < PLANE_COLS / 16; g++) {
            const __m512i w0 = _mm512_maskz_loadu_epi64((__mmask8)(inside >> (16 * g)), xp + 16 * g);
            const __m512i w1 = _mm512_maskz_loadu_epi64((__mmask8)(inside >> (16 * g + 8)), xp + 16 * g + 8);
            _mm256_store_si256((__m256i *)dst + g, _mm512_castsi512_si256(_mm512_permutex2var_epi32(w0, even, w1)));
            _mm256_store_si256((__m256i *)(dst + PLANE_COLS / 2) + g,
                               _mm512_castsi512_si256(_mm512_permutex2var_epi32(w0, odd, w1)));
        }
    }
}

/* Lane-width generic operations of the pixel-lane paths: LB (a constant after inlining)
 * picks lanes of 16 bits (32 pixels a register), 32 (16) or 64 (8). */
static inline __attribute__((always_inline)) __m512i FN(lanes_set1)(const int LB, int v)
{
    return LB == 16 ? _mm512_set1_epi16((short)v) : LB == 32 ? _mm512_set1_epi32(v) : _mm512_set1_epi64(v);
}

static inline __attribute__((always_inline)) __m512i
FN(lanes_mask_sub)(const int LB, __m512i v, uint32_t lanes, int c)
{
    return LB == 16   ? _mm512_mask_sub_epi16(v, (__mmask32)lanes, v, _mm512_set1_epi16((short)c))
           : LB == 32 ? _mm512_mask_sub_epi32(v, (__mmask16)lanes, v, _mm512_set1_epi32(c))
                      : _mm512_mask_sub_epi64(v, (__mmask8)lanes, v, _mm512_set1_epi64(c));
}

/* acc + popcount(x XOR the broadcast weight word w) in the lanes of keep, acc elsewhere
 * (with 16-bit lanes w holds the weight twice, in each half). */
static inline __attribute__((always_inline)) __m512i
FN(lanes_add_popcount)(const int LB, __m512i acc, uint32_t keep, __m512i x, uint64_t w)
{
    if (LB == 64)
        return _mm512_add_epi64(acc, _mm512_maskz_popcnt_epi64((__mmask8)keep,
                                                               _mm512_xor_si512(x, _mm512_set1_epi64((long long)w))));
    const __m512i v = _mm512_xor_si512(x, _mm512_set1_epi32((int)(uint32_t)w));
    return LB == 16 ? _mm512_add_epi16(acc, _mm512_maskz_popcnt_epi16((__mmask32)keep, v))
                    : _mm512_add_epi32(acc, _mm512_maskz_popcnt_epi32((__mmask16)keep, v));
}

/* d = total - 2 count */
static inline __attribute__((always_inline)) __m512i FN(lanes_d)(const int LB, __m512i total, __m512i count)
{
    return LB == 16   ? _mm512_sub_epi16(total, _mm512_slli_epi16(count, 1))
           : LB == 32 ? _mm512_sub_epi32(total, _mm512_slli_epi32(count, 1))
                      : _mm512_sub_epi64(total, _mm512_slli_epi64(count, 1));
}

/* The lanes whose d = total - 2 count is below t. */
static inline __attribute__((always_inline)) uint32_t
FN(lanes_below)(const int LB, __m512i total, __m512i count, int t)
{
    const __m512i d = FN(lanes_d)(LB, total, count), tv = FN(lanes_set1)(LB, t);
    return LB == 16   ? _mm512_cmplt_epi16_mask(d, tv)
           : LB == 32 ? _mm512_cmplt_epi32_mask(d, tv)
                      : _mm512_cmplt_epi64_mask(d, tv);
}

/* res shifted left by one, with bit 0 set in the lanes where v is above k: the sign of
 * k - v (VPSHLD concatenates and shifts; |k|, |v| <= 16384, so k - v does not wrap). */
static inline __attribute__((always_inline)) __m512i
FN(lanes_shift_in_sign)(const int LB, __m512i res, __m512i v, int k)
{
    const __m512i kv = FN(lanes_set1)(LB, k);
    return LB == 16   ? _mm512_shldi_epi16(res, _mm512_sub_epi16(kv, v), 1)
           : LB == 32 ? _mm512_shldi_epi32(res, _mm512_sub_epi32(kv, v), 1)
                      : _mm512_shldi_epi64(res, _mm512_sub_epi64(kv, v), 1);
}

/* Output pixels [ox, ox + m) of row r of a convolution with O % 16 == 0, with the pixels
 * side by side in one register, a pixel's one channel word in a lane of LB bits: 32
 * pixels in 16-bit lanes for C <= 16 (VPOPCNTW, AVX512-BITALG; with w16), 16 in 32-bit
 * lanes for C <= 32, both at stride S of 1 or 2, and 8 in 64-bit lanes for C <= 64 at
 * stride 1. With HALF, a row fills half of the lanes (Wo is 16 or 8, ox 0) and the next
 * row (r + 1, if m is 2 Wo) the other half, which keeps every lane busy. LB, S and HALF
 * are constants after inlining. One popcount thus counts every pixel against one
 * broadcast weight word, where the per-pixel path's VPOPCNTQ counts 8 channels x 64 bits
 * of which only C are used. The lanes come from plane rows (lanes_plane_row): pa[ky] for
 * tap row ky of row r, pb[ky] of row r + 1; ky holds each row's taps along y inside the
 * image, [ky[0], ky[1]) and [ky[2], ky[3]); padded the pixels each tap column puts in the
 * padding (lane_taps, in both halves). w16 holds each weight word twice in 32 bits
 * (w16[t * O + o]), so that the XOR broadcasts it from memory. A tap in the padding adds
 * nothing to its pixels' counts (its popcount zero-masked: as cheap as the plain one, and
 * the add stays unmasked, which keeps GCC from copying and spilling the accumulators),
 * and its C is taken from their totals. Then either the signs come from the thresholds
 * (the counts start at -total / 2: see sign_k), or d = total - 2 count is transposed to
 * a pixel's 16 channels for the float epilogue. */
static inline __attribute__((always_inline)) void
FN(avx512_lanes)(const bconv_args *a, const int LB, const int S, const int HALF, int64_t r,
                 const int *ky, int ox, int m, const uint32_t *w16, const uint32_t *padded,
                 const uint32_t (*pa)[PLANE_COLS], const uint32_t (*pb)[PLANE_COLS])
{
    const int O = a->O, KW = a->KW, C = a->C;
    const uint32_t all = LB == 16 ? 0xFFFFFFFFu : LB == 32 ? 0xFFFFu : 0xFFu;
    const uint32_t low = HALF ? (LB == 16 ? 0xFFFFu : 0xFFu) : all, up = all & ~low;
    const int a0 = ky[0], a1 = ky[1];
    const int b0 = HALF && ky[3] > ky[2] ? ky[2] : a0, b1 = HALF && ky[3] > ky[2] ? ky[3] : a0;
    __m512i total = FN(lanes_set1)(LB, (a1 - a0) * KW * C);
    if (HALF) total = FN(lanes_mask_sub)(LB, total, up, (a1 - a0 - (b1 - b0)) * KW * C);
    for (int kx = 0; kx < KW; kx++) {
        total = FN(lanes_mask_sub)(LB, total, padded[kx] & low, (a1 - a0) * C);
        if (HALF) total = FN(lanes_mask_sub)(LB, total, padded[kx] & up, (b1 - b0) * C);
    }
    /* with thresholds, the counts start at -total / 2 (total is even: sign_k) */
    const __m512i zero = _mm512_setzero_si512();
    const __m512i start = !a->sign_k  ? zero
                          : LB == 16 ? _mm512_sub_epi16(zero, _mm512_srai_epi16(total, 1))
                          : LB == 32 ? _mm512_sub_epi32(zero, _mm512_srai_epi32(total, 1))
                                     : _mm512_sub_epi64(zero, _mm512_srai_epi64(total, 1));
    const int k0 = b0 < a0 ? b0 : a0, k1 = b1 > a1 ? b1 : a1;
    for (int ob = 0; ob < O; ob += 16) {
        __m512i acc[16];
        for (int j = 0; j < 16; j++) acc[j] = start;
        for (int y = k0; y < k1; y++) {
            const uint32_t rows = !HALF ? all : (y >= a0 && y < a1 ? low : 0) | (y >= b0 && y < b1 ? up : 0);
            const char *ra = (const char *)pa[y], *rb = (const char *)pb[y];
            for (int kx = 0; kx < KW; kx++) {
                /* pixel p's column: p + kx, or 2p + kx at stride 2 (even columns first) */
                const int64_t off = (S == 1 ? kx : kx % 2 * (PLANE_COLS / 2) + kx / 2) * (LB / 8);
                const __m512i x =
                    HALF ? _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(ra + off))),
                                              _mm256_loadu_si256((const __m256i *)(rb + off)), 1)
                         : _mm512_loadu_si512(ra + off);
                const uint32_t keep = ~padded[kx] & rows;
                const int64_t t = (int64_t)(y * KW + kx) * O + ob;
                for (int j = 0; j < 16; j++)
                    acc[j] = FN(lanes_add_popcount)(LB, acc[j], keep, x, LB == 16 ? w16[t + j] : a->w[t + j]);
            }
        }
        if (a->sign_t) { /* only the signs, from the thresholds: no transpose */
            /* lane p: the bits of pixel ox + p. With sign_k, channel j's bit is the sign of
             * k - count, shifted in from the top (VPSHLD, from channel 15 down); else it
             * adds 1 << j (bit j, set once) where d < t. */
            __m512i res = _mm512_setzero_si512();
            if (a->sign_k)
                for (int j = 15; j >= 0; j--) res = FN(lanes_shift_in_sign)(LB, res, acc[j], a->sign_k[ob + j]);
            else
                for (int j = 0; j < 16; j++)
                    res = FN(lanes_mask_sub)(LB, res, FN(lanes_below)(LB, total, acc[j], a->sign_t[ob + j]),
                                             -(1 << j));
            const int flip = (int)(uint16_t)(a->sign_flip[ob / 64] >> (ob % 64));
            res = _mm512_xor_si512(res, FN(lanes_set1)(LB, flip));
            FN(lanes_store_bits)(a, LB, r, ox, m, ob, res);
            continue;
        }
        /* d = total - 2 count in the lanes, then through memory, indexed by pixel (in
         * registers they would be spilled in the loop) */
        int32_t d[32][16] __attribute__((aligned(64)));
        if (LB == 16) { /* transposed as 32-bit pairs of pixels, then split and widened */
            for (int j = 0; j < 16; j++) acc[j] = FN(lanes_d)(LB, total, acc[j]);
            FN(transpose16)(acc);
            for (int i = 0; i < 16; i++) {
                _mm512_store_si512((void *)d[2 * i], _mm512_srai_epi32(_mm512_slli_epi32(acc[i], 16), 16));
                _mm512_store_si512((void *)d[2 * i + 1], _mm512_srai_epi32(acc[i], 16));
            }
        } else { /* (64-bit lanes: narrowed to 32 bits, 8 pixels in the low half) */
            for (int j = 0; j < 16; j++)
                acc[j] = LB == 32 ? FN(lanes_d)(LB, total, acc[j])
                                  : _mm512_zextsi256_si512(_mm512_cvtepi64_epi32(FN(lanes_d)(LB, total, acc[j])));
            FN(transpose16)(acc);
            for (int j = 0; j < 512 / LB; j++) _mm512_store_si512((void *)d[j], acc[j]);
        }
        FN(avx512_lanes_finish)(a, r * a->Wo + ox, m, ob, (const int32_t(*)[16])d);
    }
}

/* Does the convolution take its pixels in lanes (avx512_lanes)? */
static inline int FN(lanes_fit)(const bconv_args *a)
{
    return (a->C <= 32 ? a->sw == 1 || a->sw == 2 : a->C <= 64 && a->sw == 1) && a->O % 16 == 0 &&
           a->KW <= LANES_MAX_KW && a->KH <= LANES_MAX_KW && a->sh <= LANES_MAX_KW;
}

/* Rows r .. of avx512_lanes, up to r1 and within one image: as many as one plane of
 * PLANE_ROWS input rows covers (at least 2: KH and sh are at most 16; an even number
 * with HALF unless the image or r1 ends the chunk, so that no pair is split). Each
 * block of pixels converts those rows once (those above and below the image as zeros),
 * then runs the chunk's rows, two at a time with HALF. Returns the next row. */
static inline __attribute__((always_inline)) int64_t
FN(lanes_chunk)(const bconv_args *a, const int LB, const int S, const int HALF, int64_t r,
                int64_t r1, const uint32_t *w16)
{
    const int n = (int)(r / a->Ho), oy = (int)(r % a->Ho);
    int64_t rows = (PLANE_ROWS - a->KH) / a->sh + 1;
    const int64_t left = a->Ho - oy < r1 - r ? a->Ho - oy : r1 - r;
    rows = HALF && rows < left ? rows / 2 * 2 : rows < left ? rows : left;
    const int iy_first = oy * a->sh - a->ph, span = (int)(rows - 1) * a->sh + a->KH;
    const int B = HALF ? a->Wo : 512 / LB;
    uint32_t plane[PLANE_ROWS][PLANE_COLS] __attribute__((aligned(64)));
    uint32_t padded[LANES_MAX_KW];
    for (int ox = 0; ox < a->Wo; ox += B) {
        const int m = a->Wo - ox < B ? a->Wo - ox : B;
        FN(lane_taps)(a, S, ox, m, padded);
        if (HALF)
            for (int kx = 0; kx < a->KW; kx++) padded[kx] |= padded[kx] << B;
        for (int i = 0; i < span; i++) {
            const int iy = iy_first + i;
            const uint64_t *row = iy >= 0 && iy < a->H ? a->x + ((int64_t)n * a->H + iy) * a->W : NULL;
            FN(lanes_plane_row)(a, LB, S, row, ox * S - a->pw, plane[i]);
        }
        for (int q = 0; q < rows; q += HALF ? 2 : 1) {
            /* each row's taps along y inside the image (none, with padding beyond the
             * kernel); a missing second row has none */
            const int two = HALF && q + 1 < rows;
            int ky[4] = {0, 0, 0, 0};
            for (int h = 0; h <= two; h++) {
                const int iy0 = iy_first + (q + h) * a->sh;
                int k0 = iy0 < 0 ? -iy0 : 0, k1 = a->H - iy0 < a->KH ? a->H - iy0 : a->KH;
                if (k1 <= k0) k0 = k1 = 0;
                ky[2 * h] = k0, ky[2 * h + 1] = k1;
            }
            FN(avx512_lanes)(a, LB, S, HALF, r + q, ky, ox, two ? 2 * m : m, w16, padded,
                             (const uint32_t(*)[PLANE_COLS])plane[q * a->sh],
                             (const uint32_t(*)[PLANE_COLS])plane[(q + two) * a->sh]);
        }
    }
    return r + rows;
}

/* AVX-512 rows for O % 8 == 0. Convolutions of C <= 64 channels, O % 16 == 0 and
 * windows up to LANES_MAX_KW wide and tall take their pixels in lanes (avx512_lanes: C <=
 * 32 at stride 1 or 2 along x, else stride 1; 16-bit lanes with w16); the others go
 * through avx512_pixels, two at a time where both have every tap inside the image. */
static inline __attribute__((always_inline)) void
FN(avx512_rows)(const bconv_args *a, int64_t r0, int64_t r1, int64_t *xoff, int64_t *woff,
                       const uint32_t *w16)
{
    if (FN(lanes_fit)(a)) {
        /* rows of 16 pixels (16-bit lanes) or 8 (32-bit) fill half a register: two at a time */
        const int half = 2 * a->Wo == (w16 ? 32 : 16);
        for (int64_t r = r0; r < r1;) {
            if (w16 && a->sw == 2) r = FN(lanes_chunk)(a, 16, 2, 1, r, r1, w16);
            else if (w16) r = half ? FN(lanes_chunk)(a, 16, 1, 1, r, r1, w16) : FN(lanes_chunk)(a, 16, 1, 0, r, r1, w16);
            else if (a->C > 32) r = FN(lanes_chunk)(a, 64, 1, 0, r, r1, NULL);
            else if (a->sw == 1) r = half ? FN(lanes_chunk)(a, 32, 1, 1, r, r1, NULL) : FN(lanes_chunk)(a, 32, 1, 0, r, r1, NULL);
            else r = half ? FN(lanes_chunk)(a, 32, 2, 1, r, r1, NULL) : FN(lanes_chunk)(a, 32, 2, 0, r, r1, NULL);
        }
        return;
    }
    for (int64_t r = r0; r < r1; r++) {
        const int oy = (int)(r % a->Ho), iy0 = oy * a->sh - a->ph;
        const int rows_inside = iy0 >= 0 && iy0 + a->KH <= a->H;
        for (int ox = 0; ox < a->Wo;) {
            const int ix0 = ox * a->sw - a->pw;
            const int inside = rows_inside && ix0 >= 0 && ix0 + a->KW <= a->W;
            if (inside && ox + 1 < a->Wo && ix0 + a->sw + a->KW <= a->W) {
                FN(avx512_pixels)(a, 2, r, ox, 1, xoff, woff);
                ox += 2;
            } else {
                FN(avx512_pixels)(a, 1, r, ox, inside, xoff, woff);
                ox += 1;
            }
        }
    }
}
#endif

/* Rows [r0, r1) of the binary convolution (r = n * Ho + oy), with one thread's heap
 * scratch (the glue sizes it: xoff and woff of KH * KW taps, then O accumulators). */
static void FN(bconv_rows)(const bconv_args *a, int64_t r0, int64_t r1, int64_t *scratch)
{
    int64_t *xoff = scratch;
    int64_t *woff = xoff + (int64_t)a->KH * a->KW;
#ifdef USE_AVX512
    if (a->O % 8 == 0) {
        /* The 16-bit lanes' weights (w16 of avx512_lanes), for up to 2048 (tap, channel)
         * pairs (8 KiB of stack), and the sign thresholds: made by each thread at each
         * call (the glue keeps no state between calls): at most about ten thousand
         * instructions a layer, against the convolution's millions of binary MACs. */
        uint32_t w16[2048];
        const int64_t pairs = (int64_t)a->KH * a->KW * a->O;
        /* (16-bit lanes at stride 2 only two rows of 16 pixels at a time: HALF) */
        const int narrow = FN(lanes_fit)(a) && a->C <= 16 && (a->sw == 1 || a->Wo == 16) && pairs <= 2048;
        for (int64_t i = 0; narrow && i < pairs; i++) w16[i] = (uint32_t)(uint16_t)a->w[i] * 0x10001u;
        int32_t t[SIGN_MAX_O], k[SIGN_MAX_O];
        uint64_t flip[SIGN_MAX_O / 64];
        bconv_args b = *a;
        b.sign_t = NULL, b.sign_flip = NULL, b.sign_k = NULL;
        if (FN(sign_thresholds)(a, t, flip)) {
            b.sign_t = t, b.sign_flip = flip;
            /* With C even every total is even, and the pixel-lane paths count from -total / 2:
             * d < t, that is 2 count > total - t, becomes count - total / 2 > floor(-t / 2). */
            if (a->C % 2 == 0) {
                for (int o = 0; o < a->O; o++) k[o] = t[o] >= 0 ? -((t[o] + 1) / 2) : -t[o] / 2;
                b.sign_k = k;
            }
        }
        FN(avx512_rows)(&b, r0, r1, xoff, woff, narrow ? w16 : NULL);
        return;
    }
#endif
    uint64_t *acc = (uint64_t *)(woff + (int64_t)a->KH * a->KW);
    for (int64_t r = r0; r < r1; r++) FN(bconv_row_plain)(a, r, acc, xoff, woff);
}

/* Signs of pixels [p0, p1) of x (P x C floats) packed into out (P x ceil(C / 64) words). */
static void FN(pack_rows)(const float *x, int64_t p0, int64_t p1, int C, uint64_t *out)
{
    const int Cw = (C + 63) / 64;
    for (int64_t p = p0; p < p1; p++) FN(pack_row)(x + p * C, C, out + p * Cw);
}

/* The popcount roofline of this variant: `iters` rounds of XOR, popcount and add on
 * 8192 bits held in registers (independent accumulators, no memory traffic): the
 * most binary multiply-accumulates per second its instructions can do. Returns a sum
 * that depends on every round, so that nothing is left out. */
static uint64_t FN(popcount_peak)(int64_t iters)
{
#if defined(USE_AVX512)
    __m512i s[16], w = _mm512_set1_epi64(0x5555), one = _mm512_set1_epi64(1);
    for (int j = 0; j < 16; j++) s[j] = _mm512_set1_epi64(j);
    for (int64_t i = 0; i < iters; i++) {
        for (int j = 0; j < 16; j++)
            s[j] = _mm512_add_epi64(s[j], _mm512_popcnt_epi64(_mm512_xor_si512(s[j], w)));
        w = _mm512_add_epi64(w, one);
    }
    for (int j = 1; j < 16; j++) s[0] = _mm512_add_epi64(s[0], s[j]);
    return (uint64_t)_mm512_reduce_add_epi64(s[0]);
#elif defined(USE_NEON)
    uint64x2_t s[32];
    uint64x2_t w = vdupq_n_u64(0x5555), one = vdupq_n_u64(1);
    for (int j = 0; j < 32; j++) s[j] = vdupq_n_u64((uint64_t)j);
    for (int64_t i = 0; i < iters; i++) {
        for (int j = 0; j < 32; j++)
            s[j] = vpadalq_u32(s[j], vpaddlq_u16(vpaddlq_u8(vcntq_u8(vreinterpretq_u8_u64(veorq_u64(s[j], w))))));
        w = vaddq_u64(w, one);
    }
    uint64_t total = 0;
    for (int j = 0; j < 32; j++) total += vgetq_lane_u64(s[j], 0) + vgetq_lane_u64(s[j], 1);
    return total;
#else
    uint64_t s[128], w = 0x5555;
    for (int j = 0; j < 128; j++) s[j] = (uint64_t)j;
    for (int64_t i = 0; i < iters; i++) {
        for (int j = 0; j < 128; j++) s[j] += (uint64_t)__builtin_popcountll(s[j] ^ w);
        w++;
    }
    uint64_t total = 0;
    for (int j = 0; j < 128; j++) total += s[j];
    return total;
#endif
}

#undef FN
#undef CAT
#undef CAT_
