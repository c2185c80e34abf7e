/*
 * nbdserver._uring: the read queue on io_uring. RingQueue has ReadQueue's Python API
 * (nbdserver/_readq.c: submit, collect, close, fileno, peak, threads, in_flight), so
 * the server does not know which one it has (nbdserver/backend.py picks).
 *
 * Why: the thread queue's reads cost about two futex calls each (the loop handing a
 * read to a C thread, the thread waking the next), and a quarter of the server's time
 * went to context switches. Here the loop's own thread puts each read on the ring's
 * submission queue and enters the kernel once (io_uring_enter): a page-cache hit is
 * served inside that call, a miss is read by the kernel asynchronously (buffered: the
 * page's completion runs the copy as task work on the loop's thread; O_DIRECT: the
 * block layer), and no thread of ours is involved. The ring's registered eventfd
 * wakes the loop, and collect() reaps every completion in one pass over the
 * completion queue, with no system call besides reading the eventfd.
 *
 * Raw system calls, no liburing: three calls and the ring's layout
 * (<linux/io_uring.h>) are all this needs, and the bootstrap builds it without
 * another Debian package.
 *
 * Batched: with `defer` (the event loop's call_soon), submit() only queues the read
 * and schedules flush() once, so the reads one turn of the loop submits enter the
 * kernel in one call, under one block plug: one virtio kick per batch, where perf
 * put a tenth of the server's time in a kick per read.
 *
 * Bounded: at most `depth` reads are in the ring at once (the completion queue has
 * room for twice the submission queue, so it cannot overflow); more wait in a FIFO
 * backlog, in order, and enter the ring as completions free slots, exactly as reads
 * wait for a thread in ReadQueue.
 *
 * Short reads: a completion with fewer bytes than asked is resubmitted for the rest;
 * one with 0 bytes is the end of the file, and the rest reads as zeros, like a hole
 * (what ReadQueue's preadv loop does, and FileBackend.pread).
 *
 * O_DIRECT (cache=none): a read with `align` whose address, offset or length is not a
 * multiple of it reads the aligned blocks around its range into a bounce buffer of its
 * own (several such reads are in the ring at once, so it cannot be a thread's), copied
 * out when it completes.
 *
 * The transform (nbdserver/_readq.h: XTS decryption) runs in collect(), on the reads
 * of the batch that succeeded. Without the GIL only when the batch holds at least
 * TRANSFORM_UNLOCKED bytes: a 4 KiB decryption takes about a microsecond, and a GIL
 * given up to a waiting worker thread comes back only when that thread lets go of it.
 *
 * Writes (submit_write, cache=none): the same ring and bound, IORING_OP_WRITE with
 * RWF_DSYNC for FUA, reported by collect() like reads. An unaligned buffer for an O_DIRECT
 * fd is copied into an aligned one at submission; a short write is resubmitted for the
 * rest, and one of 0 bytes fails with EIO rather than loop. Each write may carry a
 * `done` callable that runs exactly once, when the write is reported or dropped by
 * close(), never when submit_write raises: the layers above release the locks of the
 * written sectors there, so no read-modify-write of them runs while the write is in
 * the kernel.
 *
 * Task work (`taskrun`): `signal` is the kernel's default (a completion's task work
 * interrupts the loop's thread), `coop` is COOP_TASKRUN (it waits for the thread's next
 * system call), `defer` is SINGLE_ISSUER | DEFER_TASKRUN (it waits until collect()
 * enters the ring with GETEVENTS; the eventfd still fires when such work is queued).
 * Older kernels refuse the flags: the ring is then made as `signal`. Measured on a
 * shared host none was ahead (docs/operations.md), so readqueue.py makes `signal`
 * unless NBDSERVER_URING_TASKRUN says otherwise.
 *
 * Ownership as in ReadQueue: submit() (GIL held) takes a reference to the token and to
 * the capsule and pins the buffer (a writable Py_buffer); collect() and close() give
 * them back. The kernel writes into the buffer until its completion is reaped, so
 * close() waits for every read in the ring (without the GIL) before it releases any.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <linux/io_uring.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "_readq.h"

/* A ring that refuses submissions with nothing in it is retried after RETRY_FIRST_MS,
 * doubling to RETRY_MAX_MS: often enough to recover quickly, seldom enough not to spin. */
#define RETRY_FIRST_MS 1
#define RETRY_MAX_MS 128

/* Decrypting less than this holds the GIL (see above). */
#define TRANSFORM_UNLOCKED (64 * 1024)

