"""Disk encryption sets: a customer's key, and the managed identity that may use it.

A mixin of `Platform` (see `service`): the operations on encryption sets, and re-wrapping
a volume's DEK from one key to another (rotation and moves between keys).
"""

from __future__ import annotations

import json
import logging
import os
import time

from keyservice.client import KeyServiceClient, KeyServiceError

from . import keys, rules
from .errors import (
    AccessMissing, BadRequest, Conflict, KeyUnavailable,
)
from .model import (
    PLATFORM_KEY, EncryptionSet, KeyUrl, Volume, VolumeKind, check_name,
)

log = logging.getLogger("nbdserver.platform")


class EncryptionSetOperations:
    # -- encryption sets
    async def create_des(self, name: str, key_url: str, *, subscription: str | None = None,
                         location: str | None = None, allow_cross_subscription: bool = False) -> dict:
        check_name("encryption set", name)
        if name == PLATFORM_KEY:
            # Volumes record their scope by name, and this one means the platform's own key:
            # a set of that name would silently turn its disks platform-managed.
            raise BadRequest(f"encryption set name {name!r} is reserved for the platform-managed key")
        if self.state.get_des(name):
            raise Conflict(f"encryption set {name!r} exists")
        ku = KeyUrl.parse(key_url)
        vault = await self._vault(ku)
        subscription = subscription or vault.get("subscription")
        location = location or vault.get("location")
        rules.vault_fit_for_des(vault, ku.vault, location, subscription, allow_cross_subscription)
        try:
            cred = await self.client.create_identity(f"des-{name}", type="managedIdentity")
        except KeyServiceError as e:
            raise keys.translate(e, "creating the encryption set's identity") from None
        des = EncryptionSet(name, subscription, location, key_url, cred.object_id,
                            self.sealer.seal(json.dumps(cred.__dict__).encode(), f"des:{name}"),
                            allow_cross_subscription, time.time())
        if self.state.get_des(name):  # taken by a concurrent request meanwhile (no await until put)
            raise Conflict(f"encryption set {name!r} exists")
        self.state.put_des(des)
        return await self.show_des(name)

    async def _vault(self, ku: KeyUrl) -> dict:
        if ku.base.rstrip("/") != self.keyservice_url:
            raise BadRequest(f"key URL {ku.versionless} is not on this platform's key service "
                             f"({self.keyservice_url})")
        try:
            return await self.client.get_vault(ku.vault)
        except KeyServiceError as e:
            if e.status == 404:
                raise BadRequest(f"key vault {ku.vault!r} not found") from None
            raise keys.translate(e, f"reading key vault {ku.vault!r}") from None

    async def check_access(self, scope: str, key_url: str | None = None) -> dict:
        """Which of get, wrapKey, unwrapKey the scope's identity may use on its key."""
        client, url = self.client_for(scope), key_url or self.key_url_for(scope)
        missing, messages = [], []
        try:
            await keys.key_attributes(client, url)
        except AccessMissing as e:
            missing.append("get"); messages.append(e.message)
        probe = bytearray(os.urandom(32))
        env = None
        try:
            env = await keys.wrap(client, url, probe)
        except AccessMissing as e:
            missing.append("wrapKey"); messages.append(e.message)
        unverified = []
        if env is not None:
            try:
                keys.wipe(await keys.unwrap_raw(client, env))
            except AccessMissing as e:
                missing.append("unwrapKey"); messages.append(e.message)
        else:
            unverified.append("unwrapKey")  # nothing to unwrap without a wrap first
        keys.wipe(probe)
        return {"granted": not missing, "missing": missing, "unverified": unverified,
                "messages": messages}

    async def show_des(self, name: str) -> dict:
        des = self._des(name)
        out = {"name": des.name, "subscription": des.subscription, "location": des.location,
               "keyUrl": des.key_url, "identity": {"type": "SystemAssigned",
                                                   "objectId": des.identity_object_id},
               "allowCrossSubscription": des.allow_cross_subscription,
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
        return [{"name": d.name, "keyUrl": d.key_url, "subscription": d.subscription,
                 "location": d.location, "identity": {"objectId": d.identity_object_id}}
                for d in self.state.list_des()]

    async def update_des(self, name: str, key_url: str) -> dict:
        """Rotate: re-wrap every DEK under the set with the new key (version); online."""
        des = self._des(name)
        ku = KeyUrl.parse(key_url)
        vault = await self._vault(ku)
        rules.vault_fit_for_des(vault, ku.vault, des.location, des.subscription,
                                des.allow_cross_subscription)
        async with self.scope_lock(name):
            access = await self.check_access(name, key_url)
            if not access["granted"]:
                raise AccessMissing(f"encryption set {name!r} identity {des.identity_object_id} lacks "
                                    f"{', '.join(access['missing'])} on the new key {key_url}")
            client = self.client_for(name)
            for v in self.state.list_volumes(des=name):
                await self._rewrap(v, client, client, key_url)
            des.key_url = key_url
            self.state.put_des(des)
        return await self.show_des(name)

    async def delete_des(self, name: str) -> None:
        self._des(name)
        users = self.state.list_volumes(des=name)
        if users:
            raise Conflict(f"encryption set {name!r} is used by "
                           + ", ".join(f"{v.kind.value} {v.name}" for v in users))
        self.state.delete_des(name)
        c = self._des_clients.pop(name, None)
        if c:
            await c.close()

    async def _rewrap(self, v: Volume, old: KeyServiceClient, new: KeyServiceClient, key_url: str,
                      *, des: str | None = None) -> None:
        dek = await keys.unwrap(old, v.envelope)
        try:
            v.envelope = await keys.wrap(new, key_url, dek)
        finally:
            keys.wipe(dek)
        if des is not None:
            v.des = des
        self.state.put_volume(v)

