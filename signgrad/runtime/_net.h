/* A whole network in one call: a table of operations over three memory pools, run top
 * to bottom by one or more threads, without Python between the layers.
 *
 * The runtime's planner (signgrad/runtime/network.py) lays every value of the forward
 * pass out in an arena and writes one row of NET_FIELDS int64 per operation; the glue in
 * _kernels.c checks every row against the sizes of the buffers it was handed
 * (net_check) before anything runs, so that no operation reads or writes outside them,
 * whatever a model file holds. Layouts: activations NHWC float32 in the arena, packed
 * signs (as in _kernels_core.h) in the bits pool, float parameters in fp, binary weights
 * in wp. Without Python and without threads: the glue adds both.
 */
#ifndef SIGNGRAD_NET_H
#define SIGNGRAD_NET_H
#include "_kernels_core.h"

enum {
    NET_INPUT = 1, /* the caller's N x C x H x W input -> NHWC y */
    NET_CONV,      /* float convolution (a linear layer: 1 x 1 on a 1 x 1 map) + epilogue */
    NET_BCONV,     /* XNOR-popcount convolution of packed x + epilogue */
    NET_PACK,      /* the signs of float x, packed into bits at y */
    NET_AFFINE,    /* y = x * scale + shift, per channel */
    NET_ACT,       /* relu, hardtanh or prelu */
    NET_ADD,       /* y = x + res */
    NET_SHORTCUT,  /* option A: x[:, ::s, ::s], channels zero-padded by PH before, PW after */
    NET_MAXPOOL,
    NET_AVGPOOL,   /* padded zeros count in the mean */
    NET_GAP,       /* mean over H and W: N x C */
    NET_FLATTEN,   /* NHWC -> N x (C * H * W) in NCHW order */
    NET_LAST = NET_FLATTEN
};

/* The fields of one operation's row. Offsets are in elements of their pool; -1 is none.
 * X: arena (bits for NET_BCONV); Y: arena (bits for NET_PACK); RES: arena; WT: fp
 * (wp for NET_BCONV); SCALE, SHIFT, ACTP: fp (ACTP: hardtanh's lo and hi, or SLOPEN prelu
 * slopes); BITS: bits, the packed signs of the output. NET_SHORTCUT: SH is the stride. */
enum {
    F_OP, F_N, F_H, F_W, F_C, F_O, F_KH, F_KW, F_SH, F_SW, F_PH, F_PW, F_HO, F_WO,
    F_X, F_Y, F_RES, F_WT, F_SCALE, F_SHIFT, F_ACT, F_ACTP, F_SLOPEN, F_BITS, F_FLAGS,
    NET_FIELDS
};

/* F_FLAGS of NET_CONV: the input is sign(x). */
#define NET_SIGN_INPUT 1
/* F_FLAGS of NET_BCONV: only the output's signs are read (bconv_args.bits_only). */
#define NET_BITS_ONLY 2

typedef struct {
    const int64_t *ops;
    int64_t n_ops;
    const float *fp;
    int64_t fp_n;
    const uint64_t *wp;
    int64_t wp_n;
    float *arena;
    int64_t arena_n;
    uint64_t *bits;
    int64_t bits_n;
    const float *input;
    int64_t input_n;
    kernel_impl k;
    /* per thread scratch_stride int64 (net_scratch of the table): a binary convolution's */
    int64_t *scratch;
    int64_t scratch_stride;
} net_t;

#define NET_MAXDIM (INT_MAX - 64)

/* a * b into *out unless it overflows (or either is negative). */
static int net_mul(int64_t a, int64_t b, int64_t *out)
{
    if (a < 0 || b < 0 || (a != 0 && b > INT64_MAX / a)) return 0;
    *out = a * b;
    return 1;
}

static int net_mul3(int64_t a, int64_t b, int64_t c, int64_t *out)
{
    int64_t ab;
    return net_mul(a, b, &ab) && net_mul(ab, c, out);
}

static int net_mul4(int64_t a, int64_t b, int64_t c, int64_t d, int64_t *out)
{
    int64_t ab, cd;
    return net_mul(a, b, &ab) && net_mul(c, d, &cd) && net_mul(ab, cd, out);
}

/* [off, off + len) lies inside a pool of n elements. */
static int net_in(int64_t off, int64_t len, int64_t n)
{
    return off >= 0 && len >= 0 && off <= n && len <= n - off;
}

