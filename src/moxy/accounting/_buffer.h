/* A growable byte buffer, for the C modules that write one (moxy.accounting._loglines, which
   formats the message log's lines, and moxy.accounting._packer, which packs events). */

#ifndef MOXY_BUFFER_H
#define MOXY_BUFFER_H

#include <Python.h>

typedef struct {
    char *data;
    Py_ssize_t size, used;
} Buffer;

/* Room for `more` bytes after what is used: 0, or -1 with MemoryError. */
static inline int buffer_room(Buffer *b, Py_ssize_t more) {
    if (b->used + more <= b->size)
        return 0;
    Py_ssize_t size = b->size ? b->size * 2 : 16384;
    if (size < b->used + more)
        size = b->used + more + 4096;
    char *data = PyMem_Realloc(b->data, size);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->size = size;
    return 0;
}

#endif
