/* Bit-packed kernels of the signgrad runtime: sign packing and the XNOR-popcount
 * convolution with its epilogue (scale, shift, residual, activation) fused.
 *
 * Layouts (all C-contiguous, little-endian 64-bit words):
 *   activations  float32 N x H x W x C (NHWC)
 *   packed bits  uint64  N x H x W x Cw, Cw = ceil(C / 64); bit j of word k is channel
 *                64 k + j; 1 means negative (sign(x) = -1, sign(0) = +1), pad bits 0
 *   weights      uint64  KH x KW x Cw x O, the same bit convention
 *
 * For +-1 vectors a, w of length C: a . w = C - 2 popcount(a XOR w). Taps that fall
 * into the zero padding contribute 0, so a window's dot product is
 * valid_taps * C - 2 * sum popcount, summed over the valid taps only.
 *
 * The same C body is compiled for AVX-512 VPOPCNTDQ (8 popcounts per instruction),
 * for POPCNT, and for plain x86-64/other CPUs; the best one the CPU supports is picked
 * at import time (kernel_name() tells which).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
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
} bconv_args;

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

#define SUFFIX generic
#include "_kernels_impl.h"
#undef SUFFIX

static void (*bconv_impl)(const bconv_args *) = bconv_generic;
static void (*pack_impl)(const float *, int64_t, int, uint64_t *, int) = pack_generic;
static const char *impl_name = "generic";

/* ---------------------------------------------------------------- Python glue */

/* A buffer argument, or NULL for None; checks its size in bytes. */
static int get_buf(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t nbytes,
                   const char *what, int *have)
{
    *have = 0;
    if (obj == Py_None) return 0;
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) return -1;
    *have = 1;
    if (view->len != nbytes) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd bytes, got %zd", what, nbytes, view->len);
        return -1;
    }
    return 0;
}