typedef struct job {
    struct job *next;
    PyObject *token;                 /* owned */
    Py_buffer buf;                   /* pinned until collected */
    int fd;
    long long offset;
    PyObject *capsule;               /* the transform's capsule, owned, or NULL */
    const ReadTransform *ops;
    void *owner;
    void *state;
    uint64_t first;
    /* What the kernel reads into: the buffer itself, or the bounce buffer. */
    char *target;
    size_t target_len;
    long long target_offset;
    char *bounce;                    /* O_DIRECT's aligned copy, or NULL */
    size_t got;                      /* of target_len, read so far */
    long result;                     /* bytes, or -errno; valid once done */
    /* Writes (submit_write): the opcode, RWF_DSYNC for FUA, and what to call once the
     * write is done or dropped (the caller's sector lock's release), owned or NULL. */
    int write;
    int rw_flags;
    PyObject *done;
} Job;

typedef struct {
    PyObject_HEAD
    int ring_fd;
    int efd;
    int closed;
    PyObject *defer;                 /* the loop's call_soon, or NULL: enter at once */
    int flush_scheduled;
    PyObject *later;                 /* the loop's call_later, or NULL (see retry) */
    unsigned retry_ms;               /* the next retry's delay; 0 after a success */
    int retry_scheduled;
    int defer_taskrun;               /* completions wait for an enter with GETEVENTS */
    const char *taskrun;             /* the mode the kernel took (static string) */
    unsigned depth;                  /* reads in the ring at most */
    unsigned in_ring;
    unsigned unsubmitted;            /* SQEs written, not yet taken by the kernel */
    Job *backlog_head, *backlog_tail;
    Py_ssize_t in_flight;            /* submitted, not collected */
    long peak;
    /* The mapped rings. */
    void *sq_map, *cq_map;
    size_t sq_map_len, cq_map_len;
    struct io_uring_sqe *sqes;
    size_t sqes_len;
    _Atomic unsigned *sq_head, *sq_tail;
    unsigned sq_mask;
    unsigned *sq_array;
    _Atomic unsigned *cq_head, *cq_tail;
    unsigned cq_mask;
    struct io_uring_cqe *cqes;
} RingQueue;

static int
sys_setup(unsigned entries, struct io_uring_params *p)
{
    return (int)syscall(__NR_io_uring_setup, entries, p);
}

static int
sys_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags)
{
    return (int)syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, NULL, 0);
}

static int
sys_register(int fd, unsigned opcode, void *arg, unsigned nr)
{
    return (int)syscall(__NR_io_uring_register, fd, opcode, arg, nr);
}

/* Map the rings of `fd`, set up with `p`. 0 or -errno. */
static int
ring_map(RingQueue *q, struct io_uring_params *p)
{
    q->sq_map_len = p->sq_off.array + p->sq_entries * sizeof(unsigned);
    q->cq_map_len = p->cq_off.cqes + p->cq_entries * sizeof(struct io_uring_cqe);
    if (p->features & IORING_FEAT_SINGLE_MMAP) {
        if (q->cq_map_len > q->sq_map_len)
            q->sq_map_len = q->cq_map_len;
        q->cq_map_len = 0;
    }
    q->sq_map = mmap(NULL, q->sq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                     q->ring_fd, IORING_OFF_SQ_RING);
    if (q->sq_map == MAP_FAILED) {
        q->sq_map = NULL;
        return -errno;
    }
    if (q->cq_map_len) {
        q->cq_map = mmap(NULL, q->cq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                         q->ring_fd, IORING_OFF_CQ_RING);
        if (q->cq_map == MAP_FAILED) {
            q->cq_map = NULL;
            return -errno;
        }
    }
    char *cq = q->cq_map ? q->cq_map : q->sq_map;
    char *sq = q->sq_map;
    q->sqes_len = p->sq_entries * sizeof(struct io_uring_sqe);
    q->sqes = mmap(NULL, q->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   q->ring_fd, IORING_OFF_SQES);
    if (q->sqes == MAP_FAILED) {
        q->sqes = NULL;
        return -errno;
    }
    q->sq_head = (_Atomic unsigned *)(sq + p->sq_off.head);
    q->sq_tail = (_Atomic unsigned *)(sq + p->sq_off.tail);
    q->sq_mask = *(unsigned *)(sq + p->sq_off.ring_mask);
    q->sq_array = (unsigned *)(sq + p->sq_off.array);
    q->cq_head = (_Atomic unsigned *)(cq + p->cq_off.head);
    q->cq_tail = (_Atomic unsigned *)(cq + p->cq_off.tail);
    q->cq_mask = *(unsigned *)(cq + p->cq_off.ring_mask);
    q->cqes = (struct io_uring_cqe *)(cq + p->cq_off.cqes);
    return 0;
}

