/* The serving process's side of the events' encoding on the pipe to the accounting process,
   in C: moxy.accounting._packer (native build). Its `Packer` does exactly what
   moxy.accounting.packing's `Packer` does (the encoding is described there), which stays the
   reference and the fallback; tests/accounting/test_packing.py holds both side by side.

   Sessions hand a Packer each event's fields as the arguments of `put`, which packs them at
   once into the frames it keeps: no tuple is made, none waits in a list for its batch, and
   the fields' objects are free again as soon as the session lets them go. The clock's `take`
   returns the frames. Its only caller is the serving event loop, with the GIL held. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <marshal.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#include "_buffer.h"
#include "_packing.h"

#define KEEP (1 << 20) /* bytes of a Packer's buffer kept after a take; a larger one is freed */

static int put_length(Buffer *b, uint64_t n) {
    if (buffer_room(b, 10) < 0)
        return -1;
    while (n >= 0x80) {
        b->data[b->used++] = (char)((n & 0x7F) | 0x80);
        n >>= 7;
    }
    b->data[b->used++] = (char)n;
    return 0;
}

static int put_bytes(Buffer *b, const char *data, Py_ssize_t n) {
    if (put_length(b, (uint64_t)n) < 0 || buffer_room(b, n) < 0)
        return -1;
    memcpy(b->data + b->used, data, n);
    b->used += n;
    return 0;
}

static int put_text(Buffer *b, PyObject *text) {
    if (PyUnicode_IS_COMPACT_ASCII(text))
        return put_bytes(b, PyUnicode_DATA(text), PyUnicode_GET_LENGTH(text));
    Py_ssize_t n;
    const char *data = PyUnicode_AsUTF8AndSize(text, &n);
    if (data != NULL)
        return put_bytes(b, data, n);
    PyErr_Clear(); /* lone surrogates: encoded as Python's "surrogatepass" does */
    PyObject *encoded = PyUnicode_AsEncodedString(text, "utf-8", "surrogatepass");
    if (encoded == NULL)
        return -1;
    int status = put_bytes(b, PyBytes_AS_STRING(encoded), PyBytes_GET_SIZE(encoded));
    Py_DECREF(encoded);
    return status;
}

static int same_text(PyObject *a, PyObject *b) {
    if (a == b)
        return 1;
    Py_ssize_t n = PyUnicode_GET_LENGTH(a);
    int kind = PyUnicode_KIND(a);
    return n == PyUnicode_GET_LENGTH(b) && kind == PyUnicode_KIND(b)
           && memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), n * kind) == 0;
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

static int put_field(Buffer *b, PyObject *value) {
    if (buffer_room(b, 9) < 0)
        return -1;
    PyTypeObject *type = Py_TYPE(value);
    if (type == &PyUnicode_Type) {
        b->data[b->used++] = STR;
        return put_text(b, value);
    }
    if (type == &PyLong_Type) {
        int overflow;
        long long n = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (n == -1 && PyErr_Occurred())
            return -1;
        if (!overflow) {
            b->data[b->used++] = INT;
            uint64_t u = (uint64_t)n;
            for (int i = 0; i < 8; i++)
                b->data[b->used++] = (char)(u >> (8 * i));
            return 0;
        }
    } else if (type == &PyFloat_Type) {
        b->data[b->used++] = FLOAT;
#if PY_LITTLE_ENDIAN
        double x = PyFloat_AS_DOUBLE(value); /* IEEE 754 on every platform CPython runs on */
        memcpy(b->data + b->used, &x, 8);
#else
        if (PyFloat_Pack8(PyFloat_AS_DOUBLE(value), b->data + b->used, 1) < 0)
            return -1;
#endif
        b->used += 8;
        return 0;
    } else if (type == &PyTuple_Type && all_text(value)) {
        b->data[b->used++] = STRS;
        Py_ssize_t n = PyTuple_GET_SIZE(value);
        if (put_length(b, (uint64_t)n) < 0)
            return -1;
        for (Py_ssize_t i = 0; i < n; i++)
            if (put_text(b, PyTuple_GET_ITEM(value, i)) < 0)
                return -1;
        return 0;
    }
    PyObject *data = PyMarshal_WriteObjectToString(value, 4);
    if (data == NULL)
        return -1;
    b->data[b->used++] = OTHER;
    int status = put_bytes(b, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data));
    Py_DECREF(data);
    return status;
}

