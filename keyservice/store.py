"""SQLite persistence for the domain model (WAL mode, synchronous=FULL: a change
is durable when its transaction commits, and every change commits before the
reply). Private keys go in and out only through the seal (`sealing.py`).

One connection, used by one worker thread (see `api/app.py`): transactions are
serialised, which is what the domain's read-check-write rules need.
"""
import json
import os
import sqlite3
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

from .domain import audit, rsakeys
from .domain.events import Event
from .domain.identities import Identity
from .domain.keys import Key, KeyVersion
from .domain.vaults import Vault
from .sealing import MasterKeyError, Seal, SealError, derive, load_master_key, master_key_path

DB_NAME = "keyservice.db"
KEY_CACHE = 256  # loaded private keys kept in memory (a 4096-bit key object is a few KiB)
_CHECK = b"keyservice master key check v1"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS identities (
  object_id TEXT PRIMARY KEY, client_id TEXT UNIQUE NOT NULL, tenant_id TEXT NOT NULL,
  display_name TEXT NOT NULL, type TEXT NOT NULL, roles TEXT NOT NULL,
  secret_hash BLOB NOT NULL, created REAL NOT NULL,
  disabled INTEGER NOT NULL DEFAULT 0, generation INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS vaults (
  name TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, subscription TEXT NOT NULL,
  location TEXT NOT NULL, retention_days INTEGER NOT NULL, purge_protection INTEGER NOT NULL,
  owner TEXT NOT NULL, created REAL NOT NULL, deleted_at REAL, scheduled_purge REAL,
  id TEXT, audit_chain TEXT);
CREATE TABLE IF NOT EXISTS policies (
  vault TEXT NOT NULL, object_id TEXT NOT NULL, permissions TEXT NOT NULL,
  PRIMARY KEY (vault, object_id));
CREATE TABLE IF NOT EXISTS keys (
  vault TEXT NOT NULL, name TEXT NOT NULL, created REAL NOT NULL,
  deleted_at REAL, scheduled_purge REAL, PRIMARY KEY (vault, name));
CREATE TABLE IF NOT EXISTS key_versions (
  vault TEXT NOT NULL, name TEXT NOT NULL, version TEXT NOT NULL, ord INTEGER NOT NULL,
  size INTEGER NOT NULL, public_der BLOB NOT NULL, sealed_private BLOB NOT NULL,
  enabled INTEGER NOT NULL, nbf REAL, exp REAL, key_ops TEXT NOT NULL,
  created REAL NOT NULL, updated REAL NOT NULL, expiry_announced REAL,
  PRIMARY KEY (vault, name, version));
CREATE TABLE IF NOT EXISTS audit (
  chain TEXT NOT NULL, seq INTEGER NOT NULL, entry TEXT NOT NULL, prev BLOB NOT NULL,
  mac BLOB NOT NULL, PRIMARY KEY (chain, seq));
CREATE TABLE IF NOT EXISTS audit_heads (
  chain TEXT PRIMARY KEY, seq INTEGER NOT NULL, last BLOB NOT NULL, mac BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS closed_chains (
  vault_id TEXT PRIMARY KEY, chain TEXT NOT NULL, name TEXT NOT NULL, tenant_id TEXT NOT NULL,
  closed REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT NOT NULL, vault TEXT NOT NULL,
  key TEXT, version TEXT, kid TEXT, object_id TEXT, time REAL NOT NULL, tenant_id TEXT);
"""

# Columns added after the first release: a database made by an older version gets them
# at open (ALTER TABLE ... ADD COLUMN; the defaults are what an old row meant).
ADDED_COLUMNS = {
    "identities": (("disabled", "INTEGER NOT NULL DEFAULT 0"),
                   ("generation", "INTEGER NOT NULL DEFAULT 0")),
    "vaults": (("id", "TEXT"), ("audit_chain", "TEXT")),
    "events": (("tenant_id", "TEXT"),),
    # RSA-HSM versions (domain/hsm_keys.py): sealed_private holds the token reference.
    "key_versions": (("kty", "TEXT NOT NULL DEFAULT 'RSA'"),),
}
_VAULT_COLUMNS = ("name, tenant_id, subscription, location, retention_days, purge_protection, owner, "
                  "created, deleted_at, scheduled_purge, id, audit_chain")
_IDENTITY_COLUMNS = ("object_id, client_id, tenant_id, display_name, type, roles, secret_hash, "
                     "created, disabled, generation")


# The schema's version, in SQLite's PRAGMA user_version. 0: the releases before it was
# kept (brought up to date by ADDED_COLUMNS and `_migrate`'s steps, which are idempotent).
SCHEMA_VERSION = 1


class StoreRefused(MasterKeyError):
    """The data directory cannot be used as it is (a missing database, a newer release's
    schema): the message says why and what to do. A MasterKeyError, so every caller that
    reports why the service cannot start reports this too."""


def _aad(vault: str, name: str, version: str) -> str:
    return f"key-version:{vault}/{name}/{version}"


class Store:
    def __init__(self, data_dir: Path, master_key_file: str | None = None,
                 master_key: bytes | None = None):
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        db_path = data_dir / DB_NAME
        fresh = not db_path.exists()
        if fresh and (data_dir / "admin.credential").exists():
            # The admin credential is written after the database: this directory had one.
            # Starting empty would forget every vault and key and issue a new admin.
            raise StoreRefused(
                f"{db_path} is missing but {data_dir} held a key service (admin.credential is "
                "there): restore the database from a backup (docs/operations.md), or remove "
                "admin.credential to start a new, empty key service")
        if master_key is None:
            path, may_create = master_key_path(data_dir, master_key_file)
            master = load_master_key(path, may_create, fresh)
        else:  # unsealed by the HSM (keyservice/hsm_seal.py)
            master = master_key
        self._seal = Seal(master)
        self.token_key = derive(master, "tokens/v1")
        self._audit_key = derive(master, "audit/v1")
        # Key backups (domain/backup_ops.py) leave the service: their own key, so a
        # backup blob and a sealed row can never be taken for each other.
        self.backup_seal = Seal(derive(master, "backup/v1"))
        self._keys: OrderedDict = OrderedDict()
        self.path = db_path
        if fresh:
            # Created 0600 before SQLite opens it (SQLite gives -wal and -shm the same
            # mode), so the database is never readable by others, not even empty.
            os.close(os.open(db_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self._db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise StoreRefused(
                f"{db_path} has schema version {version}, written by a newer release; this "
                f"one knows up to {SCHEMA_VERSION}. Run the newer release, or restore the "
                "backup taken before the upgrade (docs/operations.md)")
        self._db.executescript(SCHEMA)
        self._migrate()
        self._check_master_key()

    def schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self) -> None:
        with self.transaction():
            for table, columns in ADDED_COLUMNS.items():
                have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
                for name, decl in columns:
                    if name not in have:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
            # Events from before tenants: their vault's tenant where the vault still exists;
            # the others (purged vaults) stay NULL and reach no subscriber.
            self._db.execute("UPDATE events SET tenant_id = (SELECT tenant_id FROM vaults "
                             "WHERE vaults.name = events.vault) WHERE tenant_id IS NULL")
            self._db.execute("CREATE INDEX IF NOT EXISTS events_by_tenant ON events (tenant_id, seq)")
            # Vaults from before ids: an id now, and the chain they already had (their name).
            for (name,) in self._db.execute("SELECT name FROM vaults WHERE id IS NULL").fetchall():
                self._db.execute("UPDATE vaults SET id=?, audit_chain=? WHERE name=?",
                                 (str(uuid.uuid4()), name, name))
            # Version 1 is every database these steps brought up to date; later versions
            # add their steps after them. PRAGMA takes no parameters: our own int.
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _check_master_key(self) -> None:
        row = self._db.execute("SELECT v FROM meta WHERE k='master_check'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('master_check', ?)",
                             (self._seal.seal(_CHECK, "meta:master_check"),))
            return
        try:
            self._seal.open(row[0], "meta:master_check")
        except SealError:
            raise MasterKeyError("the master key does not match this database "
                                 "(wrong --master-key-file or credential)") from None

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self):
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- meta --
    def meta(self, k: str) -> str | None:
        row = self._db.execute("SELECT v FROM meta WHERE k=?", (k,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, k: str, v: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, v))

    # -- identities --
    def add_identity(self, i: Identity) -> None:
        self.put_identity(i, new=True)

    def put_identity(self, i: Identity, new: bool = False) -> None:
        verb = "INSERT" if new else "INSERT OR REPLACE"
        self._db.execute(f"{verb} INTO identities ({_IDENTITY_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                         (i.object_id, i.client_id, i.tenant_id, i.display_name, i.type,
                          json.dumps(list(i.roles)), i.secret_hash, i.created, int(i.disabled),
                          i.generation))

    def identity_by_client_id(self, client_id: str) -> Identity | None:
        return self._identity_where("client_id=?", client_id)

    def identity(self, object_id: str) -> Identity | None:
        return self._identity_where("object_id=?", object_id)

    def _identity_where(self, cond: str, value: str) -> Identity | None:
        row = self._db.execute(f"SELECT {_IDENTITY_COLUMNS} FROM identities WHERE {cond}",
                               (value,)).fetchone()
        return None if row is None else _identity(row)

    def identities(self, tenant_id: str) -> list[Identity]:
        return [_identity(r) for r in self._db.execute(
            f"SELECT {_IDENTITY_COLUMNS} FROM identities WHERE tenant_id=? ORDER BY created, object_id",
            (tenant_id,))]

    def delete_identity(self, object_id: str) -> None:
        self._db.execute("DELETE FROM identities WHERE object_id=?", (object_id,))

    def tenant_exists(self, tenant_id: str) -> bool:
        """A tenant exists while it has an identity or a vault (vaults outlive identities)."""
        return self._db.execute("SELECT EXISTS (SELECT 1 FROM identities WHERE tenant_id=?) OR "
                                "EXISTS (SELECT 1 FROM vaults WHERE tenant_id=?)",
                                (tenant_id, tenant_id)).fetchone()[0] == 1

    def policies_of(self, object_id: str) -> list[str]:
        """The vaults where `object_id` has an access policy."""
        return [r[0] for r in self._db.execute(
            "SELECT vault FROM policies WHERE object_id=? ORDER BY vault", (object_id,))]

    # -- vaults --
    def vault(self, name: str) -> Vault | None:
        row = self._db.execute(f"SELECT {_VAULT_COLUMNS} FROM vaults WHERE name=?", (name,)).fetchone()
        return None if row is None else _vault(row)

    def vaults(self) -> list[Vault]:
        return [_vault(r) for r in self._db.execute(f"SELECT {_VAULT_COLUMNS} FROM vaults ORDER BY name")]

    def put_vault(self, v: Vault) -> None:
        self._db.execute(f"INSERT OR REPLACE INTO vaults ({_VAULT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                         (v.name, v.tenant_id, v.subscription, v.location, v.retention_days,
                          int(v.purge_protection), v.owner, v.created, v.deleted_at,
                          v.scheduled_purge, v.id, v.audit_chain or v.id))

    def purge_vault(self, name: str) -> None:
        self._forget_keys(name)
        for table in ("key_versions", "keys", "policies"):
            self._db.execute(f"DELETE FROM {table} WHERE vault=?", (name,))
        self._db.execute("DELETE FROM vaults WHERE name=?", (name,))

    # -- policies --
    def policies(self, vault: str) -> dict[str, tuple[str, ...]]:
        rows = self._db.execute("SELECT object_id, permissions FROM policies WHERE vault=? "
                                "ORDER BY object_id", (vault,))
        return {oid: tuple(json.loads(p)) for oid, p in rows}

    def set_policy(self, vault: str, object_id: str, permissions) -> None:
        self._db.execute("INSERT OR REPLACE INTO policies VALUES (?,?,?)",
                         (vault, object_id, json.dumps(list(permissions))))

    def delete_policy(self, vault: str, object_id: str) -> bool:
        cur = self._db.execute("DELETE FROM policies WHERE vault=? AND object_id=?", (vault, object_id))
        return cur.rowcount > 0

    # -- keys --
    def key(self, vault: str, name: str) -> Key | None:
        row = self._db.execute("SELECT created, deleted_at, scheduled_purge FROM keys "
                               "WHERE vault=? AND name=?", (vault, name)).fetchone()
        if row is None:
            return None
        versions = [KeyVersion(r[0], r[1], bytes(r[2]), bool(r[3]), r[4], r[5], tuple(json.loads(r[6])),
                               r[7], r[8], r[9])
                    for r in self._db.execute(
                        "SELECT version, size, public_der, enabled, nbf, exp, key_ops, created, updated, "
                        "kty FROM key_versions WHERE vault=? AND name=? ORDER BY ord", (vault, name))]
        return Key(vault, name, row[0], versions, row[1], row[2])

    def key_names(self, vault: str, deleted: bool) -> list[str]:
        cond = "IS NOT NULL" if deleted else "IS NULL"
        return [r[0] for r in self._db.execute(
            f"SELECT name FROM keys WHERE vault=? AND deleted_at {cond} ORDER BY name", (vault,))]

    def put_key(self, k: Key) -> None:
        self._db.execute("INSERT OR REPLACE INTO keys VALUES (?,?,?,?,?)",
                         (k.vault, k.name, k.created, k.deleted_at, k.scheduled_purge))

    def add_version(self, k: Key, v: KeyVersion, private_der: bytes) -> None:
        sealed = self._seal.seal(private_der, _aad(k.vault, k.name, v.version))
        self._db.execute("INSERT INTO key_versions (vault, name, version, ord, size, public_der, "
                         "sealed_private, enabled, nbf, exp, key_ops, created, updated, kty) "
                         "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                         (k.vault, k.name, v.version, len(k.versions), v.size, v.public_der, sealed,
                          int(v.enabled), v.nbf, v.exp, json.dumps(list(v.key_ops)), v.created,
                          v.updated, v.kty))

    def put_version_attributes(self, k: Key, v: KeyVersion) -> None:
        self._db.execute("UPDATE key_versions SET enabled=?, nbf=?, exp=?, key_ops=?, updated=? "
                         "WHERE vault=? AND name=? AND version=?",
                         (int(v.enabled), v.nbf, v.exp, json.dumps(list(v.key_ops)), v.updated,
                          k.vault, k.name, v.version))

    def private_der(self, vault: str, name: str, version: str) -> bytes:
        row = self._db.execute("SELECT sealed_private FROM key_versions WHERE vault=? AND name=? "
                               "AND version=?", (vault, name, version)).fetchone()
        return self._seal.open(row[0], _aad(vault, name, version))

    def private_key(self, vault: str, name: str, version: str):
        """The loaded private key, from a small cache: a version's key never changes,
        and unsealing and parsing it costs more than the RSA operation itself."""
        ident = (vault, name, version)
        key = self._keys.get(ident)
        if key is None:
            key = rsakeys.load_private_der(self.private_der(vault, name, version))
            self._keys[ident] = key
            if len(self._keys) > KEY_CACHE:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(ident)
        return key

    def _forget_keys(self, vault: str, name: str | None = None) -> None:
        for ident in [i for i in self._keys if i[0] == vault and name in (None, i[1])]:
            del self._keys[ident]

    def purge_key(self, vault: str, name: str) -> None:
        self._forget_keys(vault, name)
        self._db.execute("DELETE FROM key_versions WHERE vault=? AND name=?", (vault, name))
        self._db.execute("DELETE FROM keys WHERE vault=? AND name=?", (vault, name))

    def expired_deletions(self, now: float) -> tuple[list[str], list[tuple[str, str]]]:
        vaults = [r[0] for r in self._db.execute(
            "SELECT name FROM vaults WHERE scheduled_purge IS NOT NULL AND scheduled_purge <= ?", (now,))]
        keys = [(r[0], r[1]) for r in self._db.execute(
            "SELECT vault, name FROM keys WHERE scheduled_purge IS NOT NULL AND scheduled_purge <= ?",
            (now,))]
        return vaults, keys

    def due_expiries(self, now: float) -> list[tuple[str, str, str, float]]:
        """Versions of live keys whose `exp` has passed and not yet been announced."""
        return self._db.execute(
            "SELECT kv.vault, kv.name, kv.version, kv.exp FROM key_versions kv "
            "JOIN keys k ON k.vault = kv.vault AND k.name = kv.name "
            "JOIN vaults v ON v.name = kv.vault "
            "WHERE kv.exp IS NOT NULL AND kv.exp <= ? AND k.deleted_at IS NULL "
            "AND v.deleted_at IS NULL AND (kv.expiry_announced IS NULL OR kv.expiry_announced != kv.exp)",
            (now,)).fetchall()

    def mark_expiry_announced(self, vault: str, name: str, version: str, exp: float) -> None:
        self._db.execute("UPDATE key_versions SET expiry_announced=? WHERE vault=? AND name=? AND version=?",
                         (exp, vault, name, version))

    # -- events --
    def add_event(self, e: Event) -> int:
        cur = self._db.execute("INSERT INTO events (type, vault, key, version, kid, object_id, time, "
                               "tenant_id) VALUES (?,?,?,?,?,?,?,?)",
                               (e.type, e.vault, e.key, e.version, e.kid, e.objectId, e.time, e.tenantId))
        assert cur.lastrowid is not None  # an INSERT into a rowid table
        return cur.lastrowid

    def events_after(self, seq: int, limit: int, tenant_id: str) -> list[Event]:
        return [Event(type=r[1], vault=r[2], key=r[3], version=r[4], kid=r[5], objectId=r[6],
                      time=r[7], seq=r[0], tenantId=r[8])
                for r in self._db.execute("SELECT seq, type, vault, key, version, kid, object_id, time, "
                                          "tenant_id FROM events WHERE tenant_id=? AND seq > ? "
                                          "ORDER BY seq LIMIT ?", (tenant_id, seq, limit))]

    def last_event_seq(self) -> int:
        return self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]

    # -- audit --
    def audit_totals(self) -> tuple[int, int]:
        """(chains, entries over all chains): what the metrics report, no name in it."""
        chains, entries = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(seq), 0) FROM audit_heads").fetchone()
        return int(chains), int(entries)

    def append_audit(self, chain: str, entry: dict) -> None:
        with self.transaction():
            self._append_audit(chain, entry)

    def append_audit_many(self, items: list[tuple[str, dict]]) -> None:
        """(chain, entry) pairs appended in order in one transaction: one commit, one
        fsync for all (group commit, api/audit_writer.py); all of them or none."""
        with self.transaction():
            for chain, entry in items:
                self._append_audit(chain, entry)

    def close_audit_chain(self, v: Vault, entry: dict) -> None:
        """Inside the purge's transaction: the last entry, and the chain kept by vault id."""
        self._append_audit(v.audit_chain, entry)
        self._db.execute("INSERT OR REPLACE INTO closed_chains VALUES (?,?,?,?,?)",
                         (v.id, v.audit_chain, v.name, v.tenant_id, entry["time"]))

    def audit_chain_of(self, vault_id: str) -> str | None:
        """The chain of a live or purged vault, by the vault's id."""
        row = self._db.execute("SELECT audit_chain FROM vaults WHERE id=? UNION ALL "
                               "SELECT chain FROM closed_chains WHERE vault_id=?",
                               (vault_id, vault_id)).fetchone()
        return None if row is None else row[0]

    def _append_audit(self, chain: str, entry: dict) -> None:
        head = self._db.execute("SELECT seq, last FROM audit_heads WHERE chain=?", (chain,)).fetchone()
        seq, prev = (1, audit.GENESIS) if head is None else (head[0] + 1, bytes(head[1]))
        mac = audit.entry_mac(self._audit_key, chain, seq, prev, entry)
        self._db.execute("INSERT INTO audit VALUES (?,?,?,?,?)",
                         (chain, seq, audit.canonical(entry).decode(), prev, mac))
        self._db.execute("INSERT OR REPLACE INTO audit_heads VALUES (?,?,?,?)",
                         (chain, seq, mac, audit.head_mac(self._audit_key, chain, seq, mac)))

    def audit_entries(self, chain: str, limit: int, after: int = 0, *, newest: bool = False,
                      since: float | None = None) -> list[dict]:
        """Up to `limit` entries after seq `after` (and at or after time `since`), oldest
        first; `newest`: the last `limit` of them (`audit show --tail`), still oldest first."""
        query = "SELECT seq, entry FROM audit WHERE chain=? AND seq > ?"
        args: list = [chain, after]
        if since is not None:
            query += " AND json_extract(entry, '$.time') >= ?"
            args.append(since)
        query += f" ORDER BY seq {'DESC' if newest else 'ASC'} LIMIT ?"
        rows = self._db.execute(query, (*args, limit)).fetchall()
        return [dict(json.loads(e), seq=s) for s, e in (reversed(rows) if newest else rows)]

    def verify_audit(self, chain: str) -> audit.Verification:
        rows = self._db.execute("SELECT seq, entry, prev, mac FROM audit WHERE chain=? ORDER BY seq",
                                (chain,))
        head = self._db.execute("SELECT seq, last, mac FROM audit_heads WHERE chain=?", (chain,)).fetchone()
        return audit.verify(self._audit_key, chain, rows, head)


def _identity(r) -> Identity:
    return Identity(r[0], r[1], r[2], r[3], r[4], tuple(json.loads(r[5])), bytes(r[6]), r[7],
                    bool(r[8]), r[9])


def _vault(r) -> Vault:
    return Vault(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], r[7], r[8], r[9], r[10], r[11])
