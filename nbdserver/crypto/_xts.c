/*
 * nbdserver.crypto._xts: AES-256-XTS (IEEE 1619) over many data units per call.
 *
 * Why native: building a `cryptography` XTS cipher costs 5-35 us, so a Python loop
 * over 4 KiB sectors tops out near 300 MB/s, while OpenSSL runs AES-256-XTS at
 * several GB/s per core. Here the key schedule is made once per Engine and each data
 * unit only resets the tweak (EVP_CipherInit_ex with every argument NULL but the IV),
 * so the per-sector cost is one IV reset plus OpenSSL's own XTS loop.
 *
 * No primitive is implemented here: all cryptography is OpenSSL's EVP AES-256-XTS.
 * This file only walks buffers, counts tweaks and manages contexts.
 *
 * Tweak: data unit i of a call is processed with the 128-bit little-endian integer
 * first_sector + i as the XTS tweak (IEEE 1619 "data unit sequence number"), which is
 * dm-crypt's plain64 IV for any value below 2^64.
 *
 * Threads: an EVP_CIPHER_CTX cannot be shared by two threads at once, so each Engine
 * keeps, per direction, one keyed prototype context (never used for data) and a small
 * pool of idle copies. A call takes a context from the pool (or copies the prototype,
 * which duplicates the key schedule without redoing it), releases the GIL for large
 * inputs, and gives the context back. The pool is touched only with the GIL held, so
 * the GIL is its lock.
 *
 * Mapped sources: decrypt_mapped() reads ciphertext straight out of a file mapping (the
 * page cache), which saves the read copy. Touching a mapped page whose read fails (an
 * I/O error, or a file truncated under the mapping) raises SIGBUS, which would kill the
 * whole server; so that loop runs under a guard: a SIGBUS handler that, only on a thread
 * inside a guarded loop, jumps back out of it (siglongjmp) and the call raises
 * OSError(EIO). Any other SIGBUS goes to the handler that was there before ours, or
 * kills the process as it would have without us.
 *
 * Secrets: the caller's key buffer is read once and not kept. OpenSSL keeps the key
 * schedule in its own heap memory and cleanses it in EVP_CIPHER_CTX_free, which
 * close() and deallocation call for every context.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/provider.h>
#include <openssl/rand.h>
#include <openssl/self_test.h>

#include "../_readq.h"

#ifndef NBDSERVER_STATIC_OPENSSL
#define NBDSERVER_STATIC_OPENSSL 0
#endif

#define KEY_BYTES 64                  /* AES-256-XTS: two 256-bit AES keys */
#define MIN_UNIT 16                   /* XTS needs at least one AES block */
#define MAX_UNIT (16 * 1024 * 1024)   /* IEEE 1619: at most 2^20 blocks per data unit */
/* Idle contexts kept per direction: as many as a client's reads in flight on the native
 * read queue (each holds one from submission to collection), so those are not copied. */
#define POOL_MAX 64
/* Below this many bytes the work (~0.6 us per 4 KiB) is cheaper than a GIL round trip. */
#define GIL_RELEASE_BYTES (16 * 1024)

static EVP_CIPHER *aes_256_xts;       /* fetched once at import, again by enable_fips() */
/* FIPS mode (enable_fips): a library context holding only the FIPS provider (and the
 * base provider, which has no algorithms), where the cipher and the DRBG come from.
 * NULL: the default context of this libcrypto, as before. Set once, never unset. */
static OSSL_LIB_CTX *fips_ctx;
static long engines_made;             /* enable_fips() comes before the first Engine */

typedef struct {
    EVP_CIPHER_CTX *proto;            /* keyed; only ever copied; NULL once closed */
    EVP_CIPHER_CTX *idle[POOL_MAX];
    int n_idle;
} CtxPool;

enum { DECRYPT = 0, ENCRYPT = 1 };

typedef struct {
    PyObject_HEAD
    Py_ssize_t unit;
    CtxPool pool[2];                  /* indexed by DECRYPT / ENCRYPT */
} Engine;

static PyTypeObject EngineType;       /* defined with the methods, below */

static PyObject *
openssl_error(const char *what)
{
    char msg[256];
    unsigned long e = ERR_get_error();
    ERR_clear_error();
    if (e == 0)
        return PyErr_Format(PyExc_RuntimeError, "OpenSSL %s failed", what);
    ERR_error_string_n(e, msg, sizeof msg);
    return PyErr_Format(PyExc_RuntimeError, "OpenSSL %s failed: %s", what, msg);
}

static void
pool_clear(CtxPool *p)
{
    while (p->n_idle > 0)
        EVP_CIPHER_CTX_free(p->idle[--p->n_idle]);
    EVP_CIPHER_CTX_free(p->proto);   /* NULL-safe; cleanses the key schedule */
    p->proto = NULL;
}

/* GIL held. */
static EVP_CIPHER_CTX *
pool_take(CtxPool *p)
{
    EVP_CIPHER_CTX *ctx;
    if (p->n_idle > 0)
        return p->idle[--p->n_idle];
    ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    if (!EVP_CIPHER_CTX_copy(ctx, p->proto)) {
        EVP_CIPHER_CTX_free(ctx);
        openssl_error("EVP_CIPHER_CTX_copy");
        return NULL;
    }
    return ctx;
}

/* GIL held. A context coming back after close() is freed, not pooled. */
static void
pool_give(CtxPool *p, EVP_CIPHER_CTX *ctx)
{
    if (p->proto == NULL || p->n_idle == POOL_MAX)
        EVP_CIPHER_CTX_free(ctx);
    else
        p->idle[p->n_idle++] = ctx;
}

