/*
 * vmshare.engine._pages: the engine's per-page inner loops in C.
 *
 * Python drives the algorithm (vmshare/engine/merge.py); what is here is only
 * the work done once per page, where a Python-level loop costs more than the
 * work itself:
 *
 *   zero_pages(data, out)        indices of the all-zero pages (GIL released)
 *   hash64(data, out)            xxh3_64 of every 4 KiB page of a buffer
 *   hash64_at(data, idx, out)    the same for the pages listed in idx
 *   hash128(data, out)           xxh3_128 of every page (node fingerprints)
 *   PageSet(buffers, starts)     the current scan's fed runs, addressed by
 *                                global page position: equal() compares pages
 *                                byte for byte (memcmp), verify_groups()
 *                                compares groups with their first page and
 *                                fingerprints it in one read, is_zero(),
 *                                hash128(), page() returns a copy of one page.
 *
 * and, for content sketches (vmshare/prediction/sketch.py), keyed values:
 *
 *   siphash24(k0, k1, data)      SipHash-2-4 of a byte string (tests, reference)
 *   fp_values(data, k0, k1, out, sparse)
 *                                per page, SipHash-2-4 under (k0, k1) of the
 *                                xxh3_128 of its fingerprint: the 64-byte cache
 *                                lines at FP_OFFSETS (128 of its 4096 bytes);
 *                                sparse[i] = 1 when they are all zero
 *   repeated(values, min, out)   which values occur min or more times (a hash count)
 *   id_values(data, idx, k0, k1, out)
 *                                SipHash-2-4 under (k0, k1) of the xxh3_128 of
 *                                page idx[i] (low word, then high, little-endian)
 *
 * The buffers given to these two may be a file mapped read-only: a page of a
 * file that shrank since it was mapped raises SIGBUS when touched, which they
 * catch (only while their loop runs, only in their thread) and report as
 * OSError(EIO) naming the page, instead of the process dying.
 *
 * The hashes are XXH3_64bits / XXH3_128bits with seed 0 (libxxhash 0.8), the
 * same values python-xxhash's xxh3_64_intdigest gives (tests check it). A
 * 128-bit hash is stored as two uint64: low word, then high word.
 *
 * Every position and index is bounds-checked; a bad one raises IndexError
 * naming it. Loops over pages run with the GIL released. A PageSet holds its
 * buffers (PEP 3118 exports) until close() or deallocation, so the memory it
 * addresses cannot be freed or resized under it; close() while another thread
 * is inside one of its methods is refused.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#define PAGE 4096

static int
check_out(Py_buffer *out, Py_ssize_t items, Py_ssize_t itemsize, const char *what)
{
    if (out->len != items * itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: output holds %zd bytes, %zd needed",
                     what, out->len, items * itemsize);
        return -1;
    }
    return 0;
}

static int
check_pages(Py_buffer *data, const char *what)
{
    if (data->len % PAGE) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes is not a whole number of pages",
                     what, data->len);
        return -1;
    }
    return 0;
}

static inline void
store128(unsigned char *dst, const void *page)
{
    XXH128_hash_t h = XXH3_128bits(page, PAGE);
    memcpy(dst, &h.low64, 8);
    memcpy(dst + 8, &h.high64, 8);
}

/* One result of ``itemsize`` bytes per page of a buffer, computed by fn. */
typedef void (*page_fn)(unsigned char *dst, const unsigned char *page);

static void
hash64_fn(unsigned char *dst, const unsigned char *page)
{
    uint64_t h = XXH3_64bits(page, PAGE);
    memcpy(dst, &h, 8);
}

static void
hash128_fn(unsigned char *dst, const unsigned char *page)
{
    store128(dst, page);
}

static PyObject *
pages_each(PyObject *args, const char *name, Py_ssize_t itemsize, page_fn fn)
{
    Py_buffer data, out;
    if (!PyArg_ParseTuple(args, "y*w*", &data, &out))
        return NULL;
    PyObject *ret = NULL;
    Py_ssize_t n = data.len / PAGE;
    if (check_pages(&data, name) == 0 && check_out(&out, n, itemsize, name) == 0) {
        const unsigned char *src = data.buf;
        unsigned char *dst = out.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++)
            fn(dst + i * itemsize, src + i * PAGE);
        Py_END_ALLOW_THREADS
        ret = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    return ret;
}

