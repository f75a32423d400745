/* The message log's text lines, in C: moxy.accounting._loglines (native build).

   `encode_lines(batch)` returns exactly `events.log_lines(batch).encode()` for a batch of
   DeliveryEvents, or None when the batch holds anything it leaves to Python: a field of an
   unexpected type, a string that is not valid UTF-8 (lone surrogates), a `tls` still in ssl's
   long form, a time before 1970 or after 9999. The file sink then formats that batch with
   `events.log_lines`. In Python the message log's two lines a message were half of the
   accounting process's CPU (about 6 of 12 µs a message); here a line is a few copies into one
   buffer, without a string object per field.

   `events.log_lines` stays the reference and the fallback (a pure-Python installation runs
   it); tests/accounting/test_speedups.py holds both side by side on generated events.

   encode_lines is called by the file sink's writer thread with the GIL held: the per-second
   date cache below is only ever touched by one thread at a time. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>
#include <time.h>

#include "_buffer.h"

#define FIELDS 18
/* Fields of a DeliveryEvent (moxy.accounting.events._Fields), in order. */
enum { KIND, SESSION, MESSAGE_ID, CLIENT, HELO, FROM, RECIPIENTS, DEST, ROUTE, SIZE, CODE,
       REPLY, STAGE, DURATION, NODE, REASON, TLS, TIME };
/* 9999-12-31T23:59:59 + 1: strftime("%Y") stops being four digits there. */
#define LAST_TIME 253402300800.0

static inline int put(Buffer *b, const char *text, Py_ssize_t n) {
    if (buffer_room(b, n) < 0)
        return -1;
    memcpy(b->data + b->used, text, n);
    b->used += n;
    return 0;
}

#define PUT_LITERAL(b, text) put((b), (text), (Py_ssize_t)sizeof(text) - 1)

/* A str field as UTF-8 (the str object keeps it: ASCII needs no copy at all); 0 for anything
   else, or a string UTF-8 cannot hold (the error is cleared: Python formats that batch). */