static int
all_zero(const unsigned char *p, size_t n)
{
    /* A real ciphertext unit fails at the first byte (probability 1 - 2^-8); only a
     * hole pays for the full compare, which memcmp does at memory speed. */
    return p[0] == 0 && memcmp(p, p + 1, n - 1) == 0;
}

static void
store_le64(unsigned char *out, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        out[i] = (unsigned char)(v >> (8 * i));
}

/* May run without the GIL: touches only its arguments. Returns 0, or -1 with the
 * OpenSSL error queue set. */
static int
xts_units(EVP_CIPHER_CTX *ctx, const unsigned char *src, unsigned char *dst,
          Py_ssize_t len, Py_ssize_t unit, uint64_t lo, uint64_t hi, int holes,
          Py_ssize_t *n_holes)
{
    unsigned char iv[16];
    int outl;
    for (Py_ssize_t off = 0; off < len; off += unit) {
        if (holes && all_zero(src + off, (size_t)unit)) {
            /* Never-written sector: the lower layer returned a hole as zeros. */
            if (dst != src)
                memset(dst + off, 0, (size_t)unit);
            (*n_holes)++;
        } else {
            store_le64(iv, lo);
            store_le64(iv + 8, hi);
            if (!EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, -1))
                return -1;
            if (!EVP_CipherUpdate(ctx, dst + off, &outl, src + off, (int)unit) || outl != unit)
                return -1;
        }
        if (++lo == 0)
            hi++;
    }
    return 0;
}

/* --- the SIGBUS guard for mapped sources ----------------------------------------- */

/* Set only while this thread runs a guarded loop. initial-exec TLS: reading it in the
 * signal handler must not allocate. */
static __thread sigjmp_buf *volatile bus_jump __attribute__((tls_model("initial-exec")));
static struct sigaction bus_previous;
static int bus_installed;             /* changed with the GIL held */

static void
bus_handler(int sig, siginfo_t *info, void *context)
{
    sigjmp_buf *jump = bus_jump;
    if (jump != NULL) {
        bus_jump = NULL;
        siglongjmp(*jump, 1);
    }
    /* Not a guarded read: do what would have happened without us. */
    if (bus_previous.sa_flags & SA_SIGINFO) {
        if (bus_previous.sa_sigaction != NULL) {
            bus_previous.sa_sigaction(sig, info, context);
            return;
        }
    } else if (bus_previous.sa_handler == SIG_IGN) {
        return;
    } else if (bus_previous.sa_handler != SIG_DFL) {
        bus_previous.sa_handler(sig);
        return;
    }
    /* Default action: terminate. Returning re-runs the faulting access under SIG_DFL;
     * a SIGBUS sent with kill() is raised again and delivered when we return. */
    signal(SIGBUS, SIG_DFL);
    raise(SIGBUS);
}

static int
bus_install(void)
{
    struct sigaction sa;
    if (bus_installed)
        return 0;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = bus_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &bus_previous) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    bus_installed = 1;
    return 0;
}

/* xts_units (holes on) with a SIGBUS on src turned into a return of 1. Runs without
 * the GIL. After a jump nothing the loop wrote is read: the call fails. */
static int
xts_units_guarded(EVP_CIPHER_CTX *ctx, const unsigned char *src, unsigned char *dst,
                  Py_ssize_t len, Py_ssize_t unit, uint64_t lo, uint64_t hi,
                  Py_ssize_t *n_holes)
{
    sigjmp_buf jump;
    int rc;
    if (sigsetjmp(jump, 1) != 0)       /* the handler jumped: SIGBUS mask restored */
        return 1;
    bus_jump = &jump;
    rc = xts_units(ctx, src, dst, len, unit, lo, hi, 1, n_holes);
    bus_jump = NULL;
    return rc;
}

/* first_sector: an int in [0, 2^128). */
static int
parse_tweak(PyObject *o, uint64_t *lo, uint64_t *hi)
{
    PyObject *idx, *bytes;
    const unsigned char *b;
    if (!PyLong_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "first_sector must be an int");
        return -1;
    }
    *lo = PyLong_AsUnsignedLongLong(o);
    if (!(*lo == (uint64_t)-1 && PyErr_Occurred())) {
        *hi = 0;
        return 0;
    }
    PyErr_Clear();
    /* Beyond 64 bits (the NIST vectors use 128-bit tweaks) or negative. */
    idx = PyNumber_Index(o);
    if (idx == NULL)
        return -1;
    bytes = PyObject_CallMethod(idx, "to_bytes", "is", 16, "little");
    Py_DECREF(idx);
    if (bytes == NULL) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "first_sector must be in [0, 2**128)");
        }
        return -1;
    }
    b = (const unsigned char *)PyBytes_AS_STRING(bytes);
    *lo = *hi = 0;
    for (int i = 7; i >= 0; i--) {
        *lo = (*lo << 8) | b[i];
        *hi = (*hi << 8) | b[8 + i];
    }
    Py_DECREF(bytes);
    return 0;
}

static void
release_buffers(Py_buffer *src, Py_buffer *dst, int in_place)
{
    PyBuffer_Release(src);
    if (!in_place)
        PyBuffer_Release(dst);
}

/* The buffers of a call: src (read) and dst (written; NULL for an in-place call, which
 * then gets src writable), the same whole number of data units, not overlapping unless
 * they are one buffer (or never, with !same_ok), and tweaks that stay below 2^128. On
 * failure the buffers are released and -1 returned with an exception set. */