static PyObject *
hash64(PyObject *self, PyObject *args)
{
    return pages_each(args, "hash64", 8, hash64_fn);
}

static PyObject *
hash128(PyObject *self, PyObject *args)
{
    return pages_each(args, "hash128", 16, hash128_fn);
}

static PyObject *
hash64_at(PyObject *self, PyObject *args)
{
    Py_buffer data, idx, out;
    if (!PyArg_ParseTuple(args, "y*y*w*:hash64_at", &data, &idx, &out))
        return NULL;
    PyObject *ret = NULL;
    Py_ssize_t n = idx.len / 8, npages = data.len / PAGE;
    if (check_pages(&data, "hash64_at") == 0 && check_out(&out, n, 8, "hash64_at") == 0 &&
            check_out(&idx, n, 8, "hash64_at index") == 0) {
        const unsigned char *src = data.buf;
        unsigned char *dst = out.buf;
        Py_ssize_t bad = -1;
        int64_t badv = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++) {
            int64_t p;
            memcpy(&p, (const unsigned char *)idx.buf + i * 8, 8);
            if (p < 0 || p >= npages) {
                bad = i;
                badv = p;
                break;
            }
            uint64_t h = XXH3_64bits(src + p * PAGE, PAGE);
            memcpy(dst + i * 8, &h, 8);
        }
        Py_END_ALLOW_THREADS
        if (bad >= 0)
            PyErr_Format(PyExc_IndexError, "hash64_at: index %lld (entry %zd) is outside "
                         "a buffer of %zd pages", (long long)badv, bad, npages);
        else
            ret = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&idx);
    PyBuffer_Release(&out);
    return ret;
}


/* ---- PageSet --------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    Py_ssize_t nruns;
    Py_buffer *bufs;        /* nruns exports, valid while open */
    int64_t *starts;        /* global position of each run's first page, ascending */
    int64_t *npages;
    int open;
    int busy;               /* methods running with the GIL released */
} PageSet;

static void
pageset_release(PageSet *ps)
{
    if (ps->bufs) {
        for (Py_ssize_t i = 0; i < ps->nruns; i++)
            PyBuffer_Release(&ps->bufs[i]);
        PyMem_Free(ps->bufs);
        ps->bufs = NULL;
    }
    PyMem_Free(ps->starts);
    PyMem_Free(ps->npages);
    ps->starts = ps->npages = NULL;
    ps->nruns = 0;
    ps->open = 0;
}

static void
pageset_dealloc(PageSet *ps)
{
    pageset_release(ps);
    Py_TYPE(ps)->tp_free((PyObject *)ps);
}

static int
pageset_init(PageSet *ps, PyObject *args, PyObject *kw)
{
    PyObject *buffers, *starts;
    static char *names[] = {"buffers", "starts", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO:PageSet", names, &buffers, &starts))
        return -1;
    if (ps->busy) {
        PyErr_SetString(PyExc_ValueError, "PageSet is in use by another thread");
        return -1;
    }
    pageset_release(ps);
    PyObject *bseq = PySequence_Fast(buffers, "PageSet: buffers must be a sequence");
    if (!bseq)
        return -1;
    PyObject *sseq = PySequence_Fast(starts, "PageSet: starts must be a sequence");
    if (!sseq) {
        Py_DECREF(bseq);
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(bseq);
    int rc = -1;
    if (PySequence_Fast_GET_SIZE(sseq) != n) {
        PyErr_Format(PyExc_ValueError, "PageSet: %zd buffers but %zd starts", n,
                     PySequence_Fast_GET_SIZE(sseq));
        goto done;
    }
    ps->bufs = PyMem_Calloc(n ? n : 1, sizeof(Py_buffer));
    ps->starts = PyMem_Calloc(n ? n : 1, sizeof(int64_t));
    ps->npages = PyMem_Calloc(n ? n : 1, sizeof(int64_t));
    if (!ps->bufs || !ps->starts || !ps->npages) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long long s = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(sseq, i));
        if (s == -1 && PyErr_Occurred())
            goto done;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(bseq, i), &ps->bufs[i],
                               PyBUF_SIMPLE) < 0)
            goto done;
        ps->nruns = i + 1;
        if (check_pages(&ps->bufs[i], "PageSet") < 0)
            goto done;
        ps->starts[i] = s;
        ps->npages[i] = ps->bufs[i].len / PAGE;
        if (s < 0 || (i > 0 && s < ps->starts[i - 1] + ps->npages[i - 1])) {
            PyErr_Format(PyExc_ValueError, "PageSet: run %zd starts at %lld, before the "
                         "end of the run before it (runs must be sorted and disjoint)",
                         i, s);
            goto done;
        }
    }
    ps->open = 1;
    rc = 0;
