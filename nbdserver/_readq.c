/*
 * nbdserver._readq: reads that miss the page cache, on native threads that never take
 * the GIL, their completions collected by the event loop in batches.
 *
 * Why native: with a ThreadPoolExecutor each cold read went loop -> worker -> loop, and
 * the worker took the GIL twice (to pick up the job, and after preadv to complete the
 * future and wake the loop), while the loop gave the GIL up at each of its own system
 * calls. Cold 4 KiB reads at queue depth 16 then spent about 1.8 ms each in the server,
 * nearly all of it threads queuing for the GIL, not the disk: the reads were serialized
 * by the lock, and more workers changed nothing. Here a thread takes a job from a mutex
 * protected list, runs preadv (and the layer's transform: XTS decryption), pushes the
 * job on a lock-free done stack, and writes the queue's eventfd only when that stack
 * was empty. The loop watches the eventfd (loop.add_reader) and takes every finished
 * read in one collect() call.
 *
 * The event loop's thread is the one to spare: it runs every request's Python code. So
 * it wakes at most one sleeping thread per burst of submissions, and always outside the
 * mutex (a thread woken inside it would only block on it, and the loop would pay a
 * second futex call to hand it over); each thread that takes a job and sees more
 * waiting wakes the next one. Completions never touch the mutex.
 *
 * Ownership: submit() (GIL held) takes a reference to the token and to the transform
 * capsule and a writable Py_buffer on the destination, which pins it (a bytearray
 * cannot be resized or freed while exported). The threads see only the raw pointer,
 * length, fd and offset. collect() and close() (GIL held) release all three. So a
 * caller's buffer, and the layer behind a transform (a disk's key), stay alive until
 * the read is collected.
 *
 * O_DIRECT (a disk with cache=none): a read submitted with `align` is done straight into
 * the caller's buffer when its address, offset and length are all multiples of it, and
 * otherwise into the thread's own aligned bounce buffer (the aligned blocks around the
 * range) and copied out: the server's request buffers are plain heap memory, and a 4 KiB
 * copy costs far less than the read.
 *
 * Threads: started on demand, one more whenever more reads wait than threads are idle,
 * up to `max_threads`; so the reads in progress follow the clients' queue depth. A
 * thread lives until close(), which lets running reads finish, joins every thread and
 * hands back the reads not collected yet (those never started fail with ECANCELED).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include "_readq.h"

/* The threads only call preadv and a transform (OpenSSL's XTS): a small stack will do,
 * and keeps max_threads of them cheap in address space. */
#define THREAD_STACK (256 * 1024)

typedef struct job {
    struct job *next;
    PyObject *token;                 /* owned; touched only with the GIL */
    Py_buffer buf;                   /* pinned until collected */
    int fd;
    int align;                       /* O_DIRECT's alignment, or 0 */
    long long offset;
    PyObject *capsule;               /* the transform's capsule, owned, or NULL */
    const ReadTransform *ops;
    void *owner;
    void *state;
    uint64_t first;
    long result;                     /* bytes read, or -errno */
} Job;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    pthread_cond_t cv;
    /* Under mu: */
    Job *queue_head, *queue_tail;    /* submitted, not started */
    int stopping;
    int n_threads;
    int idle;                        /* threads waiting for a job */
    int wakes;                       /* of those, signalled and not yet running */
    Py_ssize_t waiting;              /* jobs in the queue */
    /* Lock-free: */
    _Atomic(Job *) done;             /* finished, not collected: a stack (newest first) */
    atomic_long busy;                /* jobs on threads right now */
    atomic_long peak;                /* the most jobs on threads at once */
    /* GIL only: */
    int efd;
    int closed;
    int max_threads;
    Py_ssize_t in_flight;            /* submitted, not collected */
    pthread_t *threads;
} ReadQueue;

/* No GIL. Fill `len` bytes at `p` from the file at `offset`: bytes past its end read as
 * zeros, like a hole (FileBackend.pread does the same). 0 or -errno. */
static long
pread_full(int fd, char *p, size_t len, long long offset)
{
    size_t got = 0;
    while (got < len) {
        struct iovec iov = {p + got, len - got};
        ssize_t n = preadv(fd, &iov, 1, (off_t)(offset + (long long)got));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -(long)errno;
        }
        if (n == 0) {
            memset(p + got, 0, len - got);
            break;
        }
        got += (size_t)n;
    }
    return 0;
}

/* This thread's aligned bounce buffer for O_DIRECT reads, grown as needed, freed when
 * the thread ends (worker). */
static __thread char *bounce;
static __thread size_t bounce_len;

/* No GIL. The aligned blocks around the job's range into the bounce buffer, then its
 * bytes into the job's buffer. */
