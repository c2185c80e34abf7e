"""Async client for the key service (the disk platform and the CLI use it).

Errors: `KeyServiceError` carries the service's status, code and message.
`KeyServiceUnavailable` means the service could not be reached or failed
(connection refused, timeout, 5xx): the caller must not read it as a
revocation. A `kid` may be a full key URL (with or without a version), or
"vault/name[/version]"; only its path is used, the request goes to base_url.
"""
import asyncio
import base64
import errno
import json
import os
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

import aiohttp

from daemonkit.httperrors import describe, error_of
from daemonkit.latency import Latency
from daemonkit.tls import TlsConfigError, is_loopback

from . import secret_http

RENEW_BEFORE = 300  # seconds: renew a token this long before it expires


class KeyServiceError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class KeyServiceUnavailable(KeyServiceError):
    pass


class LocalResourceError(KeyServiceError):
    """This process could not even try to reach the key service: it is out of file
    descriptors or memory. That says nothing about the key service, so a caller must not
    treat it as the service being unreachable (which a grace period tolerates): an attacker
    who exhausts our descriptors would otherwise hold revocation off."""


# errno values that mean "this host/process is out of a resource", not "the peer is away"
_LOCAL_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def unreachable(base_url: str, e: BaseException) -> KeyServiceError:
    """The error for a call that failed before an answer: local exhaustion or unreachable."""
    cause: BaseException | None = e
    while cause is not None:
        if getattr(cause, "errno", None) in _LOCAL_ERRNOS or isinstance(cause, MemoryError):
            return LocalResourceError(0, "LocalResourceExhausted",
                                      f"cannot call the key service at {base_url}: this process "
                                      f"is out of a local resource: {describe(cause)}")
        cause = getattr(cause, "os_error", None) or cause.__cause__
    return KeyServiceUnavailable(0, "ServiceUnavailable",
                                 f"key service at {base_url} unreachable: {describe(e)}")


class CallTally:
    """The platform's calls to the key service, by operation and outcome, and how long
    they took: plain ints and histograms that nbdserver/metrics.py exports at scrape
    time. One per process, hung on KeyServiceClient by the daemon (`tally`)."""

    def __init__(self) -> None:
        self.calls: dict[tuple[str, str], int] = {}  # (operation, outcome) -> count
        self.latency: dict[str, Latency] = {}

    def record(self, operation: str, outcome: str, started: float) -> None:
        key = (operation, outcome)
        self.calls[key] = self.calls.get(key, 0) + 1
        h = self.latency.get(operation)
        if h is None:
            h = self.latency[operation] = Latency()
        h.observe(time.monotonic() - started)


def _operation(method: str, path: str) -> str:
    """A bounded label for a call (never a vault or key name: those are the tenants')."""
    if path == "/oauth2/token":
        return "token"
    if path.endswith("/wrapkey"):
        return "wrapKey"
    if path.endswith("/unwrapkey"):
        return "unwrapKey"
    if method == "GET" and "/keys/" in path:
        return "getKey"
    return "other"


def _outcome(status: int) -> str:
    return "ok" if status < 400 else "refused" if status < 500 else "failed"