done:
    if (rc < 0)
        pageset_release(ps);
    Py_DECREF(bseq);
    Py_DECREF(sseq);
    return rc;
}

/* Address of the page at global position pos, or NULL if no run holds it. */
static inline const unsigned char *
locate(const PageSet *ps, int64_t pos)
{
    Py_ssize_t lo = 0, hi = ps->nruns;      /* last run with start <= pos */
    while (hi - lo > 1) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (ps->starts[mid] <= pos)
            lo = mid;
        else
            hi = mid;
    }
    if (ps->nruns == 0 || pos < ps->starts[lo] || pos >= ps->starts[lo] + ps->npages[lo])
        return NULL;
    return (const unsigned char *)ps->bufs[lo].buf + (pos - ps->starts[lo]) * PAGE;
}

static int
check_open(PageSet *ps)
{
    if (!ps->open) {
        PyErr_SetString(PyExc_ValueError, "PageSet is closed");
        return -1;
    }
    return 0;
}

static inline int64_t
pos_at(const Py_buffer *b, Py_ssize_t i)
{
    int64_t p;
    memcpy(&p, (const unsigned char *)b->buf + i * 8, 8);
    return p;
}

static void
set_bad_pos(const char *what, Py_ssize_t entry, int64_t pos)
{
    PyErr_Format(PyExc_IndexError, "PageSet.%s: position %lld (entry %zd) is in no fed run",
                 what, (long long)pos, entry);
}

static PyObject *
pageset_equal(PageSet *ps, PyObject *args)
{
    Py_buffer pa, pb, out;
    if (check_open(ps) < 0 || !PyArg_ParseTuple(args, "y*y*w*:equal", &pa, &pb, &out))
        return NULL;
    PyObject *ret = NULL;
    Py_ssize_t n = pa.len / 8;
    if (check_out(&pb, n, 8, "PageSet.equal positions") == 0 &&
            check_out(&pa, n, 8, "PageSet.equal positions") == 0 &&
            check_out(&out, n, 1, "PageSet.equal") == 0) {
        unsigned char *o = out.buf;
        Py_ssize_t bad = -1;
        int64_t badv = 0;
        ps->busy++;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++) {
            int64_t a = pos_at(&pa, i), b = pos_at(&pb, i);
            const unsigned char *x = locate(ps, a), *y = locate(ps, b);
            if (!x || !y) {
                bad = i;
                badv = x ? b : a;
                break;
            }
            o[i] = (x == y) || memcmp(x, y, PAGE) == 0;
        }
        Py_END_ALLOW_THREADS
        ps->busy--;
        if (bad >= 0)
            set_bad_pos("equal", bad, badv);
        else
            ret = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&pa);
    PyBuffer_Release(&pb);
    PyBuffer_Release(&out);
    return ret;
}

/* One result of ``itemsize`` bytes per position, computed by fn from the page. */
static PyObject *
pageset_each(PageSet *ps, PyObject *args, const char *name, Py_ssize_t itemsize, page_fn fn)
{
    Py_buffer pos, out;
    if (check_open(ps) < 0 || !PyArg_ParseTuple(args, "y*w*", &pos, &out))
        return NULL;
    PyObject *ret = NULL;
    Py_ssize_t n = pos.len / 8;
    if (check_out(&out, n, itemsize, name) == 0) {
        unsigned char *o = out.buf;
        Py_ssize_t bad = -1;
        ps->busy++;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++) {
            const unsigned char *x = locate(ps, pos_at(&pos, i));
            if (!x) {
                bad = i;
                break;
            }
            fn(o + i * itemsize, x);
        }
        Py_END_ALLOW_THREADS
        ps->busy--;
        if (bad >= 0)
            set_bad_pos(name + strlen("PageSet."), bad, pos_at(&pos, bad));
        else
            ret = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&pos);
    PyBuffer_Release(&out);
    return ret;
}