static long
read_bounced(Job *j)
{
    long long a = j->align;
    long long lo = j->offset / a * a;
    long long hi = (j->offset + (long long)j->buf.len + a - 1) / a * a;
    size_t need = (size_t)(hi - lo);
    if (need > bounce_len) {
        void *mem = NULL;
        if (posix_memalign(&mem, (size_t)a, need) != 0)
            return -ENOMEM;
        free(bounce);
        bounce = mem;
        bounce_len = need;
    }
    long rc = pread_full(j->fd, bounce, need, lo);
    if (rc == 0)
        memcpy(j->buf.buf, bounce + (j->offset - lo), (size_t)j->buf.len);
    return rc;
}

/* No GIL. Read the job's range (through the bounce buffer when O_DIRECT needs one), then
 * run the layer's transform over it. Bytes read, or -errno. */
static long
read_all(Job *j)
{
    char *p = j->buf.buf;
    size_t len = (size_t)j->buf.len;
    long rc;
    long long a = j->align;
    if (a > 0 && (((long long)(uintptr_t)p | j->offset | (long long)len) & (a - 1)))
        rc = read_bounced(j);
    else
        rc = pread_full(j->fd, p, len, j->offset);
    if (rc < 0)
        return rc;
    if (j->ops != NULL) {
        int err = j->ops->run(j->owner, j->state, (unsigned char *)p, len, j->first);
        if (err)
            return -(long)err;
    }
    return (long)len;
}

/* q->mu held: whether to wake one more sleeping thread (then counted as woken). */
static int
want_wake(ReadQueue *q)
{
    if (q->waiting > q->wakes && q->idle > q->wakes) {
        q->wakes++;
        return 1;
    }
    return 0;
}

static void
finished(ReadQueue *q, Job *j)
{
    Job *top = atomic_load(&q->done);
    do {
        j->next = top;
    } while (!atomic_compare_exchange_weak(&q->done, &top, j));
    if (top == NULL) {
        /* The first of a batch wakes the loop; the rest ride along. collect() reads the
         * eventfd before it takes the stack, so a push after the take finds it empty and
         * writes again: no completion is left unseen. */
        uint64_t one = 1;
        (void)!write(q->efd, &one, sizeof one);
    }
}

static void *
worker(void *arg)
{
    ReadQueue *q = arg;
    for (;;) {
        int wake;
        pthread_mutex_lock(&q->mu);
        while (q->queue_head == NULL && !q->stopping) {
            q->idle++;
            pthread_cond_wait(&q->cv, &q->mu);
            q->idle--;
            if (q->wakes > 0)
                q->wakes--;
        }
        if (q->stopping) {
            pthread_mutex_unlock(&q->mu);
            free(bounce);
            bounce = NULL;
            bounce_len = 0;
            return NULL;
        }
        Job *j = q->queue_head;
        q->queue_head = j->next;
        if (q->queue_head == NULL)
            q->queue_tail = NULL;
        q->waiting--;
        wake = want_wake(q);             /* pass the wake-up on down the queue */
        pthread_mutex_unlock(&q->mu);
        if (wake)
            pthread_cond_signal(&q->cv);

        long busy = atomic_fetch_add(&q->busy, 1) + 1;
        long peak = atomic_load(&q->peak);
        while (busy > peak && !atomic_compare_exchange_weak(&q->peak, &peak, busy))
            ;
        j->result = read_all(j);
        atomic_fetch_sub(&q->busy, 1);
        finished(q, j);
    }
}

static Job *
reversed(Job *j)
{
    Job *out = NULL, *next;
    for (; j != NULL; j = next) {
        next = j->next;
        j->next = out;
        out = j;
    }
    return out;
}

/* GIL held. Releases what submit() took. */
static void
job_free(Job *j)
{
    PyBuffer_Release(&j->buf);
    if (j->ops != NULL)
        j->ops->end(j->owner, j->state);
    Py_XDECREF(j->capsule);
    Py_XDECREF(j->token);
    PyMem_RawFree(j);
}

/* GIL held. Appends (token, result) to list, then frees the job. */
static int
job_report(Job *j, PyObject *list)
{
    PyObject *item = Py_BuildValue("(Ol)", j->token, j->result);
    int rc = item == NULL ? -1 : PyList_Append(list, item);
    Py_XDECREF(item);
    job_free(j);
    return rc;
}