/* The int64 scratch one thread needs for the table's convolutions (binary: their
 * bconv_scratch, then the window offsets of bconv_set_offsets; float: fconv_scratch), or
 * -1 if it overflows. Call after net_check. */
static int64_t net_scratch(const net_t *net)
{
    int64_t most = 0;
    for (int64_t i = 0; i < net->n_ops; i++) {
        const int64_t *f = net->ops + i * NET_FIELDS, taps = f[F_KH] * f[F_KW];
        int64_t need = 0;
        if (f[F_OP] == NET_BCONV) need = bconv_scratch(taps, f[F_O]) + 2 * taps;
        if (f[F_OP] == NET_CONV && !net_mul(2 * taps, f[F_C], &need)) return -1;
        if (need > most) most = need;
    }
    return most;
}

/* NULL when every row is consistent and inside its buffers, else what is wrong. */
static const char *net_check(const net_t *net)
{
    for (int64_t i = 0; i < net->n_ops; i++) {
        const int64_t *f = net->ops + i * NET_FIELDS;
        const int64_t op = f[F_OP], N = f[F_N], H = f[F_H], W = f[F_W], C = f[F_C];
        if (op < NET_INPUT || op > NET_LAST) return "unknown operation";
        if (N < 1 || H < 1 || W < 1 || C < 1 || N > NET_MAXDIM || H > NET_MAXDIM ||
            W > NET_MAXDIM || C > NET_MAXDIM)
            return "bad input dimensions";
        int64_t in_n, Ho = H, Wo = W, O = C, out_n;
        if (!net_mul4(N, H, W, C, &in_n)) return "dimensions too large";
        const int windowed = op == NET_CONV || op == NET_BCONV || op == NET_MAXPOOL ||
                             op == NET_AVGPOOL;
        if (windowed) {
            const int64_t KH = f[F_KH], KW = f[F_KW], sh = f[F_SH], sw = f[F_SW];
            const int64_t ph = f[F_PH], pw = f[F_PW];
            if (KH < 1 || KW < 1 || sh < 1 || sw < 1 || ph < 0 || pw < 0 || KH > NET_MAXDIM ||
                KW > NET_MAXDIM || sh > NET_MAXDIM || sw > NET_MAXDIM || ph > NET_MAXDIM / 4 ||
                pw > NET_MAXDIM / 4 || H + 2 * ph < KH || W + 2 * pw < KW ||
                H + 2 * ph > NET_MAXDIM || W + 2 * pw > NET_MAXDIM || KH * KW > NET_MAXDIM)
                return "bad window";
            Ho = (H + 2 * ph - KH) / sh + 1;
            Wo = (W + 2 * pw - KW) / sw + 1;
            /* a pooling window must hold one pixel of the image */
            if ((op == NET_MAXPOOL || op == NET_AVGPOOL) && (2 * ph > KH || 2 * pw > KW))
                return "pooling padding beyond half the window";
        }
        if (op == NET_CONV || op == NET_BCONV) O = f[F_O];
        if (op == NET_SHORTCUT) {
            const int64_t s = f[F_SH], pb = f[F_PH], pa = f[F_PW];
            if (s < 1 || s > NET_MAXDIM || pb < 0 || pa < 0 || pb > NET_MAXDIM || pa > NET_MAXDIM)
                return "bad shortcut";
            Ho = (H - 1) / s + 1;
            Wo = (W - 1) / s + 1;
            O = C + pb + pa;
        }
        if (op == NET_GAP || op == NET_FLATTEN) Ho = Wo = 1;
        if (op == NET_FLATTEN && !net_mul3(C, H, W, &O)) return "dimensions too large";
        if (O < 1 || O > NET_MAXDIM) return "bad output channels";
        if (f[F_HO] != Ho || f[F_WO] != Wo || f[F_O] != O) return "output shape inconsistent";
        if (!net_mul4(N, Ho, Wo, O, &out_n)) return "dimensions too large";
        const int64_t Cw = (C + 63) / 64, Ow = (O + 63) / 64;
        int64_t x_len = in_n, y_len = out_n, len;
        /* input */
        if (op == NET_INPUT) {
            if (in_n != net->input_n) return "input size";
        } else if (op == NET_BCONV) {
            if (!net_mul4(N, H, W, Cw, &x_len) || !net_in(f[F_X], x_len, net->bits_n))
                return "binary input outside the bits";
        } else if (!net_in(f[F_X], x_len, net->arena_n)) {
            return "input outside the arena";
        }
        /* output */
        if (op == NET_PACK) {
            if (!net_mul4(N, H, W, Cw, &y_len) || !net_in(f[F_Y], y_len, net->bits_n))
                return "packed output outside the bits";
        } else if (!net_in(f[F_Y], y_len, net->arena_n)) {
            return "output outside the arena";
        }
        if (op == NET_ADD && !net_in(f[F_RES], in_n, net->arena_n)) return "addend outside";
        if (op == NET_CONV || op == NET_BCONV) {
            const int64_t taps = f[F_KH] * f[F_KW];
            int64_t w_len;
            if (op == NET_CONV ? !net_mul3(taps, C, O, &w_len) || !net_in(f[F_WT], w_len, net->fp_n)
                               : !net_mul3(taps, Cw, O, &w_len) || !net_in(f[F_WT], w_len, net->wp_n))
                return "weights outside their pool";
            if (f[F_RES] != -1 && !net_in(f[F_RES], out_n, net->arena_n)) return "residual outside";
            if (f[F_BITS] != -1 &&
                (!net_mul4(N, Ho, Wo, Ow, &len) || !net_in(f[F_BITS], len, net->bits_n)))
                return "output signs outside the bits";
            if (op == NET_CONV && (f[F_FLAGS] & ~(int64_t)NET_SIGN_INPUT)) return "bad flags";
            if (op == NET_BCONV && ((f[F_FLAGS] & ~(int64_t)NET_BITS_ONLY) ||
                                    ((f[F_FLAGS] & NET_BITS_ONLY) && f[F_BITS] == -1)))
                return "bad flags";
            /* the float convolution indexes four patches of taps * C floats with ints */
            if (op == NET_CONV && (taps > NET_MAXDIM / 4 / C)) return "patch too large";
        }
        const int scaled = op == NET_CONV || op == NET_BCONV || op == NET_AFFINE;
        if (scaled && (!net_in(f[F_SCALE], O, net->fp_n) || !net_in(f[F_SHIFT], O, net->fp_n)))
            return "scale or shift outside";
        if (op == NET_CONV || op == NET_BCONV || op == NET_ACT) {
            const int64_t act = f[F_ACT];
            if (act < ACT_NONE || act > ACT_PRELU || (op == NET_ACT && act == ACT_NONE))
                return "bad activation";
            if (act == ACT_HARDTANH && !net_in(f[F_ACTP], 2, net->fp_n)) return "bounds outside";
            if (act == ACT_PRELU && ((f[F_SLOPEN] != 1 && f[F_SLOPEN] != O) ||
                                     !net_in(f[F_ACTP], f[F_SLOPEN], net->fp_n)))
                return "slopes outside";
        }
    }
    return NULL;
}