static inline uint64_t
load64(const unsigned char *p)
{
    uint64_t x;
    memcpy(&x, p, 8);              /* little-endian hosts only (x86-64, arm64) */
    return x;
}

/* all zero? Most pages are rejected by their first or last word, the rest
 * at the first 256 bytes that are not zero. */
static inline int
page_is_zero(const unsigned char *p)
{
    if (load64(p) | load64(p + PAGE - 8))
        return 0;
    for (int b = 0; b < PAGE; b += 256) {
        uint64_t any = 0;
        for (int w = 0; w < 256; w += 8)
            any |= load64(p + b + w);
        if (any)
            return 0;
    }
    return 1;
}

static void
zero_fn(unsigned char *dst, const unsigned char *x)
{
    *dst = (unsigned char)page_is_zero(x);
}


static PyObject *
pageset_is_zero(PageSet *ps, PyObject *args)
{
    return pageset_each(ps, args, "PageSet.is_zero", 1, zero_fn);
}

static PyObject *
pageset_hash128(PageSet *ps, PyObject *args)
{
    return pageset_each(ps, args, "PageSet.hash128", 16, hash128_fn);
}

/* verify_groups(pos, first, size, same, fp): group k is pos[first[k]:first[k]+size[k]].
 * same[k] = every page of the group is byte-identical to its first page; fp[k] =
 * xxh3_128 of that first page. The first page is read once and stays in cache
 * while its group is compared; the next page is prefetched. */
static PyObject *
pageset_verify_groups(PageSet *ps, PyObject *args)
{
    Py_buffer pos, first, size, same, fp;
    if (check_open(ps) < 0 || !PyArg_ParseTuple(args, "y*y*y*w*w*:verify_groups", &pos,
                                                &first, &size, &same, &fp))
        return NULL;
    PyObject *ret = NULL;
    Py_ssize_t n = pos.len / 8, g = first.len / 8;
    if (check_out(&size, g, 8, "PageSet.verify_groups size") == 0 &&
            check_out(&same, g, 1, "PageSet.verify_groups same") == 0 &&
            check_out(&fp, g, 16, "PageSet.verify_groups fp") == 0) {
        unsigned char *o = same.buf, *f = fp.buf;
        Py_ssize_t bad = -1;
        int64_t badv = 0;
        int bad_group = 0;
        ps->busy++;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t k = 0; k < g && bad < 0; k++) {
            int64_t b0 = pos_at(&first, k), b1 = b0 + pos_at(&size, k);
            if (b0 < 0 || b1 <= b0 || b1 > n) {
                bad_group = 1;
                bad = k;
                break;
            }
            const unsigned char *head = locate(ps, pos_at(&pos, b0));
            if (!head) {
                bad = b0;
                badv = pos_at(&pos, b0);
                break;
            }
            /* the next group's first page and this group's second are on their way
             * while this group's first is hashed */
            if (k + 1 < g) {
                int64_t nb = pos_at(&first, k + 1);
                const unsigned char *nh = (nb >= 0 && nb < n) ? locate(ps, pos_at(&pos, nb))
                                                              : NULL;
                if (nh)
                    __builtin_prefetch(nh);
            }
            if (b0 + 1 < b1) {
                const unsigned char *nx = locate(ps, pos_at(&pos, b0 + 1));
                if (nx)
                    __builtin_prefetch(nx);
            }
            store128(f + k * 16, head);
            int ok = 1;
            for (int64_t i = b0 + 1; i < b1; i++) {
                const unsigned char *x = locate(ps, pos_at(&pos, i));
                if (!x) {
                    bad = i;
                    badv = pos_at(&pos, i);
                    break;
                }
                if (i + 1 < b1) {
                    const unsigned char *nx = locate(ps, pos_at(&pos, i + 1));
                    if (nx)
                        __builtin_prefetch(nx);
                }
                if (ok && x != head && memcmp(x, head, PAGE) != 0)
                    ok = 0;
            }
            o[k] = ok;
        }
        Py_END_ALLOW_THREADS
        ps->busy--;
        if (bad_group)
            PyErr_Format(PyExc_IndexError, "PageSet.verify_groups: group %zd is empty or "
                         "reaches beyond the %zd positions", bad, n);
        else if (bad >= 0)
            set_bad_pos("verify_groups", bad, badv);
        else
            ret = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&pos);
    PyBuffer_Release(&first);
    PyBuffer_Release(&size);
    PyBuffer_Release(&same);
    PyBuffer_Release(&fp);
    return ret;
}