static void
ring_unmap(RingQueue *q)
{
    if (q->sqes != NULL)
        munmap(q->sqes, q->sqes_len);
    if (q->cq_map != NULL)
        munmap(q->cq_map, q->cq_map_len);
    if (q->sq_map != NULL)
        munmap(q->sq_map, q->sq_map_len);
    q->sqes = NULL;
    q->cq_map = q->sq_map = NULL;
}

/* Put the rest of j's read on the submission queue (not yet entered). A slot is free:
 * in_ring < depth <= sq entries. */
static void
ring_push(RingQueue *q, Job *j)
{
    unsigned tail = atomic_load_explicit(q->sq_tail, memory_order_relaxed);
    unsigned idx = tail & q->sq_mask;
    struct io_uring_sqe *sqe = &q->sqes[idx];
    memset(sqe, 0, sizeof *sqe);
    sqe->opcode = j->write ? IORING_OP_WRITE : IORING_OP_READ;
    sqe->rw_flags = j->rw_flags;
    sqe->fd = j->fd;
    sqe->addr = (uint64_t)(uintptr_t)(j->target + j->got);
    sqe->len = (uint32_t)(j->target_len - j->got);
    sqe->off = (uint64_t)(j->target_offset + (long long)j->got);
    sqe->user_data = (uint64_t)(uintptr_t)j;
    q->sq_array[idx] = idx;
    atomic_store_explicit(q->sq_tail, tail + 1, memory_order_release);
    q->in_ring++;
    q->unsubmitted++;
    if ((long)q->in_ring > q->peak)
        q->peak = (long)q->in_ring;
}

/* Hand the kernel what ring_push queued. 0 or -errno (the entries then stay queued). */
static int
ring_enter(RingQueue *q)
{
    while (q->unsubmitted > 0) {
        int n = sys_enter(q->ring_fd, q->unsubmitted, 0, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EAGAIN;
        q->unsubmitted -= (unsigned)n;
    }
    return 0;
}

/* One read needs this many bytes of the job's target: bytes past the end of the file
 * read as zeros. */
static void
job_eof(Job *j)
{
    memset(j->target + j->got, 0, j->target_len - j->got);
    j->got = j->target_len;
}

/* Reap every completion: finished jobs are appended, in completion order, to the chain
 * whose last next pointer is *done_tail; short ones go back on the submission queue. */
static void
ring_reap(RingQueue *q, Job ***done_tail)
{
    unsigned head = atomic_load_explicit(q->cq_head, memory_order_relaxed);
    unsigned tail = atomic_load_explicit(q->cq_tail, memory_order_acquire);
    for (; head != tail; head++) {
        struct io_uring_cqe *cqe = &q->cqes[head & q->cq_mask];
        Job *j = (Job *)(uintptr_t)cqe->user_data;
        int res = cqe->res;
        q->in_ring--;
        if (res == -EINTR || res == -EAGAIN) {
            ring_push(q, j);
            continue;
        }
        if (res < 0) {
            j->result = res;
        } else if (res == 0 && j->write) {
            /* A write that takes nothing would be retried without end: the device or
             * the file system is refusing it without saying why. */
            j->result = -EIO;
        } else {
            if (res == 0)
                job_eof(j);
            else
                j->got += (size_t)res;
            if (j->got < j->target_len) {
                ring_push(q, j);     /* short: read the rest */
                continue;
            }
            j->result = 0;
        }
        j->next = NULL;
        **done_tail = j;
        *done_tail = &j->next;
    }
    atomic_store_explicit(q->cq_head, head, memory_order_release);
}

/* GIL held. Bounce copies, then the transforms of the batch's successful reads. */
static void
finish_batch(Job *done)
{
    size_t transform_bytes = 0;
    for (Job *j = done; j != NULL; j = j->next) {
        if (j->result < 0)
            continue;
        if (j->bounce != NULL && !j->write)
            memcpy(j->buf.buf, j->bounce + (j->offset - j->target_offset), (size_t)j->buf.len);
        j->result = (long)j->buf.len;
        if (j->ops != NULL)
            transform_bytes += (size_t)j->buf.len;
    }
    if (transform_bytes == 0)
        return;
    PyThreadState *ts = NULL;
    if (transform_bytes >= TRANSFORM_UNLOCKED)
        ts = PyEval_SaveThread();
    for (Job *j = done; j != NULL; j = j->next) {
        if (j->result < 0 || j->ops == NULL)
            continue;
        int err = j->ops->run(j->owner, j->state, (unsigned char *)j->buf.buf,
                              (size_t)j->buf.len, j->first);
        if (err)
            j->result = -(long)err;
    }
    if (ts != NULL)
        PyEval_RestoreThread(ts);
}

/* GIL held. Releases what submit() took; a write's `done` runs here, once, whatever
 * became of the write (a pending exception is kept across it). */
static void
job_free(Job *j)
{
    if (j->done != NULL) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyObject *r = PyObject_CallNoArgs(j->done);
        if (r == NULL)
            PyErr_WriteUnraisable(j->done);
        Py_XDECREF(r);
        Py_DECREF(j->done);
        PyErr_Restore(type, value, tb);
    }
    PyBuffer_Release(&j->buf);
    if (j->ops != NULL)
        j->ops->end(j->owner, j->state);
    Py_XDECREF(j->capsule);
    Py_XDECREF(j->token);
    free(j->bounce);
    PyMem_RawFree(j);
}

