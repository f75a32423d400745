/* The SMTP core's per-line and per-chunk work, in C: moxy.smtp._speedups (native build).

   - `has_bare_newline(region)` says whether the bytes `region` hold a CR or an LF that is not
     part of a CRLF: exactly `data.has_bare_newline(region)`, which removes every CRLF
     (`replace`, a copy of the chunk) and then looks for what is left (two `find`s). Here two
     memchr passes look at each CR's next byte and each LF's previous one, with no copy: about
     a fifth of the instructions on a 100-byte body, and no second copy of a large one.
     CRLF pairs cannot overlap, so "some CR or LF is left once every CRLF is removed" is the
     same as "some CR is not followed by an LF, or some LF is not preceded by a CR".
   - `cut_line(buf, limit)` and `cut_known(buf, known, limit)` are exactly
     `lines.cut_line` and `lines.cut_known`: the first line of a bytearray, cut out of it, for
     the command reader and the reply reader. One memchr, one bytes object, one deletion at
     the front (which a bytearray does by moving its start, without copying the rest).

   The Python functions stay the reference and the fallback; tests/smtp/test_data_speedups.py
   and tests/smtp/test_lines.py hold both side by side. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static PyObject *has_bare_newline(PyObject *self, PyObject *region) {
    if (!PyBytes_Check(region)) {
        PyErr_Format(PyExc_TypeError, "has_bare_newline() takes bytes, not %.100s",
                     Py_TYPE(region)->tp_name);
        return NULL;
    }
    const char *start = PyBytes_AS_STRING(region);
    const char *end = start + PyBytes_GET_SIZE(region);
    const char *p = start;
    while (p < end && (p = memchr(p, '\r', (size_t)(end - p))) != NULL) {
        if (p + 1 == end || p[1] != '\n')
            Py_RETURN_TRUE;
        p += 2;
    }
    p = start;
    while (p < end && (p = memchr(p, '\n', (size_t)(end - p))) != NULL) {
        if (p == start || p[-1] != '\r')
            Py_RETURN_TRUE;
        p += 1;
    }
    Py_RETURN_FALSE;
}

/* The index of the first LF of `buf` if it is below `limit`, else -1 (also for no LF). */
static Py_ssize_t first_lf(PyObject *buf, Py_ssize_t limit) {
    const char *start = PyByteArray_AS_STRING(buf);
    Py_ssize_t size = PyByteArray_GET_SIZE(buf);
    if (limit < size)
        size = limit;  /* an LF at `limit` or beyond does not count */
    if (size <= 0)
        return -1;
    const char *lf = memchr(start, '\n', (size_t)size);
    return lf == NULL ? -1 : lf - start;
}

static int buffer_and_limit(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want,
                            const char *name, Py_ssize_t *limit) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, want,
                     nargs);
        return -1;
    }
    if (!PyByteArray_Check(args[0])) {
        PyErr_Format(PyExc_TypeError, "%s() takes a bytearray, not %.100s", name,
                     Py_TYPE(args[0])->tp_name);
        return -1;
    }
    *limit = PyLong_AsSsize_t(args[want - 1]);
    return *limit == -1 && PyErr_Occurred() ? -1 : 0;
}

static PyObject *cut_line(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t limit;
    if (buffer_and_limit(args, nargs, 2, "cut_line", &limit) < 0)
        return NULL;
    PyObject *buf = args[0];
    Py_ssize_t lf = first_lf(buf, limit);
    if (lf < 0)
        Py_RETURN_NONE;
    const char *start = PyByteArray_AS_STRING(buf);
    PyObject *line = PyBytes_FromStringAndSize(start, lf > 0 && start[lf - 1] == '\r' ? lf - 1
                                                                                    : lf);
    if (line == NULL)
        return NULL;
    if (PySequence_DelSlice(buf, 0, lf + 1) < 0) {
        Py_DECREF(line);
        return NULL;
    }
    return line;
}

static PyObject *cut_known(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t limit;
    if (buffer_and_limit(args, nargs, 3, "cut_known", &limit) < 0)
        return NULL;
    PyObject *buf = args[0], *known = args[1];
    if (!PyDict_Check(known)) {
        PyErr_Format(PyExc_TypeError, "cut_known() takes a dict, not %.100s",
                     Py_TYPE(known)->tp_name);
        return NULL;
    }
    Py_ssize_t lf = first_lf(buf, limit);
    if (lf < 0)
        Py_RETURN_NONE;
    PyObject *key = PyBytes_FromStringAndSize(PyByteArray_AS_STRING(buf), lf + 1);
    if (key == NULL)
        return NULL;
    PyObject *value = PyDict_GetItemWithError(known, key);  /* borrowed */
    Py_DECREF(key);
    if (value == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    Py_INCREF(value);
    if (value != Py_None && PySequence_DelSlice(buf, 0, lf + 1) < 0) {
        Py_DECREF(value);
        return NULL;
    }
    return value;
}

static PyMethodDef methods[] = {
    {"has_bare_newline", has_bare_newline, METH_O,
     "has_bare_newline(region: bytes) -> bool: a CR or LF outside every CRLF"},
    {"cut_line", (PyCFunction)(void (*)(void))cut_line, METH_FASTCALL,
     "cut_line(buf: bytearray, limit: int) -> bytes | None: see moxy.smtp.lines"},
    {"cut_known", (PyCFunction)(void (*)(void))cut_known, METH_FASTCALL,
     "cut_known(buf: bytearray, known: dict, limit: int) -> object: see moxy.smtp.lines"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "moxy.smtp._speedups",
    "The SMTP core's per-line and per-chunk work in C (see moxy.smtp.data and "
    "moxy.smtp.lines).", -1, methods,
};

PyMODINIT_FUNC PyInit__speedups(void) { return PyModule_Create(&module); }