static inline int utf8(PyObject *value, const char **text, Py_ssize_t *n) {
    if (!PyUnicode_Check(value))
        return 0;
    if (PyUnicode_IS_COMPACT_ASCII(value)) {  /* nearly every field: its bytes as they are */
        *text = (const char *)PyUnicode_DATA(value);
        *n = PyUnicode_GET_LENGTH(value);
        return 1;
    }
    *text = PyUnicode_AsUTF8AndSize(value, n);
    if (*text == NULL) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* A str field; `dash` writes "-" for an empty one. 1 written, 0 give up, -1 error. */
static int put_str(Buffer *b, PyObject *value, int dash) {
    const char *text;
    Py_ssize_t n;
    if (!utf8(value, &text, &n))
        return 0;
    if (n == 0 && dash)
        return put(b, "-", 1) < 0 ? -1 : 1;
    return put(b, text, n) < 0 ? -1 : 1;
}

/* An int field (not a bool, not beyond 64 bits), as str(int) writes it. */
static int put_int(Buffer *b, PyObject *value) {
    if (!PyLong_CheckExact(value))
        return 0;
    int overflow = 0;
    long long number = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (overflow || (number == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    char text[24];
    char *end = text + sizeof text, *c = end;
    unsigned long long magnitude = number < 0 ? 0ULL - (unsigned long long)number
                                              : (unsigned long long)number;
    do {
        *--c = (char)('0' + magnitude % 10);
        magnitude /= 10;
    } while (magnitude);
    if (number < 0)
        *--c = '-';
    return put(b, c, end - c) < 0 ? -1 : 1;
}

/* The date to the second, formatted again only when the second changes (events come in time
   order); Python's formatter keeps a cache of its own, which this one need not share. */
static long long last_second = -1;
static char stamp[24];

#define TRY(call)                                                                             \
    do {                                                                                      \
        int _status = (call);                                                                 \
        if (_status <= 0)                                                                     \
            return _status;                                                                   \
    } while (0)
#define TRY_PUT(call)                                                                         \
    do {                                                                                      \
        if ((call) < 0)                                                                       \
            return -1;                                                                        \
    } while (0)

/* The runs of fields written as " label=value": a str as it is, a str with "-" for an empty
   one (Python's `field or '-'`), or an int. */
enum { AS_IS, OR_DASH, AN_INT };
typedef struct {
    const char *label;
    Py_ssize_t label_n;
    int field;
    int how;
} Part;
#define PART(label, field, how) {label, (Py_ssize_t)sizeof(label) - 1, field, how}
static const Part WHO[] = {  /* after the kind, up to "to=" */
    PART(" node=", NODE, OR_DASH), PART(" session=", SESSION, AS_IS),
    PART(" id=", MESSAGE_ID, OR_DASH), PART(" client=", CLIENT, AS_IS),
    PART(" helo=", HELO, OR_DASH), PART(" from=<", FROM, AS_IS),
};
static const Part HOW[] = {  /* after the recipients, up to "tls=" */
    PART(" dest=", DEST, AS_IS), PART(" route=", ROUTE, OR_DASH), PART(" size=", SIZE, AN_INT),
    PART(" code=", CODE, AN_INT), PART(" stage=", STAGE, AS_IS),
    PART(" reason=", REASON, OR_DASH),
};

/* 1 written, 0 give up, -1 error. */
static inline __attribute__((always_inline)) int put_parts(Buffer *b, PyObject **f, const Part *parts, size_t count) {
    for (size_t i = 0; i < count; i++) {
        const Part *part = &parts[i];
        if (put(b, part->label, part->label_n) < 0)
            return -1;
        PyObject *value = f[part->field];
        int status = part->how == AN_INT ? put_int(b, value)
                                         : put_str(b, value, part->how == OR_DASH);
        if (status <= 0)
            return status;
    }
    return 1;
}

/* Within one call: the last time and duration objects and their text. A message's events
   share these objects (moxy.session_events), so each is formatted once for both lines. The
   batch holds them alive for the whole call; a new call starts afresh. */
typedef struct {
    PyObject *when;
    char moment[32];
    PyObject *duration;
    char fixed[40];
    Py_ssize_t fixed_n;
} Seen;

/* format(d, ".3f") for 0 <= d < 10^6 (not -0.0) when the thousandths are not within 10^-6 of
   a tie, into `out` (at least 12 bytes); 0 otherwise, and PyOS_double_to_string decides. A
   duration is a few thousandths of a second, and that function (sprintf underneath) cost more
   than the rest of a line. Below 10^6, d * 1000 is within 2^-24 of the exact product, so away
   from a tie it rounds as the exact binary value does. */
static Py_ssize_t fixed3(double d, char *out) {
    if (!(d >= 0.0 && d < 1e6) || signbit(d))
        return 0;
    double scaled = d * 1000.0;
    double whole = floor(scaled);
    double fraction = scaled - whole;
    if (fabs(fraction - 0.5) < 1e-6)
        return 0;
    long long q = (long long)whole + (fraction > 0.5);
    long long units = q / 1000;
    int thousandths = (int)(q % 1000);
    char digits[12];
    int n = 0;
    do {
        digits[n++] = (char)('0' + units % 10);
        units /= 10;
    } while (units);
    char *p = out;
    while (n)
        *p++ = digits[--n];
    *p++ = '.';
    *p++ = (char)('0' + thousandths / 100);
    *p++ = (char)('0' + thousandths / 10 % 10);
    *p++ = (char)('0' + thousandths % 10);
    return p - out;
}

/* One event's line: 1 written, 0 give up (Python formats the batch), -1 error. */
static int put_line(Buffer *b, PyObject *event, Seen *seen) {
    if (!PyTuple_Check(event) || PyTuple_GET_SIZE(event) != FIELDS)
        return 0;
    PyObject **f = &PyTuple_GET_ITEM(event, 0);

    PyObject *when_obj = f[TIME];
    if (when_obj != seen->when) {
        if (!PyFloat_CheckExact(when_obj))
            return 0;
        double when = PyFloat_AS_DOUBLE(when_obj);
        if (!(when >= 0.0 && when < LAST_TIME))
            return 0;
        long long second = (long long)when;
        if (second != last_second) {
            time_t t = (time_t)second;
            struct tm tm;
            if (gmtime_r(&t, &tm) == NULL)
                return 0;
            snprintf(stamp, sizeof stamp, "%04d-%02d-%02dT%02d:%02d:%02d", tm.tm_year + 1900,
                     tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
            last_second = second;
        }
        int millis = (int)((long long)(when * 1000.0) % 1000);
        char *m = seen->moment;
        memcpy(m, stamp, 19);
        m[19] = '.';
        m[20] = (char)('0' + millis / 100);
        m[21] = (char)('0' + millis / 10 % 10);
        m[22] = (char)('0' + millis % 10);
        m[23] = 'Z';
        m[24] = ' ';
        seen->when = when_obj;
    }
    TRY_PUT(put(b, seen->moment, 25));

    TRY(put_str(b, f[KIND], 0));
    TRY(put_parts(b, f, WHO, sizeof WHO / sizeof *WHO));
    TRY_PUT(PUT_LITERAL(b, "> to="));

    PyObject *recipients = f[RECIPIENTS];
    if (!PyTuple_Check(recipients))
        return 0;
    Py_ssize_t count = PyTuple_GET_SIZE(recipients);
    if (count == 0)
        TRY_PUT(put(b, "-", 1));
    for (Py_ssize_t i = 0; i < count; i++) {
        TRY_PUT(put(b, i ? ",<" : "<", i ? 2 : 1));
        TRY(put_str(b, PyTuple_GET_ITEM(recipients, i), 0));
        TRY_PUT(put(b, ">", 1));
    }

    TRY(put_parts(b, f, HOW, sizeof HOW / sizeof *HOW));

    /* tls as events.tls_field writes it: sessions hand it over already in that form, so
       only ssl's long form ("... with cipher ...") is left to Python. */
    const char *tls;
    Py_ssize_t tls_n;
    if (!utf8(f[TLS], &tls, &tls_n))
        return 0;
    if (tls_n >= 13 && memmem(tls, tls_n, " with cipher ", 13) != NULL)
        return 0;
    TRY_PUT(PUT_LITERAL(b, " tls="));
    TRY_PUT(tls_n ? put(b, tls, tls_n) : put(b, "-", 1));

    PyObject *duration = f[DURATION];
    if (duration != seen->duration) {
        if (!PyFloat_CheckExact(duration))
            return 0;
        Py_ssize_t n = fixed3(PyFloat_AS_DOUBLE(duration), seen->fixed);
        if (n == 0) {
            /* The function behind Python's own format(duration, ".3f"). */
            char *fixed = PyOS_double_to_string(PyFloat_AS_DOUBLE(duration), 'f', 3, 0, NULL);
            if (fixed == NULL)
                return -1;
            n = (Py_ssize_t)strlen(fixed);
            if (n >= (Py_ssize_t)sizeof seen->fixed) {  /* a duration of 10^36 seconds */
                PyMem_Free(fixed);
                return 0;
            }
            memcpy(seen->fixed, fixed, n);
            PyMem_Free(fixed);
        }
        seen->fixed_n = n;
        seen->duration = duration;
    }
    TRY_PUT(PUT_LITERAL(b, " duration="));
    TRY_PUT(put(b, seen->fixed, seen->fixed_n));

    /* reply="...", its line breaks as spaces and its double quotes as single ones (ASCII
       bytes: in UTF-8 they never occur inside another character). */
    const char *reply;
    Py_ssize_t reply_n;
    if (!utf8(f[REPLY], &reply, &reply_n))
        return 0;
    TRY_PUT(PUT_LITERAL(b, " reply=\""));
    Py_ssize_t start = b->used;
    TRY_PUT(put(b, reply, reply_n));
    for (char *c = b->data + start; c < b->data + b->used; c++) {
        if (*c == '\n')
            *c = ' ';
        else if (*c == '"')
            *c = '\'';
    }
    TRY_PUT(PUT_LITERAL(b, "\"\n"));
    return 1;
}

/* The buffer the lines are written into, kept from call to call (the GIL is held, and no
   Python code runs inside a call): no growing, no fresh pages to touch, only the copy into
   the bytes returned. Let go of after a batch that needed more than KEEP bytes. */
static Buffer kept = {NULL, 0, 0};
#define KEEP (4 << 20)

static PyObject *encode_lines(PyObject *module, PyObject *batch) {
    PyObject *events = PySequence_Fast(batch, "encode_lines() takes a sequence of events");
    if (events == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(events);
    Buffer b = kept;  /* written back below, whatever happens */
    b.used = 0;
    PyObject *result = NULL;
    if (buffer_room(&b, count * 320 + 64) < 0)
        goto done;
    PyObject **items = PySequence_Fast_ITEMS(events);
    Seen seen = {NULL, {0}, NULL, {0}, 0};
    for (Py_ssize_t i = 0; i < count; i++) {
        int status = put_line(&b, items[i], &seen);
        if (status < 0)
            goto done;
        if (status == 0) {
            Py_INCREF(Py_None);
            result = Py_None;
            goto done;
        }
    }
    result = PyBytes_FromStringAndSize(b.data, b.used);
done:
    if (b.size > KEEP) {
        PyMem_Free(b.data);
        b = (Buffer){NULL, 0, 0};
    }
    kept = b;
    Py_DECREF(events);
    return result;
}

static PyMethodDef methods[] = {
    {"encode_lines", encode_lines, METH_O,
     "encode_lines(batch) -> bytes | None: events.log_lines(batch).encode(), or None where "
     "Python must format the batch"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "moxy.accounting._loglines",
    "The message log's text lines in C (see moxy.accounting.events.log_lines).", -1, methods,
};

PyMODINIT_FUNC PyInit__loglines(void) { return PyModule_Create(&module); }