/* GIL held. Reports every job of the chain (token, result) into a new list and frees
 * them all, even when the list cannot grow (the error goes up then). */
static PyObject *
report(Job *chain)
{
    PyObject *list = PyList_New(0);
    Job *next;
    for (Job *j = chain; j != NULL; j = next) {
        next = j->next;
        if (list != NULL) {
            PyObject *item = Py_BuildValue("(Ol)", j->token, j->result);
            if (item == NULL || PyList_Append(list, item) < 0)
                Py_CLEAR(list);
            Py_XDECREF(item);
        }
        job_free(j);
    }
    return list;
}

/* Move backlog reads into the free slots of the ring. */
static void
fill_from_backlog(RingQueue *q)
{
    while (q->backlog_head != NULL && q->in_ring < q->depth) {
        Job *j = q->backlog_head;
        q->backlog_head = j->next;
        if (q->backlog_head == NULL)
            q->backlog_tail = NULL;
        ring_push(q, j);
    }
}

static void
backlog_append(RingQueue *q, Job *j)
{
    j->next = NULL;
    if (q->backlog_tail != NULL)
        q->backlog_tail->next = j;
    else
        q->backlog_head = j;
    q->backlog_tail = j;
}

static PyObject *
ringq_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"depth", "defer", "taskrun", "later", NULL};
    int depth;
    PyObject *defer = Py_None, *later = Py_None;
    const char *taskrun = "signal";
    RingQueue *q;
    struct io_uring_params p;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i|OsO:RingQueue", kwlist, &depth, &defer,
                                     &taskrun, &later))
        return NULL;
    if (later != Py_None && !PyCallable_Check(later))
        return PyErr_Format(PyExc_TypeError, "later must be callable or None");
    unsigned extra;
    if (strcmp(taskrun, "signal") == 0)
        extra = 0;
    else if (strcmp(taskrun, "coop") == 0)
        extra = IORING_SETUP_COOP_TASKRUN;
    else if (strcmp(taskrun, "defer") == 0)
        extra = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    else
        return PyErr_Format(PyExc_ValueError, "taskrun must be signal, coop or defer, not %s",
                            taskrun);
    if (depth < 1 || depth > 4096)
        return PyErr_Format(PyExc_ValueError, "depth must be in [1, 4096], not %d", depth);
    if (defer != Py_None && !PyCallable_Check(defer))
        return PyErr_Format(PyExc_TypeError, "defer must be callable or None");
    q = (RingQueue *)type->tp_alloc(type, 0);
    if (q == NULL)
        return NULL;
    if (defer != Py_None) {
        Py_INCREF(defer);
        q->defer = defer;
    }
    if (later != Py_None) {
        Py_INCREF(later);
        q->later = later;
    }
    q->ring_fd = q->efd = -1;
    q->closed = 1;                     /* until everything below exists */
    q->depth = (unsigned)depth;
    /* SUBMIT_ALL: a read refused at submission (a bad fd) fails alone, as a completion,
     * instead of stopping the submission of those behind it (Linux 5.18). */
    memset(&p, 0, sizeof p);
    p.flags = IORING_SETUP_SUBMIT_ALL | extra;
    q->ring_fd = sys_setup((unsigned)depth, &p);
    if (q->ring_fd < 0 && errno == EINVAL && extra) {
        memset(&p, 0, sizeof p);
        p.flags = IORING_SETUP_SUBMIT_ALL;
        q->ring_fd = sys_setup((unsigned)depth, &p);
    }
    if (q->ring_fd < 0 && errno == EINVAL) {
        memset(&p, 0, sizeof p);
        q->ring_fd = sys_setup((unsigned)depth, &p);
    }
    if (q->ring_fd < 0)
        goto oserror;
    int rc = ring_map(q, &p);
    if (rc < 0) {
        errno = -rc;
        goto oserror;
    }
    q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (q->efd < 0)
        goto oserror;
    if (sys_register(q->ring_fd, IORING_REGISTER_EVENTFD, &q->efd, 1) < 0)
        goto oserror;
    q->defer_taskrun = (p.flags & IORING_SETUP_DEFER_TASKRUN) != 0;
    q->taskrun = (p.flags & IORING_SETUP_DEFER_TASKRUN) ? "defer"
                 : (p.flags & IORING_SETUP_COOP_TASKRUN) ? "coop" : "signal";
    q->closed = 0;
    return (PyObject *)q;
