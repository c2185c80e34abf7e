/*
 * nbdserver._cachedio: the READs and small WRITEs at the head of a received chunk that
 * the page cache serves, answered in one native call.
 *
 * Why: at queue depth 1 every request wakes the event loop alone, and the Python path of
 * one request (parse, checks, dispatch, the layer's read or write, the reply, the
 * statistics) runs on a cold interpreter, on the critical path between the client's
 * request and its reply. Here the common cases are parsed, done and framed in C:
 * - a READ of whole data units that the page cache holds: preadv2(RWF_NOWAIT), then the
 *   layer's read transform (XTS decryption) in place;
 * - a WRITE of whole data units inside one stripe of the layer's sector locks, payload
 *   complete in the chunk, no FUA: the payload copied to scratch, the write transform
 *   (XTS encryption) run over it, pwritev2 with flags 0 (a buffered write, as the
 *   Python path's inline write does), under the stripe's lock taken without waiting.
 * The transforms follow nbdserver/_readq.h's protocol (capsules from crypto/_xts.c).
 * The server sends the replies with one call.
 *
 * answer() only ever takes a prefix of the chunk, and only requests whose answer is
 * exactly what the Python path would send (flags 0, length in (0, max], offset and length
 * multiples of `align`, inside the disk). It stops at the first request that is anything
 * else, at a READ the page cache does not hold entirely (EAGAIN), at a stripe lock held
 * by someone else, and at any failed read or write: that request and every one after it
 * are left to the Python path, which does it again and reports any error as it always
 * does (a write is idempotent: doing it twice lands the same bytes). So nothing here
 * decides a protocol error, and a request it declines costs one system call at most.
 *
 * The caller checks the connection's and the disk's state (locked, frozen, read-only,
 * backlogged, shutting down) before the call. Nothing can change it meanwhile: it changes
 * on the event loop's thread only, which is in this call. The GIL is given up around
 * large reads and around every write's encryption and pwritev2, which touch no Python
 * object.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>

#include "_readq.h"

#define REQUEST_SIZE 28
#define REQUEST_MAGIC 0x25609513u
#define SIMPLE_REPLY_MAGIC 0x67446698u
#define STRUCTURED_REPLY_MAGIC 0x668e33efu
#define CMD_READ 0
#define CMD_WRITE 1
#define REPLY_FLAG_DONE 1
#define REPLY_TYPE_OFFSET_DATA 1
#define SIMPLE_HEAD 16                 /* magic, error, cookie */
#define DATA_CHUNK_HEAD 28             /* magic, flags, type, cookie, length, offset */
/* I/O this large gives the GIL up while it copies (the worker threads may want it). */
#define GIL_RELEASE_BYTES (64 * 1024)