/* [*lo, *hi): part tid of n of total items. */
static void net_part(int64_t total, int tid, int n, int64_t *lo, int64_t *hi)
{
    *lo = total * tid / n;
    *hi = total * (tid + 1) / n;
}

/* The convolution arguments of a NET_CONV or NET_BCONV row. */
static bconv_args net_conv_args(const net_t *net, const int64_t *f)
{
    bconv_args a;
    memset(&a, 0, sizeof a);
    a.N = (int)f[F_N], a.H = (int)f[F_H], a.W = (int)f[F_W], a.C = (int)f[F_C];
    a.O = (int)f[F_O], a.KH = (int)f[F_KH], a.KW = (int)f[F_KW];
    a.sh = (int)f[F_SH], a.sw = (int)f[F_SW], a.ph = (int)f[F_PH], a.pw = (int)f[F_PW];
    a.Ho = (int)f[F_HO], a.Wo = (int)f[F_WO], a.Cw = (a.C + 63) / 64;
    a.scale = net->fp + f[F_SCALE];
    a.shift = net->fp + f[F_SHIFT];
    a.residual = f[F_RES] >= 0 ? net->arena + f[F_RES] : NULL;
    a.act = (int)f[F_ACT];
    if (a.act == ACT_HARDTANH) a.lo = net->fp[f[F_ACTP]], a.hi = net->fp[f[F_ACTP] + 1];
    if (a.act == ACT_PRELU) a.slope = net->fp + f[F_ACTP], a.slope_n = (int)f[F_SLOPEN];
    a.out = net->arena + f[F_Y];
    a.out_bits = f[F_BITS] >= 0 ? net->bits + f[F_BITS] : NULL;
    if (f[F_OP] == NET_BCONV) {
        a.x = net->bits + f[F_X];
        a.w = net->wp + f[F_WT];
        a.bits_only = (int)(f[F_FLAGS] & NET_BITS_ONLY);
    } else {
        a.xf = net->arena + f[F_X];
        a.wf = net->fp + f[F_WT];
        a.sign_input = (int)(f[F_FLAGS] & NET_SIGN_INPUT);
    }
    return a;
}