oserror:
    PyErr_SetFromErrno(PyExc_OSError);
    Py_DECREF(q);
    return NULL;
}

/* GIL held. Take a job that submit() or submit_write() made (token set): into the
 * ring, or the backlog when the ring is full. None, or an exception with the job freed. */
static PyObject *
enqueue(RingQueue *q, Job *j)
{
    q->in_flight++;
    if (q->in_ring >= q->depth || q->backlog_head != NULL) {
        backlog_append(q, j);        /* in order, behind those already waiting */
        Py_RETURN_NONE;
    }
    ring_push(q, j);
    if (q->defer != NULL) {
        /* Batched: one enter for every read submitted in this turn of the loop, so the
         * kernel plugs them together (one device kick per batch, not per read). */
        if (q->flush_scheduled)
            Py_RETURN_NONE;
        PyObject *flush = PyObject_GetAttrString((PyObject *)q, "flush");
        PyObject *handle = flush == NULL ? NULL : PyObject_CallOneArg(q->defer, flush);
        Py_XDECREF(flush);
        if (handle != NULL) {
            Py_DECREF(handle);
            q->flush_scheduled = 1;
            Py_RETURN_NONE;
        }
        PyErr_Clear();               /* a loop closing: enter at once instead */
    }
    int rc = ring_enter(q);
    if (rc < 0) {
        /* The kernel took none of what is queued (it takes all or reports the rest as
         * completions): take this read back off the submission queue. */
        unsigned tail = atomic_load_explicit(q->sq_tail, memory_order_relaxed);
        atomic_store_explicit(q->sq_tail, tail - 1, memory_order_release);
        q->in_ring--;
        q->unsubmitted--;
        if (q->in_ring > 0) {
            backlog_append(q, j);    /* a completion will bring it in */
            Py_RETURN_NONE;
        }
        q->in_flight--;
        Py_CLEAR(j->done);           /* refused: the caller still owns what done() ends */
        job_free(j);
        errno = -rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

/* submit(token, buf, fd, offset, transform=None, first=0, align=0): as ReadQueue's. */
static PyObject *
ringq_submit(RingQueue *q, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"token", "buf", "fd", "offset", "transform", "first", "align", NULL};
    PyObject *token, *buf, *capsule = Py_None;
    int fd, align = 0;
    long long offset;
    unsigned long long first = 0;
    Job *j;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOiL|OKi:submit", kwlist, &token, &buf, &fd,
                                     &offset, &capsule, &first, &align))
        return NULL;
    if (q->closed)
        return PyErr_Format(PyExc_ValueError, "submit on a closed RingQueue");
    if (fd < 0 || offset < 0)
        return PyErr_Format(PyExc_ValueError, "submit: bad fd or offset");
    /* O_DIRECT's alignment is a block size: a power of two, 512 to 1 MiB. */
    if (align != 0 && (align < 512 || align > (1 << 20) || (align & (align - 1))))
        return PyErr_Format(PyExc_ValueError, "submit: align must be 0 or a power of two "
                            "from 512 to 1 MiB, not %d", align);
    j = PyMem_RawCalloc(1, sizeof *j);
    if (j == NULL)
        return PyErr_NoMemory();
    if (PyObject_GetBuffer(buf, &j->buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyMem_RawFree(j);
        return NULL;
    }
    if ((unsigned long long)j->buf.len > UINT32_MAX / 2) {
        PyErr_Format(PyExc_ValueError, "submit: a read of at most 2 GiB, not %zd bytes",
                     j->buf.len);
        goto fail;
    }
    j->fd = fd;
    j->offset = offset;
    j->first = first;
    j->target = j->buf.buf;
    j->target_len = (size_t)j->buf.len;
    j->target_offset = offset;
    long long a = align;
    if (a > 0 && (((long long)(uintptr_t)j->buf.buf | offset | (long long)j->buf.len) & (a - 1))) {
        long long lo = offset / a * a;
        long long hi = (offset + (long long)j->buf.len + a - 1) / a * a;
        void *mem = NULL;
        if (posix_memalign(&mem, (size_t)a, (size_t)(hi - lo)) != 0) {
            PyErr_NoMemory();
            goto fail;
        }
        j->bounce = j->target = mem;
        j->target_len = (size_t)(hi - lo);
        j->target_offset = lo;
    }
    if (capsule != Py_None) {
        j->ops = PyCapsule_GetPointer(capsule, READQ_TRANSFORM_CAPSULE);
        if (j->ops == NULL)
            goto fail;
        j->owner = PyCapsule_GetContext(capsule);
        j->state = j->ops->begin(j->owner);
        if (j->state == NULL) {
            j->ops = NULL;
            goto fail;
        }
        Py_INCREF(capsule);
        j->capsule = capsule;
    }
    Py_INCREF(token);
    j->token = token;
    return enqueue(q, j);
fail:
    PyBuffer_Release(&j->buf);
    free(j->bounce);
    PyMem_RawFree(j);
    return NULL;
}

