/* The accounting process's other hot loops, in C: moxy.accounting._speedups (native build).
   (The message log's lines are moxy.accounting._loglines.)

   - `expand(emitted, cls, marker)` returns exactly `events.expand(emitted)`'s list (`cls` is
     DeliveryEvent, `marker` LEG_AND_MESSAGE), or None where it leaves the list to Python (an
     entry that is not a tuple, or a LEG_AND_MESSAGE entry of the wrong length).
   - `sum_known(batch, sums, start)` is the Redis sink's loop, `counters.sum_known`: it adds
     each event to its sum of messages and bytes (keyed by minute and tally) while that sum
     exists, and returns the index of the first event that needs a new one. It may also stop
     at an event it leaves to Python (a field of an unexpected type, an unhashable one); the
     sink handles that event in Python and calls it again after it. An event whose tally
     fields are the very objects of the event before (and of the same minute and outcome)
     adds to that event's sum without a key made and looked up (`Last`).

   The Python functions stay the reference and the fallback (a pure-Python installation runs
   them); tests/accounting/test_speedups.py holds both side by side on generated events. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

#define FIELDS 18
/* Fields of a DeliveryEvent (moxy.accounting.events._Fields), in order. */
enum { KIND, SESSION, MESSAGE_ID, CLIENT, HELO, FROM, RECIPIENTS, DEST, ROUTE, SIZE, CODE,
       REPLY, STAGE, DURATION, NODE, REASON, TLS, TIME };

/* Constants of the events expand makes (interned, as Python's literals are). */
static PyObject *LEG, *MESSAGE, *DASH, *END_OF_DATA, *EMPTY;

/* A `cls` instance (a tuple subclass) holding `n` items, each a new reference taken from
   `items`: what tuple.__new__(cls, items) makes. */
static PyObject *event_of(PyTypeObject *cls, PyObject **items, Py_ssize_t n) {
    PyObject *event = cls->tp_alloc(cls, n);
    if (event == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_INCREF(items[i]);
        PyTuple_SET_ITEM(event, i, items[i]);
    }
    return event;
}

static PyObject *expand(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyType_Check(args[1]) ||
        !PyType_IsSubtype((PyTypeObject *)args[1], &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "expand(emitted, cls, marker): cls a tuple subclass");
        return NULL;
    }
    PyTypeObject *cls = (PyTypeObject *)args[1];
    PyObject *marker = args[2];
    PyObject *emitted = PySequence_Fast(args[0], "expand() takes a sequence of entries");
    if (emitted == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(emitted);
    PyObject **entries = PySequence_Fast_ITEMS(emitted);
    PyObject *events = PyList_New(0);
    if (events == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *entry = entries[i];
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) == 0)
            goto to_python;
        PyObject **f = &PyTuple_GET_ITEM(entry, 0);
        Py_ssize_t n = PyTuple_GET_SIZE(entry);
        int both = f[0] == marker ? 1 : PyObject_RichCompareBool(f[0], marker, Py_EQ);
        if (both < 0)
            goto fail;
        PyObject *event;
        if (!both) {
            event = event_of(cls, f, n);
            if (event == NULL || PyList_Append(events, event) < 0) {
                Py_XDECREF(event);
                goto fail;
            }
            Py_DECREF(event);
            continue;
        }
        if (n != FIELDS + 4)
            goto to_python;
        /* The entry: the message's 18 fields (the client's tls) with the leg's size, code and
           reply, then the message's size, code and reply, and the leg's tls (events.py). */
        PyObject *leg[FIELDS], *message[FIELDS];
        memcpy(leg, f, sizeof leg);
        leg[KIND] = LEG;
        leg[TLS] = f[FIELDS + 3];
        memcpy(message, f, sizeof message);
        message[KIND] = MESSAGE;
        message[DEST] = DASH;
        message[SIZE] = f[FIELDS];
        message[CODE] = f[FIELDS + 1];
        message[REPLY] = f[FIELDS + 2];
        message[STAGE] = END_OF_DATA;
        message[REASON] = EMPTY;
        for (int which = 0; which < 2; which++) {
            event = event_of(cls, which ? message : leg, FIELDS);
            if (event == NULL || PyList_Append(events, event) < 0) {
                Py_XDECREF(event);
                goto fail;
            }
            Py_DECREF(event);
        }
    }
    Py_DECREF(emitted);
    return events;
to_python:
    Py_DECREF(events);
    Py_DECREF(emitted);
    Py_RETURN_NONE;
