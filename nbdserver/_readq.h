/*
 * The read transform protocol between nbdserver._readq (the native read queue) and a
 * layer that transforms what it reads (nbdserver.crypto._xts decrypts).
 *
 * A layer hands the queue a PyCapsule named READQ_TRANSFORM_CAPSULE whose pointer is a
 * ReadTransform (static, never freed) and whose context is the owner object the three
 * functions act for (the capsule holds a reference to it). The queue keeps the capsule
 * until the read is collected, so the owner outlives every read that uses it.
 */
#ifndef NBDSERVER_READQ_H
#define NBDSERVER_READQ_H

#include <stddef.h>
#include <stdint.h>

#define READQ_TRANSFORM_CAPSULE "nbdserver._readq.transform"
/* The same protocol run the other way, over data about to be written (crypto/_xts.c
 * encrypts; nbdserver/_cachedio.c writes). Its own name, so that a write transform
 * handed where a read transform belongs (or the reverse) is refused, never run. */
#define WRITE_TRANSFORM_CAPSULE "nbdserver._cachedio.write_transform"

typedef struct {
    /* GIL held, when the read is submitted: per-read state (an OpenSSL context), or NULL
     * with a Python exception set (the read is then not submitted). */
    void *(*begin)(void *owner);
    /* On a queue thread, WITHOUT the GIL: transform the `len` bytes just read into
     * `buf` in place, the first of them belonging to data unit `first`. Touches no
     * Python object. Returns 0, or an errno for this read. */
    int (*run)(void *owner, void *state, unsigned char *buf, size_t len, uint64_t first);
    /* GIL held, when the read is collected or discarded: give `state` back. */
    void (*end)(void *owner, void *state);
} ReadTransform;

#endif