/* submit_write(token, buf, fd, offset, fua=False, align=0, done=None): see the method's
 * doc. The buffer is pinned read-only; with align, an unaligned one is copied into an
 * aligned buffer of the job's own now (the caller may reuse it at once then). */
static PyObject *
ringq_submit_write(RingQueue *q, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"token", "buf", "fd", "offset", "fua", "align", "done", NULL};
    PyObject *token, *buf, *done = Py_None;
    int fd, fua = 0, align = 0;
    long long offset;
    Job *j;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOiL|piO:submit_write", kwlist, &token, &buf,
                                     &fd, &offset, &fua, &align, &done))
        return NULL;
    if (q->closed)
        return PyErr_Format(PyExc_ValueError, "submit_write on a closed RingQueue");
    if (fd < 0 || offset < 0)
        return PyErr_Format(PyExc_ValueError, "submit_write: bad fd or offset");
    if (align != 0 && (align < 512 || align > (1 << 20) || (align & (align - 1))))
        return PyErr_Format(PyExc_ValueError, "submit_write: align must be 0 or a power of two "
                            "from 512 to 1 MiB, not %d", align);
    if (done != Py_None && !PyCallable_Check(done))
        return PyErr_Format(PyExc_TypeError, "submit_write: done must be callable or None");
    j = PyMem_RawCalloc(1, sizeof *j);
    if (j == NULL)
        return PyErr_NoMemory();
    if (PyObject_GetBuffer(buf, &j->buf, PyBUF_C_CONTIGUOUS) < 0) {
        PyMem_RawFree(j);
        return NULL;
    }
    long long a = align;
    if ((unsigned long long)j->buf.len > UINT32_MAX / 2 || j->buf.len == 0 ||
        (a > 0 && ((offset | (long long)j->buf.len) & (a - 1)))) {
        /* O_DIRECT cannot write part of a block: read-modify-write is the layer's. */
        PyErr_Format(PyExc_ValueError, "submit_write: 1 byte to 2 GiB%s, not %zd bytes at %lld",
                     a > 0 ? " in whole aligned blocks" : "", j->buf.len, offset);
        PyBuffer_Release(&j->buf);
        PyMem_RawFree(j);
        return NULL;
    }
    j->write = 1;
    j->rw_flags = fua ? RWF_DSYNC : 0;
    j->fd = fd;
    j->offset = j->target_offset = offset;
    j->target = j->buf.buf;
    j->target_len = (size_t)j->buf.len;
    if (a > 0 && ((uintptr_t)j->buf.buf & (uintptr_t)(a - 1))) {
        void *mem = NULL;
        if (posix_memalign(&mem, (size_t)a, j->target_len) != 0) {
            PyBuffer_Release(&j->buf);
            PyMem_RawFree(j);
            return PyErr_NoMemory();
        }
        memcpy(mem, j->buf.buf, j->target_len);
        j->bounce = j->target = mem;
    }
    if (done != Py_None) {
        Py_INCREF(done);
        j->done = done;
    }
    Py_INCREF(token);
    j->token = token;
    return enqueue(q, j);
}

/* GIL held. Enter what submit() queued; on failure as in collect(). */
static void
ringq_enter_or_retry(RingQueue *q)
{
    /* On failure (the kernel short of memory) the entries stay queued and the next
     * collect() retries them. When nothing else is in the kernel to bring one, `later`
     * schedules a retry, backing off while the kernel keeps refusing; without it the
     * eventfd is made readable so that the loop calls again (at once: a spin). */
    if (ring_enter(q) == 0) {
        q->retry_ms = 0;
        return;
    }
    if (q->in_ring != q->unsubmitted)
        return;
    if (q->later != NULL) {
        if (q->retry_scheduled)
            return;
        q->retry_ms = q->retry_ms == 0 ? RETRY_FIRST_MS
                      : q->retry_ms * 2 > RETRY_MAX_MS ? RETRY_MAX_MS : q->retry_ms * 2;
        PyObject *retry = PyObject_GetAttrString((PyObject *)q, "_retry");
        PyObject *handle = retry == NULL ? NULL
            : PyObject_CallFunction(q->later, "dO", q->retry_ms / 1000.0, retry);
        Py_XDECREF(retry);
        if (handle != NULL) {
            Py_DECREF(handle);
            q->retry_scheduled = 1;
            return;
        }
        PyErr_Clear();               /* a loop closing: the eventfd instead */
    }
    uint64_t one = 1;
    (void)!write(q->efd, &one, sizeof one);
}