typedef struct {
    PyObject_HEAD
    Buffer out;
    Py_ssize_t head;     /* where the open frame's header is, or -1 */
    Py_ssize_t in_frame; /* entries in the open frame */
    Py_ssize_t entries, events, wake_at, limit, frame_entries, frame_bytes;
    char kind;
    int busy;
    PyObject *wake, *refuse, *pair;
    Py_ssize_t known;             /* fields of the entry before in this frame */
    PyObject *before[MAX_FIELDS]; /* its fields (or equal ones: see add_entry) */
} Packer;

static void forget(Packer *self, Py_ssize_t from) {
    for (Py_ssize_t i = from; i < self->known; i++)
        Py_CLEAR(self->before[i]);
    self->known = from;
}

static void seal(Packer *self) {
    if (self->head < 0)
        return;
    uint32_t n = (uint32_t)(self->out.used - self->head - 5);
    unsigned char *at = (unsigned char *)self->out.data + self->head + 1;
    at[0] = (unsigned char)(n >> 24);
    at[1] = (unsigned char)(n >> 16);
    at[2] = (unsigned char)(n >> 8);
    at[3] = (unsigned char)n;
    self->head = -1;
    forget(self, 0);
}

/* One entry, packed against the entry before it in the open frame (a new frame when none is
   open); 0, or -1 with an exception and nothing of it written: an entry that cannot be packed
   ends the frame it would have gone into (the comparisons' state is not kept half done). */
static int add_entry(Packer *self, PyObject *const *fields, Py_ssize_t n) {
    if (n < 1 || n > MAX_FIELDS) {
        PyErr_Format(PyExc_ValueError, "an event of %zd fields", n);
        return -1;
    }
    if (self->busy) { /* a destructor that emits, run by an allocation below */
        PyErr_SetString(PyExc_RuntimeError, "Packer entered again while packing");
        return -1;
    }
    self->busy = 1;
    Buffer *b = &self->out;
    Py_ssize_t start = b->used;
    int opened = self->head < 0;
    /* Room for the header, the count and a byte per field (a SAME), so that only a field
       written in full asks for more. */
    if (buffer_room(b, 6 + n) < 0)
        goto fail;
    if (opened) {
        self->head = b->used;
        b->data[b->used] = self->kind;
        b->used += 5;
        self->in_frame = 0;
    }
    b->data[b->used++] = (char)n;
    Py_ssize_t known = self->known;
    PyObject **before = self->before;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *value = fields[i];
        int same = i < known ? equal(value, before[i]) : 0;
        if (same > 0) {
            b->data[b->used++] = SAME; /* and `before[i]`, equal to it, stays */
            continue;
        }
        if (same < 0 || put_field(b, value) < 0 || buffer_room(b, n - i) < 0)
            goto fail;
        Py_INCREF(value);
        Py_XSETREF(before[i], value);
    }
    if (n > known)
        self->known = n;
    forget(self, n);
    self->entries++;
    PyObject *kind = fields[0];
    self->events += (kind == self->pair
                     || (PyUnicode_CheckExact(kind) && same_text(kind, self->pair))) ? 2 : 1;
    if (++self->in_frame >= self->frame_entries || b->used - self->head >= self->frame_bytes)
        seal(self);
    self->busy = 0;
    return 0;
fail:
    b->used = start;
    if (opened)
        self->head = -1;
    seal(self);
    forget(self, 0);
    self->busy = 0;
    return -1;
}

static PyObject *Packer_put(Packer *self, PyObject *const *args, Py_ssize_t nargs) {
    if (self->entries >= self->limit) {
        PyObject *fields = PyTuple_New(nargs);
        if (fields == NULL)
            return NULL;
        for (Py_ssize_t i = 0; i < nargs; i++) {
            Py_INCREF(args[i]);
            PyTuple_SET_ITEM(fields, i, args[i]);
        }
        PyObject *result = PyObject_CallOneArg(self->refuse, fields);
        Py_DECREF(fields);
        return result;
    }
    if (add_entry(self, args, nargs) < 0)
        return NULL;
    if (self->entries == self->wake_at)
        return PyObject_CallNoArgs(self->wake);
    Py_RETURN_NONE;
}

