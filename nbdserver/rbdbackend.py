"""RbdBackend: a disk kept in a Ceph RBD image, through librbd (Debian's python3-rbd).

The image holds what the layer above writes and nothing else: under `XtsLayer` that is
ciphertext only, so Ceph never sees a DEK or a plaintext byte. The encryption layer is
unchanged; it only sees another `BlockBackend` (backend.py).

How the NBD commands map (librbd, Ceph 16):
- READ / WRITE: `Image.read` / `Image.write`, which release the GIL, so requests run
  in parallel on the server's worker threads, up to its worker count. librbd is safe for
  concurrent I/O on one image handle. `nowait` is always refused (BlockingIOError):
  every request is network I/O, never a page-cache hit, and must not run on the loop.
- FLUSH: `Image.flush`. The librbd cache is off (`rbd_cache=false`): a write completes
  only once the OSDs have it, so FUA needs nothing more, and a server killed mid-write
  loses no write it acknowledged.
- TRIM: `Image.discard`; with `rbd_skip_partial_discard=false` a discard of part of an
  object zeroes it (Ceph's default would skip it), so a trimmed range reads as zeros,
  as over the file backend.
- WRITE_ZEROES: a discard, or with NO_HOLE `Image.write_zeroes(THICK_PROVISION)`.
  FAST_ZERO is not offered: librbd writes zeros for the parts of objects a range only
  covers in part, which is what FAST_ZERO promises not to do.
- BLOCK_STATUS: `Image.diff_iterate(whole_object=True)`, answered from the object map
  (the `fast-diff` feature, on by default) without a round trip per object: objects
  (4 MiB) never written are holes, anything in a written one is data.
- Size: the image's, read once at open (images are not resized under a server).

Opening is by plain data (`RbdSpec`), like `backend.FileSpec`, so another process (an
I/O worker) can open the same image the same way. Images of one cluster share one RADOS
connection per process (`_Connections`): a connection has its own messenger threads and
sockets to every OSD, which a server with many disks should pay once.

Fencing: one server serves an image at a time. A writable open takes the image's
exclusive lock explicitly (`lock_acquire(RBD_LOCK_MODE_EXCLUSIVE)`, the exclusive-lock
feature, on by default); librbd then never hands it to another client on request, as it
does with locks it took by itself. Another server's open finds it held and waits in
*standby*: its requests fail with EIO, and each tries the lock again. librbd grants it
only once the holder is gone: a live holder refuses at once (EROFS); a holder whose
watch on the image lapsed (killed, cut off: `osd client watch timeout`, 30 s by
default) is blocklisted (`rbd_blocklist_on_break_lock`, set here) and its lock broken, so
whatever that server still sends is refused by the OSDs. A server that loses the lock
(the OSDs refuse it: blocklisted, or the image read-only to it) never writes again
through that open: every later request fails with EIO, and only a new open, which takes
the lock afresh, serves. Checking ownership before each request would cost a round trip
into librbd (about 250 us): the OSDs' refusal is the check.

Every librbd/librados error becomes an OSError with its errno at this boundary; a
request whose OSD does not answer within OP_TIMEOUT fails with ETIMEDOUT instead of
holding its worker forever.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .backend import BlockBackend, Capabilities, Extent

# Seconds librados waits for a monitor or an OSD before failing the operation: long
# enough for an OSD to restart or a PG to peer, short enough that a lost cluster turns
# into I/O errors the client sees rather than requests that never end.
OP_TIMEOUT = 30
CONNECT_TIMEOUT = 30
SCHEME = "rbd:"
# What librbd answers a client that lost (or never had) an image's exclusive lock:
# EROFS from librbd, ESHUTDOWN (Ceph's EBLOCKLISTED) from an OSD once it is blocklisted.
_FENCED = (errno.EROFS, errno.ESHUTDOWN)


class LockState:
    """A writable open's hold on the image's exclusive lock (the module's docstring)."""
    HELD = "held"
    STANDBY = "standby"  # another server holds it: no I/O until it is gone
    LOST = "lost"        # ours was broken: no I/O through this open, ever


@dataclass(frozen=True, slots=True)
class RbdSpec:
    """Where an RBD disk is and how to reach it, as plain data. The key of an encrypted
    one is never part of it (the caller puts XtsLayer on, as `crypto.open_disk` does for
    files). `size`: create the image with this size if it does not exist; an existing
    image must already have it (never resized behind its owner's back)."""

    pool: str
    image: str
    conf: str                       # ceph.conf (mon host, ...)
    client_id: str = "admin"        # the cephx name is client.<client_id>
    keyring: str | None = None      # None: what ceph.conf says
    size: int | None = None
    readonly: bool = False
    encrypted: bool = False
    # Another server holds the image's lock: False, the open fails with EBUSY (the
    # platform refuses the client, who retries); True, it opens in standby (the baseline
    # runner, which opens its exports at start). See the module's docstring, "Fencing".
    standby: bool = False

    @classmethod
    def parse(cls, text: str, **kw) -> RbdSpec:
        """`rbd:POOL/IMAGE` (the rest of the fields from `kw`)."""
        if not text.startswith(SCHEME):
            raise ValueError(f"an RBD disk is written rbd:POOL/IMAGE, not {text!r}")
        pool, sep, image = text[len(SCHEME):].partition("/")
        if not sep or not pool or not image or "/" in image or "@" in image:
            raise ValueError(f"an RBD disk is written rbd:POOL/IMAGE, not {text!r}")
        return cls(pool, image, **kw)

    def __str__(self) -> str:
        return f"{SCHEME}{self.pool}/{self.image}"

    def open(self) -> RbdBackend:
        return RbdBackend(self)


def _oserror(e: Exception, what: str) -> OSError:
    """librbd/librados errors carry a positive errno; anything else is EIO."""
    code = abs(getattr(e, "errno", 0) or 0) or errno.EIO
    return OSError(code, f"{what}: {e}")


class _Connections:
    """One RADOS connection per (conf, client, keyring) in this process, shared by the
    images opened through it and shut down with the last of them."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: dict[tuple, list] = {}  # key -> [rados.Rados, users]

    def acquire(self, spec: RbdSpec):
        import rados
        key = (spec.conf, spec.client_id, spec.keyring)
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                conf = {"rbd_cache": "false", "rbd_skip_partial_discard": "false",
                        "rbd_blocklist_on_break_lock": "true",
                        "rados_osd_op_timeout": str(OP_TIMEOUT), "rados_mon_op_timeout": str(OP_TIMEOUT)}
                if spec.keyring:
                    conf["keyring"] = spec.keyring
                cluster = rados.Rados(conffile=spec.conf, rados_id=spec.client_id, conf=conf)
                try:
                    cluster.connect(timeout=CONNECT_TIMEOUT)
                except rados.Error as e:
                    cluster.shutdown()
                    raise _oserror(e, f"cannot reach the Ceph cluster of {spec.conf} as "
                                      f"client.{spec.client_id}") from None
                entry = self._open[key] = [cluster, 0]
            entry[1] += 1
            return entry[0]

    def release(self, spec: RbdSpec) -> None:
        key = (spec.conf, spec.client_id, spec.keyring)
        with self._lock:
            entry = self._open[key]
            entry[1] -= 1
            if entry[1] == 0:
                del self._open[key]
                entry[0].shutdown()


CONNECTIONS = _Connections()


class RbdBackend(BlockBackend):
    """The image `spec` names, opened through librbd (see the module's docstring)."""

    def __init__(self, spec: RbdSpec):
        import rados
        import rbd
        if not Path(spec.conf).is_file():
            raise OSError(errno.ENOENT, f"no Ceph configuration at {spec.conf}")
        self.spec = spec
        self._rbd = rbd
        cluster = CONNECTIONS.acquire(spec)
        self._ioctx = None
        self._image: Any = None  # rbd.Image once opened
        try:
            try:
                self._ioctx = cluster.open_ioctx(spec.pool)
            except rados.Error as e:
                raise _oserror(e, f"pool {spec.pool!r}") from None
            self._image = self._open_image()
        except BaseException:
            self._release()
            raise
        self._size = self._image.size()
        ro = spec.readonly
        self._caps = Capabilities(writable=not ro, flush=not ro, fua=not ro, trim=not ro, zero=not ro,
                                  fast_zero=False, cache=False, multi_conn=True, extents=True)
        self._closed = False
        # A read-only open takes no lock: it changes nothing, and a copy reads a source
        # (a snapshot) that no server writes.
        self.lock_state = LockState.HELD if ro else LockState.STANDBY
        self._lock_guard = threading.Lock()
        if not ro:
            try:
                self._take_lock()
            except OSError as e:
                if e.errno != errno.EIO or not spec.standby:
                    self.close()
                    raise OSError(errno.EBUSY, e.strerror) if e.errno == errno.EIO else e from None

    def _open_image(self):
        rbd, spec = self._rbd, self.spec
        try:
            if spec.size is not None and not spec.readonly:
                try:
                    rbd.RBD().create(self._ioctx, spec.image, spec.size)
                except rbd.ImageExists:
                    pass
            image = rbd.Image(self._ioctx, spec.image, read_only=spec.readonly)
        except rbd.Error as e:
            raise _oserror(e, f"RBD image {spec}") from None
        if spec.size is not None and image.size() != spec.size:
            have = image.size()
            image.close()
            raise OSError(errno.EINVAL, f"RBD image {spec} has {have} bytes, not the {spec.size} asked for "
                                        "(images are never resized here)")
        return image

    # --- BlockBackend -----------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    def pread(self, buf, offset, *, nowait=False):
        if nowait:
            raise BlockingIOError(errno.EAGAIN, "RBD I/O is network I/O: use a worker")
        buf = memoryview(buf).cast("B")
        if not len(buf):
            return
        self._serving()
        try:
            data = self._image.read(offset, len(buf))
        except self._rbd.Error as e:
            raise self._failed(e, "RBD read") from None
        buf[:len(data)] = data
        if len(data) < len(buf):  # past the end of the image: zeros, like a file's hole
            buf[len(data):] = bytes(len(buf) - len(data))

    def pwrite(self, data, offset, *, fua=False, nowait=False, owned=False):
        self._check_writable()
        if nowait:
            raise BlockingIOError(errno.EAGAIN, "RBD I/O is network I/O: use a worker")
        # librbd's Python binding takes bytes only: one copy of the payload.
        payload = bytes(data)
        self._serving()
        try:
            done = self._image.write(payload, offset)
        except self._rbd.Error as e:
            raise self._failed(e, "RBD write") from None
        if done != len(payload):
            raise OSError(errno.EIO, f"RBD write of {len(payload)} bytes wrote {done}")
        # fua: nothing more to do, the write completed on the OSDs (no librbd cache).

    def flush(self):
        if self.lock_state is LockState.STANDBY:
            return  # nothing was written through this open
        self._serving()
        try:
            self._image.flush()
        except self._rbd.Error as e:
            raise self._failed(e, "RBD flush") from None

    def trim(self, offset, length, *, fua=False):
        self._check_writable()
        self._serving()
        try:
            self._image.discard(offset, length)
        except self._rbd.Error as e:
            raise self._failed(e, "RBD discard") from None

    def zero(self, offset, length, *, may_trim=True, fua=False, fast=False):
        self._check_writable()
        if fast:
            raise OSError(errno.ENOTSUP, "fast zeroing is not supported on RBD")
        self._serving()
        try:
            if may_trim:
                self._image.discard(offset, length)
            else:
                self._image.write_zeroes(offset, length, self._rbd.RBD_WRITE_ZEROES_FLAG_THICK_PROVISION)
        except self._rbd.Error as e:
            raise self._failed(e, "RBD write-zeroes") from None

    def block_status(self, offset, length):
        end = min(offset + length, self._size)
        written: list[tuple[int, int]] = []

        def changed(off: int, n: int, exists: bool) -> int:
            if exists:
                written.append((max(off, offset), min(off + n, end)))
            return 0

        self._serving()
        try:
            self._image.diff_iterate(offset, end - offset, None, changed, include_parent=True,
                                     whole_object=True)
        except self._rbd.Error as e:
            raise self._failed(e, "RBD diff") from None
        out: list[Extent] = []
        pos = offset
        for lo, hi in sorted(written):
            if hi <= pos:
                continue
            if lo > pos:
                out.append(Extent(lo - pos, hole=True, zero=True))
            out.append(Extent(hi - max(lo, pos)))
            pos = hi
        if pos < end:
            out.append(Extent(end - pos, hole=True, zero=True))
        return _merged(out)

    def grow(self, size):
        """Serve `size` bytes: the image was resized first (`resize_image`; librbd
        refreshes this handle's view of it when the header changes)."""
        if size < self._size:
            raise OSError(errno.EINVAL, f"cannot grow RBD image {self.spec} from {self._size} to {size}")
        have = self._image.size()
        if have < size:
            raise OSError(errno.EINVAL, f"RBD image {self.spec} holds {have} bytes, fewer than {size}: "
                                        "resize it first")
        self._size = size

    def close(self):
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            self._image.close()
        finally:
            self._release()

    # --- asynchronous requests: librbd aio, completed on an event loop ---------------
    #
    # The same requests as above, started from the loop's thread without a worker: librbd
    # runs them on its own threads, and its completion callback hands the result to the
    # loop (`call_soon_threadsafe`), which resolves the returned future. Requests in
    # flight are then bounded by the clients' queue depth, not by a thread pool. Until
    # this open holds the image's lock they raise BlockingIOError: taking it may wait
    # seconds (a dead holder), which a worker does through the methods above.

    # The server starts READ and WRITE with these (server._start_aio) unless
    # NBDSERVER_RBD_AIO=0, which leaves every request to a worker (as before aio; for
    # comparing the two, and a way back should librbd's aio misbehave somewhere).
    starts_requests = os.environ.get("NBDSERVER_RBD_AIO", "1") != "0"

    def aio_pread(self, buf, offset: int, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        """Fill `buf` from `offset`; the future resolves to None or fails with OSError."""
        view = memoryview(buf).cast("B")
        n = len(view)

        def done(completion, data) -> None:
            ret = completion.get_return_value()
            if ret >= 0:
                # On librbd's thread, with the GIL: the copy into the caller's buffer.
                view[:len(data)] = data
                if len(data) < n:
                    view[len(data):] = bytes(n - len(data))
            self._settle(loop, fut, ret, "RBD read")

        fut = self._aio_start(loop)
        self._aio_call(fut, "RBD read", self._image.aio_read, offset, n, done)
        return fut

    def aio_pwrite(self, data, offset: int, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        """Write `data` at `offset` (on the OSDs when the future resolves: no cache)."""
        self._check_writable()
        payload = bytes(data)  # the binding takes bytes only, as in pwrite
        fut = self._aio_start(loop)
        self._aio_call(fut, "RBD write", self._image.aio_write, payload, offset,
                       lambda c: self._settle(loop, fut, c.get_return_value(), "RBD write"))
        return fut

    def aio_flush(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        fut = self._aio_start(loop)
        self._aio_call(fut, "RBD flush", self._image.aio_flush,
                       lambda c: self._settle(loop, fut, c.get_return_value(), "RBD flush"))
        return fut

    def aio_discard(self, offset: int, length: int, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        """TRIM, or WRITE_ZEROES that may punch (a discard zeroes partial objects here)."""
        self._check_writable()
        fut = self._aio_start(loop)
        self._aio_call(fut, "RBD discard", self._image.aio_discard, offset, length,
                       lambda c: self._settle(loop, fut, c.get_return_value(), "RBD discard"))
        return fut

    def _aio_start(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        if self._closed:
            raise OSError(errno.EBADF, f"RBD image {self.spec} is closed")
        if self.lock_state is not LockState.HELD:
            if self.lock_state is LockState.LOST:
                self._take_lock()  # raises EIO: a lost open serves nothing
            raise BlockingIOError(errno.EAGAIN, "the image's lock is not held yet: use a worker")
        return loop.create_future()

    def _aio_call(self, fut: asyncio.Future, what: str, start, *args) -> None:
        try:
            start(*args)
        except self._rbd.Error as e:
            raise self._failed(e, what) from None

    def _settle(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future, ret: int, what: str) -> None:
        """On librbd's callback thread: hand the outcome to the loop."""
        err = None
        if ret < 0:
            err = self._failed(OSError(-ret, os.strerror(-ret)), what)

        def resolve() -> None:
            if fut.done():  # cancelled by its waiter meanwhile
                return
            if err is None:
                fut.set_result(None)
            else:
                fut.set_exception(err)
        try:
            loop.call_soon_threadsafe(resolve)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    # --- helpers ----------------------------------------------------------------------

    def _serving(self) -> None:
        """Refuse the request unless this open holds the image's lock (or needs none)."""
        if self.lock_state is not LockState.HELD:
            self._take_lock()

    def _take_lock(self) -> None:
        """Standby: try the lock (librbd breaks a dead holder's, blocklisting it, which
        takes a few seconds: on the calling worker, never the loop). Lost: refuse."""
        with self._lock_guard:
            if self.lock_state is LockState.HELD:
                return
            if self.lock_state is LockState.LOST:
                raise OSError(errno.EIO, f"RBD image {self.spec} lost its exclusive lock to another "
                                         "server: this open serves no more I/O")
            assert self._image is not None
            try:
                self._image.lock_acquire(self._rbd.RBD_LOCK_MODE_EXCLUSIVE)
            except self._rbd.Error as e:
                err = _oserror(e, "RBD lock")
                if err.errno in _FENCED or err.errno == errno.EBUSY:
                    raise OSError(errno.EIO, f"RBD image {self.spec} is served by another server "
                                             "(it holds the image's exclusive lock)") from None
                raise err from None
            self.lock_state = LockState.HELD

    def _failed(self, e: Exception, what: str) -> OSError:
        """A librbd error as an OSError; one that says this open is fenced makes it LOST."""
        err = _oserror(e, what)
        if err.errno in _FENCED and not self.spec.readonly:
            self.lock_state = LockState.LOST
            return OSError(errno.EIO, f"{what}: RBD image {self.spec} is fenced, its lock taken "
                                      f"by another server ({err.strerror})")
        return err

    def _check_writable(self) -> None:
        if self.spec.readonly:
            raise OSError(errno.EPERM, "read-only")

    def _release(self) -> None:
        if self._ioctx is not None:
            self._ioctx.close()
            self._ioctx = None
        CONNECTIONS.release(self.spec)


def _merged(extents: list[Extent]) -> list[Extent]:
    out: list[Extent] = []
    for e in extents:
        if out and (out[-1].hole, out[-1].zero) == (e.hole, e.zero):
            out[-1] = Extent(out[-1].length + e.length, e.hole, e.zero)
        else:
            out.append(e)
    return out


# --- images as a whole (the platform's volumes: platform/storage.py) ----------------------

class _Pool:
    """The pool of `spec` on this process's shared connection, for the calls below."""

    def __init__(self, spec: RbdSpec):
        self.spec = spec

    def __enter__(self):
        import rados
        cluster = CONNECTIONS.acquire(self.spec)
        try:
            self.ioctx = cluster.open_ioctx(self.spec.pool)
        except rados.Error as e:
            CONNECTIONS.release(self.spec)
            raise _oserror(e, f"pool {self.spec.pool!r}") from None
        return self.ioctx

    def __exit__(self, *exc) -> None:
        self.ioctx.close()
        CONNECTIONS.release(self.spec)


def clone_image(src: RbdSpec, dst: RbdSpec) -> None:
    """`dst` made a copy-on-write clone of `src` as it is now, in the same pool: a
    snapshot of `src` named after `dst` (each clone has its own, removed with it),
    protected, then cloned. No data is copied: instant whatever the size. The caller
    makes `src` consistent first (its writes flushed). A snapshot of an image another
    handle holds the lock of is done by that handle's librbd on request."""
    import rbd
    if src.pool != dst.pool:
        raise OSError(errno.EXDEV, f"a clone of {src} must be in pool {src.pool!r}")
    with _Pool(src) as ioctx:
        try:
            with rbd.Image(ioctx, src.image) as image:
                image.create_snap(dst.image)
                image.protect_snap(dst.image)
            rbd.RBD().clone(ioctx, src.image, dst.image, ioctx, dst.image)
        except rbd.Error as e:
            raise _oserror(e, f"cloning RBD image {src} as {dst.image}") from None


def resize_image(spec: RbdSpec, size: int) -> None:
    """Grow the image to `size` bytes (never shrink: the platform refuses that first).
    A handle that holds the image's lock does it on librbd's request, as for a snapshot."""
    import rbd
    with _Pool(spec) as ioctx:
        try:
            with rbd.Image(ioctx, spec.image) as image:
                if image.size() < size:
                    image.resize(size, allow_shrink=False)
        except rbd.Error as e:
            raise _oserror(e, f"resizing RBD image {spec}") from None


def remove_image(spec: RbdSpec) -> None:
    """Remove the image; one that is not there is removed already.

    Clones of it (snapshots and images of a disk, images of a snapshot) outlive it: each
    is flattened first, which copies the data it shares (on this worker, bounded by the
    image's size), and its snapshot removed. Then the image, then the snapshot of its
    parent it was cloned from, if it is a clone."""
    import rbd
    parent = None
    with _Pool(spec) as ioctx:
        try:
            with rbd.Image(ioctx, spec.image) as image:
                try:
                    parent = image.parent_info()  # (pool, image, snapshot)
                except rbd.ImageNotFound:
                    parent = None  # not a clone
                for snap in list(image.list_snaps()):
                    name = snap["name"]
                    image.set_snap(name)
                    children = list(image.list_children())
                    image.set_snap(None)
                    for pool, child in children:
                        with _Pool(RbdSpec(pool, child, spec.conf, spec.client_id, spec.keyring)) as cio, \
                                rbd.Image(cio, child) as c:
                            c.flatten()
                    if image.is_protected_snap(name):
                        image.unprotect_snap(name)
                    image.remove_snap(name)
        except rbd.ImageNotFound:
            return
        except rbd.Error as e:
            raise _oserror(e, f"RBD image {spec}: its snapshots and clones") from None
        try:
            rbd.RBD().remove(ioctx, spec.image)
        except rbd.ImageNotFound:
            pass
        except rbd.Error as e:
            raise _oserror(e, f"removing RBD image {spec}") from None
    if parent is not None:
        _remove_snapshot(replace(spec, pool=parent[0], image=parent[1]), parent[2])


def _remove_snapshot(spec: RbdSpec, snap: str) -> None:
    """The snapshot a removed clone was made from (no other clone uses it: each has its own)."""
    import rbd
    with _Pool(spec) as ioctx:
        try:
            with rbd.Image(ioctx, spec.image) as image:
                image.set_snap(snap)
                if list(image.list_children()):
                    return
                image.set_snap(None)
                if image.is_protected_snap(snap):
                    image.unprotect_snap(snap)
                image.remove_snap(snap)
        except (rbd.ImageNotFound, rbd.ObjectNotFound):
            return
        except rbd.Error as e:
            raise _oserror(e, f"removing snapshot {snap} of RBD image {spec}") from None


def list_images(spec: RbdSpec) -> list[str]:
    """The names of the images in the pool of `spec` (its image is not used)."""
    import rbd
    with _Pool(spec) as ioctx:
        try:
            return list(rbd.RBD().list(ioctx))
        except rbd.Error as e:
            raise _oserror(e, f"listing pool {spec.pool!r}") from None
