/*
 * vmshare.engine._pages: the engine's per-page inner loops in C.
 *
 * Python drives the algorithm (vmshare/engine/merge.py); what is here is only
 * the work done once per page, where a Python-level loop costs more than the
 * work itself:
 *
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

static void
zero_fn(unsigned char *dst, const unsigned char *x)
{
    /* all zero iff the first byte is zero and every byte equals the next */
    *dst = x[0] == 0 && memcmp(x, x + 1, PAGE - 1) == 0;
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

static PyMethodDef module_methods[] = {
    {"hash64", hash64, METH_VARARGS,
     "hash64(data, out): out[i] = xxh3_64 of page i of data (out: uint64 per page)."},
    {"hash64_at", hash64_at, METH_VARARGS,
     "hash64_at(data, idx, out): out[i] = xxh3_64 of page idx[i] of data (idx: int64)."},
    {"hash128", hash128, METH_VARARGS,
     "hash128(data, out): xxh3_128 of page i of data into out[2i] (low), out[2i+1] (high)."},
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
    if (PyModule_AddIntConstant(m, "PAGE_SIZE", PAGE) < 0 ||
            PyModule_AddObjectRef(m, "PageSet", (PyObject *)&PageSetType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
