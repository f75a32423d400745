/* The accounting process's side of the events' encoding on the pipe from the serving process,
   in C: moxy.accounting._frames (native build). `unpack(payload)` does exactly what
   moxy.accounting.packing's function of the same name does (the encoding is described there),
   which stays the reference and the fallback; tests/accounting/test_packing.py holds both side
   by side. It returns the list of tuples, or raises ValueError for a payload a Packer would
   not make. A field marked SAME is the very object of the event before. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <marshal.h>
#include <stdint.h>
#include <string.h>

#include "_packing.h"

typedef struct {
    const unsigned char *data;
    Py_ssize_t at, end;
} Reader;

static int bad(Reader *r, const char *what) {
    PyErr_Format(PyExc_ValueError, "not a packed payload: %s at byte %zd", what, r->at);
    return -1;
}

static int get_length(Reader *r, Py_ssize_t *out) {
    uint64_t n = 0;
    for (int shift = 0;; shift += 7) {
        if (r->at >= r->end || shift > 56)
            return bad(r, "a bad length");
        unsigned char byte = r->data[r->at++];
        n |= (uint64_t)(byte & 0x7F) << shift;
        if (byte < 0x80)
            break;
    }
    if (n > (uint64_t)(r->end - r->at))
        return bad(r, "a length past the end");
    *out = (Py_ssize_t)n;
    return 0;
}

static PyObject *get_text(Reader *r) {
    Py_ssize_t n;
    if (get_length(r, &n) < 0)
        return NULL;
    const unsigned char *data = r->data + r->at;
    r->at += n;
    Py_ssize_t i = 0;
    while (i < n && data[i] < 0x80)
        i++;
    if (i < n)
        return PyUnicode_DecodeUTF8((const char *)data, n, "surrogatepass");
    PyObject *text = PyUnicode_New(n, 127);
    if (text != NULL)
        memcpy(PyUnicode_DATA(text), data, n);
    return text;
}

static PyObject *get_field(Reader *r, int tag) {
    Py_ssize_t n;
    switch (tag) {
    case STR:
        return get_text(r);
    case INT:
    case FLOAT:
        if (r->end - r->at < 8) {
            bad(r, "a number past the end");
            return NULL;
        }
        r->at += 8;
        if (tag == FLOAT) {
            double x = PyFloat_Unpack8((const char *)r->data + r->at - 8, 1);
            return x == -1.0 && PyErr_Occurred() ? NULL : PyFloat_FromDouble(x);
        } else {
            uint64_t u = 0;
            for (int i = 7; i >= 0; i--)
                u = (u << 8) | r->data[r->at - 8 + i];
            return PyLong_FromLongLong((long long)u);
        }
    case STRS: {
        if (get_length(r, &n) < 0)
            return NULL;
        PyObject *tuple = PyTuple_New(n);
        for (Py_ssize_t i = 0; tuple != NULL && i < n; i++) {
            PyObject *text = get_text(r);
            if (text == NULL)
                Py_CLEAR(tuple);
            else
                PyTuple_SET_ITEM(tuple, i, text);
        }
        return tuple;
    }
    case OTHER: {
        if (get_length(r, &n) < 0)
            return NULL;
        PyObject *value = PyMarshal_ReadObjectFromString((const char *)r->data + r->at, n);
        r->at += n;
        if (value == NULL && !PyErr_ExceptionMatches(PyExc_ValueError)) {
            PyErr_Clear();
            bad(r, "a marshalled field that is not");
        }
        return value;
    }
    default:
        r->at--;
        bad(r, "an unknown tag");
        return NULL;
    }
}

static int unpack_into(Reader *r, PyObject *events) {
    PyObject *before = NULL;
    while (r->at < r->end) {
        Py_ssize_t n = r->data[r->at++];
        if (n == 0) {
            r->at--;
            return bad(r, "an event of no fields");
        }
        PyObject *event = PyTuple_New(n);
        if (event == NULL)
            return -1;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *value;
            if (r->at >= r->end) {
                bad(r, "the end inside an event");
                value = NULL;
            } else {
                int tag = r->data[r->at++];
                if (tag != SAME) {
                    value = get_field(r, tag);
                } else if (before == NULL || i >= PyTuple_GET_SIZE(before)) {
                    bad(r, "a field repeating one the event before lacks");
                    value = NULL;
                } else {
                    value = PyTuple_GET_ITEM(before, i);
                    Py_INCREF(value);
                }
            }
            if (value == NULL) {
                Py_DECREF(event);
                return -1;
            }
            PyTuple_SET_ITEM(event, i, value);
        }
        int status = PyList_Append(events, event);
        Py_DECREF(event); /* the list holds it */
        if (status < 0)
            return -1;
        before = event;
    }
    return 0;
}

static PyObject *unpack(PyObject *module, PyObject *payload) {
    Py_buffer view;
    if (PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Reader r = {view.buf, 0, view.len};
    PyObject *events = PyList_New(0);
    if (events != NULL && unpack_into(&r, events) < 0)
        Py_CLEAR(events);
    PyBuffer_Release(&view);
    return events;
}

static PyMethodDef methods[] = {
    {"unpack", unpack, METH_O, "unpack(payload) -> list: packing.unpack(payload)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "moxy.accounting._frames",
    "The events' encoding on the accounting process's pipe, in C (see "
    "moxy.accounting.packing).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__frames(void) { return PyModule_Create(&module); }
