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
 * for POPCNT, for NEON on aarch64 (CNT on 16 bytes) and for plain C on other CPUs; the
 * best one the CPU supports is picked at import time (kernel_name() tells which). The
 * part without Python is _kernels_core.h, and _net.h runs whole networks on it
 * (run_net).
 *
 * Threads: a call that asks for T > 1 threads starts T - 1 of them and joins them before
 * it returns. Within the call they wait for each other at barriers (spinning briefly,
 * then yielding the CPU); between calls there is no thread at all, so nothing spins
 * against other libraries in the process (PyTorch's or onnxruntime's OpenMP pools).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>

#include "_net.h"

/* The most threads a call may ask for: signgrad.runtime.model.MAX_THREADS checks the same
 * bound with a clear message; this is the glue's own defence. */
#define MAX_THREADS 1024

/* ---------------------------------------------------------------- threads */

typedef struct team team;
typedef void (*team_body)(void *ctx, int tid, int n, team *t);

struct team {
    team_body body;
    void *ctx;
    atomic_int go;      /* 1 once n is known */
    int n;              /* threads taking part, the caller's included */
    atomic_int arrived; /* the barrier's count and its sense */
    atomic_int sense;
};

typedef struct {
    team *t;
    int tid;
} team_member;

/* Spin a little (the others are usually a few microseconds away), then give the CPU up:
 * a thread preempted on a busy machine is not waited for at full speed. */
static void team_wait(atomic_int *flag, int value)
{
    for (int spins = 0; atomic_load_explicit(flag, memory_order_acquire) != value; spins++)
        if (spins > 2000) sched_yield();
}

/* Every member of the team waits here for the others (a sense-reversing barrier). */
static void team_barrier(team *t, int *local_sense)
{
    if (t == NULL || t->n == 1) return;
    *local_sense = !*local_sense;
    if (atomic_fetch_add_explicit(&t->arrived, 1, memory_order_acq_rel) == t->n - 1) {
        atomic_store_explicit(&t->arrived, 0, memory_order_relaxed);
        atomic_store_explicit(&t->sense, *local_sense, memory_order_release);
    } else {
        team_wait(&t->sense, *local_sense);
    }
}

static void *team_main(void *arg)
{
    team_member *m = arg;
    team_wait(&m->t->go, 1);
    if (m->tid < m->t->n) m->t->body(m->t->ctx, m->tid, m->t->n, m->t);
    return NULL;
}

/* body(ctx, tid, n, team) on n <= threads threads (fewer if the system refuses some),
 * the calling thread being tid 0. Call without the GIL. */
static void team_run(int threads, team_body body, void *ctx)
{
    team t = {body, ctx, 0, 1, 0, 0};
    pthread_t ids[MAX_THREADS];
    team_member members[MAX_THREADS];
    int started = 0;
    for (int i = 1; i < threads && i < MAX_THREADS; i++) {
        members[i] = (team_member){&t, i};
        if (pthread_create(&ids[i], NULL, team_main, &members[i]) != 0) break;
        started = i;
    }
    t.n = started + 1;
    atomic_store_explicit(&t.go, 1, memory_order_release);
    body(ctx, 0, t.n, &t);
    for (int i = 1; i <= started; i++) pthread_join(ids[i], NULL);
}

/* ---------------------------------------------------------------- Python glue */

/* a * b into *out unless it overflows (or either is negative): every size below is
 * computed with these, so no product of values from a model file wraps around. */
static int mul_ok(int64_t a, int64_t b, int64_t *out)
{
    if (a < 0 || b < 0 || (a != 0 && b > INT64_MAX / a)) return 0;
    *out = a * b;
    return 1;
}

static int mul_all(int64_t *out, int n, const int64_t *f)
{
    int64_t p = 1;
    for (int i = 0; i < n; i++)
        if (!mul_ok(p, f[i], &p)) return 0;
    if (p > PY_SSIZE_T_MAX) return 0;
    *out = p;
    return 1;
}

#define PRODUCT(out, ...)                                                                   \
    mul_all(&(out), (int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)),              \
            (int64_t[]){__VA_ARGS__})

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

/* A binary convolution split by rows among a team. */
typedef struct {
    const bconv_args *a;
    int64_t *scratch; /* per thread stride int64 */
    int64_t stride, rows;
} rows_job;

static void bconv_part(void *ctx, int tid, int n, team *Py_UNUSED(t))
{
    const rows_job *j = ctx;
    int64_t lo, hi;
    net_part(j->rows, tid, n, &lo, &hi);
    impl.bconv_rows(j->a, lo, hi, j->scratch + tid * j->stride);
}

