"""Master keys: the keyring a sealer works with, where it is kept, and when one may be made.

A keyring is the current master key (the one new blobs are sealed under) followed by the
older ones, kept so that what was sealed before a rotation still opens. Each key is known
by its id: four bytes derived from the key (HKDF-SHA256), so the id says which key sealed
a blob without naming the key, and a keyring needs no counter kept anywhere else.

The file holds the keys alone. Two forms are read: one key as 32 raw bytes (what both
daemons wrote before rotation existed; the key service also took 64 hex digits), and the
keyring form, one key of 64 hex digits per line, the current one first, `#` lines
ignored. Writes are the keyring form, 0600 from the first byte, replaced atomically
(temporary file, fsync, rename, fsync of the directory), so a crash leaves the old
keyring or the new one, never half of either.

The one rule of both daemons (`open_keyring`): a master key is made only for a data
directory that holds no sealed state yet. A state whose key went missing is refused,
never silently re-keyed: everything sealed in it would no longer open.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .fips import random_bytes

KEY_BYTES = 32  # AES-256
KEY_ID_BYTES = 4  # ids of keys of one keyring; a new key whose id collides is drawn again


class MasterKeyError(Exception):
    """The master key cannot be used as configured: the message says why and what to do."""


def key_id(key: bytes) -> bytes:
    """A one-way function of the key: it can be stored next to ciphertext."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_ID_BYTES, salt=None,
                info=b"daemonkit/master-key-id").derive(key)


@dataclass(frozen=True)
class Keyring:
    keys: tuple[bytes, ...]  # current first

    def __post_init__(self) -> None:
        if not self.keys:
            raise MasterKeyError("a keyring holds at least one master key")
        for k in self.keys:
            if len(k) != KEY_BYTES:
                raise MasterKeyError(f"a master key is {KEY_BYTES} bytes, found {len(k)}")
        if len({key_id(k) for k in self.keys}) != len(self.keys):
            raise MasterKeyError("a keyring holds each master key once")

    @property
    def current(self) -> bytes:
        return self.keys[0]

    @property
    def current_id(self) -> bytes:
        return key_id(self.keys[0])

    def ids(self) -> list[bytes]:
        return [key_id(k) for k in self.keys]

    def get(self, kid: bytes) -> bytes | None:
        for k in self.keys:
            if key_id(k) == kid:
                return k
        return None

    def rotated(self) -> Keyring:
        """A new random key as current, every key so far kept after it."""
        while True:
            new = random_bytes(KEY_BYTES)
            if key_id(new) not in self.ids():
                return Keyring((new, *self.keys))

    def retired(self, keep: Iterable[bytes]) -> Keyring:
        """The current key and the older ones whose id is in `keep`."""
        wanted = set(keep)
        return Keyring((self.current, *(k for k in self.keys[1:] if key_id(k) in wanted)))


def parse_keyring(raw: bytes, where: str) -> Keyring:
    if len(raw) == KEY_BYTES:
        return Keyring((raw,))
    try:
        lines = [ln.strip() for ln in raw.decode("ascii").splitlines()]
        keys = tuple(bytes.fromhex(ln) for ln in lines if ln and not ln.startswith("#"))
    except (UnicodeDecodeError, ValueError):
        keys = ()
    if not keys or any(len(k) != KEY_BYTES for k in keys):
        raise MasterKeyError(f"master key {where} must be {KEY_BYTES} raw bytes, or keys of "
                             f"{2 * KEY_BYTES} hex digits one per line (the current one first)")
    return Keyring(keys)


def read_keyring(path: Path) -> Keyring:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise MasterKeyError(f"cannot read the master key {path}: {e.strerror}") from None
    return parse_keyring(raw, str(path))


def keyring_text(keyring: Keyring) -> bytes:
    lines = ["# master keys, the current one first (daemonkit/keyring.py); secret"]
    lines += [k.hex() for k in keyring.keys]
    return ("\n".join(lines) + "\n").encode()


def write_private_atomically(path: Path, data: bytes) -> None:
    """`data` at `path`, 0600 from its first byte, all or nothing across a crash."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_keyring(path: Path, keyring: Keyring) -> None:
    write_private_atomically(path, keyring_text(keyring))


@dataclass(frozen=True)
class KeySource:
    """Where a daemon's keyring lives; `writable` is False for systemd's credentials
    (a read-only directory that systemd fills at each start)."""
    path: Path
    writable: bool
    how_to_supply: str  # the options that name it, for messages


def key_source(data_dir, option: str | None, *, credential: str, default_name: str,
               option_name: str = "--master-key-file") -> KeySource:
    """`option`, else `$CREDENTIALS_DIRECTORY/<credential>` when that exists, else
    DATA_DIR/<default_name>: the order both daemons have always used."""
    how = f"{option_name}, the systemd credential {credential}, or DATA_DIR/{default_name}"
    if option:
        return KeySource(Path(option), True, how)
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and os.path.exists(os.path.join(creds, credential)):
        return KeySource(Path(creds) / credential, False, how)
    return KeySource(Path(data_dir) / default_name, True, how)


def open_keyring(source: KeySource, *, holds_sealed_state: bool, state: str) -> Keyring:
    """The keyring at `source`. A missing one is made (one new key, 0600) only when the
    data directory holds no sealed state yet (`holds_sealed_state` False): for a state
    sealed under a key that went missing, a new key would make it unreadable."""
    if source.path.exists():
        return read_keyring(source.path)
    if holds_sealed_state:
        raise MasterKeyError(
            f"master key not found at {source.path}: it is missing, and {state} is sealed "
            f"under it: supply the original ({source.how_to_supply}; docs/operations.md, "
            "\"Backup and restore\"); a new key is made only for a new data directory")
    if not source.writable:
        raise MasterKeyError(f"master key not found at {source.path} (a systemd credential "
                             "is read-only: create it, docs/operations.md)")
    keyring = Keyring((random_bytes(KEY_BYTES),))
    fd = os.open(source.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(keyring.current)  # the one-key form: an older release reads it too
        f.flush()
        os.fsync(f.fileno())
    return keyring