static PyObject *
pageset_page(PageSet *ps, PyObject *arg)
{
    if (check_open(ps) < 0)
        return NULL;
    long long p = PyLong_AsLongLong(arg);
    if (p == -1 && PyErr_Occurred())
        return NULL;
    const unsigned char *x = locate(ps, p);
    if (!x) {
        set_bad_pos("page", 0, p);
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)x, PAGE);
}

static PyObject *
pageset_close(PageSet *ps, PyObject *unused)
{
    if (ps->busy) {
        PyErr_SetString(PyExc_ValueError, "PageSet is in use by another thread");
        return NULL;
    }
    pageset_release(ps);
    Py_RETURN_NONE;
}

static PyMethodDef pageset_methods[] = {
    {"equal", (PyCFunction)pageset_equal, METH_VARARGS,
     "equal(pa, pb, out): out[i] = page pa[i] is byte-identical to page pb[i]\n"
     "(int64 positions, one byte out per pair)."},
    {"is_zero", (PyCFunction)pageset_is_zero, METH_VARARGS,
     "is_zero(pos, out): out[i] = page pos[i] is all zero bytes."},
    {"hash128", (PyCFunction)pageset_hash128, METH_VARARGS,
     "hash128(pos, out): xxh3_128 of page pos[i] into out[2i] (low), out[2i+1] (high)."},
    {"verify_groups", (PyCFunction)pageset_verify_groups, METH_VARARGS,
     "verify_groups(pos, first, size, same, fp): for group k = pos[first[k]:first[k]+size[k]]\n"
     "same[k] = all its pages equal its first, fp[k] = xxh3_128 of that first page."},
    {"page", (PyCFunction)pageset_page, METH_O, "page(pos) -> bytes: a copy of one page."},
    {"close", (PyCFunction)pageset_close, METH_NOARGS,
     "Release every buffer; later calls raise ValueError."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PageSetType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vmshare.engine._pages.PageSet",
    .tp_basicsize = sizeof(PageSet),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "PageSet(buffers, starts): pages of sorted, disjoint runs by global position.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)pageset_init,
    .tp_dealloc = (destructor)pageset_dealloc,
    .tp_methods = pageset_methods,
};


/* ---- content sketches: SipHash-2-4, fingerprints, identities ---------------- */

/* a page's fingerprint: two whole cache lines, its first and the one halfway
 * (a line costs one memory access whatever is used of it; two far apart tell
 * apart pages that differ in one part) */
#define FP_LINES 2
#define FP_BYTES 64
static const int FP_OFFSETS[FP_LINES] = {0, 2048};
/* pages ahead whose fingerprint lines are fetched while one is hashed */
#define FP_AHEAD 8

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                       \
    do {                                                               \
        v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);      \
        v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                         \
        v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                         \
        v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);      \
    } while (0)


