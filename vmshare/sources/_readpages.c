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
 * Only I/O: no parsing and no decisions (the sources own what a failure
 * means). All-zero pages are found by vmshare.engine._pages.zero_pages.
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

static PyMethodDef module_methods[] = {
    {"pread_ranges", pread_ranges, METH_VARARGS,
     "pread_ranges(fd, offsets, sizes, out, start) -> index of the first range not read."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "vmshare.sources._readpages",
    .m_doc = "Scattered reads of one file descriptor, the GIL released.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__readpages(void)
{
    return PyModule_Create(&module);
}