static PyObject *
ringq_retry(RingQueue *q, PyObject *Py_UNUSED(ignored))
{
    q->retry_scheduled = 0;
    if (!q->closed)
        ringq_enter_or_retry(q);
    Py_RETURN_NONE;
}

static PyObject *
ringq_flush(RingQueue *q, PyObject *Py_UNUSED(ignored))
{
    q->flush_scheduled = 0;
    if (!q->closed)
        ringq_enter_or_retry(q);
    Py_RETURN_NONE;
}

static PyObject *
ringq_collect(RingQueue *q, PyObject *Py_UNUSED(ignored))
{
    uint64_t v;
    Job *done = NULL, **done_tail = &done;
    if (q->closed)
        return PyList_New(0);
    /* Read the eventfd before reaping: a completion posted after the reap then makes it
     * readable again, so none is left unseen. */
    (void)!read(q->efd, &v, sizeof v);
    if (q->defer_taskrun)            /* run the completions the kernel holds for us */
        (void)sys_enter(q->ring_fd, 0, 0, IORING_ENTER_GETEVENTS);
    ring_reap(q, &done_tail);
    fill_from_backlog(q);
    ringq_enter_or_retry(q);
    finish_batch(done);
    for (Job *j = done; j != NULL; j = j->next)
        q->in_flight--;
    return report(done);
}

/* GIL held. Cancels the backlog, waits for every read in the ring (short ones read to
 * the end), unmaps and closes. The jobs, in a chain: finished first, then cancelled.
 * Returns -errno (leaking the reads in the ring, whose buffers the kernel may still
 * write) only if the kernel refuses to wait. */
static int
ringq_stop(RingQueue *q, Job **chain)
{
    Job *done = NULL, **done_tail = &done;
    Job *cancelled = q->backlog_head;
    int rc = 0;
    q->closed = 1;
    q->backlog_head = q->backlog_tail = NULL;
    for (Job *j = cancelled; j != NULL; j = j->next)
        j->result = -ECANCELED;
    ring_reap(q, &done_tail);
    while (q->in_ring > 0) {
        int n;
        Py_BEGIN_ALLOW_THREADS
        n = sys_enter(q->ring_fd, q->unsubmitted, 1, IORING_ENTER_GETEVENTS);
        Py_END_ALLOW_THREADS
        if (n < 0 && errno != EINTR) {
            rc = -errno;
            break;
        }
        if (n > 0)
            q->unsubmitted -= (unsigned)n;
        ring_reap(q, &done_tail);
    }
    if (rc == 0) {
        finish_batch(done);
        *done_tail = cancelled;
        *chain = done;
        ring_unmap(q);
        close(q->ring_fd);
    } else {
        *chain = cancelled;          /* the rest stays with the ring, never freed */
    }
    q->ring_fd = -1;
    close(q->efd);
    q->efd = -1;
    q->in_flight = 0;
    q->in_ring = 0;
    return rc;                       /* 0, or -errno of the failed wait */
}