static uint64_t
sip24(uint64_t k0, uint64_t k1, const unsigned char *m, size_t len)
{
    uint64_t v0 = k0 ^ 0x736F6D6570736575ULL, v1 = k1 ^ 0x646F72616E646F6DULL;
    uint64_t v2 = k0 ^ 0x6C7967656E657261ULL, v3 = k1 ^ 0x7465646279746573ULL;
    size_t full = len & ~(size_t)7;
    for (size_t i = 0; i < full; i += 8) {
        uint64_t w = load64(m + i);
        v3 ^= w;
        SIPROUND;
        SIPROUND;
        v0 ^= w;
    }
    uint64_t last = (uint64_t)(len & 0xFF) << 56;
    for (size_t i = 0; i < (len & 7); i++)
        last |= (uint64_t)m[full + i] << (8 * i);
    v3 ^= last;
    SIPROUND;
    SIPROUND;
    v0 ^= last;
    v2 ^= 0xFF;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

/* SIGBUS while a guarded loop runs in this thread jumps back to it. */
static __thread sigjmp_buf *bus_env;
static struct sigaction bus_prev;
static int bus_users;              /* guarded calls running; changed with the GIL held */

static void
on_bus(int sig, siginfo_t *info, void *ctx)
{
    if (bus_env)
        siglongjmp(*bus_env, 1);
    /* not ours: what was installed before (faulthandler, the default) */
    if (bus_prev.sa_flags & SA_SIGINFO) {
        bus_prev.sa_sigaction(sig, info, ctx);
    } else if (bus_prev.sa_handler != SIG_IGN && bus_prev.sa_handler != SIG_DFL) {
        bus_prev.sa_handler(sig);
    } else {
        signal(SIGBUS, SIG_DFL);
        raise(SIGBUS);
    }
}

static int
bus_guard_on(void)
{
    if (bus_users++ == 0) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_bus;
        sa.sa_flags = SA_SIGINFO;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGBUS, &sa, &bus_prev) < 0) {
            bus_users--;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
    }
    return 0;
}

static void
bus_guard_off(void)
{
    if (--bus_users == 0)
        sigaction(SIGBUS, &bus_prev, NULL);
}

static void
set_bus_error(const char *what, Py_ssize_t page)
{
    PyObject *msg = PyUnicode_FromFormat("%s: bus error reading page %zd of the buffer (a "
                                         "mapped file that shrank?)", what, page);
    if (!msg)
        return;
    PyObject *exc = PyObject_CallFunction(PyExc_OSError, "iO", EIO, msg);
    Py_DECREF(msg);
    if (exc) {
        PyErr_SetObject(PyExc_OSError, exc);
        Py_DECREF(exc);
    }
}

static PyObject *
siphash24_py(PyObject *self, PyObject *args)
{
    unsigned long long k0, k1;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "KKy*:siphash24", &k0, &k1, &data))
        return NULL;
    uint64_t h = sip24(k0, k1, data.buf, (size_t)data.len);
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLongLong(h);
}

/* One page's work in a guarded loop: the i-th result of a job. */
typedef struct {
    const unsigned char *src;
    const int64_t *idx;            /* the pages to read (id_values), NULL: every page */
    uint64_t k0, k1;
    uint64_t zero_id;              /* the value of an all-zero page (id_values) */
    unsigned char *out, *sparse;
} sketch_job;

static inline void
fp_step(const sketch_job *j, Py_ssize_t i, Py_ssize_t n)
{
    const unsigned char *page = j->src + i * PAGE;
    if (i + FP_AHEAD < n)
        for (int l = 0; l < FP_LINES; l++)
            __builtin_prefetch(page + FP_AHEAD * PAGE + FP_OFFSETS[l]);
    unsigned char fp[FP_LINES * FP_BYTES], h[16];
    uint64_t any = 0;
    for (int l = 0; l < FP_LINES; l++) {
        memcpy(fp + l * FP_BYTES, page + FP_OFFSETS[l], FP_BYTES);
        for (int w = 0; w < FP_BYTES / 8; w++)
            any |= load64(fp + l * FP_BYTES + 8 * w);
    }
    XXH128_hash_t x = XXH3_128bits(fp, sizeof fp);
    memcpy(h, &x.low64, 8);
    memcpy(h + 8, &x.high64, 8);
    uint64_t v = sip24(j->k0, j->k1, h, 16);
    memcpy(j->out + i * 8, &v, 8);
    j->sparse[i] = any == 0;
}

static inline void
id_step(const sketch_job *j, Py_ssize_t i, Py_ssize_t n)
{
    if (i + 1 < n)
        __builtin_prefetch(j->src + j->idx[i + 1] * PAGE);
    const unsigned char *page = j->src + j->idx[i] * PAGE;
    uint64_t v = j->zero_id;          /* an all-zero page: its value, known */
    if (!page_is_zero(page)) {
        unsigned char h[16];
        store128(h, page);
        v = sip24(j->k0, j->k1, h, 16);
    }
    memcpy(j->out + i * 8, &v, 8);
}