static int
get_buffers(Engine *self, PyObject *src_obj, PyObject *dst_obj, uint64_t lo, uint64_t hi,
            int same_ok, Py_buffer *src, Py_buffer *dst)
{
    Py_ssize_t units;
    if (PyObject_GetBuffer(src_obj, src, dst_obj == NULL ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
        return -1;
    if (dst_obj == NULL) {
        *dst = *src;                   /* in place: one buffer, released once */
    } else if (PyObject_GetBuffer(dst_obj, dst, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(src);
        return -1;
    }
    if (src->len != dst->len || src->len % self->unit != 0) {
        PyErr_Format(PyExc_ValueError,
                     "src (%zd bytes) and dst (%zd bytes) must be the same whole number "
                     "of %zd-byte data units", src->len, dst->len, self->unit);
        goto fail;
    }
    if (dst_obj != NULL && (char *)src->buf < (char *)dst->buf + dst->len &&
        (char *)dst->buf < (char *)src->buf + src->len && !(same_ok && src->buf == dst->buf)) {
        PyErr_SetString(PyExc_ValueError, same_ok
                        ? "src and dst overlap without being the same buffer"
                        : "src and dst must not overlap");
        goto fail;
    }
    units = src->len / self->unit;
    if (units > 0 && hi == UINT64_MAX && (uint64_t)(units - 1) > UINT64_MAX - lo) {
        PyErr_SetString(PyExc_ValueError, "sector numbers would pass 2**128 - 1");
        goto fail;
    }
    return 0;
fail:
    release_buffers(src, dst, dst_obj == NULL);
    return -1;
}

static PyObject *
engine_run(Engine *self, PyObject *const *args, Py_ssize_t nargs, int dir)
{
    Py_buffer src, dst;
    uint64_t lo, hi;
    int holes = 0, rc;
    Py_ssize_t n_holes = 0;
    EVP_CIPHER_CTX *ctx;
    const char *name = dir == ENCRYPT ? "encrypt" : "decrypt";

    if (nargs != 3 && !(dir == DECRYPT && nargs == 4))
        return PyErr_Format(PyExc_TypeError, "%s(src, dst, first_sector%s)", name,
                            dir == DECRYPT ? ", holes=False" : "");
    if (self->pool[dir].proto == NULL)
        return PyErr_Format(PyExc_ValueError, "%s on a closed Engine", name);
    if (parse_tweak(args[2], &lo, &hi) < 0)
        return NULL;
    if (nargs == 4 && (holes = PyObject_IsTrue(args[3])) < 0)
        return NULL;
    if (get_buffers(self, args[0], args[1], lo, hi, 1, &src, &dst) < 0)
        return NULL;
    ctx = pool_take(&self->pool[dir]);
    if (ctx == NULL)
        goto fail;
    if (src.len >= GIL_RELEASE_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        rc = xts_units(ctx, src.buf, dst.buf, src.len, self->unit, lo, hi, holes, &n_holes);
        Py_END_ALLOW_THREADS
    } else {
        rc = xts_units(ctx, src.buf, dst.buf, src.len, self->unit, lo, hi, holes, &n_holes);
    }
    pool_give(&self->pool[dir], ctx);
    if (rc < 0) {
        openssl_error(name);
        goto fail;
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    if (dir == ENCRYPT)
        Py_RETURN_NONE;
    return PyLong_FromSsize_t(n_holes);
fail:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return NULL;
}

static PyObject *
engine_encrypt(Engine *self, PyObject *const *args, Py_ssize_t nargs)
{
    return engine_run(self, args, nargs, ENCRYPT);
}

static PyObject *
engine_decrypt(Engine *self, PyObject *const *args, Py_ssize_t nargs)
{
    return engine_run(self, args, nargs, DECRYPT);
}

static PyObject *
engine_decrypt_mapped(Engine *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer src, dst;
    uint64_t lo, hi;
    int rc;
    Py_ssize_t n_holes = 0;
    EVP_CIPHER_CTX *ctx;

    if (nargs != 3)
        return PyErr_Format(PyExc_TypeError, "decrypt_mapped(src, dst, first_sector)");
    if (self->pool[DECRYPT].proto == NULL)
        return PyErr_Format(PyExc_ValueError, "decrypt_mapped on a closed Engine");
    if (parse_tweak(args[2], &lo, &hi) < 0)
        return NULL;
    if (bus_install() < 0)
        return NULL;
    if (get_buffers(self, args[0], args[1], lo, hi, 0, &src, &dst) < 0)
        return NULL;
    ctx = pool_take(&self->pool[DECRYPT]);
    if (ctx == NULL)
        goto done;
    /* Always without the GIL: a page fault on the mapping may wait for the disk. */
    Py_BEGIN_ALLOW_THREADS
    rc = xts_units_guarded(ctx, src.buf, dst.buf, src.len, self->unit, lo, hi, &n_holes);
    Py_END_ALLOW_THREADS
    if (rc == 1) {
        /* Left mid-operation: do not reuse this context. */
        EVP_CIPHER_CTX_free(ctx);
        PyObject *exc_args = Py_BuildValue("(is)", EIO,
                                           "I/O error reading the disk file (SIGBUS on its mapping)");
        if (exc_args != NULL) {
            PyErr_SetObject(PyExc_OSError, exc_args);
            Py_DECREF(exc_args);
        }
        goto done;
    }
    pool_give(&self->pool[DECRYPT], ctx);
    if (rc < 0)
        openssl_error("decrypt_mapped");
done:
    release_buffers(&src, &dst, 0);
    return PyErr_Occurred() ? NULL : PyLong_FromSsize_t(n_holes);
}

/* encrypt_write(buf, fd, offset, first_sector, flags): encrypt buf in place and write
 * all of it with pwritev2(fd, offset, flags), in one call without the GIL. A layer's
 * encrypt-then-write would otherwise take the GIL back between the two, and on a busy
 * event loop that wait is a visible part of a 1 MiB write. */
/* A C int from a Python int; _PyLong_AsInt is private and gone in Python 3.13. */
static int
as_int(PyObject *o)
{
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < INT_MIN || v > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "value does not fit a C int");
        return -1;
    }
    return (int)v;
}

/* The arguments of encrypt_write and read_decrypt, (buf, fd, offset, first_sector,
 * flags), checked alike: on success buf is held (in place, writable) and the caller
 * releases it; on failure -1 with an exception set and nothing held. */
static int
io_args(Engine *self, int dir, const char *name, PyObject *const *args, Py_ssize_t nargs,
        Py_buffer *buf, int *fd, long long *offset, int *flags, uint64_t *lo, uint64_t *hi)
{
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "%s(buf, fd, offset, first_sector, flags)", name);
        return -1;
    }
    if (self->pool[dir].proto == NULL) {
        PyErr_Format(PyExc_ValueError, "%s on a closed Engine", name);
        return -1;
    }
    *fd = as_int(args[1]);
    *offset = PyLong_AsLongLong(args[2]);
    *flags = as_int(args[4]);
    if (PyErr_Occurred())
        return -1;
    if (*fd < 0 || *offset < 0) {
        PyErr_Format(PyExc_ValueError, "%s: bad fd or offset", name);
        return -1;
    }
    if (parse_tweak(args[3], lo, hi) < 0)
        return -1;
    return get_buffers(self, args[0], NULL, *lo, *hi, 1, buf, buf);
}