static PyObject *py_bconv2d(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *ox, *ow, *oscale, *oshift, *ores, *oslope, *oout, *obits;
    bconv_args a;
    memset(&a, 0, sizeof a);
    if (!PyArg_ParseTuple(args, "OO(iiiii)(iiii)(ii)OOOiffOOOi", &ox, &ow, &a.N, &a.H, &a.W,
                          &a.C, &a.O, &a.KH, &a.KW, &a.sh, &a.sw, &a.ph, &a.pw, &oscale,
                          &oshift, &ores, &a.act, &a.lo, &a.hi, &oslope, &oout, &obits,
                          &a.threads))
        return NULL;
    if (a.N < 0 || a.H < 1 || a.W < 1 || a.C < 1 || a.O < 1 || a.KH < 1 || a.KW < 1 ||
        a.sh < 1 || a.sw < 1 || a.ph < 0 || a.pw < 0 || a.threads < 1) {
        PyErr_SetString(PyExc_ValueError, "bconv2d: bad dimensions");
        return NULL;
    }
    a.Cw = (a.C + 63) / 64;
    a.Ho = (a.H + 2 * a.ph - a.KH) / a.sh + 1;
    a.Wo = (a.W + 2 * a.pw - a.KW) / a.sw + 1;
    if (a.Ho < 1 || a.Wo < 1) {
        PyErr_SetString(PyExc_ValueError, "bconv2d: kernel larger than the padded input");
        return NULL;
    }
    const Py_ssize_t npix = (Py_ssize_t)a.N * a.Ho * a.Wo;
    Py_buffer b[8];
    int have[8] = {0};
    PyObject *ret = NULL;
    Py_ssize_t nslope = 0;
    if (oslope != Py_None) {
        Py_buffer tmp;
        if (PyObject_GetBuffer(oslope, &tmp, PyBUF_C_CONTIGUOUS) < 0) return NULL;
        nslope = tmp.len;
        PyBuffer_Release(&tmp);
        a.slope_n = (int)(nslope / 4);
        if (a.slope_n != 1 && a.slope_n != a.O) {
            PyErr_SetString(PyExc_ValueError, "bconv2d: slope needs 1 or O values");
            return NULL;
        }
    } else if (a.act == ACT_PRELU) {
        PyErr_SetString(PyExc_ValueError, "bconv2d: prelu needs slopes");
        return NULL;
    }
    if (get_buf(ox, &b[0], 0, npix ? (Py_ssize_t)a.N * a.H * a.W * a.Cw * 8 : 0, "x", &have[0]) ||
        get_buf(ow, &b[1], 0, (Py_ssize_t)a.KH * a.KW * a.Cw * a.O * 8, "w", &have[1]) ||
        get_buf(oscale, &b[2], 0, (Py_ssize_t)a.O * 4, "scale", &have[2]) ||
        get_buf(oshift, &b[3], 0, (Py_ssize_t)a.O * 4, "shift", &have[3]) ||
        get_buf(ores, &b[4], 0, npix * a.O * 4, "residual", &have[4]) ||
        get_buf(oslope, &b[5], 0, nslope, "slope", &have[5]) ||
        get_buf(oout, &b[6], 1, npix * a.O * 4, "out", &have[6]) ||
        get_buf(obits, &b[7], 1, npix * ((a.O + 63) / 64) * 8, "out_bits", &have[7]))
        goto done;
    if (!have[0] || !have[1] || !have[2] || !have[3] || !have[6]) {
        PyErr_SetString(PyExc_ValueError, "bconv2d: x, w, scale, shift and out are required");
        goto done;
    }
    a.x = b[0].buf;
    a.w = b[1].buf;
    a.scale = b[2].buf;
    a.shift = b[3].buf;
    a.residual = have[4] ? b[4].buf : NULL;
    a.slope = have[5] ? b[5].buf : NULL;
    a.out = b[6].buf;
    a.out_bits = have[7] ? b[7].buf : NULL;
    if (npix) {
        Py_BEGIN_ALLOW_THREADS
        bconv_impl(&a);
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    for (int i = 0; i < 8; i++)
        if (have[i]) PyBuffer_Release(&b[i]);
    return ret;
}

static PyObject *py_pack_signs(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *ox, *oout;
    Py_ssize_t P;
    int C, threads;
    if (!PyArg_ParseTuple(args, "OnOii", &ox, &P, &oout, &C, &threads)) return NULL;
    if (P < 0 || C < 1 || threads < 1) {
        PyErr_SetString(PyExc_ValueError, "pack_signs: bad dimensions");
        return NULL;
    }
    Py_buffer bx, bo;
    int hx = 0, ho = 0;
    PyObject *ret = NULL;
    if (get_buf(ox, &bx, 0, P * C * 4, "x", &hx) ||
        get_buf(oout, &bo, 1, P * ((C + 63) / 64) * 8, "out", &ho))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    pack_impl(bx.buf, P, C, bo.buf, threads);
    Py_END_ALLOW_THREADS
    ret = Py_None;
    Py_INCREF(ret);
done:
    if (hx) PyBuffer_Release(&bx);
    if (ho) PyBuffer_Release(&bo);
    return ret;
}

static PyObject *py_kernel_name(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(args))
{
#ifdef _OPENMP
    return PyUnicode_FromFormat("%s+openmp", impl_name);
#else
    return PyUnicode_FromString(impl_name);
#endif
}

static PyMethodDef methods[] = {
    {"bconv2d", py_bconv2d, METH_VARARGS,
     "bconv2d(x_bits, w_bits, (N, H, W, C, O), (KH, KW, sh, sw), (ph, pw), scale, shift, "
     "residual, act, lo, hi, slope, out, out_bits, threads)"},
    {"pack_signs", py_pack_signs, METH_VARARGS, "pack_signs(x, P, out, C, threads)"},
    {"kernel_name", py_kernel_name, METH_NOARGS, "the instruction set in use"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels", "Bit-packed kernels of the signgrad runtime.", -1,
    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void)
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
#endif
    return PyModule_Create(&module);
}
