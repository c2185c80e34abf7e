"""Volumes: disks, snapshots and images, and their views.

One of the parts `Platform` is built from (see `service`). Snapshots and images are ciphertext copies that
keep their source's envelope; disks made from them are re-encrypted under a fresh DEK.

Every operation that changes something validates first (nothing awaited), then claims
its names and runs as a task under a deadline (`operations`), and returns that task.
Each is all-or-nothing across the state database, the export catalog and the files:
what it made is undone if it fails or is cancelled, and a crash leaves at most a
CREATING row or a file no row names, both removed at the next start.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING

from daemonkit.rfc3339 import format_time

from ..backend import WRITEBACK, FileSpec
from ..crypto import XtsLayer, open_disk
from ..crypto.double import join_keys
from . import backing, keys, rules
from . import operations as ops
from .copy import copy_ciphertext, reencrypt, run_copy
from .errors import (
    AccessMissing,
    BadRequest,
    Conflict,
    InsufficientStorage,
    NotFound,
)
from .model import (
    PLATFORM_KEY,
    KeyEnvelope,
    KeyUrl,
    Volume,
    VolumeKind,
    VolumeState,
    check_cache,
    check_name,
    parse_size,
)
from .serving import is_open
from .storage import VolumeStorage, open_volume

if TYPE_CHECKING:
    from ..exports import ExportCatalog
    from .access import KeyAccess
    from .encryption_sets import EncryptionSets
    from .operations import Operations
    from .scopes import KeyScopes
    from .serving import DiskServing
    from .state import State

log = logging.getLogger("nbdserver.platform")

DEFAULT_SUBSCRIPTION = "default"
DEFAULT_LOCATION = "local"


class Volumes:
    """Disks, snapshots and images. Rows live in `state`, data in `storage` (files under
    `data_dir`, or RBD images); changes run as `operations`. Keys come through `scopes`
    (each volume's set or the platform key), sets' access checks and re-wraps from
    `encryption_sets`, and a disk is served and closed by `serving` (which also says how
    a disk is opened, its cache mode included). `use_key_access` wires the revocation
    watcher built after it."""

    def __init__(self, data_dir: str, storage: VolumeStorage, state: State, catalog: ExportCatalog,
                 operations: Operations, scopes: KeyScopes, encryption_sets: EncryptionSets,
                 serving: DiskServing):
        self.data_dir = data_dir
        self.storage = storage
        self.state = state
        self.catalog = catalog
        self.operations = operations
        self.scopes = scopes
        self.encryption_sets = encryption_sets
        self.serving = serving
        self.access: KeyAccess | None = None

    def use_key_access(self, access: KeyAccess) -> None:
        self.access = access

    # -- volumes
    def volume(self, kind: VolumeKind, name: str) -> Volume:
        v = self.state.get_volume(kind, name)
        if v is None:
            raise NotFound(f"{kind.value} {name!r} not found")
        return v

    def _new_path(self, kind: VolumeKind, pool: str | None = None) -> str:
        """A new volume's location: a file, or an image in `pool` (storage.py)."""
        return self.storage.new_location(kind, pool, self._rbd_owner() if pool else "")

    def _rbd_owner(self) -> str:
        """This platform's mark in the names of its RBD images (storage.py), made once and
        kept in its state: another platform's images in a pool are never its strays."""
        owner = self.state.get_config("rbd_owner")
        if owner is None:
            owner = uuid.uuid4().hex[:12]
            self.state.set_config("rbd_owner", owner)
        return owner

    async def _remove_data(self, location: str) -> None:
        """A volume's file or image removed, on a worker thread (an image is a round trip
        to the cluster, which the loop must not wait for)."""
        if backing.is_rbd(location):
            await asyncio.get_running_loop().run_in_executor(None, self.storage.remove, location)
        else:
            _unlink(location)

    def _source(self, source: str | None) -> Volume | None:
        if not source:
            return None
        kind, _, name = source.partition(":")
        kinds = {"snapshot": VolumeKind.SNAPSHOT, "image": VolumeKind.IMAGE, "disk": VolumeKind.DISK}
        if kind not in kinds or not name:
            raise BadRequest(f"source must be snapshot:NAME, image:NAME or disk:NAME, got {source!r}")
        return self.volume(kinds[kind], name)

    def validate_disk_request(self, name: str, *, size=None, des: str | None = None,
                              source: str | None = None, count: int | None = None,
                              subscription: str | None = None, location: str | None = None,
                              cache: str | None = None, storage: str | None = None):
        """Everything about a disk request that can be refused before any work starts."""
        check_name("disk", name)
        check_cache(cache)
        if cache and self.storage.pool_for(storage) is not None:
            raise BadRequest("a cache mode is for disks in files: librbd's cache is always off "
                             "on RBD (an answered write is on the OSDs)")
        src = self._source(source)
        if src is not None and src.kind is VolumeKind.DISK:
            raise BadRequest("a disk is made from a snapshot or an image; snapshot the disk first")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool)
                                  or not 1 <= count <= 1000):
            raise BadRequest("count must be a whole number from 1 to 1000")
        names = [name] if count is None else [f"{name}-{i}" for i in range(count)]
        for n in names:
            if self.state.get_volume(VolumeKind.DISK, n):
                raise Conflict(f"disk {n!r} exists")
        size = parse_size(size) if size is not None else (src.size if src else None)
        if size is None:
            raise BadRequest("give --size, or a --source to copy")
        if src is not None and size < src.size:
            raise BadRequest(f"size {size} is smaller than the source ({src.size} bytes)")
        scope, subscription, location = self._placement(des, src, subscription, location)
        return names, size, src, scope, subscription, location

    def create_disks(self, name: str, *, progress=None, **request) -> asyncio.Task:
        names, size, src, scope, subscription, location = self.validate_disk_request(name, **request)
        cache = request.get("cache")
        pool = self.storage.pool_for(request.get("storage"))

        async def run():
            created = []
            try:
                for i, n in enumerate(names):
                    def part(done, total, i=i):
                        if progress:
                            progress((i + done / total) / len(names))
                    created.append(await self._create_disk(n, size, scope, subscription, location,
                                                           src, part, cache, pool))
            except BaseException:
                for n in created:  # all or nothing, a set of disks too
                    await self._discard_disk(n, "creation failed")
                raise
            return [self.show_disk(n) for n in created]

        what = f"creation of disk {name!r}" if len(names) == 1 else \
            f"creation of disks {names[0]!r} to {names[-1]!r}"
        return self.operations.start(
            what, run, exclusive=[ops.disk(n) for n in names],
            shared=[ops.scope(scope)] + ([ops.volume(src.kind, src.name)] if src else []),
            deadline=ops.DEADLINE * len(names) + (size * len(names) / ops.COPY_RATE if src else 0))

    def validate_copy_request(self, kind: VolumeKind, name: str, source: str) -> Volume:
        check_name(kind.value, name)
        if self.state.get_volume(kind, name):
            raise Conflict(f"{kind.value} {name!r} exists")
        src = self._source(source)
        if src is None:  # an empty source string: refused here, not a 500 further on
            raise BadRequest(f"a {kind.value} needs a source: disk:NAME, snapshot:NAME or image:NAME")
        if kind is VolumeKind.SNAPSHOT and src.kind is not VolumeKind.DISK:
            raise BadRequest("a snapshot is taken of a disk")
        if kind is VolumeKind.IMAGE and src.kind is VolumeKind.IMAGE:
            raise BadRequest("an image is made from a disk or a snapshot")
        return src

    def _placement(self, des, src, subscription, location):
        if src is not None and src.customer_managed:
            rules.cmk_source(src, des, subscription)
            des = des or src.des
        if des and des != PLATFORM_KEY:
            d = self.scopes.des(des)
            rules.same_subscription_as_des(d, subscription)
            return des, d.subscription, location or d.location
        return PLATFORM_KEY, subscription or (src.subscription if src else DEFAULT_SUBSCRIPTION), \
            location or (src.location if src else DEFAULT_LOCATION)

    async def _create_disk(self, name, size, scope, subscription, location, src, progress,
                           cache=None, pool=None) -> str:
        dek = keys.new_dek()
        # A recheck of the scope that starts after this point may not see the disk (it is
        # not served yet): if one did, the scope is checked again once the disk serves.
        checks = self.access.checks_started(scope) if self.access is not None else 0
        try:
            client = self.scopes.client_for(scope)
            url = self.scopes.key_url_for(scope)
            env = await keys.wrap(client, url, dek)
            if scope != PLATFORM_KEY:
                # Serving needs get and unwrapKey too (the watcher checks both): a set
                # granted only wrapKey would make a disk that locks at its first check.
                await keys.key_attributes(client, env.kid)
                keys.wipe(await keys.unwrap(client, env))
            while url != self.scopes.key_url_for(scope):
                # A rotation committed the set's new key meanwhile and may have listed its
                # volumes before this one had a row: wrap with the new key. From the check
                # to the row's write nothing is awaited, so a later rotation sees the row.
                url = self.scopes.key_url_for(scope)
                env = await keys.wrap(client, url, dek)
        except AccessMissing as e:
            keys.wipe(dek)
            if scope != PLATFORM_KEY:
                des = self.scopes.des(scope)
                raise AccessMissing(f"encryption set {scope!r} cannot use its key: identity "
                                    f"{des.identity_object_id} needs get, wrapKey, unwrapKey on "
                                    f"the vault ({e.message})") from None
            raise
        except BaseException:
            keys.wipe(dek)
            raise
        platform_env = None
        if scope != PLATFORM_KEY and self.scopes.des(scope).double:
            try:
                dek, platform_env = await self._add_platform_dek(dek)
            except BaseException:
                keys.wipe(dek)
                raise
        if self.state.get_volume(VolumeKind.DISK, name):
            # A concurrent request took the name while this one waited for the key service.
            # Nothing awaits between this check and put_volume below, so the check holds.
            keys.wipe(dek)
            raise Conflict(f"disk {name!r} exists")
        v = Volume(name, VolumeKind.DISK, size, subscription, location, scope, env,
                   self._new_path(VolumeKind.DISK, pool), VolumeState.CREATING,
                   source=f"{src.kind.value}:{src.name}" if src else None, created=time.time(),
                   extra={"cache": cache} if cache else {}, platform_envelope=platform_env)
        self.state.put_volume(v)
        spec = self.serving.disk_spec(v)
        loop = asyncio.get_running_loop()
        try:
            # Opened as it will be served: a cache mode its file system cannot do is
            # refused now, not at every attach. An image is made on a worker thread.
            made = replace(spec, size=size)
            backend = open_disk(made, dek) if isinstance(made, FileSpec) else \
                await loop.run_in_executor(None, open_volume, made, dek)
        except OSError as e:
            keys.wipe(dek)
            await self._remove_data(v.path)
            self.state.delete_volume(VolumeKind.DISK, name)
            if e.errno == errno.EINVAL and getattr(spec, "cache", WRITEBACK) != WRITEBACK:
                raise BadRequest(f"disk {name!r}: {e.strerror}") from None
            raise _storage_error(e, f"creating disk {name!r} of {size} bytes") from None
        try:
            if src is not None:
                src_dek = await keys.unwrap_volume(self.scopes.client_for, src)
                src_spec = self.storage.spec(src.path, cache=WRITEBACK, encrypted=False, readonly=True)
                try:
                    src_lower = await loop.run_in_executor(None, src_spec.open)
                except BaseException:
                    keys.wipe(src_dek)
                    raise
                try:
                    src_layer = XtsLayer(src_lower, src_dek)
                except BaseException as e:
                    # The layer did not take them (XtsLayer's contract): ours to wipe and close.
                    keys.wipe(src_dek)
                    src_lower.close()
                    if isinstance(e, OSError) and e.errno == errno.EINVAL:
                        # Not whole sectors: the source's storage is damaged, not the request.
                        raise Conflict(f"{src.kind.value} {src.name!r} cannot be read: "
                                       f"{e.strerror}") from None
                    raise
                try:
                    # run_copy returns only once its thread has left both layers.
                    await run_copy(reencrypt, src_layer, backend, progress=progress)
                finally:
                    src_layer.close()
            await loop.run_in_executor(None, backend.flush)
        except BaseException as e:
            backend.close()
            await self._remove_data(v.path)
            self.state.delete_volume(VolumeKind.DISK, name)
            if isinstance(e, OSError):
                raise _storage_error(e, f"writing disk {name!r}") from None
            raise
        # Unattached from the start: the DEK is wiped now and unwrapped again when a
        # client attaches (serving.py).
        backend.close()
        self._mark_ready(v)
        self.serving.export_disk(v)
        if self.access is not None and self.access.checks_started(scope) != checks:
            self.access.poke(scope)
        return name

    async def _add_platform_dek(self, dek: bytearray) -> tuple[bytearray, KeyEnvelope]:
        """A disk of a double-encryption set: a second, independent DEK wrapped by the
        platform key, joined to the customer's `dek` (which the result replaces)."""
        platform_dek = keys.new_dek()
        try:
            env = await keys.wrap(self.scopes.client_for(PLATFORM_KEY), self.scopes.key_url_for(PLATFORM_KEY),
                                  platform_dek)
        except BaseException:
            keys.wipe(platform_dek)
            raise
        return join_keys(platform_dek, dek), env

    async def _discard_disk(self, name: str, reason: str) -> None:
        """Remove a disk everywhere, in the order a crash can only leave a stray file in
        (removed at the next start): out of the catalog, out of the state, off the disk,
        then drain its in-flight requests and wipe its DEK."""
        v = self.state.get_volume(VolumeKind.DISK, name)
        export = self.catalog.remove(name)
        if v is not None:
            self.state.delete_volume(VolumeKind.DISK, name)
            if not backing.is_rbd(v.path):
                _unlink(v.path)  # an open file serves on: its requests drain below
        if export is not None:
            await self.serving.close_disk(name, reason, export)
        if v is not None and backing.is_rbd(v.path):
            # An image is removed only once closed: librbd refuses while this server
            # holds it open (its watch and lock). A crash in between leaves a stray image.
            await self._remove_data(v.path)

    def remove_orphan_files(self) -> None:
        """Files no volume row names: left by a crash between a delete's commit and its
        unlink. Every volume's row is written before its file, so nothing else is here."""
        volumes = self.state.list_volumes()
        known = {v.path for v in volumes}
        pools = {p for p in (self.storage.pool_of(v.path) for v in volumes) if p}
        if self.storage.default_pool:
            pools.add(self.storage.default_pool)
        try:
            strays = self.storage.stray_images(known, pools, self._rbd_owner()) if pools else []
            for location in strays:
                log.warning("removing RBD image %s, which no volume names (left by a crash)", location)
                self.storage.remove(location)
        except OSError as e:  # the cluster unreachable: its disks fail at attach, others serve
            log.error("cannot look for stray RBD images: %s", e)
        for kind in VolumeKind:
            folder = os.path.join(self.data_dir, kind.value + "s")
            for entry in os.scandir(folder):
                if entry.name.endswith(".img") and entry.path not in known:
                    log.warning("removing %s, which no volume names (left by a crash)", entry.path)
                    _unlink(entry.path)

    def report_failed_disks(self, disks: list[Volume]) -> int:
        """At start: say in the log which of `disks` cannot serve because of their file
        (the others serve); how many. Each is refused to clients when it is selected.
        Runs on a worker thread: it touches only the files, not the state."""
        failed = 0
        for v in disks:
            why = backing.problem(v.path, v.size)
            if why is not None:
                failed += 1
                log.warning("disk %s failed: %s; the other disks serve", v.name, why)
        return failed

    def show_disk(self, name: str) -> dict:
        v = self.volume(VolumeKind.DISK, name)
        out = _volume_view(v)
        out["file"] = backing.stored_path(self.data_dir, v.path)  # docs/format.md
        # What the disk is opened with: its own mode, or the server's default.
        out["cache"] = {"mode": v.cache or self.serving.default_cache,
                        "source": "disk" if v.cache else "server default"}
        pool = self.storage.pool_of(v.path)
        out["storage"] = f"rbd:{pool}" if pool else "file"
        if pool:  # librbd's cache is always off (rbdbackend.py)
            out["cache"] = {"mode": "none", "source": "rbd"}
        export = self.catalog.get(name)
        if export is not None:
            # Azure's disk states: Attached while a client is in transmission.
            out["diskState"] = "Attached" if export.clients else "Unattached"
            out["serving"] = {"state": export.state.value, "reason": export.lock_reason or None,
                              "connections": export.clients, "keyLoaded": is_open(export),
                              "clients": [{"peer": a.peer, "identity": a.identity,
                                           "since": a.since}
                                          for a in export.attachments.values()]}
            # A disk that holds its DEK serves from the file it opened, whatever happened
            # to the name since; one that does not would be refused at its next attach.
            why = None if is_open(export) else backing.problem(v.path, v.size)
            if why is not None:
                out["serving"].update(state="failed", reason=why)
        return out

    def list_volumes(self, kind: VolumeKind) -> list[dict]:
        return [self.show_disk(v.name) if kind is VolumeKind.DISK else _volume_view(v)
                for v in self.state.list_volumes(kind)]

    def show_volume(self, kind: VolumeKind, name: str) -> dict:
        return self.show_disk(name) if kind is VolumeKind.DISK else _volume_view(self.volume(kind, name))

    def key_envelope(self, name: str) -> dict:
        v = self.volume(VolumeKind.DISK, name)
        if v.platform_envelope is not None:
            # The outer layer's key (the customer's) is the envelope; the inner one's beside it.
            return {"disk": v.name, **v.envelope.to_json(), "platform": v.platform_envelope.to_json(),
                    "format": "two stacked aes-xts-plain64 layers, 4096-byte sectors, "
                              "iv_large_sectors: customer DEK outside, platform DEK inside; "
                              "see docs/format.md"}
        return {"disk": v.name, **v.envelope.to_json(),
                "format": "aes-xts-plain64, 4096-byte sectors, iv_large_sectors; see docs/format.md"}

    def update_disk(self, name: str, *, des: str | None = None, platform_key: bool = False) -> asyncio.Task:
        """Move a disk between the platform key and encryption sets by re-wrapping its DEK."""
        if bool(des) == bool(platform_key):
            raise BadRequest("give exactly one of --des NAME or --platform-key")
        v = self.volume(VolumeKind.DISK, name)
        target = des if des else PLATFORM_KEY  # exactly one of them was given
        rules.same_layers_move(v, target, target != PLATFORM_KEY and self.scopes.des(target).double)
        if target != PLATFORM_KEY:
            rules.no_subscription_move(v, self.scopes.des(target))
        elif v.customer_managed:
            pass  # CMK -> PMK keeps the subscription; allowed

        async def run():
            if target == v.des:
                return self.show_disk(name)
            if target != PLATFORM_KEY:
                # All three permissions, not just the wrapKey the move itself uses: without
                # get and unwrapKey the moved disk would lock at its next check.
                access = await self.encryption_sets.check_access(target)
                if not access["granted"]:
                    d = self.scopes.des(target)
                    raise AccessMissing(f"encryption set {target!r} identity {d.identity_object_id} "
                                        f"lacks {', '.join(access['missing'])} on its key; the vault "
                                        "owner must grant get, wrapKey, unwrapKey")
            # One row changes (scope and envelope together): a crash leaves the old or the new.
            scopes = self.scopes
            if not await self.encryption_sets.rewrap(v, scopes.client_for(v.des), scopes.client_for(target),
                                                     scopes.key_url_for(target), des=target):
                raise Conflict(f"disk {name!r} changed while it was being moved; try again")
            export = self.catalog.get(name)
            if export is not None:
                export.description = describe_disk(v)
            if self.access is not None:
                self.access.poke(target)
            return self.show_disk(name)

        to = "the platform-managed key" if target == PLATFORM_KEY else f"encryption set {target!r}"
        return self.operations.start(f"move of disk {name!r} to {to}", run,
                                     exclusive=[ops.disk(name)],
                                     shared=[ops.scope(v.des), ops.scope(target),
                                             ops.key_of(v.des), ops.key_of(target)])

    def delete_disk(self, name: str, *, force: bool = False) -> asyncio.Task:
        self.volume(VolumeKind.DISK, name)
        export = self.catalog.get(name)
        if export is not None and export.clients and not force:
            raise Conflict(f"disk {name!r} is attached ({export.clients} connection(s)); "
                           "detach it first or delete with force")
        return self.operations.start(f"deletion of disk {name!r}",
                                     lambda: self._discard_disk(name, "disk deleted"),
                                     exclusive=[ops.disk(name)])

    # -- snapshots and images: ciphertext copies that keep the source's envelope
    def create_snapshot(self, name: str, disk: str, progress=None) -> asyncio.Task:
        src = self.validate_copy_request(VolumeKind.SNAPSHOT, name, f"disk:{disk}")
        return self._start_copy(VolumeKind.SNAPSHOT, name, src, progress)

    def create_image(self, name: str, source: str, progress=None) -> asyncio.Task:
        src = self.validate_copy_request(VolumeKind.IMAGE, name, source)
        return self._start_copy(VolumeKind.IMAGE, name, src, progress)

    def _start_copy(self, kind: VolumeKind, name: str, src: Volume, progress) -> asyncio.Task:
        # Shared claims: two snapshots of one disk may run at once; a delete or a move of
        # the disk, or a rotation of its set, is refused meanwhile.
        return self.operations.start(
            f"{kind.value} {name!r} of {src.kind.value} {src.name!r}",
            lambda: self._copy_volume(kind, name, src, progress),
            exclusive=[ops.volume(kind, name)],
            shared=[ops.volume(src.kind, src.name), ops.scope(src.des)],
            deadline=ops.DEADLINE + src.size / ops.COPY_RATE)

    async def _copy_volume(self, kind: VolumeKind, name: str, src: Volume, progress) -> dict:
        src = self.volume(src.kind, src.name)  # its envelope now (a rotation may have run)
        v = Volume(name, kind, src.size, src.subscription, src.location, src.des, src.envelope,
                   self._new_path(kind, self.storage.pool_of(src.path)), VolumeState.CREATING,
                   source=f"{src.kind.value}:{src.name}", created=time.time(),
                   platform_envelope=src.platform_envelope)  # both layers' keys go with it
        self.state.put_volume(v)
        cb = (lambda done, total: progress(done / total)) if progress else None
        loop = asyncio.get_running_loop()
        export = self.catalog.get(src.name) if src.kind is VolumeKind.DISK else None
        try:
            if export is not None:
                # A consistent point in time while the disk stays attached: hold new
                # requests (they wait, they do not fail), let in-flight ones finish,
                # flush, copy, release.
                async with export.frozen():
                    if is_open(export):  # an unattached disk has nothing unflushed
                        # Counted in flight: a revocation meanwhile drains it before it
                        # closes the backend under it.
                        export.begin()
                        try:
                            await asyncio.shield(loop.run_in_executor(None, export.backend.flush))
                        finally:
                            export.end()
                    await self._copy_data(src.path, v.path, src.size, cb)
            else:
                await self._copy_data(src.path, v.path, src.size, cb)
        except BaseException as e:
            await self._remove_data(v.path)
            self.state.delete_volume(kind, name)
            if isinstance(e, OSError):  # a full disk is a 507, not an internal error
                raise _storage_error(e, f"writing {kind.value} {name!r}") from None
            raise
        self._mark_ready(v)
        return _volume_view(v)

    async def _copy_data(self, src: str, dst: str, size: int, progress) -> None:
        """A byte-exact copy of a volume's ciphertext. On RBD a copy-on-write clone: the
        DEK is the same, so the data may be shared, and the copy is instant whatever the
        size (copies under a fresh DEK, a disk made from a snapshot or an image, rewrite
        every byte and cannot be clones: `reencrypt`)."""
        if not backing.is_rbd(src):
            await run_copy(copy_ciphertext, src, dst, size, progress=progress)
            return
        from ..rbdbackend import clone_image

        def clone(source, target, report) -> None:
            clone_image(source, target)
            report(1, 1)
        # run_copy: a cancelled operation waits for the clone's thread before its
        # rollback removes the clone.
        await run_copy(clone, self.storage.rbd_spec(src), self.storage.rbd_spec(dst), progress=progress)

    def _mark_ready(self, v: Volume) -> None:
        """A rotation (des update) may have re-wrapped the volume's DEK while its data was
        being copied: keep the stored envelope, not the one this copy started with."""
        stored = self.state.get_volume(v.kind, v.name)
        if stored is not None:
            v.envelope, v.des = stored.envelope, stored.des
        v.state = VolumeState.READY
        self.state.put_volume(v)

    def share_image(self, name: str, gallery: str) -> asyncio.Task:
        v = self.volume(VolumeKind.IMAGE, name)
        rules.image_shareable(v)
        check_name("gallery", gallery)

        async def run():
            self.state.set_gallery(VolumeKind.IMAGE, name, gallery)
            return _volume_view(self.volume(VolumeKind.IMAGE, name))
        return self.operations.start(f"sharing of image {name!r}", run,
                                     exclusive=[ops.volume(VolumeKind.IMAGE, name)])

    def delete_volume(self, kind: VolumeKind, name: str) -> asyncio.Task:
        v = self.volume(kind, name)

        async def run():
            self.state.delete_volume(kind, name)  # committed first: a crash leaves a stray file
            await self._remove_data(v.path)
        return self.operations.start(f"deletion of {kind.value} {name!r}", run,
                                     exclusive=[ops.volume(kind, name)])