static PyObject *
engine_encrypt_write(Engine *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer buf;
    uint64_t lo, hi;
    int fd, flags, rc, err = 0;
    long long offset;
    Py_ssize_t n_holes = 0, done = 0;
    EVP_CIPHER_CTX *ctx;

    if (io_args(self, ENCRYPT, "encrypt_write", args, nargs, &buf, &fd, &offset, &flags,
                &lo, &hi) < 0)
        return NULL;
    ctx = pool_take(&self->pool[ENCRYPT]);
    if (ctx == NULL)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    rc = xts_units(ctx, buf.buf, buf.buf, buf.len, self->unit, lo, hi, 0, &n_holes);
    while (rc == 0 && done < buf.len) {
        struct iovec iov = {(char *)buf.buf + done, (size_t)(buf.len - done)};
        ssize_t w = pwritev2(fd, &iov, 1, (off_t)(offset + done), flags);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            err = errno;
            break;
        }
        done += w;
    }
    Py_END_ALLOW_THREADS
    pool_give(&self->pool[ENCRYPT], ctx);
    if (rc < 0) {
        openssl_error("encrypt_write");
    } else if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
    }
done:
    PyBuffer_Release(&buf);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

/* read_decrypt(buf, fd, offset, first_sector, flags): fill buf with preadv2(fd, offset,
 * flags) (zeros past the end of the file, like a hole), then decrypt it in place, an
 * all-zero sector being a hole: the read side of encrypt_write, for the event loop's
 * page-cache reads (flags RWF_NOWAIT), which otherwise cost a read call and a decrypt
 * call, each with its own argument parsing. Returns the number of holes; OSError as the
 * read fails (BlockingIOError for EAGAIN: buf is then garbage, to be read again). The
 * GIL is kept for small reads, as in decrypt(): RWF_NOWAIT reads do not wait. */
static PyObject *
engine_read_decrypt(Engine *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer buf;
    uint64_t lo, hi;
    int fd, flags, rc = 0, err = 0;
    long long offset;
    Py_ssize_t n_holes = 0, done = 0;
    EVP_CIPHER_CTX *ctx;
    PyThreadState *saved = NULL;

    if (io_args(self, DECRYPT, "read_decrypt", args, nargs, &buf, &fd, &offset, &flags,
                &lo, &hi) < 0)
        return NULL;
    ctx = pool_take(&self->pool[DECRYPT]);
    if (ctx == NULL)
        goto done;
    if (buf.len >= GIL_RELEASE_BYTES)
        saved = PyEval_SaveThread();
    while (done < buf.len) {
        struct iovec iov = {(char *)buf.buf + done, (size_t)(buf.len - done)};
        ssize_t r = preadv2(fd, &iov, 1, (off_t)(offset + done), flags);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            err = errno;
            break;
        }
        if (r == 0) {                  /* past the end of the file: zeros */
            memset((char *)buf.buf + done, 0, (size_t)(buf.len - done));
            break;
        }
        done += r;
    }
    if (!err)
        rc = xts_units(ctx, buf.buf, buf.buf, buf.len, self->unit, lo, hi, 1, &n_holes);
    if (saved != NULL)
        PyEval_RestoreThread(saved);
    pool_give(&self->pool[DECRYPT], ctx);
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
    } else if (rc < 0) {
        openssl_error("read_decrypt");
    }
done:
    PyBuffer_Release(&buf);
    if (PyErr_Occurred())
        return NULL;
    return PyLong_FromSsize_t(n_holes);
}

/* --- the transforms of nbdserver/_readq.h: decryption for the native read queue
 * (nbdserver/_readq.c) and for the page-cache fast path's READs, encryption for its
 * WRITEs (nbdserver/_cachedio.c). One set of helpers per direction `dir`. */

/* GIL held, at submission: the I/O's own context, from the pool of `dir`. */
static void *
transform_begin(Engine *self, int dir)
{
    if (self->pool[dir].proto == NULL) {
        PyErr_SetString(PyExc_ValueError,
                        dir == DECRYPT ? "read on a closed Engine" : "write on a closed Engine");
        return NULL;
    }
    return pool_take(&self->pool[dir]);
}

/* Without the GIL (a queue thread, or the loop's with the GIL given up): transform in
 * place, exactly decrypt(buf, buf, first, holes=True) or encrypt(buf, buf, first).
 * Reads only the engine's unit, which never changes, and the context this I/O took. */
