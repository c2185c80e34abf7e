"""Disk encryption sets: a customer's key, and the managed identity that may use it.

One of the parts `Platform` is built from (see `service`): the operations on encryption
sets, and re-wrapping
a volume's DEK from one key to another (rotation and moves between keys). A set may also
follow its key's latest version by itself (`auto_rotation`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import TYPE_CHECKING

from daemonkit.rfc3339 import format_time
from keyservice.client import KeyServiceClient, KeyServiceError

from . import keys, rules
from . import operations as ops
from .errors import (
    AccessMissing,
    BadRequest,
    Conflict,
    KeyUnavailable,
)
from .model import (
    CUSTOMER_KEY,
    PLATFORM_KEY,
    SET_TYPES,
    EncryptionSet,
    KeyUrl,
    Volume,
    VolumeKind,
    canonical_key_url,
    check_name,
)

if TYPE_CHECKING:
    from .access import KeyAccess
    from .auto_rotation import AutoRotation
    from .operations import Operations
    from .scopes import KeyScopes
    from .sealing import Sealer
    from .state import State

log = logging.getLogger("nbdserver.platform")


class EncryptionSets:
    """Encryption sets and re-wrapping. It keeps sets in `state`, seals their identities'
    credentials with `sealer`, talks to the key service as the platform (`scopes.client`)
    or as a set (`scopes`), runs its changes as `operations`, and tells `auto_rotation`
    about sets that follow their key. Key URLs must be on `keyservice_url` (or, in Key
    Vault's host form, under `vault_domain`). `use_key_access` wires the revocation
    watcher built after it."""

    def __init__(self, state: State, sealer: Sealer, scopes: KeyScopes, operations: Operations,
                 auto_rotation: AutoRotation, *, keyservice_url: str,
                 vault_domain: str | None = None):
        self.state = state
        self.sealer = sealer
        self.scopes = scopes
        self.operations = operations
        self.auto_rotation = auto_rotation
        self.keyservice_url = keyservice_url
        self.vault_domain = vault_domain
        self.access: KeyAccess | None = None

    def use_key_access(self, access: KeyAccess) -> None:
        self.access = access

    # -- encryption sets
    def create_des(self, name: str, key_url: str, *, subscription: str | None = None,
                   location: str | None = None, allow_cross_subscription: bool = False,
                   auto_rotate: bool = False, encryption_type: str | None = None) -> asyncio.Task:
        check_name("encryption set", name)
        encryption_type = encryption_type or CUSTOMER_KEY
        if encryption_type not in SET_TYPES:
            # EncryptionAtRestWithPlatformKey is no set's: it is a disk without one.
            raise BadRequest(f"encryptionType must be one of {', '.join(SET_TYPES)}, "
                             f"not {encryption_type!r}")
        key_url = canonical_key_url(key_url, self.keyservice_url, self.vault_domain)
        if name == PLATFORM_KEY:
            # Volumes record their scope by name, and this one means the platform's own key:
            # a set of that name would silently turn its disks platform-managed.
            raise BadRequest(f"encryption set name {name!r} is reserved for the platform-managed key")
        if self.state.get_des(name):
            raise Conflict(f"encryption set {name!r} exists")
        ku = KeyUrl.parse(key_url)
        return self.operations.start(
            f"creation of encryption set {name!r}",
            lambda: self._create_des(name, key_url, ku, subscription, location,
                                     allow_cross_subscription, auto_rotate, encryption_type),
            exclusive=[ops.scope(name)])

    async def _create_des(self, name, key_url, ku, subscription, location,
                          allow_cross_subscription, auto_rotate, encryption_type=CUSTOMER_KEY) -> dict:
        vault = await self._vault(ku)
        subscription = subscription or vault.get("subscription")
        location = location or vault.get("location")
        rules.vault_fit_for_des(vault, ku.vault, location, subscription, allow_cross_subscription)
        try:
            cred = await self.scopes.client.create_identity(f"des-{name}", type="managedIdentity")
        except KeyServiceError as e:
            raise keys.translate(e, "creating the encryption set's identity") from None
        des = EncryptionSet(name, subscription, location, key_url, cred.object_id,
                            self.sealer.seal(json.dumps(cred.__dict__).encode(), f"des:{name}"),
                            allow_cross_subscription, time.time(), auto_rotate=auto_rotate,
                            # Known only when named: the identity may not `get` the key yet.
                            active_key_url=key_url if ku.version else None,
                            encryption_type=encryption_type)
        if self.state.get_des(name):  # taken by a concurrent request meanwhile (no await until put)
            raise Conflict(f"encryption set {name!r} exists")
        self.state.put_des(des)
        return await self.show_des(name)

    async def _vault(self, ku: KeyUrl) -> dict:
        if ku.base.rstrip("/") != self.keyservice_url:
            raise BadRequest(f"key URL {ku.versionless} is not on this platform's key service "
                             f"({self.keyservice_url})")
        try:
            return await self.scopes.client.get_vault(ku.vault)
        except KeyServiceError as e:
            if e.status == 404:
                raise BadRequest(f"key vault {ku.vault!r} not found") from None
            raise keys.translate(e, f"reading key vault {ku.vault!r}") from None

    async def check_access(self, scope: str, key_url: str | None = None) -> dict:
        """Which of get, wrapKey, unwrapKey the scope's identity may use on its key."""
        client, url = self.scopes.client_for(scope), key_url or self.scopes.key_url_for(scope)
        missing, messages = [], []
        try:
            await keys.key_attributes(client, url)
        except AccessMissing as e:
            missing.append("get")
            messages.append(e.message)
        probe = bytearray(os.urandom(32))
        env = None
        try:
            env = await keys.wrap(client, url, probe)
        except AccessMissing as e:
            missing.append("wrapKey")
            messages.append(e.message)
        unverified = []
        if env is not None:
            try:
                keys.wipe(await keys.unwrap_raw(client, env))
            except AccessMissing as e:
                missing.append("unwrapKey")
                messages.append(e.message)
        else:
            unverified.append("unwrapKey")  # nothing to unwrap without a wrap first
        keys.wipe(probe)
        return {"granted": not missing, "missing": missing, "unverified": unverified,
                "messages": messages}

    async def show_des(self, name: str) -> dict:
        des = self.scopes.des(name)
        out = {"name": des.name, "subscription": des.subscription, "location": des.location,
               "encryptionType": des.encryption_type, "keyUrl": des.key_url,
               "identity": {"type": "SystemAssigned", "objectId": des.identity_object_id},
               "allowCrossSubscription": des.allow_cross_subscription,
               **rotation_view(des, self.state.list_volumes(des=name),
                               # Not the update this view ends, if it is one.
                               rotating=any(ops.key_of(name) in r.exclusive
                                            and r.task is not asyncio.current_task()
                                            for r in self.operations.running)),
               "disks": [v.name for v in self.state.list_volumes(VolumeKind.DISK, des=name)]}
        try:
            access = await self.check_access(name)
        except KeyUnavailable as e:
            out["access"] = {"granted": None, "message": e.message}
        else:
            if access["granted"]:
                out["access"] = {"granted": True}
            else:
                vault = KeyUrl.parse(des.key_url).vault
                out["access"] = {
                    "granted": False, "missing": access["missing"], "unverified": access["unverified"],
                    # The key service's own reasons: a refusal is a missing permission or
                    # a key that is disabled, expired or deleted, and only it can tell which.
                    "message": f"identity {des.identity_object_id} is refused "
                               f"{', '.join(access['missing'])} on key vault {vault!r} "
                               f"({'; '.join(access['messages'])}); the vault owner must grant "
                               "get, wrapKey, unwrapKey on a key that is enabled, unexpired and "
                               "not deleted",
                    "details": access["messages"]}
        return out

    def list_des(self) -> list[dict]:
        return [{"name": d.name, "encryptionType": d.encryption_type, "keyUrl": d.key_url,
                 "subscription": d.subscription, "location": d.location,
                 "identity": {"objectId": d.identity_object_id},
                 "rotationToLatestKeyVersionEnabled": d.auto_rotate}
                for d in self.state.list_des()]

    def update_des(self, name: str, key_url: str | None = None, *,
                   auto_rotate: bool | None = None) -> asyncio.Task:
        """Rotate: re-wrap every DEK under the set with the new key (version); online.
        And/or turn automatic rotation on or off (`auto_rotation`).

        Each volume's row changes alone (its envelope), so a rotation cut short, by its
        deadline or a crash, leaves every volume under the old key or the new one, both
        usable by the set; running it again finishes it."""
        self.scopes.des(name)
        key_url = canonical_key_url(key_url, self.keyservice_url, self.vault_domain)
        if key_url is None and auto_rotate is None:
            raise BadRequest("nothing to update: give keyUrl, rotationToLatestKeyVersionEnabled "
                             "or both")
        if key_url is None:
            # Claims the set's key: the switch must not change under a rotation's feet.
            task = self.operations.start(
                f"update of encryption set {name!r}",
                lambda: self._set_auto_rotate(name, bool(auto_rotate)),
                exclusive=[ops.key_of(name)], shared=[ops.scope(name)])
        else:
            ku = KeyUrl.parse(key_url)
            count = len(self.state.list_volumes(des=name))
            task = self.operations.start(f"rotation of encryption set {name!r}",
                                         lambda: self._rotate(name, key_url, ku, auto_rotate),
                                         exclusive=[ops.key_of(name)], shared=[ops.scope(name)],
                                         deadline=ops.DEADLINE * (1 + count / 10))
        # Once its claim on the key is released: a set that follows its key catches up now
        # (switched on, or pinned to an older version than the latest), not at the lease,
        # and an automatic attempt that gave way to this update is made again.
        task.add_done_callback(lambda t: self._follow_latest(name, t))
        return task

    def _follow_latest(self, name: str, task: asyncio.Task) -> None:
        if task.cancelled():  # the platform is stopping
            return
        des = self.state.get_des(name)
        if des is not None and des.auto_rotate:
            self.auto_rotation.poke(name)

    async def _set_auto_rotate(self, name: str, auto_rotate: bool) -> dict:
        des = self.scopes.des(name)
        des.auto_rotate = auto_rotate
        if not auto_rotate:
            des.rotation_error = None  # a manual set has no automatic attempts to report
        self.state.put_des(des)
        return await self.show_des(name)

    async def _rotate(self, name: str, key_url: str, ku: KeyUrl,
                      auto_rotate: bool | None = None) -> dict:
        des = self.scopes.des(name)
        vault = await self._vault(ku)
        rules.vault_fit_for_des(vault, ku.vault, des.location, des.subscription,
                                des.allow_cross_subscription)
        access = await self.check_access(name, key_url)
        if not access["granted"]:
            raise AccessMissing(f"encryption set {name!r} identity {des.identity_object_id} lacks "
                                f"{', '.join(access['missing'])} on the new key {key_url}")
        client = self.scopes.client_for(name)
        kids = set()
        for v in self.state.list_volumes(des=name):
            if await self.rewrap(v, client, client, key_url):
                kids.add(v.envelope.kid)
        des.key_url = key_url
        if auto_rotate is not None:
            des.auto_rotate = auto_rotate
        self.state.put_des(des)
        # Disks and copies being made meanwhile claim no key (a long copy must not hold a
        # rotation back): one wrapped before the new key was committed but written after
        # the list above is re-wrapped now; one written later uses the new key itself.
        for v in self.state.list_volumes(des=name):
            if v.envelope.kid not in kids:
                await self.rewrap(v, client, client, key_url)
        wrapped = {v.envelope.kid for v in self.state.list_volumes(des=name)}
        # What the volumes are on; with none, the version the key URL names now.
        active = (next(iter(wrapped)) if len(wrapped) == 1
                  else await keys.latest_version(client, key_url))
        self.state.set_des_rotation(name, active_key_url=active, rotated=time.time(), error=None)
        if self.access is not None:
            self.access.poke(name)
        return await self.show_des(name)

    def delete_des(self, name: str) -> asyncio.Task:
        self.scopes.des(name)

        async def run():
            users = self.state.list_volumes(des=name)
            if users:
                raise Conflict(f"encryption set {name!r} is used by "
                               + ", ".join(f"{v.kind.value} {v.name}" for v in users))
            self.state.delete_des(name)
            self.auto_rotation.forget(name)
            if self.access is not None:
                self.access.forget(name)
            await self.scopes.forget(name)
        return self.operations.start(f"deletion of encryption set {name!r}", run,
                                     exclusive=[ops.scope(name)])

    async def rewrap(self, v: Volume, old: KeyServiceClient, new: KeyServiceClient, key_url: str,
                      *, des: str | None = None) -> bool:
        """Re-wrap one volume's DEK; False if the volume went or changed meanwhile."""
        dek = await keys.unwrap(old, v.envelope)
        try:
            envelope = await keys.wrap(new, key_url, dek)
        finally:
            keys.wipe(dek)
        if not self.state.replace_envelope(v, v.envelope, envelope, des or v.des):
            return False
        v.envelope, v.des = envelope, des or v.des
        return True



def rotation_view(des: EncryptionSet, volumes: list[Volume], *, rotating: bool) -> dict:
    """The set's rotation as Azure names it. The active key is the version the last
    rotation wrapped every volume with; before any, the one version its volumes share
    (a set on a versionless URL that has not rotated), or null if they share none.
    The state: InProgress while an operation holds the set's key, else Failed after a
    failed automatic attempt, Succeeded after a rotation, null before any."""
    if rotating:
        state: str | None = "InProgress"
    elif des.rotation_error is not None:
        state = "Failed"
    else:
        state = "Succeeded" if des.last_key_rotation is not None else None
    active = des.active_key_url
    if active is None:
        kids = {v.envelope.kid for v in volumes}
        active = next(iter(kids)) if len(kids) == 1 else None
    return {"rotationToLatestKeyVersionEnabled": des.auto_rotate,
            "activeKey": {"keyUrl": active},
            "lastKeyRotationTimestamp": (format_time(des.last_key_rotation)
                                         if des.last_key_rotation is not None else None),
            "keyRotationState": state,
            "autoKeyRotationError": des.rotation_error}
