"""DEK envelopes: a fresh DEK per volume, wrapped and unwrapped through the key service.

The DEK exists unwrapped only in memory (a bytearray the caller wipes, or hands to the
XtsLayer that wipes it on close). Errors of the key service are translated here, once:
unreachable -> `KeyUnavailable` (keep serving within the grace period), any refusal
(disabled, expired, deleted, permission removed) -> `AccessMissing` (revocation).
"""

from __future__ import annotations

from collections.abc import Callable

from daemonkit.wipe import wipe as wipe  # the callers' keys.wipe
from keyservice.client import KeyServiceClient, KeyServiceError, KeyServiceUnavailable, unreachable

from ..crypto import generate_dek
from ..crypto.double import join_keys
from .errors import AccessMissing, BadRequest, KeyUnavailable
from .model import PLATFORM_KEY, KeyEnvelope, KeyUrl, Volume

DEK_BYTES = 64  # AES-256-XTS: two AES-256 keys
WRAP_ALG = "RSA-OAEP-256"


def new_dek() -> bytearray:
    """From the engine's DRBG, which in FIPS mode is the FIPS provider's (fipsmode.py);
    never with equal halves (IEEE 1619 / FIPS 140-3 IG C.I)."""
    return generate_dek()


def translate(e: Exception, what: str) -> Exception:
    """Unreachable -> KeyUnavailable (a grace period applies); a refusal, and also this
    process being out of descriptors or memory, -> AccessMissing (fail closed: our own
    exhaustion must not pass for an outage, or a connection flood would hold off
    revocation for the whole grace period)."""
    if isinstance(e, OSError) and not isinstance(e, KeyServiceError):
        e = unreachable("the key service", e)
    if isinstance(e, KeyServiceUnavailable):
        return KeyUnavailable(f"{what}: {e.message}")  # "key service at URL unreachable: why"
    if isinstance(e, KeyServiceError):
        return AccessMissing(f"{what}: {e.message}")
    return e


async def wrap(client: KeyServiceClient, key_url: str, dek: bytearray) -> KeyEnvelope:
    try:
        kid, wrapped = await client.wrap_key(key_url, dek, alg=WRAP_ALG)
    except (KeyServiceError, OSError) as e:
        raise translate(e, f"wrapKey with {key_url}") from None
    return KeyEnvelope(kid, WRAP_ALG, wrapped)


async def unwrap_raw(client: KeyServiceClient, envelope: KeyEnvelope) -> bytearray:
    try:
        return await client.unwrap_key(envelope.kid, envelope.wrapped, alg=envelope.alg)
    except (KeyServiceError, OSError) as e:
        raise translate(e, f"unwrapKey with {envelope.kid}") from None


async def unwrap(client: KeyServiceClient, envelope: KeyEnvelope) -> bytearray:
    dek = await unwrap_raw(client, envelope)
    if len(dek) != DEK_BYTES:
        wipe(dek)
        raise AccessMissing(f"unwrapKey with {envelope.kid} returned {len(dek)} bytes, not a DEK")
    return dek


async def unwrap_volume(client_for: Callable[[str], KeyServiceClient], v: Volume) -> bytearray:
    """The key a volume's data is opened with: its DEK, or for a double-encrypted volume
    its two DEKs as one buffer (platform's, then customer's: crypto/double.py).

    The customer's envelope first: its refusal is the revocation, reported as for a CMK
    disk. The platform key refusing is not the customer's doing and must not look like
    it (a lock and a recheck of the customer's set, which answers, and reopens, and
    fails again): the volume is unavailable, KeyUnavailable."""
    dek = await unwrap(client_for(v.des), v.envelope)
    if v.platform_envelope is None:
        return dek
    try:
        platform_dek = await unwrap(client_for(PLATFORM_KEY), v.platform_envelope)
    except AccessMissing as e:
        wipe(dek)
        raise KeyUnavailable(f"the platform key refused this volume's platform DEK: {e.message}") from None
    except BaseException:
        wipe(dek)
        raise
    return join_keys(platform_dek, dek)


async def key_attributes(client: KeyServiceClient, kid: str) -> dict:
    """The key's attributes (needs the `get` permission)."""
    try:
        bundle = await client.get_key(kid)
    except (KeyServiceError, OSError) as e:
        raise translate(e, f"get {kid}") from None
    return bundle.get("attributes", {})


async def latest_version(client: KeyServiceClient, key_url: str) -> str:
    """The kid, with version, of the key's current version (needs `get`): what a wrap
    with the versionless URL would use."""
    try:
        bundle = await client.get_key(key_url)
    except (KeyServiceError, OSError) as e:
        raise translate(e, f"get {key_url}") from None
    kid = (bundle.get("key") or {}).get("kid") if isinstance(bundle, dict) else None
    if not isinstance(kid, str) or not kid:
        raise KeyUnavailable(f"get {key_url}: the key service answered without a kid")
    # What is re-wrapped under comes from this answer: it must name a version of the very
    # key asked for, not any key the answer names.
    try:
        same = KeyUrl.parse(kid).versionless == KeyUrl.parse(key_url).versionless
    except BadRequest:
        same = False
    if not same or KeyUrl.parse(kid).version is None:
        raise KeyUnavailable(f"get {key_url}: the key service answered with another key ({kid!r})")
    return kid