static int
transform_run(Engine *self, void *state, unsigned char *buf, size_t len, uint64_t first,
              int holes)
{
    Py_ssize_t n_holes = 0;
    if (len % (size_t)self->unit != 0)
        return EINVAL;
    if (xts_units(state, buf, buf, (Py_ssize_t)len, self->unit, first, 0, holes, &n_holes) < 0) {
        ERR_clear_error();             /* the error queue is per thread: leave it empty */
        return EIO;
    }
    return 0;
}

static void *
read_begin(void *owner)
{
    return transform_begin(owner, DECRYPT);
}

static int
read_run(void *owner, void *state, unsigned char *buf, size_t len, uint64_t first)
{
    return transform_run(owner, state, buf, len, first, 1);
}

/* GIL held, at collection: the context goes back (or is freed after close()). */
static void
read_end(void *owner, void *state)
{
    pool_give(&((Engine *)owner)->pool[DECRYPT], state);
}

static const ReadTransform read_decrypt = {read_begin, read_run, read_end};

static void
read_capsule_free(PyObject *capsule)
{
    Py_XDECREF((PyObject *)PyCapsule_GetContext(capsule));
}

/* The capsule of `ops` for this engine: it keeps the Engine object alive (not the key:
 * close() still cleanses the schedule, and a context a read holds is freed when that
 * read is collected). */
static PyObject *
transform_capsule(Engine *self, const ReadTransform *ops, const char *name)
{
    PyObject *capsule = PyCapsule_New((void *)ops, name, read_capsule_free);
    if (capsule == NULL)
        return NULL;
    if (PyCapsule_SetContext(capsule, self) < 0) {
        Py_DECREF(capsule);
        return NULL;
    }
    Py_INCREF(self);
    return capsule;
}

/* read_transform(): the capsule the read queue runs after each preadv. */
static PyObject *
engine_read_transform(Engine *self, PyObject *Py_UNUSED(ignored))
{
    return transform_capsule(self, &read_decrypt, READQ_TRANSFORM_CAPSULE);
}

static void *
write_begin(void *owner)
{
    return transform_begin(owner, ENCRYPT);
}

static int
write_run(void *owner, void *state, unsigned char *buf, size_t len, uint64_t first)
{
    return transform_run(owner, state, buf, len, first, 0);
}

static void
write_end(void *owner, void *state)
{
    pool_give(&((Engine *)owner)->pool[ENCRYPT], state);
}

static const ReadTransform write_encrypt = {write_begin, write_run, write_end};

/* write_transform(): the capsule of write_encrypt. */
static PyObject *
engine_write_transform(Engine *self, PyObject *Py_UNUSED(ignored))
{
    return transform_capsule(self, &write_encrypt, WRITE_TRANSFORM_CAPSULE);
}

/* Two layers (double.py): the outer engine's decryption, then the inner one's, on the
 * queue's thread, each with holes (a hole of the file is zeros after the outer layer,
 * which the inner one reads as a hole too); for writes, the inner engine's encryption,
 * then the outer one's (double.py's encrypt). The owner is a Chain; the per-I/O state
 * is a pair of contexts of the transform's direction. */
typedef struct {
    Engine *outer;
    Engine *inner;
} Chain;

typedef struct {
    EVP_CIPHER_CTX *outer;
    EVP_CIPHER_CTX *inner;
} ChainState;