/* y = max(y, x) (NaN wins, as in numpy's max) and y += x over C channels; restrict: the
 * window's pixel never overlaps the output, and saying so lets the loops vectorize. */
static inline void net_max_into(float *restrict y, const float *restrict x, int64_t C)
{
    for (int64_t c = 0; c < C; c++) {
        const float a = y[c], b = x[c];
        y[c] = (a != a) | (b <= a) ? a : b; /* |, not ||: no branch, so it vectorizes */
    }
}

static inline void net_add_into(float *restrict y, const float *restrict x, int64_t C)
{
    for (int64_t c = 0; c < C; c++) y[c] += x[c];
}

static void net_pool(const net_t *net, const int64_t *f, int64_t r0, int64_t r1)
{
    const int64_t H = f[F_H], W = f[F_W], C = f[F_C], KH = f[F_KH], KW = f[F_KW];
    const int64_t Ho = f[F_HO], Wo = f[F_WO];
    const int max = f[F_OP] == NET_MAXPOOL;
    const float *x = net->arena + f[F_X];
    const float area = (float)(KH * KW);
    for (int64_t r = r0; r < r1; r++) {
        const int64_t n = r / Ho, oy = r % Ho;
        for (int64_t ox = 0; ox < Wo; ox++) {
            float *y = net->arena + f[F_Y] + (r * Wo + ox) * C;
            for (int64_t c = 0; c < C; c++) y[c] = max ? -INFINITY : 0.0f;
            for (int64_t ky = 0; ky < KH; ky++) {
                const int64_t iy = oy * f[F_SH] - f[F_PH] + ky;
                if (iy < 0 || iy >= H) continue;
                for (int64_t kx = 0; kx < KW; kx++) {
                    const int64_t ix = ox * f[F_SW] - f[F_PW] + kx;
                    if (ix < 0 || ix >= W) continue;
                    const float *xp = x + ((n * H + iy) * W + ix) * C;
                    if (max) net_max_into(y, xp, C);
                    else net_add_into(y, xp, C);
                }
            }
            if (!max)
                for (int64_t c = 0; c < C; c++) y[c] /= area;
        }
    }
}