/* Runs the job's steps 0..n-1 with the GIL released and SIGBUS caught; 0, or -1
 * with OSError(EIO) naming the page that could not be read. */
static int
guarded_loop(const sketch_job *j, Py_ssize_t n, const char *what)
{
    if (bus_guard_on() < 0)
        return -1;
    volatile Py_ssize_t i = 0;
    volatile int bus = 0;
    sigjmp_buf env;
    Py_BEGIN_ALLOW_THREADS
    if (sigsetjmp(env, 1) == 0) {
        bus_env = &env;
        if (j->idx)
            for (; i < n; i++)
                id_step(j, i, n);
        else
            for (; i < n; i++)
                fp_step(j, i, n);
    } else {
        bus = 1;
    }
    bus_env = NULL;
    Py_END_ALLOW_THREADS
    bus_guard_off();
    if (bus) {
        set_bus_error(what, j->idx ? j->idx[i] : i);
        return -1;
    }
    return 0;
}

static PyObject *
fp_values(PyObject *self, PyObject *args)
{
    Py_buffer data, out, sparse;
    sketch_job j = {0};
    if (!PyArg_ParseTuple(args, "y*KKw*w*:fp_values", &data, &j.k0, &j.k1, &out, &sparse))
        return NULL;
    Py_ssize_t n = data.len / PAGE;
    int ok = check_pages(&data, "fp_values") == 0 && check_out(&out, n, 8, "fp_values") == 0
             && check_out(&sparse, n, 1, "fp_values sparse") == 0;
    if (ok) {
        j.src = data.buf;
        j.out = out.buf;
        j.sparse = sparse.buf;
        ok = guarded_loop(&j, n, "fp_values") == 0;
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    PyBuffer_Release(&sparse);
    return ok ? Py_NewRef(Py_None) : NULL;
}

static PyObject *
id_values(PyObject *self, PyObject *args)
{
    Py_buffer data, idx, out;
    sketch_job j = {0};
    if (!PyArg_ParseTuple(args, "y*y*KKw*:id_values", &data, &idx, &j.k0, &j.k1, &out))
        return NULL;
    Py_ssize_t n = idx.len / 8, npages = data.len / PAGE;
    int ok = check_pages(&data, "id_values") == 0 && check_out(&out, n, 8, "id_values") == 0
             && check_out(&idx, n, 8, "id_values index") == 0;
    j.idx = idx.buf;
    for (Py_ssize_t i = 0; ok && i < n; i++)
        if (j.idx[i] < 0 || j.idx[i] >= npages) {
            PyErr_Format(PyExc_IndexError, "id_values: index %lld (entry %zd) is outside "
                         "a buffer of %zd pages", (long long)j.idx[i], i, npages);
            ok = 0;
        }
    if (ok) {
        static const unsigned char zero[PAGE];
        unsigned char h[16];
        store128(h, zero);
        j.zero_id = sip24(j.k0, j.k1, h, 16);
        j.src = data.buf;
        j.out = out.buf;
        ok = guarded_loop(&j, n, "id_values") == 0;
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&idx);
    PyBuffer_Release(&out);
    return ok ? Py_NewRef(Py_None) : NULL;
}

/* repeated(values, min, out): out[i] = 1 when values[i] occurs min or more times
 * in values (an open-addressing count, O(n); values are keyed hashes, so their
 * high bits index the table well). */
static PyObject *
repeated(PyObject *self, PyObject *args)
{
    Py_buffer vals, out;
    Py_ssize_t least;
    if (!PyArg_ParseTuple(args, "y*nw*:repeated", &vals, &least, &out))
        return NULL;
    Py_ssize_t n = vals.len / 8;
    int ok = check_out(&vals, n, 8, "repeated values") == 0 &&
             check_out(&out, n, 1, "repeated") == 0;
    int bits = 4;
    while (ok && ((Py_ssize_t)1 << bits) < 2 * n)
        bits++;
    size_t size = (size_t)1 << bits;
    uint64_t *keys = ok ? PyMem_RawMalloc(size * sizeof(uint64_t)) : NULL;
    uint32_t *counts = ok ? PyMem_RawCalloc(size, sizeof(uint32_t)) : NULL;
    if (ok && (!keys || !counts)) {
        PyErr_NoMemory();
        ok = 0;
    }
    if (ok) {
        const uint64_t *v = vals.buf;
        unsigned char *o = out.buf;
        Py_BEGIN_ALLOW_THREADS
        for (int pass = 0; pass < 2; pass++)
            for (Py_ssize_t i = 0; i < n; i++) {
                size_t h = (size_t)((v[i] * 0x9E3779B97F4A7C15ULL) >> (64 - bits));
                while (counts[h] && keys[h] != v[i])
                    h = (h + 1) & (size - 1);
                if (pass == 0) {
                    keys[h] = v[i];
                    counts[h]++;
                } else {
                    o[i] = counts[h] >= (uint64_t)least;
                }
            }
        Py_END_ALLOW_THREADS
    }
    PyMem_RawFree(keys);
    PyMem_RawFree(counts);
    PyBuffer_Release(&vals);
    PyBuffer_Release(&out);
    return ok ? Py_NewRef(Py_None) : NULL;
}

/* zero_pages(data, out) -> k: the indices of the all-zero pages of data in out[:k] */
static PyObject *
zero_pages(PyObject *self, PyObject *args)
{
    Py_buffer data, out;
    if (!PyArg_ParseTuple(args, "y*w*", &data, &out))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = data.len / PAGE;
    if (data.len % PAGE || out.len < n * 8 || ((uintptr_t)out.buf % 8)) {
        PyErr_SetString(PyExc_ValueError, "zero_pages: data must be whole 4 KiB pages and "
                        "out an aligned int64 array of one slot per page");
        goto done;
    }
    const unsigned char *p = data.buf;
    int64_t *idx = out.buf;
    Py_ssize_t k = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        if (page_is_zero(p + i * PAGE))
            idx[k++] = i;
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(k);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef module_methods[] = {
    {"zero_pages", zero_pages, METH_VARARGS,
     "zero_pages(data, out) -> how many all-zero pages, their indices written to out."},
    {"hash64", hash64, METH_VARARGS,
     "hash64(data, out): out[i] = xxh3_64 of page i of data (out: uint64 per page)."},
    {"hash64_at", hash64_at, METH_VARARGS,
     "hash64_at(data, idx, out): out[i] = xxh3_64 of page idx[i] of data (idx: int64)."},
    {"hash128", hash128, METH_VARARGS,
     "hash128(data, out): xxh3_128 of page i of data into out[2i] (low), out[2i+1] (high)."},
    {"siphash24", siphash24_py, METH_VARARGS,
     "siphash24(k0, k1, data) -> int: SipHash-2-4 of data under the key words k0, k1."},
    {"fp_values", fp_values, METH_VARARGS,
     "fp_values(data, k0, k1, out, sparse): out[i] = SipHash-2-4 of the xxh3_128 of page\n"
     "i's fingerprint (the 64-byte lines at FP_OFFSETS), sparse[i] = it is all zero\n"
     "(out: uint64, sparse: uint8)."},
    {"repeated", repeated, METH_VARARGS,
     "repeated(values, min, out): out[i] = values[i] (uint64) occurs min or more times\n"
     "(out: uint8)."},
    {"id_values", id_values, METH_VARARGS,
     "id_values(data, idx, k0, k1, out): out[i] = SipHash-2-4 of the xxh3_128 of page\n"
     "idx[i] (idx: int64, out: uint64)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "vmshare.engine._pages",
    .m_doc = "Per-page inner loops of the userspace KSM engine (xxh3 hashing, memcmp).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__pages(void)
{
    if (PyType_Ready(&PageSetType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    PyObject *offs = Py_BuildValue("(ii)", FP_OFFSETS[0], FP_OFFSETS[1]);
    if (!offs || PyModule_AddObject(m, "FP_OFFSETS", offs) < 0) {
        Py_XDECREF(offs);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "PAGE_SIZE", PAGE) < 0 ||
            PyModule_AddObjectRef(m, "PageSet", (PyObject *)&PageSetType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
