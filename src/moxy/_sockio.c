/* The hot path's socket calls, in C: moxy._sockio (native build), used by moxy.stream only.

   - `recv(fd, size)`: up to `size` bytes from the non-blocking socket `fd`; b"" at the end of
     the stream; None when nothing has arrived (EAGAIN), where `socket.recv` raises
     BlockingIOError (an exception made and caught: about 2,000 instructions).
   - `send(fd, data)`: as much of `data` (any buffer) as the kernel takes now; 0 when it takes
     nothing (EAGAIN). MSG_NOSIGNAL: a peer that is gone is an EPIPE, never a SIGPIPE.
   Other errors raise OSError with the errno, as the socket methods do; EINTR is retried
   after the signal handlers ran (PEP 475).

   Both keep the GIL: on a non-blocking socket the call returns at once, and releasing and
   taking the GIL back (plus the method lookup on a `socket.socket`) was about an eighth of
   the user-space cost of a short read or write. They take a file descriptor, not the socket:
   moxy.stream.Stream forgets its descriptor (sets it to -1) before it closes the socket, so a
   descriptor number the system has given to a new connection is never used in its place.

   `stream.recv_fallback` and `stream.send_fallback` are the pure-Python fallbacks;
   tests/test_sockio.py holds both side by side. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <sys/socket.h>

static int descriptor(PyObject *value, int *fd) {
    *fd = _PyLong_AsInt(value);
    return *fd == -1 && PyErr_Occurred() ? -1 : 0;
}

static PyObject *sockio_recv(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int fd;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "recv() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    if (descriptor(args[0], &fd) < 0)
        return NULL;
    Py_ssize_t size = PyLong_AsSsize_t(args[1]);
    if (size == -1 && PyErr_Occurred())
        return NULL;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "negative buffersize in recv");
        return NULL;
    }
    PyObject *data = PyBytes_FromStringAndSize(NULL, size);
    if (data == NULL)
        return NULL;
    ssize_t got;
    for (;;) {
        got = recv(fd, PyBytes_AS_STRING(data), (size_t)size, 0);
        if (got >= 0)
            break;
        if (errno == EINTR) {
            if (PyErr_CheckSignals() < 0) {
                Py_DECREF(data);
                return NULL;
            }
            continue;
        }
        int error = errno;
        Py_DECREF(data);
        if (error == EAGAIN || error == EWOULDBLOCK)
            Py_RETURN_NONE;
        errno = error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (got != size && _PyBytes_Resize(&data, got) < 0)
        return NULL;
    return data;
}

static PyObject *sockio_send(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int fd;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "send() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    if (descriptor(args[0], &fd) < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    ssize_t sent;
    for (;;) {
        sent = send(fd, view.buf, (size_t)view.len, MSG_NOSIGNAL);
        if (sent >= 0)
            break;
        if (errno == EINTR) {
            if (PyErr_CheckSignals() < 0) {
                PyBuffer_Release(&view);
                return NULL;
            }
            continue;
        }
        int error = errno;
        PyBuffer_Release(&view);
        if (error == EAGAIN || error == EWOULDBLOCK)
            return PyLong_FromLong(0);
        errno = error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(sent);
}

static PyMethodDef methods[] = {
    {"recv", (PyCFunction)(void (*)(void))sockio_recv, METH_FASTCALL,
     "recv(fd: int, size: int) -> bytes | None: None when nothing has arrived"},
    {"send", (PyCFunction)(void (*)(void))sockio_send, METH_FASTCALL,
     "send(fd: int, data: buffer) -> int: bytes sent, 0 when the kernel takes none now"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "moxy._sockio",
    "The hot path's non-blocking socket calls in C (see moxy.stream).", -1, methods,
};

PyMODINIT_FUNC PyInit__sockio(void) { return PyModule_Create(&module); }