/* Operation f on part tid of n. */
static void net_op(const net_t *net, const int64_t *f, int tid, int n)
{
    const int64_t op = f[F_OP], N = f[F_N], H = f[F_H], W = f[F_W], C = f[F_C];
    /* X of NET_BCONV and Y of NET_PACK are offsets in the bits, not the arena */
    const float *x = op == NET_INPUT ? net->input : op == NET_BCONV ? NULL : net->arena + f[F_X];
    float *y = op == NET_PACK ? NULL : net->arena + f[F_Y];
    int64_t lo, hi;
    switch (op) {
    case NET_INPUT: /* rows (n, h) */
        net_part(N * H, tid, n, &lo, &hi);
        for (int64_t r = lo; r < hi; r++) {
            const int64_t b = r / H, h = r % H;
            for (int64_t w = 0; w < W; w++)
                for (int64_t c = 0; c < C; c++)
                    y[(r * W + w) * C + c] = x[((b * C + c) * H + h) * W + w];
        }
        break;
    case NET_CONV:
    case NET_BCONV: {
        bconv_args a = net_conv_args(net, f);
        net_part(N * f[F_HO], tid, n, &lo, &hi);
        int64_t *s = net->scratch + tid * net->scratch_stride;
        if (op == NET_CONV) {
            net->k.fconv_rows(&a, lo, hi, (float *)s);
        } else {
            const int64_t taps = f[F_KH] * f[F_KW];
            bconv_set_offsets(&a, s + bconv_scratch(taps, f[F_O]));
            net->k.bconv_rows(&a, lo, hi, s);
        }
        break;
    }
    case NET_PACK:
        net_part(N * H * W, tid, n, &lo, &hi);
        net->k.pack_rows(x, lo, hi, (int)C, net->bits + f[F_Y]);
        break;
    case NET_AFFINE:
    case NET_ACT:
    case NET_ADD: { /* pixels */
        /* (a pointer is formed only from an offset net_check has checked for this op) */
        const float *s = op == NET_AFFINE ? net->fp + f[F_SCALE] : NULL;
        const float *t = op == NET_AFFINE ? net->fp + f[F_SHIFT] : NULL;
        const float *res = op == NET_ADD ? net->arena + f[F_RES] : NULL;
        const int64_t act = f[F_ACT];
        const float *p = op == NET_ACT && act != ACT_RELU ? net->fp + f[F_ACTP] : NULL;
        net_part(N * H * W, tid, n, &lo, &hi);
        for (int64_t i = lo * C; i < hi * C; i += C) {
            const float *xi = x + i;
            float *yi = y + i;
            if (op == NET_ADD)
                for (int64_t c = 0; c < C; c++) yi[c] = xi[c] + res[i + c];
            else if (op == NET_AFFINE)
                for (int64_t c = 0; c < C; c++) yi[c] = xi[c] * s[c] + t[c];
            else if (act == ACT_RELU)
                for (int64_t c = 0; c < C; c++) yi[c] = xi[c] < 0.0f ? 0.0f : xi[c];
            else if (act == ACT_HARDTANH) {
                const float lo_v = p[0], hi_v = p[1];
                for (int64_t c = 0; c < C; c++)
                    yi[c] = xi[c] < lo_v ? lo_v : (xi[c] > hi_v ? hi_v : xi[c]);
            } else if (f[F_SLOPEN] == 1) {
                const float a = p[0];
                for (int64_t c = 0; c < C; c++) yi[c] = xi[c] >= 0.0f ? xi[c] : xi[c] * a;
            } else {
                for (int64_t c = 0; c < C; c++) yi[c] = xi[c] >= 0.0f ? xi[c] : xi[c] * p[c];
            }
        }
        break;
    }
    case NET_SHORTCUT: {
        const int64_t s = f[F_SH], Ho = f[F_HO], Wo = f[F_WO], O = f[F_O], pb = f[F_PH];
        net_part(N * Ho, tid, n, &lo, &hi);
        for (int64_t r = lo; r < hi; r++) {
            const int64_t b = r / Ho, iy = (r % Ho) * s;
            for (int64_t ox = 0; ox < Wo; ox++) {
                float *yp = y + (r * Wo + ox) * O;
                const float *xp = x + ((b * H + iy) * W + ox * s) * C;
                for (int64_t o = 0; o < O; o++) yp[o] = 0.0f;
                for (int64_t c = 0; c < C; c++) yp[pb + c] = xp[c];
            }
        }
        break;
    }
    case NET_MAXPOOL:
    case NET_AVGPOOL:
        net_part(N * f[F_HO], tid, n, &lo, &hi);
        net_pool(net, f, lo, hi);
        break;
    case NET_GAP: {
        const float area = (float)(H * W);
        net_part(N, tid, n, &lo, &hi);
        for (int64_t b = lo; b < hi; b++) {
            float *yb = y + b * C;
            for (int64_t c = 0; c < C; c++) yb[c] = 0.0f;
            for (int64_t p = 0; p < H * W; p++)
                for (int64_t c = 0; c < C; c++) yb[c] += x[(b * H * W + p) * C + c];
            for (int64_t c = 0; c < C; c++) yb[c] /= area;
        }
        break;
    }
    case NET_FLATTEN:
        net_part(N, tid, n, &lo, &hi);
        for (int64_t b = lo; b < hi; b++)
            for (int64_t p = 0; p < H * W; p++)
                for (int64_t c = 0; c < C; c++)
                    y[b * C * H * W + c * H * W + p] = x[(b * H * W + p) * C + c];
        break;
    default:
        break;
    }
}

/* The whole table as thread tid of n: sync(ctx, i) after operation i, which every thread
 * must reach before any goes on (a barrier; may be NULL when n is 1). */
static void net_run(const net_t *net, int tid, int n, void (*sync)(void *, int64_t), void *ctx)
{
    for (int64_t i = 0; i < net->n_ops; i++) {
        net_op(net, net->ops + i * NET_FIELDS, tid, n);
        if (sync) sync(ctx, i);
    }
}

#endif