static PyObject *Packer_add(Packer *self, PyObject *fields) {
    if (!PyTuple_Check(fields)) {
        PyErr_SetString(PyExc_TypeError, "add() takes a tuple");
        return NULL;
    }
    Py_INCREF(fields); /* its items must outlive the call */
    int status = add_entry(self, &PyTuple_GET_ITEM(fields, 0), PyTuple_GET_SIZE(fields));
    Py_DECREF(fields);
    if (status < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Packer_take(Packer *self, PyObject *unused) {
    seal(self);
    PyObject *frames = PyBytes_FromStringAndSize(self->out.data, self->out.used);
    if (frames == NULL)
        return NULL;
    self->out.used = 0;
    self->entries = self->events = 0;
    if (self->out.size > KEEP) {
        PyMem_Free(self->out.data);
        self->out.data = NULL;
        self->out.size = 0;
    }
    return frames;
}

static int Packer_init(Packer *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"kind", "wake_at", "limit", "wake", "refuse", "pair",
                            "frame_entries", "frame_bytes", NULL};
    const char *kind;
    Py_ssize_t kind_size;
    PyObject *wake, *refuse, *pair;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y#nnOOUnn:Packer", names, &kind,
                                     &kind_size, &self->wake_at, &self->limit, &wake, &refuse,
                                     &pair, &self->frame_entries, &self->frame_bytes))
        return -1;
    if (kind_size != 1 || self->frame_entries < 1 || self->frame_bytes < 1) {
        PyErr_SetString(PyExc_ValueError, "Packer: a kind of one byte, frames of 1 or more");
        return -1;
    }
    self->kind = kind[0];
    Py_INCREF(wake);
    Py_XSETREF(self->wake, wake);
    Py_INCREF(refuse);
    Py_XSETREF(self->refuse, refuse);
    Py_INCREF(pair);
    Py_XSETREF(self->pair, pair);
    self->head = -1;
    return 0;
}

static int Packer_traverse(Packer *self, visitproc visit, void *arg) {
    Py_VISIT(self->wake);
    Py_VISIT(self->refuse);
    return 0;
}

static int Packer_clear(Packer *self) {
    Py_CLEAR(self->wake);
    Py_CLEAR(self->refuse);
    return 0;
}

static void Packer_dealloc(Packer *self) {
    PyObject_GC_UnTrack(self);
    Packer_clear(self);
    Py_CLEAR(self->pair);
    forget(self, 0);
    PyMem_Free(self->out.data);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Packer_entries(Packer *self, void *unused) {
    return PyLong_FromSsize_t(self->entries);
}

static PyObject *Packer_events(Packer *self, void *unused) {
    return PyLong_FromSsize_t(self->events);
}

static PyMethodDef Packer_methods[] = {
    {"put", (PyCFunction)(void (*)(void))Packer_put, METH_FASTCALL,
     "put(*fields): the entry packed (wake() when it is the wake_at-th) while fewer than "
     "limit are; else refuse(fields)"},
    {"add", (PyCFunction)Packer_add, METH_O, "add(fields: tuple): the entry packed"},
    {"take", (PyCFunction)Packer_take, METH_NOARGS,
     "take() -> bytes: the frames of the entries packed since the last take"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Packer_members[] = {
    {"limit", T_PYSSIZET, offsetof(Packer, limit), 0, "entries put packs at most"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef Packer_getset[] = {
    {"entries", (getter)Packer_entries, NULL, "entries packed since the last take", NULL},
    {"events", (getter)Packer_events, NULL, "... counting a `pair` entry as two", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PackerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "moxy.accounting._packer.Packer",
    .tp_basicsize = sizeof(Packer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "packing.Packer in C",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Packer_init,
    .tp_dealloc = (destructor)Packer_dealloc,
    .tp_traverse = (traverseproc)Packer_traverse,
    .tp_clear = (inquiry)Packer_clear,
    .tp_methods = Packer_methods,
    .tp_getset = Packer_getset,
    .tp_members = Packer_members,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "moxy.accounting._packer",
    "The serving process's packing of events for the accounting process's pipe, in C (see "
    "moxy.accounting.packing).",
    -1, NULL,
};

PyMODINIT_FUNC PyInit__packer(void) {
    if (PyType_Ready(&PackerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&PackerType);
    if (PyModule_AddObject(m, "Packer", (PyObject *)&PackerType) < 0) {
        Py_DECREF(&PackerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