@dataclass
class Credential:
    client_id: str
    client_secret: str
    tenant_id: str
    object_id: str

    @classmethod
    def load(cls, path) -> "Credential":
        with open(path) as f:
            data = json.load(f)
        return cls(**{k: data[k] for k in ("client_id", "client_secret", "tenant_id", "object_id")})

    def dump(self, path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f, indent=2)
            f.write("\n")


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64u(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def parse_kid(kid: str) -> tuple[str, str, str | None]:
    """A kid URL or "vault/name[/version]" -> (vault, name, version). URLs in path form
    (`{base}/vaults/{vault}/keys/...`) and in Key Vault's host form
    (`https://{vault}.{domain}/keys/...`, what the Azure SDKs hold) both name a key."""
    path = urlsplit(kid).path if "://" in kid else kid
    parts = [p for p in path.split("/") if p]
    if "://" in kid and parts[:1] == ["keys"]:
        label, dot, _ = (urlsplit(kid).hostname or "").partition(".")
        if not dot or len(parts) not in (2, 3):
            raise ValueError(f"not a key identifier: {kid!r}")
        parts = [label] + parts[1:]
    elif "://" in kid or parts[:1] == ["vaults"]:
        if len(parts) not in (4, 5) or parts[0] != "vaults" or parts[2] != "keys":
            raise ValueError(f"not a key identifier: {kid!r}")
        parts = [parts[1]] + parts[3:]
    if len(parts) not in (2, 3):
        raise ValueError(f"not a key identifier: {kid!r}")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def _key_path(kid: str) -> str:
    vault, name, version = parse_kid(kid)
    return f"/vaults/{vault}/keys/{name}" + (f"/{version}" if version else "")


# The TLS of a connection to the service: verify its certificate, plain HTTP only to loopback.
def client_context(cafile=None) -> ssl.SSLContext:
    """Verify the key service's certificate: against `cafile`, else the system's CAs."""
    try:
        ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    except (OSError, ssl.SSLError) as e:
        raise TlsConfigError(f"cannot load the key service CA {cafile}: {e}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def client_ssl_for(url: str, cafile=None, insecure_plain_http: bool = False):
    """The `ssl=` a KeyServiceClient for `url` needs; refuses http:// to another host.

    https:// gets a verifying context (hostname checked, default CAs or `cafile`);
    http:// is fine to a loopback service, elsewhere only with `insecure_plain_http`.
    """
    parts = urlsplit(url)
    if parts.scheme == "https":
        return client_context(cafile)
    if parts.scheme != "http":
        raise TlsConfigError(f"key service URL must be https:// (or http:// on loopback): {url}")
    if cafile:
        raise TlsConfigError(f"a CA file was given but the key service URL is plain http: {url}")
    if not insecure_plain_http and not is_loopback(parts.hostname or ""):
        raise TlsConfigError(
            f"refusing plain HTTP to the key service at {url}: unwrapped keys would cross the "
            "network. Use https:// (and a CA file), or allow it explicitly "
            "(nbdserver serve --insecure-keyservice-http)")
    return None


class KeyServiceClient:
    # Where calls are counted, if anywhere: the platform daemon sets one for the process.
    tally: CallTally | None = None

    def __init__(self, base_url: str, credential: Credential, *, ssl=None, timeout: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.credential = credential
        self._ssl = ssl
        # `total` alone is not enough: aiohttp can miss it and wait for an answer forever
        # (aio-libs/aiohttp#11740; CI saw a CLI call hang 120 s). The socket-level
        # timeouts are armed on the connection itself, so every phase is bounded.
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=timeout,
                                              sock_read=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self._token_renew = 0.0
        self._token_lock = asyncio.Lock()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def _bearer(self) -> str:
        async with self._token_lock:
            if self._token is None or time.time() > self._token_renew:
                body = await self._send("POST", "/oauth2/token", json_body={
                    "grant_type": "client_credentials", "client_id": self.credential.client_id,
                    "client_secret": self.credential.client_secret}, auth=False)
                self._token = body["access_token"]
                # Trust our own clock for renewal: expires_in, not the server's expires_on.
                # Renew early, but never sooner than halfway through a short lifetime.
                lifetime = body["expires_in"]
                self._token_renew = time.time() + lifetime - min(RENEW_BEFORE, lifetime / 2)
            return self._token

    async def _send(self, method: str, path: str, *, json_body=None, params=None, auth=True):
        headers = {"Authorization": f"Bearer {await self._bearer()}"} if auth else {}
        started = time.monotonic()
        try:
            async with self._http().request(method, self.base_url + path, json=json_body,
                                            params=params, headers=headers, ssl=self._ssl) as resp:
                data = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            if self.tally is not None:
                self.tally.record(_operation(method, path), "unreachable", started)
            raise unreachable(self.base_url, e) from e
        if self.tally is not None:
            self.tally.record(_operation(method, path), _outcome(status), started)
        if status == 401 and auth:
            self._token = None  # e.g. the service's master key changed: re-authenticate next time
        return _decode(status, data)

    async def request(self, method: str, path: str, json_body=None, params=None):
        """Any API call; returns the decoded JSON body (None for 204). A 401 on a
        cached token (e.g. clocks disagree on its expiry) is retried once with a new one."""
        try:
            return await self._send(method, path, json_body=json_body, params=params)
        except KeyServiceError as e:
            if e.status != 401:
                raise
        return await self._send(method, path, json_body=json_body, params=params)

    # -- the directory --
    async def create_identity(self, display_name: str, *, type: str = "managedIdentity",
                              roles=()) -> Credential:
        body = await self.request("POST", "/identities", {"displayName": display_name, "type": type,
                                                          "roles": list(roles)})
        return Credential(body["clientId"], body["clientSecret"], body["tenantId"], body["objectId"])

    # -- vaults and policies --
    async def create_vault(self, name, *, location, subscription, retention_days=90,
                           purge_protection=False) -> dict:
        return await self.request("POST", "/vaults", {
            "name": name, "location": location, "subscription": subscription,
            "softDeleteRetentionInDays": retention_days, "enablePurgeProtection": purge_protection})

    async def get_vault(self, name) -> dict:
        return await self.request("GET", f"/vaults/{name}")

    async def set_policy(self, vault, object_id, key_permissions: list[str]) -> dict:
        return await self.request("PUT", f"/vaults/{vault}/accessPolicies/{object_id}",
                                  {"permissions": {"keys": list(key_permissions)}})

    # -- keys --
    async def create_key(self, vault, name, *, size=3072) -> dict:
        return await self.request("POST", f"/vaults/{vault}/keys/{name}/create",
                                  {"kty": "RSA", "key_size": size})

    async def get_key(self, kid_or_vault_name_version: str) -> dict:
        return await self.request("GET", _key_path(kid_or_vault_name_version))

    async def wrap_key(self, kid: str, value: bytes | bytearray, *,
                       alg: str = "RSA-OAEP-256") -> tuple[str, bytes]:
        """Wrap `value` (a DEK: sent from wipeable buffers only, see `secret_http`)."""
        body, _ = await self._secret_call(_key_path(kid) + "/wrapkey", alg, value, None)
        return body["kid"], _unb64u(body["value"])

    async def unwrap_key(self, kid: str, value: bytes, *, alg: str = "RSA-OAEP-256") -> bytearray:
        """The unwrapped DEK in a bytearray the caller wipes; its encoded form only ever
        lived in buffers that are wiped before this returns."""
        _, dek = await self._secret_call(_key_path(kid) + "/unwrapkey", alg, value, "value")
        if dek is None:
            raise KeyServiceError(502, "BadResponse", "unwrapKey answered without a value")
        return dek

    async def _secret_call(self, path: str, alg: str, value, answer_field: str | None):
        """wrapKey/unwrapKey through `secret_http` (one retry on 401, like `request`)."""
        for attempt in (1, 2):
            token = await self._bearer()
            started = time.monotonic()
            try:
                status, body, secret = await secret_http.post_secret(
                    self.base_url + path, token, {"alg": alg}, "value", value,
                    answer_field=answer_field, ssl=self._ssl, timeout=self._timeout.total or 10.0)
            except (TimeoutError, OSError, ValueError) as e:
                if self.tally is not None:
                    self.tally.record(_operation("POST", path), "unreachable", started)
                raise unreachable(self.base_url, e) from e
            if self.tally is not None:
                self.tally.record(_operation("POST", path), _outcome(status), started)
            if status < 400:
                return body, secret
            if secret is not None:
                secret_http.wipe(secret)
            if status == 401:
                self._token = None
                if attempt == 1:
                    continue
            _decode(status, json.dumps(body).encode())
        raise AssertionError("unreachable")

    # -- the change stream --
    async def events(self, since: int | None = None, *, idle_timeout: float = 15.0,
                     on_open=None) -> AsyncIterator[dict]:
        """Follow the change stream. Raises KeyServiceUnavailable when the connection
        drops or nothing (not even a heartbeat) arrives for idle_timeout seconds;
        resume with since=<the last seq seen>. `on_open()` is called once the stream is
        established: from then on no change is missed."""
        params = {} if since is None else {"since": str(since)}
        headers = {"Authorization": f"Bearer {await self._bearer()}", "Accept": "text/event-stream"}
        # No total (a stream lasts), but connecting is bounded like any request: a service
        # whose accept queue is full drops the SYN, and the kernel retries for ~2 minutes.
        timeout = aiohttp.ClientTimeout(total=None, connect=self._timeout.total,
                                        sock_read=idle_timeout)
        try:
            async with self._http().get(self.base_url + "/events", params=params, headers=headers,
                                        ssl=self._ssl, timeout=timeout) as resp:
                if resp.status != 200:
                    _decode(resp.status, await resp.read())
                if on_open is not None:
                    on_open()
                data: list[str] = []
                async for raw in resp.content:
                    line = raw.decode().rstrip("\r\n")
                    if line.startswith("data:"):
                        data.append(line[5:].lstrip(" "))
                    elif line == "" and data:
                        yield json.loads("\n".join(data))
                        data = []
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise KeyServiceUnavailable(0, "ServiceUnavailable",
                                        f"change stream lost: {describe(e)}") from e
        raise KeyServiceUnavailable(0, "ServiceUnavailable", "change stream ended")


def _decode(status: int, data: bytes):
    if status >= 400:
        code, message = error_of(status, data)
        raise (KeyServiceUnavailable if status >= 500 else KeyServiceError)(status, code, message)
    try:
        return json.loads(data) if data else None
    except ValueError:
        return None
