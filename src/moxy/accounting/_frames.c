/* The events' encoding on the pipe to the accounting process, in C: moxy.accounting._frames
   (native build). `pack(events)` and `unpack(payload)` do exactly what
   moxy.accounting.packing's functions of the same names do (the encoding is described
   there); those stay the reference and the fallback, and tests/accounting/test_packing.py
   holds both side by side.

   - `pack(events)` takes a list of tuples and returns the payload, or None when an entry is
     not a tuple or has no fields or more than 255 (Python then packs the list, and refuses
     it). It writes into one buffer kept from call to call: the serving process's event loop
     is its only caller, with the GIL held.
   - `unpack(payload)` returns the list of tuples, or raises ValueError for a payload `pack`
     would not make. A field marked SAME is the very object of the event before. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <marshal.h>
#include <stdint.h>
#include <string.h>

enum { SAME, STR, INT, FLOAT, STRS, OTHER };
#define MAX_FIELDS 255
#define KEEP (1 << 20) /* bytes of buffer kept between calls; a larger one is freed */

static char *buffer;
static Py_ssize_t size, used;

static int room(Py_ssize_t more) {
    if (used + more <= size)
        return 0;
    Py_ssize_t want = size ? size * 2 : 16384;
    while (want < used + more)
        want *= 2;
    char *data = PyMem_Realloc(buffer, want);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    buffer = data;
    size = want;
    return 0;
}

static int put_length(uint64_t n) {
    if (room(10) < 0)
        return -1;
    while (n >= 0x80) {
        buffer[used++] = (char)((n & 0x7F) | 0x80);
        n >>= 7;
    }
    buffer[used++] = (char)n;
    return 0;
}

static int put_bytes(const char *data, Py_ssize_t n) {
    if (put_length((uint64_t)n) < 0 || room(n) < 0)
        return -1;
    memcpy(buffer + used, data, n);
    used += n;
    return 0;
}

static int put_text(PyObject *text) {
    if (PyUnicode_IS_COMPACT_ASCII(text))
        return put_bytes(PyUnicode_DATA(text), PyUnicode_GET_LENGTH(text));
    Py_ssize_t n;
    const char *data = PyUnicode_AsUTF8AndSize(text, &n);
    if (data != NULL)
        return put_bytes(data, n);
    PyErr_Clear(); /* lone surrogates: encoded as Python's "surrogatepass" does */
    PyObject *encoded = PyUnicode_AsEncodedString(text, "utf-8", "surrogatepass");
    if (encoded == NULL)
        return -1;
    int status = put_bytes(PyBytes_AS_STRING(encoded), PyBytes_GET_SIZE(encoded));
    Py_DECREF(encoded);
    return status;
}

static int same_text(PyObject *a, PyObject *b) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(a);
    int kind = PyUnicode_KIND(a);
    return a == b || (n == PyUnicode_GET_LENGTH(b) && kind == PyUnicode_KIND(b)
                      && memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), n * kind) == 0);
}

static int all_text(PyObject *tuple) {
    for (Py_ssize_t i = 0, n = PyTuple_GET_SIZE(tuple); i < n; i++)
        if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(tuple, i)))
            return 0;
    return 1;
}

/* packing._equal: 1, 0, or -1 with an exception (comparing two ints cannot fail). */
static int equal(PyObject *value, PyObject *before) {
    if (value == before)
        return 1;
    PyTypeObject *type = Py_TYPE(value);
    if (type != Py_TYPE(before))
        return 0;
    if (type == &PyUnicode_Type)
        return same_text(value, before);
    if (type == &PyLong_Type) {  /* sizes and reply codes: within a long long, compared so */
        int overflow_a, overflow_b;
        long long a = PyLong_AsLongLongAndOverflow(value, &overflow_a);
        long long b = PyLong_AsLongLongAndOverflow(before, &overflow_b);
        if (!overflow_a && !overflow_b)
            return a == b;
        return PyObject_RichCompareBool(value, before, Py_EQ);
    }
    if (type != &PyTuple_Type)
        return 0;
    Py_ssize_t n = PyTuple_GET_SIZE(value);
    if (n != PyTuple_GET_SIZE(before))
        return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *a = PyTuple_GET_ITEM(value, i), *b = PyTuple_GET_ITEM(before, i);
        if (!PyUnicode_CheckExact(a) || !PyUnicode_CheckExact(b) || !same_text(a, b))
            return 0;
    }
    return 1;
}

