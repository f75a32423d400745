/* The body check's scan, in C: moxy.smtp._speedups (native build).

   `has_bare_newline(region)` says whether the bytes `region` hold a CR or an LF that is not
   part of a CRLF: exactly `data.has_bare_newline(region)`, which removes every CRLF
   (`replace`, a copy of the chunk) and then looks for what is left (two `find`s). Here two
   memchr passes look at each CR's next byte and each LF's previous one, with no copy: about a
   fifth of the instructions on a 100-byte body, and no second copy of a large one.

   CRLF pairs cannot overlap, so "some CR or LF is left once every CRLF is removed" is the same
   as "some CR is not followed by an LF, or some LF is not preceded by a CR". The Python
   function stays the reference and the fallback; tests/smtp/test_data_speedups.py holds both
   side by side. */

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

static PyMethodDef methods[] = {
    {"has_bare_newline", has_bare_newline, METH_O,
     "has_bare_newline(region: bytes) -> bool: a CR or LF outside every CRLF"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "moxy.smtp._speedups",
    "The DATA body check's scan in C (see moxy.smtp.data).", -1, methods,
};

PyMODINIT_FUNC PyInit__speedups(void) { return PyModule_Create(&module); }
