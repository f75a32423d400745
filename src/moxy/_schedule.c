/* The read's schedule point in C: moxy._schedule (native build), used by moxy.schedule.

   `yield_now()` returns an awaitable that yields trio's CancelShieldedCheckpoint message to the
   run loop once (set by `set_message`) and then returns None, whatever the loop sent back: for
   that message, trio's loop always reschedules the task with `Value(None)`, so there is nothing
   to unwrap (moxy/schedule.py says more). It is what `schedule._yield_message`, a generator,
   does, without calling a Python function, making a generator and a frame, and running it
   twice: the await goes through the type's slots only (am_await, am_send).

   Exceptions thrown in at the yield (a coroutine closed while it waits) pass through as they
   would through the generator: the object has no `throw` or `close`, so the awaiting frame
   raises them itself. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *message = NULL;  /* trio's CancelShieldedCheckpoint, once set_message ran */

typedef struct {
    PyObject_HEAD
    int yielded;
} YieldObject;

static PyTypeObject YieldType;

static PySendResult yield_send(PyObject *self, PyObject *arg, PyObject **result) {
    YieldObject *y = (YieldObject *)self;
    if (!y->yielded) {
        y->yielded = 1;
        Py_INCREF(message);
        *result = message;
        return PYGEN_NEXT;
    }
    Py_INCREF(Py_None);
    *result = Py_None;
    return PYGEN_RETURN;
}

static PyObject *yield_next(PyObject *self) {
    YieldObject *y = (YieldObject *)self;
    if (!y->yielded) {
        y->yielded = 1;
        Py_INCREF(message);
        return message;
    }
    return NULL;  /* StopIteration, with None */
}

static PyObject *yield_await(PyObject *self) {
    Py_INCREF(self);
    return self;
}

static PyObject *yield_send_method(PyObject *self, PyObject *arg) {
    PyObject *result;
    if (yield_send(self, arg, &result) == PYGEN_NEXT)
        return result;
    Py_DECREF(result);
    PyErr_SetNone(PyExc_StopIteration);
    return NULL;
}

static void yield_dealloc(PyObject *self) { PyObject_Free(self); }

static PyMethodDef yield_methods[] = {
    {"send", yield_send_method, METH_O, "send(value): as next(); the value is not used"},
    {NULL, NULL, 0, NULL},
};

static PyAsyncMethods yield_async = {
    .am_await = yield_await,
    .am_send = yield_send,
};

static PyTypeObject YieldType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "moxy._schedule.Yield",
    .tp_basicsize = sizeof(YieldObject),
    .tp_dealloc = yield_dealloc,
    .tp_as_async = &yield_async,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "yield_now()'s awaitable: trio's message once, then None",
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = yield_next,
    .tp_methods = yield_methods,
};

static PyObject *yield_now(PyObject *module, PyObject *unused) {
    if (message == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "moxy._schedule.set_message() was not called");
        return NULL;
    }
    YieldObject *y = PyObject_New(YieldObject, &YieldType);
    if (y == NULL)
        return NULL;
    y->yielded = 0;
    return (PyObject *)y;
}

static PyObject *set_message(PyObject *module, PyObject *value) {
    Py_INCREF(value);
    Py_XSETREF(message, value);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"yield_now", yield_now, METH_NOARGS,
     "yield_now() -> Awaitable[None]: yield the message to trio's run loop once"},
    {"set_message", set_message, METH_O, "set_message(message): what yield_now() yields"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "moxy._schedule",
    "The read's schedule point in C (see moxy.schedule).", -1, methods,
};

PyMODINIT_FUNC PyInit__schedule(void) {
    if (PyType_Ready(&YieldType) < 0)
        return NULL;
    return PyModule_Create(&module);
}