static PyObject *
readq_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"max_threads", NULL};
    int max_threads;
    ReadQueue *q;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i:ReadQueue", kwlist, &max_threads))
        return NULL;
    if (max_threads < 1 || max_threads > 4096)
        return PyErr_Format(PyExc_ValueError, "max_threads must be in [1, 4096], not %d",
                            max_threads);
    q = (ReadQueue *)type->tp_alloc(type, 0);
    if (q == NULL)
        return NULL;
    q->efd = -1;
    q->closed = 1;                     /* until everything below exists */
    q->threads = PyMem_RawCalloc((size_t)max_threads, sizeof(pthread_t));
    if (q->threads == NULL) {
        Py_DECREF(q);
        return PyErr_NoMemory();
    }
    pthread_mutex_init(&q->mu, NULL);
    pthread_cond_init(&q->cv, NULL);
    atomic_init(&q->done, NULL);
    atomic_init(&q->busy, 0);
    atomic_init(&q->peak, 0);
    q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (q->efd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(q);
        return NULL;
    }
    q->max_threads = max_threads;
    q->closed = 0;
    return (PyObject *)q;
}

/* GIL held, q->mu held. */
static int
start_thread(ReadQueue *q)
{
    pthread_attr_t attr;
    sigset_t all, old;
    int rc;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, THREAD_STACK);
    /* The thread starts with every signal blocked: signals go to Python's threads,
     * where the interpreter expects them, and never interrupt a read. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(&q->threads[q->n_threads], &attr, worker, q);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (rc == 0)
        q->n_threads++;
    return rc;
}

/* submit(token, buf, fd, offset, transform=None, first=0, align=0) */
static PyObject *
readq_submit(ReadQueue *q, PyObject *args, PyObject *kwds)
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
        return PyErr_Format(PyExc_ValueError, "submit on a closed ReadQueue");
    if (fd < 0 || offset < 0)
        return PyErr_Format(PyExc_ValueError, "submit: bad fd or offset");
    /* O_DIRECT's alignment is a block size: a power of two, 512 to 1 MiB (and at least
     * what posix_memalign takes for the bounce buffer). */
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
    j->fd = fd;
    j->align = align;
    j->offset = offset;
    j->first = first;

    int wake;
    pthread_mutex_lock(&q->mu);
    if (q->queue_tail != NULL)
        q->queue_tail->next = j;
    else
        q->queue_head = j;
    q->queue_tail = j;
    q->waiting++;
    q->in_flight++;
    /* One wake-up at a time from here: the woken thread wakes the next (worker). */
    wake = q->wakes == 0 && want_wake(q);
    if (q->waiting > q->idle && q->n_threads < q->max_threads) {
        /* A failed start is not this read's failure: a running thread will take it. */
        if (start_thread(q) != 0 && q->n_threads == 0) {
            /* No thread at all: nothing would ever read it. */
            q->queue_head = q->queue_tail = NULL;
            q->waiting--;
            q->in_flight--;
            pthread_mutex_unlock(&q->mu);
            errno = EAGAIN;
            PyErr_SetFromErrno(PyExc_OSError);
            job_free(j);
            return NULL;
        }
    }
    pthread_mutex_unlock(&q->mu);
    if (wake)
        pthread_cond_signal(&q->cv);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&j->buf);
    PyMem_RawFree(j);
    return NULL;
}

static PyObject *
readq_collect(ReadQueue *q, PyObject *Py_UNUSED(ignored))
{
    uint64_t v;
    Job *j, *next;
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    if (q->closed)
        return list;
    /* Read the eventfd before taking the list: a read finishing after the take then
     * finds `signalled` clear and writes it again, so no completion is left unseen. */
    (void)!read(q->efd, &v, sizeof v);
    j = reversed(atomic_exchange(&q->done, NULL));  /* in the order they finished */
    for (; j != NULL; j = next) {
        next = j->next;
        q->in_flight--;
        if (job_report(j, list) < 0) {
            /* Out of memory: free the rest too, the error goes up. */
            for (j = next; j != NULL; j = next) {
                next = j->next;
                q->in_flight--;
                job_free(j);
            }
            Py_DECREF(list);
            return NULL;
        }
    }
    return list;
}

/* GIL held. Stops and joins the threads; returns the jobs not collected. */
static Job *
readq_stop(ReadQueue *q, Job **unstarted)
{
    Job *done;
    pthread_mutex_lock(&q->mu);
    q->stopping = 1;
    pthread_cond_broadcast(&q->cv);
    pthread_mutex_unlock(&q->mu);
    Py_BEGIN_ALLOW_THREADS
    for (int i = 0; i < q->n_threads; i++)
        pthread_join(q->threads[i], NULL);
    Py_END_ALLOW_THREADS
    q->n_threads = 0;
    done = reversed(atomic_exchange(&q->done, NULL));
    *unstarted = q->queue_head;
    q->queue_head = q->queue_tail = NULL;
    q->waiting = 0;
    q->in_flight = 0;
    return done;
}