static void *
chain_take(Chain *chain, int dir)
{
    ChainState *state;
    if (chain->outer->pool[dir].proto == NULL || chain->inner->pool[dir].proto == NULL) {
        PyErr_SetString(PyExc_ValueError,
                        dir == DECRYPT ? "read on a closed Engine" : "write on a closed Engine");
        return NULL;
    }
    state = PyMem_Malloc(sizeof *state);
    if (state == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    state->outer = pool_take(&chain->outer->pool[dir]);
    if (state->outer == NULL) {
        PyMem_Free(state);
        return NULL;
    }
    state->inner = pool_take(&chain->inner->pool[dir]);
    if (state->inner == NULL) {
        pool_give(&chain->outer->pool[dir], state->outer);
        PyMem_Free(state);
        return NULL;
    }
    return state;
}

static void
chain_give(Chain *chain, ChainState *pair, int dir)
{
    pool_give(&chain->outer->pool[dir], pair->outer);
    pool_give(&chain->inner->pool[dir], pair->inner);
    PyMem_Free(pair);
}

static void *
chain_begin(void *owner)
{
    return chain_take(owner, DECRYPT);
}

static int
chain_run(void *owner, void *state, unsigned char *buf, size_t len, uint64_t first)
{
    Chain *chain = owner;
    ChainState *pair = state;
    int rc = read_run(chain->outer, pair->outer, buf, len, first);
    return rc ? rc : read_run(chain->inner, pair->inner, buf, len, first);
}

static void
chain_end(void *owner, void *state)
{
    chain_give(owner, state, DECRYPT);
}

static const ReadTransform read_decrypt_chain = {chain_begin, chain_run, chain_end};

static void *
chain_write_begin(void *owner)
{
    return chain_take(owner, ENCRYPT);
}

static int
chain_write_run(void *owner, void *state, unsigned char *buf, size_t len, uint64_t first)
{
    Chain *chain = owner;
    ChainState *pair = state;
    int rc = write_run(chain->inner, pair->inner, buf, len, first);
    return rc ? rc : write_run(chain->outer, pair->outer, buf, len, first);
}

static void
chain_write_end(void *owner, void *state)
{
    chain_give(owner, state, ENCRYPT);
}

static const ReadTransform write_encrypt_chain = {chain_write_begin, chain_write_run,
                                                  chain_write_end};

static void
chain_capsule_free(PyObject *capsule)
{
    Chain *chain = PyCapsule_GetContext(capsule);
    if (chain == NULL)
        return;
    Py_DECREF(chain->outer);
    Py_DECREF(chain->inner);
    PyMem_Free(chain);
}

/* The capsule `name` of `ops` over two layers; it keeps both Engines alive, as a single
 * one's does. */
static PyObject *
chain_capsule(PyObject *args, const ReadTransform *ops, const char *name, const char *fmt)
{
    PyObject *outer, *inner, *capsule;
    Chain *chain;
    if (!PyArg_ParseTuple(args, fmt, &EngineType, &outer, &EngineType, &inner))
        return NULL;
    if (((Engine *)outer)->unit != ((Engine *)inner)->unit)
        return PyErr_Format(PyExc_ValueError, "the two layers' data units differ");
    chain = PyMem_Malloc(sizeof *chain);
    if (chain == NULL)
        return PyErr_NoMemory();
    capsule = PyCapsule_New((void *)ops, name, chain_capsule_free);
    if (capsule == NULL) {
        PyMem_Free(chain);
        return NULL;
    }
    Py_INCREF(outer);
    Py_INCREF(inner);
    chain->outer = (Engine *)outer;
    chain->inner = (Engine *)inner;
    if (PyCapsule_SetContext(capsule, chain) < 0) {
        Py_DECREF(capsule);            /* chain_capsule_free finds no context */
        Py_DECREF(outer);
        Py_DECREF(inner);
        PyMem_Free(chain);
        return NULL;
    }
    return capsule;
}

/* chain_read_transform(outer, inner): read_transform() for two layers. */
static PyObject *
chain_read_transform(PyObject *Py_UNUSED(module), PyObject *args)
{
    return chain_capsule(args, &read_decrypt_chain, READQ_TRANSFORM_CAPSULE,
                         "O!O!:chain_read_transform");
}

/* chain_write_transform(outer, inner): write_transform() for two layers. */
static PyObject *
chain_write_transform(PyObject *Py_UNUSED(module), PyObject *args)
{
    return chain_capsule(args, &write_encrypt_chain, WRITE_TRANSFORM_CAPSULE,
                         "O!O!:chain_write_transform");
}

static PyObject *
engine_close(Engine *self, PyObject *Py_UNUSED(ignored))
{
    pool_clear(&self->pool[DECRYPT]);
    pool_clear(&self->pool[ENCRYPT]);
    Py_RETURN_NONE;
}

static PyObject *
engine_closed(Engine *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->pool[ENCRYPT].proto == NULL);
}

static PyObject *
engine_unit(Engine *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->unit);
}

static PyObject *
engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"key", "data_unit_size", NULL};
    Py_buffer key;
    Py_ssize_t unit;
    Engine *self;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*n:Engine", kwlist, &key, &unit))
        return NULL;
    if (key.len != KEY_BYTES) {
        PyBuffer_Release(&key);
        return PyErr_Format(PyExc_ValueError, "an AES-256-XTS key is %d bytes, not %zd",
                            KEY_BYTES, key.len);
    }
    /* IEEE 1619-2018 5.1 and OpenSSL refuse key1 == key2: the tweak would then be
     * encrypted under the data key, which breaks the mode's security argument. */
    if (CRYPTO_memcmp(key.buf, (char *)key.buf + KEY_BYTES / 2, KEY_BYTES / 2) == 0) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "the two halves of an XTS key must differ");
        return NULL;
    }
    if (unit < MIN_UNIT || unit > MAX_UNIT) {
        PyBuffer_Release(&key);
        return PyErr_Format(PyExc_ValueError, "data_unit_size must be in [%d, %d], not %zd",
                            MIN_UNIT, MAX_UNIT, unit);
    }
    self = (Engine *)type->tp_alloc(type, 0);
    if (self == NULL) {
        PyBuffer_Release(&key);
        return NULL;
    }
    self->unit = unit;
    engines_made++;
    for (int dir = DECRYPT; dir <= ENCRYPT; dir++) {
        EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
        self->pool[dir].proto = ctx;
        if (ctx == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
        if (!EVP_CipherInit_ex(ctx, aes_256_xts, NULL, key.buf, NULL, dir)) {
            openssl_error("EVP_CipherInit_ex");
            goto fail;
        }
    }
    PyBuffer_Release(&key);
    return (PyObject *)self;
fail:
    PyBuffer_Release(&key);
    Py_DECREF(self);
    return NULL;
}