typedef struct {
    const float *x;
    int64_t P;
    int C;
    uint64_t *out;
} pack_job;

static void pack_part(void *ctx, int tid, int n, team *Py_UNUSED(t))
{
    const pack_job *j = ctx;
    int64_t lo, hi;
    net_part(j->P, tid, n, &lo, &hi);
    impl.pack_rows(j->x, lo, hi, j->C, j->out);
}

static PyObject *py_bconv2d(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *ox, *ow, *oscale, *oshift, *ores, *oslope, *oout, *obits;
    bconv_args a;
    int threads;
    memset(&a, 0, sizeof a);
    if (!PyArg_ParseTuple(args, "OO(iiiii)(iiii)(ii)OOOiffOOOi", &ox, &ow, &a.N, &a.H, &a.W,
                          &a.C, &a.O, &a.KH, &a.KW, &a.sh, &a.sw, &a.ph, &a.pw, &oscale,
                          &oshift, &ores, &a.act, &a.lo, &a.hi, &oslope, &oout, &obits,
                          &threads))
        return NULL;
    if (a.N < 0 || a.H < 1 || a.W < 1 || a.C < 1 || a.O < 1 || a.KH < 1 || a.KW < 1 ||
        a.sh < 1 || a.sw < 1 || a.ph < 0 || a.pw < 0 || threads < 1 ||
        threads > MAX_THREADS || a.act < ACT_NONE || a.act > ACT_PRELU) {
        PyErr_SetString(PyExc_ValueError, "bconv2d: bad dimensions");
        return NULL;
    }
    /* In 64 bits, then checked to fit the kernel's int arithmetic: the padded input, the
     * channel words and the taps of one window. */
    const int64_t hp = (int64_t)a.H + 2 * (int64_t)a.ph, wp = (int64_t)a.W + 2 * (int64_t)a.pw;
    const int64_t taps = (int64_t)a.KH * a.KW;
    if (hp > INT_MAX || wp > INT_MAX || taps > INT_MAX || a.C > INT_MAX - 64 ||
        a.O > INT_MAX - 64) {
        PyErr_SetString(PyExc_ValueError, "bconv2d: dimensions too large");
        return NULL;
    }
    a.Cw = (a.C + 63) / 64;
    if (hp < a.KH || wp < a.KW) {
        PyErr_SetString(PyExc_ValueError, "bconv2d: kernel larger than the padded input");
        return NULL;
    }
    a.Ho = (int)((hp - a.KH) / a.sh + 1);
    a.Wo = (int)((wp - a.KW) / a.sw + 1);
    const int64_t Ow = (a.O + 63) / 64;
    /* Per thread bconv_scratch (spaced), then the window offsets (2 x taps) that all
     * share; taps and O are below INT_MAX here, so these two do not overflow. */
    const int64_t stride = scratch_spaced(bconv_scratch(taps, a.O)), offsets = 2 * taps;
    int64_t npix, x_n, w_n, o_n, bits_n, scratch_n, scratch_b;
    if (!PRODUCT(npix, a.N, a.Ho, a.Wo) || !PRODUCT(x_n, a.N, a.H, a.W, a.Cw, 8) ||
        !PRODUCT(w_n, taps, a.Cw, a.O, 8) || !PRODUCT(o_n, npix, a.O, 4) ||
        !PRODUCT(bits_n, npix, Ow, 8) || !PRODUCT(scratch_n, stride, threads) ||
        scratch_n > INT64_MAX - offsets - 8 || !PRODUCT(scratch_b, scratch_n + offsets + 8, 8)) {
        PyErr_SetString(PyExc_ValueError, "bconv2d: dimensions too large");
        return NULL;
    }
    rows_job job = {&a, NULL, stride, (int64_t)a.N * a.Ho};
    Py_buffer b[8];
    int have[8] = {0};
    PyObject *ret = NULL;
    int64_t *scratch = NULL;
    Py_ssize_t nslope = 0;
    if (oslope != Py_None) {
        Py_buffer tmp;
        if (PyObject_GetBuffer(oslope, &tmp, PyBUF_C_CONTIGUOUS) < 0) return NULL;
        nslope = tmp.len;
        PyBuffer_Release(&tmp);
        if (nslope != 4 && nslope != (Py_ssize_t)a.O * 4) {
            PyErr_SetString(PyExc_ValueError, "bconv2d: slope needs 1 or O values");
            return NULL;
        }
        a.slope_n = (int)(nslope / 4);
    } else if (a.act == ACT_PRELU) {
        PyErr_SetString(PyExc_ValueError, "bconv2d: prelu needs slopes");
        return NULL;
    }
    if (get_buf(ox, &b[0], 0, npix ? x_n : 0, "x", &have[0]) ||
        get_buf(ow, &b[1], 0, w_n, "w", &have[1]) ||
        get_buf(oscale, &b[2], 0, (Py_ssize_t)a.O * 4, "scale", &have[2]) ||
        get_buf(oshift, &b[3], 0, (Py_ssize_t)a.O * 4, "shift", &have[3]) ||
        get_buf(ores, &b[4], 0, o_n, "residual", &have[4]) ||
        get_buf(oslope, &b[5], 0, nslope, "slope", &have[5]) ||
        get_buf(oout, &b[6], 1, o_n, "out", &have[6]) ||
        get_buf(obits, &b[7], 1, bits_n, "out_bits", &have[7]))
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
        /* Allocated here, with the GIL, so that a failure is a MemoryError. */
        scratch = PyMem_RawMalloc((size_t)scratch_b);
        if (scratch == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        job.scratch = scratch_line(scratch);
        bconv_set_offsets(&a, job.scratch + scratch_n);
        Py_BEGIN_ALLOW_THREADS
        team_run(threads, bconv_part, &job);
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyMem_RawFree(scratch);
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
    int64_t x_n, out_n;
    if (P < 0 || C < 1 || C > INT_MAX - 64 || threads < 1 || threads > MAX_THREADS) {
        PyErr_SetString(PyExc_ValueError, "pack_signs: bad dimensions");
        return NULL;
    }
    if (!PRODUCT(x_n, P, C, 4) || !PRODUCT(out_n, P, (C + 63) / 64, 8)) {
        PyErr_SetString(PyExc_ValueError, "pack_signs: dimensions too large");
        return NULL;
    }
    Py_buffer bx, bo;
    int hx = 0, ho = 0;
    PyObject *ret = NULL;
    if (get_buf(ox, &bx, 0, x_n, "x", &hx) || get_buf(oout, &bo, 1, out_n, "out", &ho))
        goto done;
    pack_job job = {bx.buf, P, C, bo.buf};
    Py_BEGIN_ALLOW_THREADS
    team_run(threads, pack_part, &job);
    Py_END_ALLOW_THREADS
    ret = Py_None;
    Py_INCREF(ret);
done:
    if (hx) PyBuffer_Release(&bx);
    if (ho) PyBuffer_Release(&bo);
    return ret;
}

/* A network run by a team: every member runs every operation on its part, and they meet
 * at a barrier after each one; with times, member 0 notes the clock there. */
typedef struct {
    const net_t *net;
    double *times; /* seconds per operation, or NULL */
} net_job;

typedef struct {
    team *t;
    int sense, tid;
    const net_job *job;
    struct timespec last;
} net_member;

static double seconds_since(struct timespec *last)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    const double s = (double)(now.tv_sec - last->tv_sec) + 1e-9 * (double)(now.tv_nsec - last->tv_nsec);
    *last = now;
    return s;
}

