"""`Platform`: the disk platform's one object, built from its parts.

Every operation validates, talks to the key service where it must, commits its state to
SQLite, and only then answers. Disks are served as NBD exports named after the disk; the
export of a disk whose key cannot be used is LOCKED (EIO to I/O, new clients refused).

Each part takes what it uses in its constructor, and the dependencies run one way:
sizing uses volumes and serving; volumes use encryption sets, serving and scopes;
encryption sets and serving use scopes. `Platform` builds them in that order and keeps
the methods its callers (the API, the daemon, tests) use, each a one-line delegation.

- here: start/stop, the platform's own vault and key;
- `scopes`: the key-service client and key of each scope (a set, or the platform key);
- `serving`: opening a disk when a client attaches, closing it when idle or revoked;
- `encryption_sets`: create, show (live access check), rotate, delete, re-wrap;
- `volumes`: disks, snapshots, images, moves between keys;
- `sizing`: growing a disk, its usage;
- `access`: revocation (the change stream, the lease, the grace period), and
  `auto_rotation`: both still take the whole platform and call back into several parts
  through it; the sets poke `auto_rotation`, which re-wraps through the sets, so that
  one cycle remains, through the platform.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from keyservice.client import Credential, KeyServiceClient, KeyServiceError, KeyServiceUnavailable

from ..backend import WRITEBACK
from ..exports import Export, ExportCatalog
from . import keys
from .access import KeyAccess
from .auto_rotation import AutoRotation
from .encryption_sets import EncryptionSets
from .errors import PlatformVaultUntrusted
from .model import (
    EncryptionSet,
    KeyUrl,
    Volume,
    VolumeKind,
)
from .operations import Operations
from .oplog import OperationLog
from .scopes import KeyScopes
from .sealing import platform_sealer, reseal
from .serving import IDLE_CLOSE, DiskServing
from .sizing import DiskSizing
from .state import State
from .storage import VolumeStorage
from .volumes import DEFAULT_LOCATION, Volumes

if TYPE_CHECKING:
    from .leases import DiskLeases

log = logging.getLogger("nbdserver.platform")
FAILED_SCAN_DELAY = 3.0  # seconds after start: see start()

PLATFORM_VAULT = "nbd-platform"
PLATFORM_KEY_NAME = "platform-dek-wrapping"


def platform_vault_problems(vault: dict, object_id: str, tenant_id: str) -> list[str]:
    """What makes `vault` (the key service's JSON) unfit to be the platform's own."""
    problems = []
    if vault.get("owner") != object_id:
        problems.append(f"it is owned by {vault.get('owner')!r}, not by the platform's identity "
                        f"{object_id!r}")
    if vault.get("tenantId") != tenant_id:
        problems.append(f"it is in tenant {vault.get('tenantId')!r}, not the platform's {tenant_id!r}")
    if vault.get("enablePurgeProtection") is not True:
        problems.append("it has no purge protection")
    if vault.get("state", "active") != "active":
        problems.append(f"it is {vault.get('state')}")
    others = sorted(p.get("objectId") for p in vault.get("accessPolicies", [])
                    if p.get("objectId") != object_id
                    and (p.get("permissions") or {}).get("keys"))
    if others:
        problems.append(f"other identities hold key permissions on it: {', '.join(others)}")
    return problems


class Platform:
    """The parts, built with their dependencies, and the methods callers use."""

    def __init__(self, data_dir: str, catalog: ExportCatalog, keyservice_url: str,
                 credential: Credential, *, ssl=None, master_key_file: str | None = None,
                 idle_close: float = IDLE_CLOSE, storage: VolumeStorage | None = None,
                 state_url: str | None = None, default_cache: str = WRITEBACK,
                 vault_domain: str | None = None):
        # Absolute once, here: files are found relative to it whatever the working directory.
        self.data_dir = data_dir = os.path.abspath(data_dir)
        self.catalog = catalog
        self.keyservice_url = keyservice_url.rstrip("/")
        self.storage = storage or VolumeStorage(data_dir)  # files, or RBD images (storage.py)
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        for sub in ("disks", "snapshots", "images"):
            os.makedirs(os.path.join(data_dir, sub), mode=0o700, exist_ok=True)
        # state_url: PostgreSQL that several servers share (state.py); else SQLite here.
        self.state = State(os.path.join(data_dir, "platform.db"), state_url=state_url)
        self.sealer = platform_sealer(data_dir, master_key_file, holds_state=not self.state.fresh)
        reseal(self.state, self.sealer)  # after a master key rotation (sealing.py)
        self.client = KeyServiceClient(self.keyservice_url, credential, ssl=ssl)
        # The client and key of each scope (a set's name, or the platform key).
        self.scopes = KeyScopes(self.state, self.sealer, self.client,
                                keyservice_url=self.keyservice_url, ssl=ssl)
        self.operations = Operations()  # claims, deadlines, tasks: see operations.py
        self.oplog = OperationLog(self.state)  # what clients follow: the API's and our own
        self.auto_rotation = AutoRotation(self)  # sets that follow their key's latest version
        # vault_domain: Key Vault's host-form key URLs on that service
        # (model.canonical_key_url); None: path form only.
        self.encryption_sets = EncryptionSets(self.state, self.sealer, self.scopes, self.operations,
                                              self.auto_rotation, keyservice_url=self.keyservice_url,
                                              vault_domain=vault_domain)
        self.access: KeyAccess | None = None  # see use_key_access
        # Opens a disk when a client attaches, closes it when idle or revoked.
        self.serving = DiskServing(self.state, catalog, self.storage, self.scopes,
                                   idle_close=idle_close, default_cache=default_cache)
        self.volumes = Volumes(data_dir, self.storage, self.state, catalog, self.operations,
                               self.scopes, self.encryption_sets, self.serving)
        self.sizing = DiskSizing(self.state, self.storage, catalog, self.operations,
                                 find_volume=self.volumes.volume, show_disk=self.volumes.show_disk,
                                 opening=self.serving.opening)

    def use_key_access(self, access: KeyAccess) -> None:
        """The revocation watcher to poke after a change that may alter key access (a new
        key, a move, a refused unwrap). Whoever builds both wires them (daemon.py); a
        platform without one changes nothing and is rechecked by nobody."""
        self.access = access  # access.py and auto_rotation.py read it here
        for part in (self.serving, self.encryption_sets, self.volumes):
            part.use_key_access(access)

    def use_leases(self, leases: DiskLeases) -> None:
        """Several servers share the state: a disk is opened only by its lease's holder."""
        self.serving.use_leases(leases)

    # -- what the parts do, as callers (the API, the CLI, tests) name it
    def create_des(self, name: str, key_url: str, *, subscription: str | None = None,
                   location: str | None = None, allow_cross_subscription: bool = False,
                   auto_rotate: bool = False, encryption_type: str | None = None) -> asyncio.Task:
        return self.encryption_sets.create_des(
            name, key_url, subscription=subscription, location=location,
            allow_cross_subscription=allow_cross_subscription, auto_rotate=auto_rotate,
            encryption_type=encryption_type)

    async def show_des(self, name: str) -> dict:
        return await self.encryption_sets.show_des(name)

    def list_des(self) -> list[dict]:
        return self.encryption_sets.list_des()

    def update_des(self, name: str, key_url: str | None = None, *,
                   auto_rotate: bool | None = None) -> asyncio.Task:
        return self.encryption_sets.update_des(name, key_url, auto_rotate=auto_rotate)

    def delete_des(self, name: str) -> asyncio.Task:
        return self.encryption_sets.delete_des(name)

    async def check_access(self, scope: str, key_url: str | None = None) -> dict:
        return await self.encryption_sets.check_access(scope, key_url)

    async def _rewrap(self, v: Volume, old: KeyServiceClient, new: KeyServiceClient, key_url: str,
                      *, des: str | None = None) -> bool:  # auto_rotation.py's call
        return await self.encryption_sets.rewrap(v, old, new, key_url, des=des)

    def resize_disk(self, name: str, size) -> asyncio.Task:
        return self.sizing.resize_disk(name, size)

    def disk_usage(self, name: str) -> dict:
        return self.sizing.disk_usage(name)

    def volume(self, kind: VolumeKind, name: str) -> Volume:
        return self.volumes.volume(kind, name)

    def create_disks(self, name: str, *, progress=None, **request) -> asyncio.Task:
        return self.volumes.create_disks(name, progress=progress, **request)

    def show_disk(self, name: str) -> dict:
        return self.volumes.show_disk(name)

    def list_volumes(self, kind: VolumeKind) -> list[dict]:
        return self.volumes.list_volumes(kind)

    def show_volume(self, kind: VolumeKind, name: str) -> dict:
        return self.volumes.show_volume(kind, name)

    def key_envelope(self, name: str) -> dict:
        return self.volumes.key_envelope(name)

    def update_disk(self, name: str, *, des: str | None = None, platform_key: bool = False) -> asyncio.Task:
        return self.volumes.update_disk(name, des=des, platform_key=platform_key)

    def delete_disk(self, name: str, *, force: bool = False) -> asyncio.Task:
        return self.volumes.delete_disk(name, force=force)

    def create_snapshot(self, name: str, disk: str, progress=None) -> asyncio.Task:
        return self.volumes.create_snapshot(name, disk, progress)

    def create_image(self, name: str, source: str, progress=None) -> asyncio.Task:
        return self.volumes.create_image(name, source, progress)

    def share_image(self, name: str, gallery: str) -> asyncio.Task:
        return self.volumes.share_image(name, gallery)

    def delete_volume(self, kind: VolumeKind, name: str) -> asyncio.Task:
        return self.volumes.delete_volume(kind, name)

    def _export_disk(self, disk: Volume) -> Export:  # leases.py's call
        return self.serving.export_disk(disk)

    def close_disks(self, names, reason: str) -> list[asyncio.Task]:
        return self.serving.close_disks(names, reason)

    async def open_disks(self, names) -> int:
        return await self.serving.open_disks(names)

    def unserve(self, name: str, reason: str) -> None:
        self.serving.unserve(name, reason)

    # -- start and stop
    async def start(self) -> None:
        self._remove_unfinished()
        if self.scopes.platform_key_url is None:
            self.scopes.platform_key_url = await self._create_platform_key()
        else:
            await self._check_platform_vault(created_now=False)
        # Nothing is unwrapped here: a disk opens when a client attaches (serving.py),
        # so starting costs the same whatever the number of disks.
        disks = self.state.list_volumes(VolumeKind.DISK)
        for disk in disks:
            self._export_disk(disk)
        # volumes.py: a missing file fails its disk alone. Saying which costs a stat per
        # disk, so it runs beside serving, off the way to READY, and a moment later, when
        # the first clients (a reconnect storm after a restart) have been served; a client
        # selecting such a disk is refused by its own check at attach either way.
        loop = asyncio.get_running_loop()
        self._failed_scan = loop.call_later(
            FAILED_SCAN_DELAY, lambda: loop.run_in_executor(None, self.volumes.report_failed_disks, disks))

    async def stop(self) -> None:
        scan = getattr(self, "_failed_scan", None)  # set by start(), which may have failed
        if scan is not None:
            scan.cancel()
        await self.auto_rotation.stop()
        await self.operations.cancel_all()
        await self.serving.stop()
        await self.scopes.close()
        self.state.close()

    def _remove_unfinished(self) -> None:
        """A volume left CREATING by a crash has partial data: remove it and its file,
        unless another server sharing the state is still making it (leases.py)."""
        from .leases import remove_abandoned
        remove_abandoned(self.state, self.storage)
        self.volumes.remove_orphan_files()

    async def _create_platform_key(self) -> str:
        """First start: the platform's own vault and RSA key wrap every PMK volume's DEK.
        A vault of that name that exists already is used only if it passes
        `_check_platform_vault`: whoever else holds it could unwrap every PMK disk's DEK."""
        try:
            try:
                await self.client.create_vault(PLATFORM_VAULT, location=DEFAULT_LOCATION,
                                               subscription="platform", retention_days=90,
                                               purge_protection=True)
            except KeyServiceError as e:
                if e.status != 409:
                    raise
            await self._check_platform_vault(created_now=True)
            bundle = await self.client.create_key(PLATFORM_VAULT, PLATFORM_KEY_NAME)
        except KeyServiceError as e:
            raise keys.translate(e, "creating the platform key") from None
        url = KeyUrl.parse(bundle["key"]["kid"]).versionless
        self.state.set_config("platform_key_url", url)
        log.info("created the platform-managed key %s", url)
        return url

    async def _check_platform_vault(self, *, created_now: bool) -> None:
        """The platform's vault must be the platform's alone: owned by its identity, in its
        tenant, with purge protection, and no other identity granted anything on its keys.
        Otherwise the platform refuses to start (`PlatformVaultUntrusted`), naming what is
        wrong. On a later start with the key service unreachable the check waits for the
        next start (it passed when the key was made); a refusal is never waited out."""
        me = self.client.credential
        try:
            vault = await self.client.get_vault(PLATFORM_VAULT)
        except KeyServiceUnavailable:
            if created_now:
                raise
            log.warning("cannot check the platform vault %r now: the key service is unreachable",
                        PLATFORM_VAULT)
            return
        except KeyServiceError as e:
            raise PlatformVaultUntrusted(
                f"the platform vault {PLATFORM_VAULT!r} exists but this platform's identity "
                f"{me.object_id} cannot read it ({e.status} {e.code}: {e.message}); it belongs to "
                "someone else. Remove it (or give the platform another identity's vault) before "
                "starting") from None
        problems = platform_vault_problems(vault, me.object_id, me.tenant_id)
        if problems:
            raise PlatformVaultUntrusted(
                f"refusing to use the platform vault {PLATFORM_VAULT!r}: " + "; ".join(problems)
                + ". Whoever holds it could unwrap every platform-managed disk's key")

    # -- key access per scope (an encryption set's name, or PLATFORM_KEY)
    def client_for(self, scope: str) -> KeyServiceClient:
        return self.scopes.client_for(scope)

    def key_url_for(self, scope: str) -> str:
        return self.scopes.key_url_for(scope)

    def _des(self, name: str) -> EncryptionSet:  # auto_rotation.py's call
        return self.scopes.des(name)