static void
engine_dealloc(Engine *self)
{
    pool_clear(&self->pool[DECRYPT]);
    pool_clear(&self->pool[ENCRYPT]);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef engine_methods[] = {
    {"encrypt", (PyCFunction)(void (*)(void))engine_encrypt, METH_FASTCALL,
     "encrypt(src, dst, first_sector, /): XTS-encrypt src into dst (may be the same "
     "buffer), data unit i with tweak first_sector + i."},
    {"decrypt", (PyCFunction)(void (*)(void))engine_decrypt, METH_FASTCALL,
     "decrypt(src, dst, first_sector, holes=False, /) -> int: XTS-decrypt src into dst. "
     "With holes, an all-zero ciphertext unit is a never-written sector and becomes zeros "
     "without decryption. Returns the number of such units."},
    {"decrypt_mapped", (PyCFunction)(void (*)(void))engine_decrypt_mapped, METH_FASTCALL,
     "decrypt_mapped(src, dst, first_sector, /) -> int: decrypt(src, dst, first_sector, "
     "True) for a src that is a file mapping: without the GIL, and a SIGBUS while reading "
     "src (I/O error, truncated file) raises OSError(EIO) instead of killing the process. "
     "src and dst must not overlap."},
    {"encrypt_write", (PyCFunction)(void (*)(void))engine_encrypt_write, METH_FASTCALL,
     "encrypt_write(buf, fd, offset, first_sector, flags, /): encrypt buf in place "
     "(data unit i with tweak first_sector + i), then pwritev2 all of it to fd at offset "
     "with flags; one call without the GIL. OSError as pwritev2 fails."},
    {"read_decrypt", (PyCFunction)(void (*)(void))engine_read_decrypt, METH_FASTCALL,
     "read_decrypt(buf, fd, offset, first_sector, flags): preadv2 into buf (zeros past "
     "the end), then decrypt it in place with holes; returns the number of holes."},
    {"write_transform", (PyCFunction)engine_write_transform, METH_NOARGS,
     "write_transform() -> capsule: encrypt(buf, buf, first) by nbdserver/_readq.h's "
     "protocol, for the server's native small writes (nbdserver/_cachedio.c)."},
    {"read_transform", (PyCFunction)engine_read_transform, METH_NOARGS,
     "read_transform() -> capsule: decrypt(buf, buf, first, holes=True) for the native "
     "read queue (nbdserver._readq.ReadQueue.submit's transform), run without the GIL."},
    {"close", (PyCFunction)engine_close, METH_NOARGS,
     "Free every OpenSSL context (cleansing the key schedule). Idempotent."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef engine_getset[] = {
    {"closed", (getter)engine_closed, NULL, "True after close()", NULL},
    {"data_unit_size", (getter)engine_unit, NULL, "bytes per data unit (sector)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nbdserver.crypto._xts.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Engine(key, data_unit_size): AES-256-XTS over whole data units, "
              "keyed once.",
    .tp_new = engine_new,
    .tp_dealloc = (destructor)engine_dealloc,
    .tp_methods = engine_methods,
    .tp_getset = engine_getset,
};

static PyObject *
random_into(PyObject *Py_UNUSED(mod), PyObject *arg)
{
    Py_buffer b;
    int ok;
    if (PyObject_GetBuffer(arg, &b, PyBUF_WRITABLE) < 0)
        return NULL;
    /* In FIPS mode the FIPS provider's DRBG (its CTR-DRBG, seeded through the core). */
    ok = b.len <= INT_MAX && RAND_bytes_ex(fips_ctx, b.buf, (size_t)b.len, 0) == 1;
    PyBuffer_Release(&b);
    if (!ok)
        return openssl_error("RAND_bytes");
    Py_RETURN_NONE;
}

static PyObject *
wipe(PyObject *Py_UNUSED(mod), PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_WRITABLE) < 0)
        return NULL;
    OPENSSL_cleanse(b.buf, (size_t)b.len);  /* not elided by the compiler */
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

static PyObject *
memory_lock(PyObject *Py_UNUSED(mod), PyObject *args)
{
    Py_buffer b;
    int lock, rc;
    if (!PyArg_ParseTuple(args, "y*p:mlock", &b, &lock))
        return NULL;
    rc = lock ? mlock(b.buf, (size_t)b.len) : munlock(b.buf, (size_t)b.len);
    PyBuffer_Release(&b);
    return PyBool_FromLong(rc == 0);
}


/* ---- FIPS mode ------------------------------------------------------------------
 * enable_fips(config, modules) loads OpenSSL's FIPS provider into a library context of
 * its own (the configuration `config` names it and its module configuration, the
 * fipsinstall output; `modules` is where fips.so is), runs its self-tests once more on
 * demand, and from then on fetches AES-256-XTS there with "fips=yes" and draws random
 * bytes from its DRBG. On load the provider checks its own integrity (the HMAC of fips.so
 * against the module configuration) and runs its known-answer tests; a failure of either
 * is reported through the self-test callback, which records the first failing test so
 * that the refusal can say which. */
static char self_test_failed[128];

static int
self_test_event(const OSSL_PARAM params[], void *Py_UNUSED(arg))
{
    const char *phase = NULL, *type = NULL, *desc = NULL;
    const OSSL_PARAM *p;
    if ((p = OSSL_PARAM_locate_const(params, OSSL_PROV_PARAM_SELF_TEST_PHASE)) != NULL)
        OSSL_PARAM_get_utf8_string_ptr(p, &phase);
    if ((p = OSSL_PARAM_locate_const(params, OSSL_PROV_PARAM_SELF_TEST_TYPE)) != NULL)
        OSSL_PARAM_get_utf8_string_ptr(p, &type);
    if ((p = OSSL_PARAM_locate_const(params, OSSL_PROV_PARAM_SELF_TEST_DESC)) != NULL)
        OSSL_PARAM_get_utf8_string_ptr(p, &desc);
    if (phase != NULL && strcmp(phase, OSSL_SELF_TEST_PHASE_FAIL) == 0 && self_test_failed[0] == 0)
        snprintf(self_test_failed, sizeof self_test_failed, "%s %s",
                 type != NULL ? type : "?", desc != NULL ? desc : "");
    return 1;
}

static PyObject *
fips_failure(const char *what)
{
    char msg[256] = "";
    unsigned long e = ERR_peek_last_error();
    if (e != 0)
        ERR_error_string_n(e, msg, sizeof msg);
    ERR_clear_error();
    /* Module_Integrity (the HMAC of fips.so) and Install_Integrity (3.0's install
     * state) are the integrity check; every other test type is a known-answer test. */
    if (strstr(self_test_failed, "Integrity") != NULL)
        return PyErr_Format(PyExc_RuntimeError, "integrity check failed: %s", self_test_failed);
    if (self_test_failed[0] != 0)
        return PyErr_Format(PyExc_RuntimeError, "self-test failed: %s", self_test_failed);
    return PyErr_Format(PyExc_RuntimeError, "%s: %s", what, msg[0] ? msg : "no OpenSSL error");
}

static PyObject *
enable_fips(PyObject *Py_UNUSED(mod), PyObject *args)
{
    const char *config, *modules;
    char name[64] = "", version[64] = "", build[64] = "";
    char *pname = name, *pversion = version, *pbuild = build;
    OSSL_LIB_CTX *ctx;
    OSSL_PROVIDER *prov = NULL;
    EVP_CIPHER *cipher = NULL;
    OSSL_PARAM params[4];

    if (!PyArg_ParseTuple(args, "ss:enable_fips", &config, &modules))
        return NULL;
    if (fips_ctx != NULL)
        return PyErr_Format(PyExc_RuntimeError, "FIPS mode is already on");
    if (engines_made != 0)
        return PyErr_Format(PyExc_RuntimeError, "FIPS mode must be on before the first Engine");
    self_test_failed[0] = 0;
    ctx = OSSL_LIB_CTX_new();
    if (ctx == NULL)
        return PyErr_NoMemory();
    OSSL_SELF_TEST_set_callback(ctx, self_test_event, NULL);
    if (!OSSL_PROVIDER_set_default_search_path(ctx, modules) ||
        !OSSL_LIB_CTX_load_config(ctx, config) || !OSSL_PROVIDER_available(ctx, "fips")) {
        fips_failure("the FIPS provider did not load");
        goto fail;
    }
    prov = OSSL_PROVIDER_load(ctx, "fips");  /* a reference to the one the config loaded */
    if (prov == NULL || !OSSL_PROVIDER_self_test(prov)) {
        fips_failure("the FIPS provider's self-test did not pass");
        goto fail;
    }
    params[0] = OSSL_PARAM_construct_utf8_ptr(OSSL_PROV_PARAM_NAME, &pname, 0);
    params[1] = OSSL_PARAM_construct_utf8_ptr(OSSL_PROV_PARAM_VERSION, &pversion, 0);
    params[2] = OSSL_PARAM_construct_utf8_ptr(OSSL_PROV_PARAM_BUILDINFO, &pbuild, 0);
    params[3] = OSSL_PARAM_construct_end();
    if (!OSSL_PROVIDER_get_params(prov, params)) {
        fips_failure("the FIPS provider's parameters");
        goto fail;
    }
    cipher = EVP_CIPHER_fetch(ctx, "AES-256-XTS", "fips=yes");
    if (cipher == NULL) {
        fips_failure("EVP_CIPHER_fetch(AES-256-XTS, fips=yes)");
        goto fail;
    }
    EVP_CIPHER_free(aes_256_xts);
    aes_256_xts = cipher;
    fips_ctx = ctx;       /* the provider reference stays with it, for the process's life */
    return Py_BuildValue("(sss)", pname, pversion, pbuild);
fail:
    if (prov != NULL)
        OSSL_PROVIDER_unload(prov);
    OSSL_LIB_CTX_free(ctx);
    return NULL;
}

static PyMethodDef module_methods[] = {
    {"random_into", random_into, METH_O,
     "random_into(buf): fill a writable buffer from OpenSSL's CSPRNG, in place."},
    {"enable_fips", enable_fips, METH_VARARGS,
     "enable_fips(config, modules) -> (name, version, buildinfo): from now on AES-256-XTS and "
     "random bytes come from the FIPS provider, in a library context of its own."},
    {"chain_read_transform", chain_read_transform, METH_VARARGS,
     "chain_read_transform(outer, inner) -> capsule: the outer Engine's read_transform, "
     "then the inner one's, for a disk encrypted twice."},
    {"chain_write_transform", chain_write_transform, METH_VARARGS,
     "chain_write_transform(outer, inner) -> capsule: as Engine.write_transform, for two "
     "layers: inner's encryption, then outer's (each data unit tweaked by its number)."},
    {"wipe", wipe, METH_O, "wipe(buf): overwrite a writable buffer with zeros (OPENSSL_cleanse)."},
    {"mlock", memory_lock, METH_VARARGS,
     "mlock(buf, lock) -> bool: mlock(2) (lock=True) or munlock(2) the buffer's pages; "
     "False if the kernel refused (e.g. RLIMIT_MEMLOCK)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef xts_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "nbdserver.crypto._xts",
    .m_doc = "AES-256-XTS over OpenSSL EVP, many data units per call (see _xts.c).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__xts(void)
{
    PyObject *m;
    if (aes_256_xts == NULL) {
        /* Read no openssl.cnf (the engine needs no configuration, and a static copy
         * must not pick up the system's) and register no atexit handler: the extension
         * is never unloaded, and the contexts are freed by their owners. */
        if (!OPENSSL_init_crypto(OPENSSL_INIT_NO_LOAD_CONFIG | OPENSSL_INIT_NO_ATEXIT, NULL))
            return openssl_error("OPENSSL_init_crypto");
        aes_256_xts = EVP_CIPHER_fetch(NULL, "AES-256-XTS", NULL);
        if (aes_256_xts == NULL)
            return openssl_error("EVP_CIPHER_fetch(AES-256-XTS)");
    }
    if (PyType_Ready(&EngineType) < 0)
        return NULL;
    m = PyModule_Create(&xts_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(&EngineType);
        Py_DECREF(m);
        return NULL;
    }
    /* Which OpenSSL does the work: the pinned static build (scripts/lib/openssl.sh) or
     * the system's. Benchmarks and `nbdserver --version` report it. */
    if (PyModule_AddStringConstant(m, "OPENSSL_VERSION", OpenSSL_version(OPENSSL_VERSION)) < 0 ||
        PyModule_AddIntConstant(m, "OPENSSL_STATIC", NBDSERVER_STATIC_OPENSSL) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