static void net_sync(void *ctx, int64_t i)
{
    net_member *m = ctx;
    team_barrier(m->t, &m->sense);
    if (m->job->times && m->tid == 0) m->job->times[i] += seconds_since(&m->last);
}

static void net_part_run(void *ctx, int tid, int n, team *t)
{
    const net_job *job = ctx;
    net_member m = {t, 0, tid, job, {0, 0}};
    if (job->times && tid == 0) clock_gettime(CLOCK_MONOTONIC, &m.last);
    const int sync = n > 1 || job->times;
    net_run(job->net, tid, n, sync ? net_sync : NULL, &m);
}

static PyObject *py_run_net(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *obj[7];
    int threads;
    if (!PyArg_ParseTuple(args, "OOOOOOiO", &obj[0], &obj[1], &obj[2], &obj[3], &obj[4],
                          &obj[5], &threads, &obj[6]))
        return NULL;
    if (threads < 1 || threads > MAX_THREADS) {
        PyErr_SetString(PyExc_ValueError, "run_net: bad thread count");
        return NULL;
    }
    /* ops, fp, wp, input, then the writable arena, bits and times */
    static const char *what[7] = {"ops", "fp", "wp", "arena", "bits", "input", "times"};
    static const Py_ssize_t item[7] = {8, 4, 8, 4, 8, 4, 8};
    static const int writable[7] = {0, 0, 0, 1, 1, 0, 1};
    Py_buffer b[7];
    int have[7] = {0};
    PyObject *ret = NULL;
    int64_t *scratch = NULL;
    for (int i = 0; i < 7; i++) {
        if (i == 6 && obj[i] == Py_None) break;
        const int flags = PyBUF_C_CONTIGUOUS | (writable[i] ? PyBUF_WRITABLE : 0);
        if (PyObject_GetBuffer(obj[i], &b[i], flags) < 0) goto done;
        have[i] = 1;
        if (b[i].len % item[i]) {
            PyErr_Format(PyExc_ValueError, "run_net: %s is not a whole number of items", what[i]);
            goto done;
        }
    }
    net_t net;
    memset(&net, 0, sizeof net);
    net.ops = b[0].buf, net.n_ops = b[0].len / 8 / NET_FIELDS;
    net.fp = b[1].buf, net.fp_n = b[1].len / 4;
    net.wp = b[2].buf, net.wp_n = b[2].len / 8;
    net.arena = b[3].buf, net.arena_n = b[3].len / 4;
    net.bits = b[4].buf, net.bits_n = b[4].len / 8;
    net.input = b[5].buf, net.input_n = b[5].len / 4;
    net.k = impl;
    if (b[0].len % (8 * NET_FIELDS)) {
        PyErr_SetString(PyExc_ValueError, "run_net: ops is not a whole number of rows");
        goto done;
    }
    if (have[6] && b[6].len / 8 != net.n_ops) {
        PyErr_SetString(PyExc_ValueError, "run_net: times needs one number per operation");
        goto done;
    }
    const char *bad = net_check(&net);
    if (bad) {
        PyErr_Format(PyExc_ValueError, "run_net: %s", bad);
        goto done;
    }
    int64_t scratch_b;
    net.scratch_stride = net_scratch(&net);
    if (net.scratch_stride < 0 || net.scratch_stride > INT64_MAX / 2 ||
        !PRODUCT(scratch_b, scratch_spaced(net.scratch_stride), threads, 8) ||
        scratch_b > INT64_MAX - 64) {
        PyErr_SetString(PyExc_ValueError, "run_net: dimensions too large");
        goto done;
    }
    net.scratch_stride = scratch_spaced(net.scratch_stride);
    /* Allocated here, with the GIL, so that a failure is a MemoryError. */
    scratch = PyMem_RawMalloc((size_t)scratch_b + 64);
    if (scratch == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    net.scratch = scratch_line(scratch);
    net_job job = {&net, have[6] ? b[6].buf : NULL};
    Py_BEGIN_ALLOW_THREADS
    team_run(threads, net_part_run, &job);
    Py_END_ALLOW_THREADS
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyMem_RawFree(scratch);
    for (int i = 0; i < 7; i++)
        if (have[i]) PyBuffer_Release(&b[i]);
    return ret;
}

static PyObject *py_popcount_peak(PyObject *Py_UNUSED(self), PyObject *args)
{
    long long iters;
    if (!PyArg_ParseTuple(args, "L", &iters)) return NULL;
    if (iters < 1) {
        PyErr_SetString(PyExc_ValueError, "popcount_peak: iterations must be positive");
        return NULL;
    }
    uint64_t r;
    Py_BEGIN_ALLOW_THREADS
    r = impl.popcount_peak(iters);
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLongLong(r);
}

static PyObject *py_kernel_name(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(args))
{
    return PyUnicode_FromString(impl_name);
}

static PyMethodDef methods[] = {
    {"bconv2d", py_bconv2d, METH_VARARGS,
     "bconv2d(x_bits, w_bits, (N, H, W, C, O), (KH, KW, sh, sw), (ph, pw), scale, shift, "
     "residual, act, lo, hi, slope, out, out_bits, threads)"},
    {"pack_signs", py_pack_signs, METH_VARARGS, "pack_signs(x, P, out, C, threads)"},
    {"run_net", py_run_net, METH_VARARGS,
     "run_net(ops, fp, wp, arena, bits, input, threads, times): a whole network (_net.h)"},
    {"popcount_peak", py_popcount_peak, METH_VARARGS,
     "popcount_peak(rounds): XOR-popcount-add on 8192 bits a round, in registers (roofline)"},
    {"kernel_name", py_kernel_name, METH_NOARGS, "the instruction set in use"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels", "Bit-packed kernels of the signgrad runtime.", -1,
    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void)
{
    select_impl();
    return PyModule_Create(&module);
}