fail:
    Py_XDECREF(events);
    Py_DECREF(emitted);
    return NULL;
}

/* The outcomes of counters.tally (interned, as Python's literals are), and 1. */
static PyObject *LEG_KIND, *REFUSED_KIND, *DELIVERED, *LEG_REFUSED, *RCPT_REFUSED, *ONE, *SIXTY;

/* Python's float floor division by 60 (floatobject.c, _float_div_mod), so that a minute here
   is the minute `int(time // 60)` makes. */
static double minute_of(double t) {
    double mod = fmod(t, 60.0);
    double div = (t - mod) / 60.0;
    if (mod) {
        if (mod < 0)
            div -= 1.0;
    }
    if (div) {
        double floordiv = floor(div);
        if (div - floordiv > 0.5)
            floordiv += 1.0;
        return floordiv;
    }
    return copysign(0.0, t / 60.0);
}

/* minute_of for events of the minute before, without fmod (about 470 instructions a call):
   the events of a batch nearly all fall into one minute. Kept only for times from 1970 to
   about 33,000 AD, where 60 * m is exact and `t // 60` is m exactly when 60m <= t < 60(m+1).
   The GIL is held: one thread at a time. */
static double known_minute = 0.0, known_from = 1.0, known_until = 0.0;

static inline double minute_of_cached(double t) {
    if (t >= known_from && t < known_until)
        return known_minute;
    double minute = minute_of(t);
    if (t >= 60.0 && t < 1e12) {
        known_minute = minute;
        known_from = minute * 60.0;
        known_until = (minute + 1.0) * 60.0;
    }
    return minute;
}

/* The sum the last event of this call was added to, and what its key was made of. The next
   event whose key is made of the very same objects (and minute) adds to it without a key
   made and looked up: consecutive events from one sender, client and destination share those
   objects (moxy.accounting.packing hands on a repeated field as the same object). Only set
   from a key of exact str and tuple-of-str parts, whose lookup runs no Python code, and
   forgotten at every lookup: so no Python code runs between its setting and its use. */
typedef struct {
    PyObject *entry; /* borrowed from `sums`, or NULL */
    PyObject *owner; /* the event whose fields these are: held, so they stay what they are */
    double minute;
    PyObject *outcome, *dest, *recipients, *from, *client, *node;
} Last;

static int exact_text(PyObject *value) {
    if (PyUnicode_CheckExact(value))
        return 1;
    if (!PyTuple_CheckExact(value))
        return 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(value); i++)
        if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(value, i)))
            return 0;
    return 1;
}

/* counters.sum_known for one event: 1 when it was added (or counts nothing), 0 when it needs
   Python (no sum yet, or a field of an unexpected type). Never raises. */