static PyObject *
readq_close(ReadQueue *q, PyObject *Py_UNUSED(ignored))
{
    Job *done, *unstarted, *next;
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    if (q->closed)
        return list;
    q->closed = 1;
    done = readq_stop(q, &unstarted);
    close(q->efd);
    q->efd = -1;
    for (Job *j = unstarted; j != NULL; j = next) {
        next = j->next;
        j->result = -ECANCELED;
    }
    /* Every job is freed even if the list cannot grow: the error goes up after. */
    int failed = 0;
    for (int pass = 0; pass < 2; pass++) {
        for (Job *j = pass ? unstarted : done; j != NULL; j = next) {
            next = j->next;
            if (failed)
                job_free(j);
            else if (job_report(j, list) < 0)
                failed = 1;
        }
    }
    if (failed) {
        Py_DECREF(list);
        return NULL;
    }
    return list;
}

static PyObject *
readq_fileno(ReadQueue *q, PyObject *Py_UNUSED(ignored))
{
    if (q->closed)
        return PyErr_Format(PyExc_ValueError, "fileno of a closed ReadQueue");
    return PyLong_FromLong(q->efd);
}

static void
readq_dealloc(ReadQueue *q)
{
    if (!q->closed) {
        Job *unstarted, *next;
        Job *done = readq_stop(q, &unstarted);
        for (int pass = 0; pass < 2; pass++)
            for (Job *j = pass ? unstarted : done; j != NULL; j = next) {
                next = j->next;
                job_free(j);
            }
        close(q->efd);
    }
    if (q->threads != NULL) {
        pthread_mutex_destroy(&q->mu);
        pthread_cond_destroy(&q->cv);
        PyMem_RawFree(q->threads);
    }
    Py_TYPE(q)->tp_free((PyObject *)q);
}

#define LOCKED_COUNT(name, field)                                           \
    static PyObject *name(ReadQueue *q, void *Py_UNUSED(c))                      \
    {                                                                            \
        Py_ssize_t v;                                                            \
        pthread_mutex_lock(&q->mu);                                              \
        v = q->field;                                                            \
        pthread_mutex_unlock(&q->mu);                                            \
        return PyLong_FromSsize_t(v);                                            \
    }

LOCKED_COUNT(readq_threads, n_threads)

static PyObject *
readq_peak(ReadQueue *q, void *Py_UNUSED(c))
{
    return PyLong_FromLong(atomic_load(&q->peak));
}

static PyObject *
readq_in_flight(ReadQueue *q, void *Py_UNUSED(c))
{
    return PyLong_FromSsize_t(q->in_flight);   /* changed only with the GIL held */
}

static PyMethodDef readq_methods[] = {
    {"submit", (PyCFunction)(void (*)(void))readq_submit, METH_VARARGS | METH_KEYWORDS,
     "submit(token, buf, fd, offset, transform=None, first=0, align=0): fill all of the "
     "writable buf from fd at offset (zeros past the end of the file) on a queue thread, "
     "then run the transform capsule's function over it (data unit `first` first); "
     "collect() reports (token, result) later. buf stays pinned until then. With align "
     "(an O_DIRECT fd), an unaligned read goes through an aligned bounce buffer."},
    {"collect", (PyCFunction)readq_collect, METH_NOARGS,
     "collect() -> [(token, result)]: the reads finished since the last call; result is "
     "the number of bytes, or -errno for that read."},
    {"close", (PyCFunction)readq_close, METH_NOARGS,
     "close() -> [(token, result)]: let running reads finish, join every thread, and "
     "return the reads not collected (those never started with -ECANCELED). Idempotent."},
    {"fileno", (PyCFunction)readq_fileno, METH_NOARGS,
     "The eventfd that becomes readable when collect() has something."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef readq_getset[] = {
    {"peak", (getter)readq_peak, NULL, "the most reads in progress on threads at once", NULL},
    {"threads", (getter)readq_threads, NULL, "threads started so far", NULL},
    {"in_flight", (getter)readq_in_flight, NULL, "reads submitted and not collected", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ReadQueueType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nbdserver._readq.ReadQueue",
    .tp_basicsize = sizeof(ReadQueue),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "ReadQueue(max_threads): preadv (plus a layer's transform) on native "
              "threads that never take the GIL; completions through an eventfd.",
    .tp_new = readq_new,
    .tp_dealloc = (destructor)readq_dealloc,
    .tp_methods = readq_methods,
    .tp_getset = readq_getset,
};

static struct PyModuleDef readq_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "nbdserver._readq",
    .m_doc = "Reads on native threads, completions collected in batches (see _readq.c).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__readq(void)
{
    PyObject *m;
    if (PyType_Ready(&ReadQueueType) < 0)
        return NULL;
    m = PyModule_Create(&readq_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ReadQueueType);
    if (PyModule_AddObject(m, "ReadQueue", (PyObject *)&ReadQueueType) < 0 ||
        PyModule_AddStringConstant(m, "TRANSFORM_CAPSULE", READQ_TRANSFORM_CAPSULE) < 0) {
        Py_DECREF(&ReadQueueType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
