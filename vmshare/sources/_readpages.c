/*
 * vmshare.sources._readpages: reading many scattered ranges of one file
 * descriptor without a Python call per range (the scan reads again the pages
 * it compares, often one 4 KiB page per range: the call costs more than the
 * copy).
 *
 *   pread_ranges(fd, offsets, sizes, out, start) -> int
 *       reads sizes[i] bytes at file offset offsets[i] (int64 arrays), one
 *       range after the other into out, from range ``start`` on (out then
 *       begins at that range's bytes), with the GIL released; returns the
 *       index of the first range that failed (an error, or fewer bytes than
 *       asked: the caller reads it again its own way, to report why), or
 *       len(offsets) when all were read.
 *
 *   zero_pages(data, out) -> int
 *       the indices of the all-zero 4 KiB pages of ``data`` (whole pages),
 *       ascending, written into ``out`` (an int64 array of one slot per page),
 *       with the GIL released; returns how many. A page is rejected at its
 *       first non-zero word (most pages: the first), so a reader pays about
 *       one load per page that is not zero and a scan of the zero ones.
 *
 * Only I/O and finding zero pages in what was read: no parsing and no
 * decisions (the sources own what a failure or a zero page means).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <unistd.h>

static PyObject *
pread_ranges(PyObject *self, PyObject *args)
{
    int fd;
    Py_ssize_t start;
    Py_buffer off, size, out;
    if (!PyArg_ParseTuple(args, "iy*y*w*n", &fd, &off, &size, &out, &start))
        return NULL;
    Py_ssize_t n = off.len / 8;
    PyObject *result = NULL;
    if (off.len % 8 || size.len != off.len || start < 0 || start > n) {
        PyErr_SetString(PyExc_ValueError, "pread_ranges: offsets and sizes must be int64 "
                        "arrays of one length, start within them");
        goto done;
    }
    const int64_t *o = off.buf, *s = size.buf;
    int64_t total = 0;
    for (Py_ssize_t i = start; i < n; i++) {
        if (s[i] < 0 || o[i] < 0) {
            PyErr_SetString(PyExc_ValueError, "pread_ranges: negative offset or size");
            goto done;
        }
        total += s[i];
    }
    if (total > out.len) {
        PyErr_Format(PyExc_ValueError, "pread_ranges: %lld bytes asked, out holds %zd",
                     (long long)total, out.len);
        goto done;
    }
    Py_ssize_t i = start;
    char *dst = out.buf;
    Py_BEGIN_ALLOW_THREADS
    for (; i < n; i++) {
        int64_t got = 0;
        while (got < s[i]) {
            ssize_t r = pread(fd, dst + got, (size_t)(s[i] - got), (off_t)(o[i] + got));
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0)
                break;
            got += r;
        }
        if (got < s[i])
            break;
        dst += s[i];
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(i);
done:
    PyBuffer_Release(&off);
    PyBuffer_Release(&size);
    PyBuffer_Release(&out);
    return result;
}

#define PAGE_WORDS (4096 / 8)

static int
page_is_zero(const uint64_t *w)
{
    if (w[0] | w[PAGE_WORDS - 1])
        return 0;
    uint64_t acc = 0;
    for (int k = 0; k < PAGE_WORDS; k += 64) {      /* 512 bytes per step: vectorised */
        for (int j = 0; j < 64; j++)
            acc |= w[k + j];
        if (acc)
            return 0;
    }
    return 1;
}

static PyObject *
zero_pages(PyObject *self, PyObject *args)
{
    Py_buffer data, out;
    if (!PyArg_ParseTuple(args, "y*w*", &data, &out))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = data.len / 4096;
    if (data.len % 4096 || out.len < n * 8 || ((uintptr_t)data.buf % 8)
            || ((uintptr_t)out.buf % 8)) {
        PyErr_SetString(PyExc_ValueError, "zero_pages: data must be whole 4 KiB pages and "
                        "out an aligned int64 array of one slot per page");
        goto done;
    }
    const uint64_t *w = data.buf;
    int64_t *idx = out.buf;
    Py_ssize_t k = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        if (page_is_zero(w + i * PAGE_WORDS))
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
    {"pread_ranges", pread_ranges, METH_VARARGS,
     "pread_ranges(fd, offsets, sizes, out, start) -> index of the first range not read."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "vmshare.sources._readpages",
    .m_doc = "Scattered reads of one file descriptor and all-zero pages, the GIL released.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__readpages(void)
{
    return PyModule_Create(&module);
}