static int add_known(PyObject *sums, PyObject *event, Last *last) {
    if (!PyTuple_Check(event) || PyTuple_GET_SIZE(event) < FIELDS)
        return 0;
    PyObject **f = &PyTuple_GET_ITEM(event, 0);
    PyObject *kind = f[KIND], *outcome;
    if (!PyUnicode_CheckExact(kind))
        return 0;
    if (kind == LEG_KIND || PyUnicode_Compare(kind, LEG_KIND) == 0) {
        if (!PyLong_CheckExact(f[CODE]))
            return 0;
        int overflow;
        long code = PyLong_AsLongAndOverflow(f[CODE], &overflow);
        if (overflow || (code == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return 0;
        }
        outcome = 200 <= code && code < 300 ? DELIVERED : LEG_REFUSED;
    } else if (kind == REFUSED_KIND || PyUnicode_Compare(kind, REFUSED_KIND) == 0) {
        outcome = RCPT_REFUSED;
    } else {
        return 1;  /* counts nothing */
    }
    if (!PyLong_CheckExact(f[SIZE]))
        return 0;
    PyObject *minute, *entry;
    double minute_value = 0.0;
    int by_float = PyFloat_CheckExact(f[TIME]);
    if (by_float) {
        double t = PyFloat_AS_DOUBLE(f[TIME]);
        if (!isfinite(t))
            return 0;
        minute_value = minute_of_cached(t);
        if (last->entry != NULL && minute_value == last->minute && outcome == last->outcome &&
            f[DEST] == last->dest && f[RECIPIENTS] == last->recipients &&
            f[FROM] == last->from && f[CLIENT] == last->client && f[NODE] == last->node) {
            entry = last->entry;
            goto add;
        }
        minute = PyLong_FromDouble(minute_value);
    } else if (PyLong_CheckExact(f[TIME])) {
        minute = PyNumber_FloorDivide(f[TIME], SIXTY);
    } else {
        return 0;
    }
    if (minute == NULL) {
        PyErr_Clear();
        return 0;
    }
    PyObject *key = PyTuple_Pack(7, minute, outcome, f[DEST], f[RECIPIENTS], f[FROM], f[CLIENT],
                                 f[NODE]);
    Py_DECREF(minute);
    if (key == NULL) {
        PyErr_Clear();
        return 0;
    }
    last->entry = NULL;
    entry = PyDict_GetItemWithError(sums, key);  /* borrowed */
    Py_DECREF(key);
    if (entry == NULL || !PyList_CheckExact(entry) || PyList_GET_SIZE(entry) < 2 ||
        !PyLong_CheckExact(PyList_GET_ITEM(entry, 0)) ||
        !PyLong_CheckExact(PyList_GET_ITEM(entry, 1))) {
        PyErr_Clear();
        return 0;  /* ints only: no Python code runs while the entry is borrowed */
    }
    if (by_float && exact_text(f[DEST]) && exact_text(f[RECIPIENTS]) && exact_text(f[FROM]) &&
        exact_text(f[CLIENT]) && exact_text(f[NODE])) {
        Py_INCREF(event);
        Py_XDECREF(last->owner);
        *last = (Last){entry, event, minute_value, outcome, f[DEST], f[RECIPIENTS], f[FROM],
                       f[CLIENT], f[NODE]};
    }
add:
    PyObject *count = PyNumber_Add(PyList_GET_ITEM(entry, 0), ONE);
    PyObject *bytes = count ? PyNumber_Add(PyList_GET_ITEM(entry, 1), f[SIZE]) : NULL;
    if (bytes == NULL) {
        Py_XDECREF(count);
        PyErr_Clear();
        return 0;
    }
    PyList_SetItem(entry, 0, count);  /* steals, releases the old */
    PyList_SetItem(entry, 1, bytes);
    return 1;
}

static PyObject *sum_known(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyDict_Check(args[1]) || !PyLong_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "sum_known(batch, sums, start): sums a dict, start an int");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[2]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    PyObject *batch = PySequence_Fast(args[0], "sum_known() takes a sequence of events");
    if (batch == NULL)
        return NULL;
    Py_ssize_t i = start < 0 ? 0 : start;
    Last last = {NULL};
    /* The size and items are read again each time: a key's __eq__ is Python code. */
    for (; i < PySequence_Fast_GET_SIZE(batch); i++) {
        PyObject *event = PySequence_Fast_GET_ITEM(batch, i);
        Py_INCREF(event);
        int done = add_known(args[1], event, &last);
        Py_DECREF(event);
        if (!done)
            break;
    }
    Py_XDECREF(last.owner);
    Py_DECREF(batch);
    return PyLong_FromSsize_t(i);
}

static PyMethodDef methods[] = {
    {"expand", (PyCFunction)(void (*)(void))expand, METH_FASTCALL,
     "expand(emitted, cls, marker) -> list | None: events.expand(emitted), or None where "
     "Python must expand the list"},
    {"sum_known", (PyCFunction)(void (*)(void))sum_known, METH_FASTCALL,
     "sum_known(batch, sums, start) -> int: counters.sum_known, stopping also at an event "
     "Python must count"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "moxy.accounting._speedups",
    "The accounting process's event and counter loops in C (see moxy.accounting.events and "
    "moxy.accounting.counters).", -1, methods,
};

PyMODINIT_FUNC PyInit__speedups(void) {
    LEG = PyUnicode_InternFromString("leg");
    MESSAGE = PyUnicode_InternFromString("message");
    DASH = PyUnicode_InternFromString("-");
    END_OF_DATA = PyUnicode_InternFromString("end-of-data");
    EMPTY = PyUnicode_InternFromString("");
    if (!LEG || !MESSAGE || !DASH || !END_OF_DATA || !EMPTY)
        return NULL;
    LEG_KIND = LEG;
    REFUSED_KIND = PyUnicode_InternFromString("refused");
    DELIVERED = PyUnicode_InternFromString("delivered");
    LEG_REFUSED = PyUnicode_InternFromString("leg-refused");
    RCPT_REFUSED = PyUnicode_InternFromString("rcpt-refused");
    ONE = PyLong_FromLong(1);
    SIXTY = PyLong_FromLong(60);
    if (!REFUSED_KIND || !DELIVERED || !LEG_REFUSED || !RCPT_REFUSED || !ONE || !SIXTY)
        return NULL;
    return PyModule_Create(&module);
}