static PyObject *
ringq_close(RingQueue *q, PyObject *Py_UNUSED(ignored))
{
    Job *chain = NULL;
    if (q->closed)
        return PyList_New(0);
    int rc = ringq_stop(q, &chain);
    if (rc < 0) {
        Py_XDECREF(report(chain));
        errno = -rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return report(chain);
}

static PyObject *
ringq_fileno(RingQueue *q, PyObject *Py_UNUSED(ignored))
{
    if (q->closed)
        return PyErr_Format(PyExc_ValueError, "fileno of a closed RingQueue");
    return PyLong_FromLong(q->efd);
}

static void
ringq_dealloc(RingQueue *q)
{
    if (!q->closed) {
        Job *chain = NULL;
        (void)ringq_stop(q, &chain);
        Py_XDECREF(report(chain));
        PyErr_Clear();
    } else {
        ring_unmap(q);
        if (q->ring_fd >= 0)
            close(q->ring_fd);
        if (q->efd >= 0)
            close(q->efd);
    }
    Py_XDECREF(q->defer);
    Py_XDECREF(q->later);
    Py_TYPE(q)->tp_free((PyObject *)q);
}

static PyObject *
ringq_peak(RingQueue *q, void *Py_UNUSED(c))
{
    return PyLong_FromLong(q->peak);
}

static PyObject *
ringq_threads(RingQueue *Py_UNUSED(q), void *Py_UNUSED(c))
{
    return PyLong_FromLong(0);         /* the kernel's, not ours */
}

static PyObject *
ringq_in_flight(RingQueue *q, void *Py_UNUSED(c))
{
    return PyLong_FromSsize_t(q->in_flight);
}

static PyMethodDef ringq_methods[] = {
    {"submit", (PyCFunction)(void (*)(void))ringq_submit, METH_VARARGS | METH_KEYWORDS,
     "submit(token, buf, fd, offset, transform=None, first=0, align=0): fill all of the "
     "writable buf from fd at offset (zeros past the end of the file) through the ring, "
     "then run the transform capsule's function over it (data unit `first` first) when "
     "collected; collect() reports (token, result). buf stays pinned until then. With "
     "align (an O_DIRECT fd), an unaligned read goes through an aligned bounce buffer."},
    {"submit_write", (PyCFunction)(void (*)(void))ringq_submit_write,
     METH_VARARGS | METH_KEYWORDS,
     "submit_write(token, buf, fd, offset, fua=False, align=0, done=None): write all of "
     "buf to fd at offset through the ring (RWF_DSYNC with fua); collect() reports "
     "(token, bytes or -errno) as for reads. With align (an O_DIRECT fd) the offset and "
     "length must be multiples of it, and an unaligned buf is copied into an aligned one. "
     "done() runs once the write is reported or dropped by close(), never when this "
     "raises: the caller's lock on the range is released there."},
    {"flush", (PyCFunction)ringq_flush, METH_NOARGS,
     "flush(): hand the kernel the reads submitted since the last flush (what `defer` "
     "schedules; harmless at any time)."},
    {"_retry", (PyCFunction)ringq_retry, METH_NOARGS,
     "_retry(): what `later` runs after a refused submission (flush, then back off "
     "further if the kernel still refuses)."},
    {"collect", (PyCFunction)ringq_collect, METH_NOARGS,
     "collect() -> [(token, result)]: the reads finished since the last call; result is "
     "the number of bytes, or -errno for that read."},
    {"close", (PyCFunction)ringq_close, METH_NOARGS,
     "close() -> [(token, result)]: wait for the reads in the ring, and return the reads "
     "not collected (those never started with -ECANCELED). Idempotent."},
    {"fileno", (PyCFunction)ringq_fileno, METH_NOARGS,
     "The eventfd (registered with the ring) that becomes readable when collect() has "
     "something."},
    {NULL, NULL, 0, NULL},
};

static PyObject *
ringq_retry_delay(RingQueue *q, void *Py_UNUSED(c))
{
    return PyFloat_FromDouble(q->retry_ms / 1000.0);
}

static PyObject *
ringq_taskrun(RingQueue *q, void *Py_UNUSED(c))
{
    return PyUnicode_FromString(q->taskrun != NULL ? q->taskrun : "signal");
}

static PyGetSetDef ringq_getset[] = {
    {"taskrun", (getter)ringq_taskrun, NULL, "the task-work mode the kernel took", NULL},
    {"retry_delay", (getter)ringq_retry_delay, NULL,
     "seconds until the retry of a refused submission (0: none refused)", NULL},
    {"peak", (getter)ringq_peak, NULL, "the most reads in the ring at once", NULL},
    {"threads", (getter)ringq_threads, NULL, "0: the ring starts no thread of ours", NULL},
    {"in_flight", (getter)ringq_in_flight, NULL, "reads submitted and not collected", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RingQueueType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nbdserver._uring.RingQueue",
    .tp_basicsize = sizeof(RingQueue),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "RingQueue(depth, defer=None, taskrun='signal', later=None): ReadQueue's API on io_uring, "
              "plus submit_write: reads and writes submitted from the calling thread, at most "
              "depth in the kernel at once, completions through an eventfd. With defer (an "
              "event loop's call_soon), the I/O of one turn of the loop enters the kernel "
              "together, in flush(), which defer runs; later (the loop's call_later) retries, "
              "backing off, a submission the kernel refused. taskrun: signal, coop or defer "
              "(how the kernel runs completions' task work; defer: only the thread that "
              "made the ring may use it).",
    .tp_new = ringq_new,
    .tp_dealloc = (destructor)ringq_dealloc,
    .tp_methods = ringq_methods,
    .tp_getset = ringq_getset,
};

static struct PyModuleDef uring_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "nbdserver._uring",
    .m_doc = "The read queue on io_uring (see _uring.c).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__uring(void)
{
    PyObject *m;
    if (PyType_Ready(&RingQueueType) < 0)
        return NULL;
    m = PyModule_Create(&uring_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RingQueueType);
    if (PyModule_AddObject(m, "RingQueue", (PyObject *)&RingQueueType) < 0) {
        Py_DECREF(&RingQueueType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