static int put_field(PyObject *value) {
    if (room(9) < 0)
        return -1;
    PyTypeObject *type = Py_TYPE(value);
    if (type == &PyUnicode_Type) {
        buffer[used++] = STR;
        return put_text(value);
    }
    if (type == &PyLong_Type) {
        int overflow;
        long long n = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (n == -1 && PyErr_Occurred())
            return -1;
        if (!overflow) {
            buffer[used++] = INT;
            uint64_t u = (uint64_t)n;
            for (int i = 0; i < 8; i++)
                buffer[used++] = (char)(u >> (8 * i));
            return 0;
        }
    } else if (type == &PyFloat_Type) {
        buffer[used++] = FLOAT;
#if PY_LITTLE_ENDIAN
        double x = PyFloat_AS_DOUBLE(value); /* IEEE 754 on every platform CPython runs on */
        memcpy(buffer + used, &x, 8);
#else
        if (PyFloat_Pack8(PyFloat_AS_DOUBLE(value), buffer + used, 1) < 0)
            return -1;
#endif
        used += 8;
        return 0;
    } else if (type == &PyTuple_Type && all_text(value)) {
        buffer[used++] = STRS;
        Py_ssize_t n = PyTuple_GET_SIZE(value);
        if (put_length((uint64_t)n) < 0)
            return -1;
        for (Py_ssize_t i = 0; i < n; i++)
            if (put_text(PyTuple_GET_ITEM(value, i)) < 0)
                return -1;
        return 0;
    }
    PyObject *data = PyMarshal_WriteObjectToString(value, 4);
    if (data == NULL)
        return -1;
    buffer[used++] = OTHER;
    int status = put_bytes(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data));
    Py_DECREF(data);
    return status;
}

static PyObject *pack_list(PyObject *events) {
    /* The event being packed and the one before are held: marshal, for an odd field, can
       free objects, and a destructor can run Python code. */
    PyObject *before = NULL, *event = NULL, *payload = NULL;
    used = 0;
    for (Py_ssize_t e = 0; e < PyList_GET_SIZE(events); e++) {
        event = PyList_GET_ITEM(events, e);
        Py_INCREF(event);
        Py_ssize_t n = PyTuple_Check(event) ? PyTuple_GET_SIZE(event) : 0;
        if (n < 1 || n > MAX_FIELDS) {
            payload = Py_None; /* Python packs it (and refuses what is not an event) */
            Py_INCREF(payload);
            goto done;
        }
        if (room(1) < 0)
            goto done;
        buffer[used++] = (char)n;
        Py_ssize_t known = before == NULL ? 0 : PyTuple_GET_SIZE(before);
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *value = PyTuple_GET_ITEM(event, i);
            int same = i < known ? equal(value, PyTuple_GET_ITEM(before, i)) : 0;
            if (same < 0)
                goto done;
            if (same) {
                if (room(1) < 0)
                    goto done;
                buffer[used++] = SAME;
            } else if (put_field(value) < 0) {
                goto done;
            }
        }
        Py_XSETREF(before, event);
        event = NULL;
    }
    payload = PyBytes_FromStringAndSize(buffer, used);
done:
    Py_XDECREF(event);
    Py_XDECREF(before);
    return payload;
}

static PyObject *pack(PyObject *module, PyObject *events) {
    if (!PyList_CheckExact(events)) {
        PyErr_SetString(PyExc_TypeError, "pack() takes a list");
        return NULL;
    }
    PyObject *payload = pack_list(events);
    if (size > KEEP) {
        PyMem_Free(buffer);
        buffer = NULL;
        size = 0;
    }
    used = 0;
    return payload;
}

/* --- unpack ------------------------------------------------------------------------------ */

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
    {"pack", pack, METH_O,
     "pack(events: list) -> bytes | None: packing.pack(events), or None where Python must "
     "pack the list"},
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