def describe_disk(v: Volume) -> str:
    key = "platform-managed key" if v.des == PLATFORM_KEY else f"encryption set {v.des}"
    return f"encrypted disk {v.name} ({key})"


def _volume_view(v: Volume) -> dict:
    ku = KeyUrl.parse(v.envelope.kid)
    return {"name": v.name, "kind": v.kind.value, "size": v.size, "subscription": v.subscription,
            "location": v.location,
            "encryption": {"type": v.encryption_type,
                           "diskEncryptionSet": None if v.des == PLATFORM_KEY else v.des,
                           "kid": v.envelope.kid, "keyVersion": ku.version, "alg": v.envelope.alg,
                           **_platform_layer(v)},
            "state": v.state.value, "source": v.source, "gallery": v.gallery, "created": v.created,
            "timeCreated": format_time(v.created)}


def _platform_layer(v: Volume) -> dict:
    """A double-encrypted volume's second key: the platform key's version that wraps it."""
    if v.platform_envelope is None:
        return {}
    return {"platformKid": v.platform_envelope.kid}


def _storage_error(e: OSError, what: str) -> Exception:
    """The platform's own storage refused: the request's fault (a size the file system
    cannot hold) or a full disk; anything else stays an internal error."""
    if e.errno in (errno.EFBIG, errno.EOVERFLOW):
        return BadRequest(f"{what}: too large for the platform's storage ({e.strerror})")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage(f"{what}: the platform's storage is full ({e.strerror})")
    return e


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