static uint32_t
get_be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint16_t
get_be16(const unsigned char *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

static uint64_t
get_be64(const unsigned char *p)
{
    return (uint64_t)get_be32(p) << 32 | get_be32(p + 4);
}

static void
put_be32(unsigned char *p, uint32_t v)
{
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static void
put_be16(unsigned char *p, uint16_t v)
{
    p[0] = v >> 8; p[1] = v;
}

static void
put_be64(unsigned char *p, uint64_t v)
{
    put_be32(p, (uint32_t)(v >> 32));
    put_be32(p + 4, (uint32_t)v);
}

/* A transform capsule (or None), and its per-call state once begun. */
typedef struct {
    const ReadTransform *ops;
    void *owner;
    void *state;
} Transform;

/* The capsule named `name` (a read or a write transform, never one for the other), or
 * None for no transform. */
static int
transform_get(PyObject *capsule, const char *name, Transform *t)
{
    t->ops = NULL;
    t->owner = t->state = NULL;
    if (capsule == Py_None)
        return 0;
    t->ops = PyCapsule_GetPointer(capsule, name);
    if (t->ops == NULL)
        return -1;
    t->owner = PyCapsule_GetContext(capsule);
    if (t->owner == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "answer: a transform capsule without its owner");
        return -1;
    }
    return 0;
}

/* GIL held. 1 when the transform may run, 0 when it cannot now (a closed engine): the
 * request is then declined, its exception dropped; the usual path meets the same state
 * and answers it as it always does. */
static int
transform_begin(Transform *t)
{
    if (t->ops == NULL || t->state != NULL)
        return 1;
    t->state = t->ops->begin(t->owner);
    if (t->state == NULL) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

static void
transform_end(Transform *t)
{
    if (t->ops != NULL && t->state != NULL)
        t->ops->end(t->owner, t->state);
    t->state = NULL;
}

/* Fill buf from fd at offset with RWF_NOWAIT: 0, or the errno that stopped it (EAGAIN
 * when part of it is not cached). Zeros past the end of the file, as the layers read. */
static int
read_cached(int fd, unsigned char *buf, size_t len, uint64_t offset)
{
    size_t done = 0;
    while (done < len) {
        struct iovec iov = {buf + done, len - done};
        ssize_t r = preadv2(fd, &iov, 1, (off_t)(offset + done), RWF_NOWAIT);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (r == 0) {
            memset(buf + done, 0, len - done);
            break;
        }
        done += (size_t)r;
    }
    return 0;
}

static int
write_all(int fd, const unsigned char *buf, size_t len, uint64_t offset)
{
    size_t done = 0;
    while (done < len) {
        struct iovec iov = {(void *)(buf + done), len - done};
        ssize_t w = pwritev2(fd, &iov, 1, (off_t)(offset + done), 0);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (w == 0)
            return EIO;                /* never for a regular file; never spin on it */
        done += (size_t)w;
    }
    return 0;
}

/* The parameters of answer(), parsed. */
typedef struct {
    uint64_t size, unit, align, max_bytes, max_read, max_write;
    int structured;
    Py_ssize_t max_requests;
    int read_fd, write_fd;             /* -1: that command is not answered here */
    Transform read, write;
    PyObject *locks;                   /* a list of stripe locks (or None), or NULL */
    uint64_t per;                      /* sectors per stripe */
    unsigned char *scratch;            /* max_write bytes, made at the first WRITE */
    int missed;                        /* stopped at a READ the page cache lacks */
    PyThreadState *ts;                 /* in serve(): the GIL is not held (else NULL) */
} Params;

/* Borrowed: the stripe lock of units [first, end), Py_None when there is none to take,
 * or NULL when the range spans stripes or the lock is not made yet (Python makes it). */
static PyObject *
stripe_lock(const Params *p, uint64_t first, uint64_t end)
{
    Py_ssize_t n;
    uint64_t g;
    if (p->locks == NULL)
        return Py_None;
    g = first / p->per;
    n = PyList_GET_SIZE(p->locks);
    if (g != (end - 1) / p->per || n == 0)
        return NULL;
    PyObject *lock = PyList_GET_ITEM(p->locks, (Py_ssize_t)(g % (uint64_t)n));
    return lock == Py_None ? NULL : lock;
}

/* 1 when taken, 0 when held by another (or the call failed: declined, as above). */
static int
lock_try(PyObject *lock)
{
    PyObject *r;
    int taken;
    if (lock == Py_None)
        return 1;
    r = PyObject_CallMethod(lock, "acquire", "O", Py_False);
    if (r == NULL) {
        PyErr_Clear();
        return 0;
    }
    taken = r == Py_True;
    Py_DECREF(r);
    return taken;
}

/* 0, or -1 with an exception: a lock this call took and cannot give back is a bug the
 * server must hear of (it then drops the connection). */
static int
lock_release(PyObject *lock)
{
    PyObject *r;
    if (lock == Py_None)
        return 0;
    r = PyObject_CallMethod(lock, "release", NULL);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* One WRITE, its payload at `payload`: 1 done, 0 declined, -1 with an exception. The
 * GIL is given up around the encryption and the write, whatever their size, as the
 * usual path's encrypt_write does: a buffered write may wait (writeback throttling),
 * and the worker threads must go on meanwhile. In serve() (p->ts set), the GIL is taken
 * only to look up, take and give back the stripe's lock. */
static int
do_write(Params *p, const unsigned char *payload, uint64_t offset, uint32_t length)
{
    uint64_t first = offset / p->unit;
    PyObject *lock;
    int taken, err = 0;
    if (p->scratch == NULL) {          /* at the first WRITE of the call */
        if (p->ts != NULL || (p->scratch = PyMem_Malloc(p->max_write)) == NULL)
            return 0;                  /* serve() makes it at its start */
    }
    if (p->ts != NULL)                 /* serve(): the GIL for the lock only */
        PyEval_RestoreThread(p->ts);
    lock = stripe_lock(p, first, first + length / p->unit);
    if (lock == NULL || !transform_begin(&p->write)) {
        taken = 0;
    } else {
        Py_INCREF(lock);
        taken = lock_try(lock);
        if (!taken)
            Py_DECREF(lock);
    }
    if (taken) {
        unsigned char *scratch = p->scratch;
        Py_BEGIN_ALLOW_THREADS
        memcpy(scratch, payload, length);
        if (p->write.ops != NULL)
            err = p->write.ops->run(p->write.owner, p->write.state, scratch, length, first);
        if (!err)
            err = write_all(p->write_fd, scratch, length, offset);
        Py_END_ALLOW_THREADS
        taken = lock_release(lock) < 0 ? -1 : 1;
        Py_DECREF(lock);
    }
    if (p->ts != NULL)
        p->ts = PyEval_SaveThread();
    if (taken <= 0)
        return taken;                  /* declined (0), or a lock not given back (-1) */
    return err ? 0 : 1;
}

/* One READ into `out` (its reply's data): 1 done, 0 declined. */
static int
do_read(Params *p, unsigned char *out, uint64_t offset, uint32_t length)
{
    PyThreadState *saved = NULL;
    int err;
    if (p->ts == NULL && !transform_begin(&p->read))
        return 0;                      /* serve() begins it at its start */
    if (p->ts == NULL && length >= GIL_RELEASE_BYTES)
        saved = PyEval_SaveThread();
    err = read_cached(p->read_fd, out, length, offset);
    if (err == EAGAIN)
        p->missed = 1;
    if (!err && p->read.ops != NULL)
        err = p->read.ops->run(p->read.owner, p->read.state, out, length, offset / p->unit);
    if (saved != NULL)
        PyEval_RestoreThread(saved);
    return err ? 0 : 1;
}

/* The prefix of src[0, len) that may be answered, from the headers alone: its request
 * count, at most max_requests; *total is the size of its replies, at most out_cap.
 * *need_more is 1 when it stopped for want of bytes (a header, or an answerable WRITE's
 * payload), 0 when at a request answered elsewhere or at a limit. */
static Py_ssize_t
plan(const Params *p, const unsigned char *src, Py_ssize_t len, size_t out_cap, size_t *total,
     int *need_more)
{
    Py_ssize_t pos = 0, count = 0;
    size_t head = p->structured ? DATA_CHUNK_HEAD : SIMPLE_HEAD, bytes = 0;
    *total = 0;
    *need_more = 0;
    while (count < p->max_requests) {
        if (len - pos < REQUEST_SIZE) {
            *need_more = 1;
            break;
        }
        const unsigned char *h = src + pos;
        uint16_t cmd = get_be16(h + 6);
        uint64_t offset = get_be64(h + 16);
        uint32_t length = get_be32(h + 24);
        if (get_be32(h) != REQUEST_MAGIC || get_be16(h + 4) != 0 || length == 0
                || (offset | length) % p->align != 0 || offset > p->size
                || length > p->size - offset)
            break;
        if (cmd == CMD_READ && p->read_fd >= 0 && length <= p->max_read) {
            if (bytes + length > p->max_bytes || *total + head + length > out_cap)
                break;
            bytes += length;
            *total += head + length;
            pos += REQUEST_SIZE;
        } else if (cmd == CMD_WRITE && p->write_fd >= 0 && length <= p->max_write) {
            if (len - pos - REQUEST_SIZE < (Py_ssize_t)length) {
                *need_more = 1;
                break;
            }
            if (*total + SIMPLE_HEAD > out_cap)
                break;
            *total += SIMPLE_HEAD;
            pos += REQUEST_SIZE + length;
        } else {
            break;
        }
        count++;
    }
    return count;
}

/* What run() did. */
typedef struct {
    Py_ssize_t consumed, reads, writes, used;
    size_t read_bytes, write_bytes;
    int sampled;                       /* the command of request `sample`, or -1 */
} Done;

/* Answer the `count` requests plan() found at src, their replies into out: 1 when all
 * were, 0 when one was declined (it and the rest are not), -1 with an exception. */
static int
run(Params *p, const unsigned char *src, Py_ssize_t count, unsigned char *out, Py_ssize_t sample,
    Done *d)
{
    size_t head = p->structured ? DATA_CHUNK_HEAD : SIMPLE_HEAD;
    int rc = 1;
    d->consumed = d->reads = d->writes = d->used = 0;
    d->read_bytes = d->write_bytes = 0;
    d->sampled = -1;
    for (Py_ssize_t i = 0; i < count; i++) {
        const unsigned char *h = src + d->consumed;
        uint16_t cmd = get_be16(h + 6);
        uint64_t cookie = get_be64(h + 8), offset = get_be64(h + 16);
        uint32_t length = get_be32(h + 24);
        unsigned char *r = out + d->used;
        if (cmd == CMD_READ) {
            rc = do_read(p, r + head, offset, length);
            if (rc <= 0)
                break;
            if (p->structured) {
                put_be32(r, STRUCTURED_REPLY_MAGIC);
                put_be16(r + 4, REPLY_FLAG_DONE);
                put_be16(r + 6, REPLY_TYPE_OFFSET_DATA);
                put_be64(r + 8, cookie);
                put_be32(r + 16, 8 + length);
                put_be64(r + 20, offset);
            } else {
                put_be32(r, SIMPLE_REPLY_MAGIC);
                put_be32(r + 4, 0);
                put_be64(r + 8, cookie);
            }
            d->used += (Py_ssize_t)(head + length);
            d->read_bytes += length;
            d->reads++;
            d->consumed += REQUEST_SIZE;
        } else {
            rc = do_write(p, h + REQUEST_SIZE, offset, length);
            if (rc <= 0)
                break;
            put_be32(r, SIMPLE_REPLY_MAGIC);
            put_be32(r + 4, 0);
            put_be64(r + 8, cookie);
            d->used += SIMPLE_HEAD;
            d->write_bytes += length;
            d->writes++;
            d->consumed += REQUEST_SIZE + length;
        }
        if (i == sample)
            d->sampled = cmd;
    }
    return rc;
}

static int
params_init(Params *p, unsigned long long size, unsigned long long unit,
            unsigned long long align, int structured, unsigned long long max_bytes,
            Py_ssize_t max_requests, unsigned long long max_read, int read_fd,
            PyObject *read_transform, unsigned long long max_write, int write_fd,
            PyObject *write_transform, PyObject *locks, unsigned long long per,
            const char *fn)
{
    p->size = size; p->unit = unit; p->align = align; p->structured = structured;
    p->max_bytes = max_bytes; p->max_requests = max_requests; p->max_read = max_read;
    p->max_write = max_write; p->read_fd = read_fd; p->write_fd = write_fd; p->per = per;
    p->locks = locks == Py_None ? NULL : locks;
    p->read.ops = p->write.ops = NULL;
    p->read.state = p->write.state = NULL;
    p->scratch = NULL;
    p->missed = 0;
    p->ts = NULL;
    if (unit == 0 || align == 0 || align % unit != 0 || max_requests < 0
            || (p->locks != NULL && (!PyList_Check(p->locks) || per == 0))) {
        PyErr_Format(PyExc_ValueError, "%s: bad unit, align, max_requests or locks", fn);
        return -1;
    }
    if (transform_get(read_transform, READQ_TRANSFORM_CAPSULE, &p->read) < 0
            || transform_get(write_transform, WRITE_TRANSFORM_CAPSULE, &p->write) < 0)
        return -1;
    return 0;
}

static PyObject *
answer(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer data;
    Params p;
    PyObject *read_transform, *write_transform, *locks, *replies = NULL, *result = NULL;
    unsigned long long size, unit, align, max_bytes, max_read, max_write, per;
    Py_ssize_t max_requests, count, sample;
    size_t total;
    int structured, read_fd, write_fd, rc, need_more;
    Done d;

    if (!PyArg_ParseTuple(args, "y*KKKpKnKiOKiOOKn:answer", &data, &size, &unit, &align,
                          &structured, &max_bytes, &max_requests, &max_read, &read_fd,
                          &read_transform, &max_write, &write_fd, &write_transform, &locks,
                          &per, &sample))
        return NULL;
    if (params_init(&p, size, unit, align, structured, max_bytes, max_requests, max_read,
                    read_fd, read_transform, max_write, write_fd, write_transform, locks, per,
                    "answer") < 0)
        goto done;
    count = plan(&p, data.buf, data.len, SIZE_MAX, &total, &need_more);
    if (count == 0) {
        result = Py_BuildValue("(ny#nnnnii)", (Py_ssize_t)0, "", (Py_ssize_t)0, (Py_ssize_t)0,
                               (Py_ssize_t)0, (Py_ssize_t)0, (Py_ssize_t)0, -1, 0);
        goto done;
    }
    replies = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (replies == NULL)
        goto done;
    rc = run(&p, data.buf, count, (unsigned char *)PyBytes_AS_STRING(replies), sample, &d);
    if (rc < 0)
        goto done;                     /* a stripe lock not given back: a bug, said */
    if ((size_t)d.used < total && _PyBytes_Resize(&replies, d.used) < 0)
        goto done;                     /* replies is NULL and freed */
    result = Py_BuildValue("(nOnnnnii)", d.consumed, replies, d.reads, (Py_ssize_t)d.read_bytes,
                           d.writes, (Py_ssize_t)d.write_bytes, d.sampled, p.missed);
done:
    transform_end(&p.read);
    transform_end(&p.write);
    Py_XDECREF(replies);
    PyMem_Free(p.scratch);
    PyBuffer_Release(&data);
    return result;
}

/* --- serve(): a connection's requests answered on a thread of their own ---------------- */

#define SERVE_IN_CAP (256 * 1024)      /* received, not yet answered */
#define SERVE_OUT_CAP (512 * 1024)     /* replies of one pass */
#define SERVE_DECLINED 0               /* at a request answered elsewhere (or a miss) */
#define SERVE_IDLE 1                   /* nothing received for idle_ms, or max_ms passed */
#define SERVE_STOPPED 2                /* the stop flag was set (and stop_fd signalled) */
#define SERVE_CLOSED 3                 /* end of file or an error on the socket */
#define SERVE_SAMPLES 1024             /* latency samples kept per call */

static uint64_t
now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static int64_t
now_ms(void)
{
    return (int64_t)(now_ns() / 1000000u);
}

/* Wait until fd is ready for `events` or stop_fd is signalled: 1 ready, 0 timed out,
 * -SERVE_STOPPED, or -SERVE_CLOSED (an error on the socket). A signal does not restart
 * the wait whole: signals more frequent than the timeout would otherwise keep an idle
 * session waiting past its deadline. */
static int
wait_for(int fd, short events, int stop_fd, int timeout_ms)
{
    struct pollfd fds[2] = {{fd, events, 0}, {stop_fd, POLLIN, 0}};
    int64_t end = now_ms() + timeout_ms;
    for (;;) {
        int r = poll(fds, 2, timeout_ms);
        if (r < 0) {
            if (errno == EINTR) {
                int64_t left = end - now_ms();
                if (left <= 0)
                    return 0;
                timeout_ms = (int)left;
                continue;
            }
            return -SERVE_CLOSED;
        }
        if (r == 0)
            return 0;
        if (fds[1].revents)
            return -SERVE_STOPPED;
        return 1;                      /* readable, writable, or an error recv/send meets */
    }
}

/* The caller's stop flag (one byte it sets before it signals stop_fd): checked before
 * each pass, so a client that keeps sending is stopped as promptly as an idle one. */
static int
stop_asked(const unsigned char *flag)
{
    return __atomic_load_n(flag, __ATOMIC_ACQUIRE) != 0;
}

/* Send buf[0, len) by `deadline` (ms): 0 when all of it went, else why not
 * (-SERVE_STOPPED, -SERVE_IDLE at the deadline: a client that does not read its replies
 * goes back to the loop, whose budget and back-pressure deal with it; -SERVE_CLOSED);
 * *sent says how much did. */
static int
send_all(int fd, int stop_fd, const unsigned char *flag, int64_t deadline,
         const unsigned char *buf, size_t len, size_t *sent)
{
    *sent = 0;
    while (*sent < len) {
        ssize_t w = send(fd, buf + *sent, len - *sent, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) {
            *sent += (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            int64_t left = deadline - now_ms();
            int r;
            if (stop_asked(flag))
                return -SERVE_STOPPED;
            if (left <= 0)
                return -SERVE_IDLE;
            r = wait_for(fd, POLLOUT, stop_fd, (int)left);
            if (r == 0)
                return -SERVE_IDLE;
            if (r < 0)
                return r;
            continue;
        }
        return -SERVE_CLOSED;
    }
    return 0;
}

static PyObject *
serve(PyObject *Py_UNUSED(module), PyObject *args)
{
    Params p;
    PyObject *read_transform, *write_transform, *locks, *result = NULL;
    unsigned long long size, unit, align, max_read, max_write, per;
    int structured, read_fd, write_fd, sock, stop_fd, idle_ms, max_ms, every, next;
    Py_buffer stop;
    unsigned char *in = NULL, *out = NULL;
    uint64_t samples[2 * SERVE_SAMPLES], seen = 0;
    Py_ssize_t n_samples = 0;
    int wait_first = 0;
    Py_ssize_t have = 0, reads = 0, writes = 0;
    size_t read_bytes = 0, write_bytes = 0, sent = 0, unsent_at = 0, unsent_len = 0;
    int reason = SERVE_DECLINED, rc = 1;
    int64_t deadline;

    if (!PyArg_ParseTuple(args, "iiw*KKKpKiOKiOOKiiii:serve", &sock, &stop_fd, &stop, &size,
                          &unit, &align, &structured, &max_read, &read_fd, &read_transform,
                          &max_write, &write_fd, &write_transform, &locks, &per, &idle_ms,
                          &max_ms, &every, &next))
        return NULL;
    if (params_init(&p, size, unit, align, structured, SERVE_OUT_CAP, PY_SSIZE_T_MAX, max_read,
                    read_fd, read_transform, max_write, write_fd, write_transform, locks, per,
                    "serve") < 0)
        goto done;
    if (stop.len < 1 || every < 0 || (every > 0 && (next < 0 || next >= every))) {
        PyErr_SetString(PyExc_ValueError, "serve: bad stop flag or sampling (every, next)");
        goto done;
    }
    if (max_read + DATA_CHUNK_HEAD > SERVE_OUT_CAP || max_write + REQUEST_SIZE > SERVE_IN_CAP) {
        PyErr_SetString(PyExc_ValueError, "serve: max_read or max_write too large");
        goto done;
    }
    in = PyMem_RawMalloc(SERVE_IN_CAP);
    out = PyMem_RawMalloc(SERVE_OUT_CAP);
    if (p.write_fd >= 0)
        p.scratch = PyMem_Malloc(max_write);
    if (in == NULL || out == NULL || (p.write_fd >= 0 && p.scratch == NULL)) {
        PyErr_NoMemory();
        goto done;
    }
    if (!transform_begin(&p.read))     /* a closed engine: nothing to do here */
        goto answered;
    deadline = now_ms() + max_ms;
    p.ts = PyEval_SaveThread();
    for (;;) {
        size_t total;
        int need_more;
        Py_ssize_t count;
        if (stop_asked(stop.buf)) {
            reason = SERVE_STOPPED;
            break;
        }
        count = plan(&p, in, have, SERVE_OUT_CAP, &total, &need_more);
        if (count > 0) {
            Done d;
            /* the first request of this pass that is sampled, if any */
            Py_ssize_t sample = every ? (Py_ssize_t)((uint64_t)next + (uint64_t)every
                                                     - seen % (uint64_t)every) % every : -1;
            uint64_t t0 = sample >= 0 && sample < count ? now_ns() : 0;
            rc = run(&p, in, count, out, sample, &d);
            seen += (uint64_t)(d.reads + d.writes);
            /* A client with one request in flight sends the next after this reply: wait
             * for it rather than find the socket empty first (a system call a request). */
            wait_first = d.reads + d.writes == 1 && d.consumed == have;
            reads += d.reads;
            writes += d.writes;
            read_bytes += d.read_bytes;
            write_bytes += d.write_bytes;
            if (d.consumed) {
                memmove(in, in + d.consumed, (size_t)(have - d.consumed));
                have -= d.consumed;
            }
            if (d.used) {
                int r = send_all(sock, stop_fd, stop.buf, deadline, out, (size_t)d.used, &sent);
                if (r < 0) {
                    unsent_at = sent;
                    unsent_len = (size_t)d.used - sent;
                    reason = -r;
                    break;
                }
            }
            if (d.sampled >= 0) {      /* received to sent */
                samples[2 * n_samples] = (uint64_t)d.sampled;
                samples[2 * n_samples + 1] = now_ns() - t0;
                if (++n_samples == SERVE_SAMPLES && rc > 0) {
                    reason = SERVE_IDLE;   /* back to the loop, which takes them */
                    break;
                }
            }
            if (rc <= 0)
                break;                 /* declined (or an exception, said below) */
            continue;
        }
        if (!need_more || have == SERVE_IN_CAP)
            break;                     /* SERVE_DECLINED */
        int64_t left = deadline - now_ms();
        if (left <= 0) {
            reason = SERVE_IDLE;
            break;
        }
        if (wait_first) {              /* the next request is not here yet */
            int w = wait_for(sock, POLLIN, stop_fd, left < idle_ms ? (int)left : idle_ms);
            wait_first = 0;
            if (w == 0) {
                reason = SERVE_IDLE;
                break;
            }
            if (w < 0) {
                reason = -w;
                break;
            }
            continue;                  /* the stop flag first, then receive */
        }
        ssize_t r = recv(sock, in + have, (size_t)(SERVE_IN_CAP - have), MSG_DONTWAIT);
        if (r > 0) {
            have += r;
            continue;
        }
        if (r == 0) {
            reason = SERVE_CLOSED;
            break;
        }
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            reason = SERVE_CLOSED;
            break;
        }
        wait_first = 1;                /* nothing yet: wait (above), then receive */
    }
    PyEval_RestoreThread(p.ts);
    p.ts = NULL;
    if (rc < 0)
        goto done;                     /* a stripe lock not given back: a bug, said */
answered:
    result = Py_BuildValue("(iy#y#nnnniy#)", reason, (const char *)in, have,
                           (const char *)out + unsent_at, (Py_ssize_t)unsent_len, reads,
                           (Py_ssize_t)read_bytes, writes, (Py_ssize_t)write_bytes, p.missed,
                           (const char *)samples, n_samples * 2 * (Py_ssize_t)sizeof(uint64_t));
done:
    transform_end(&p.read);
    transform_end(&p.write);
    PyMem_Free(p.scratch);
    PyMem_RawFree(in);
    PyMem_RawFree(out);
    PyBuffer_Release(&stop);
    return result;
}

static PyMethodDef cachedio_methods[] = {
    {"answer", answer, METH_VARARGS,
     "answer(data, size, unit, align, structured, max_bytes, max_requests, max_read, read_fd, "
     "read_transform, max_write, write_fd, write_transform, locks, per, sample) -> (consumed, "
     "replies, reads, read_bytes, writes, write_bytes, sampled, missed): answer the READs and "
     "WRITEs at the "
     "head of data (NBD requests as received) that the page cache serves. A READ (read_fd "
     ">= 0, length <= max_read, at most max_bytes of data in all) is read with "
     "preadv2(read_fd, RWF_NOWAIT), then read_transform (a capsule of nbdserver/_readq.h, "
     "or None) runs over it, data unit offset // unit first; its reply is a simple reply "
     "or one OFFSET_DATA chunk (structured). A WRITE (write_fd >= 0, length <= max_write, "
     "its payload in data) is encrypted by write_transform into scratch and written with "
     "pwritev2(write_fd, flags 0) under its stripe's lock (locks[(offset // unit // per) "
     "% len(locks)], taken without waiting; None for no locks), inside one stripe. Every "
     "request must have flags 0 and whole `align` units inside `size`. Stops at the first "
     "request that cannot be answered so, after max_requests; `consumed` bytes of data "
     "were answered. `sampled` is the command of the request at index `sample` (counting "
     "from 0) if it was answered, else -1. `missed` is 1 when the call stopped at a READ "
     "the page cache did not hold (RWF_NOWAIT said EAGAIN), else 0."},
    {"serve", serve, METH_VARARGS,
     "serve(sock, stop_fd, stop_flag, size, unit, align, structured, max_read, read_fd, read_transform, "
     "max_write, write_fd, write_transform, locks, per, idle_ms, max_ms, every, next) -> "
     "(reason, leftover, unsent, reads, read_bytes, writes, write_bytes, missed, samples): "
     "answer a "
     "connection's requests on the calling thread, the GIL given up, as answer() would "
     "answer them one received chunk after another: receive from sock (non-blocking), "
     "answer the requests at the head, send their replies, until a request answer() would "
     "decline (reason 0), nothing received for idle_ms, max_ms passed or the client not "
     "reading its replies until then (1), stop_flag[0] set (2; set it, then signal "
     "stop_fd), or end of file or an error on sock (3). `leftover`: bytes received and "
     "not answered; `unsent`: replies not yet sent (the caller sends them first). The GIL "
     "is taken only around a WRITE's stripe lock. Every `every`-th request answered (0: "
     "none), starting at index `next`, is timed from the pass that answers it to its "
     "reply sent: `samples` holds (command, nanoseconds) as native uint64 pairs."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef cachedio_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "nbdserver._cachedio",
    .m_doc = "Page-cache READs and WRITEs answered natively (see _cachedio.c).",
    .m_size = -1,
    .m_methods = cachedio_methods,
};

PyMODINIT_FUNC
PyInit__cachedio(void)
{
    return PyModule_Create(&cachedio_module);
}
