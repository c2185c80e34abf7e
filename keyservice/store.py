"""Persistence for the domain model, in SQLite (the default) or PostgreSQL
(`daemonkit.statedb`: one interface, the engines' differences). Every change commits before
the reply, and is durable when it commits. Private keys go in and out only through the
seal (`sealing.py`).

One connection, used by one worker thread (see `api/app.py`); write transactions are
serialised (on PostgreSQL across every instance too), which is what the domain's
read-check-write rules need. The SQL here is what both engines speak.
"""
import json
import uuid
from collections import OrderedDict
from pathlib import Path

from . import database
from .database import DB_NAME, Database
from .domain import audit, rsakeys
from .domain.events import Event
from .domain.identities import Identity
from .domain.keys import Key, KeyVersion
from .domain.vaults import Vault
from .sealing import (
    SECRETS_META,
    Keyring,
    MasterKeyError,
    Seal,
    SealError,
    load_master_key,
    master_key_path,
    reader,
    service_secrets,
)

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


def _upsert(table: str, columns: str, key: str) -> str:
    """INSERT, or UPDATE the row with the same `key` (SQLite's and PostgreSQL's common
    spelling of what SQLite alone calls INSERT OR REPLACE)."""
    names = [c.strip() for c in columns.split(",")]
    keys = {k.strip() for k in key.split(",")}
    sets = ", ".join(f"{c}=excluded.{c}" for c in names if c not in keys)
    return (f"INSERT INTO {table} ({columns}) VALUES ({', '.join('?' * len(names))}) "
            f"ON CONFLICT ({key}) DO UPDATE SET {sets}")


# The schema's version (SQLite: PRAGMA user_version; PostgreSQL: the schema_version table).
# 0: the releases before it was kept (brought up to date by ADDED_COLUMNS and `_migrate`'s
# steps, which are idempotent). A new version adds its steps to `_migrate`, for both.
SCHEMA_VERSION = 1


class StoreRefused(MasterKeyError):
    """The data directory cannot be used as it is (a missing database, a newer release's
    schema): the message says why and what to do. A MasterKeyError, so every caller that
    reports why the service cannot start reports this too."""


def _aad(vault: str, name: str, version: str) -> str:
    return f"key-version:{vault}/{name}/{version}"


class Store:
    """`state`: None for SQLite in the data directory, or a postgresql:// URL (the data
    directory then holds the master key and admin.credential only)."""

    def __init__(self, data_dir: Path, master_key_file: str | None = None,
                 master_key: Keyring | bytes | None = None, state: str | None = None):
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        db_path = data_dir / DB_NAME
        if state is None and not db_path.exists() and (data_dir / "admin.credential").exists():
            # The admin credential is written after the database: this directory had one.
            # Starting empty would forget every vault and key and issue a new admin.
            raise StoreRefused(
                f"{db_path} is missing but {data_dir} held a key service (admin.credential is "
                "there): restore the database from a backup (docs/operations.md), or remove "
                "admin.credential to start a new, empty key service")
        self._db: Database = database.open_state(data_dir, state)
        try:
            self._open(data_dir, master_key_file, master_key)
        except BaseException:
            self._db.close()
            raise

    def _open(self, data_dir: Path, master_key_file: str | None, master_key: Keyring | bytes | None) -> None:
        if master_key is None:
            path, may_create = master_key_path(data_dir, master_key_file)
            master: Keyring | bytes = load_master_key(path, may_create, self._db.fresh)
            reload = reader(path)  # another instance's rotation (sealing.py)
        else:  # unsealed by the HSM (keyservice/hsm_seal.py)
            master, reload = master_key, None
        self._seal = Seal(master, reload)
        self._keys: OrderedDict = OrderedDict()
        self.kind = self._db.kind
        self.path = getattr(self._db, "path", None)  # SQLite's file; None on PostgreSQL
        with self.transaction():
            # One transaction: instances starting together on one PostgreSQL database
            # make and migrate the schema once, and agree on one master key check.
            version = self.schema_version()
            if version > SCHEMA_VERSION:
                raise StoreRefused(
                    f"{self._db.describe()} has schema version {version}, written by a newer "
                    f"release; this one knows up to {SCHEMA_VERSION}. Run the newer release, or "
                    "restore the backup taken before the upgrade (docs/operations.md)")
            self._db.create_schema(SCHEMA)
            self._migrate()
            self._check_master_key()
            self._service_secrets()

    def schema_version(self) -> int:
        return self._db.schema_version()

    def describe(self) -> str:
        """Where the state is, for logs (never a password)."""
        return self._db.describe()

    def follow_changes(self, wake) -> None:
        """Call `wake()` (from another thread) when another instance commits events."""
        self._db.follow_changes(wake)

    def _migrate(self) -> None:
        """Inside the opening transaction; every step is idempotent."""
        for table, columns in ADDED_COLUMNS.items():
            have = self._db.columns(table)
            for name, decl in columns:
                if name not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
        # Events from before tenants: their vault's tenant where the vault still exists;
        # the others (purged vaults) stay NULL and reach no subscriber.
        self._db.execute("UPDATE events SET tenant_id = (SELECT tenant_id FROM vaults "
                         "WHERE vaults.name = events.vault) WHERE tenant_id IS NULL")
        self._db.execute("CREATE INDEX IF NOT EXISTS events_by_tenant ON events (tenant_id, seq)")
        # Vaults from before ids: an id now, and the chain they already had (their name).
        for row in self._db.execute("SELECT name FROM vaults WHERE id IS NULL").fetchall():
            self._db.execute("UPDATE vaults SET id=?, audit_chain=? WHERE name=?",
                             (str(uuid.uuid4()), row["name"], row["name"]))
        # Version 1 is every database these steps brought up to date; later versions
        # add their steps after them.
        self._db.set_schema_version(SCHEMA_VERSION)

    def _check_master_key(self) -> None:
        row = self._db.execute("SELECT v FROM meta WHERE k='master_check'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta (k, v) VALUES ('master_check', ?)",
                             (self._seal.seal(_CHECK, "meta:master_check"),))
            return
        try:
            self._seal.open(row["v"], "meta:master_check")
        except SealError:
            raise MasterKeyError("the master key does not match this database "
                                 "(wrong --master-key-file or credential)") from None

    def close(self) -> None:
        self._db.close()

    def transaction(self):
        """A write transaction: the only one running, on this database, until it ends."""
        return self._db.transaction()

    def _service_secrets(self) -> None:
        """The token, audit and key-backup keys, kept sealed: they outlive a master key
        rotation (sealing.py). Key backups (domain/backup_ops.py) leave the service: their
        own key, so a backup blob and a sealed row can never be taken for each other."""
        secrets, new = service_secrets(self._seal, self.meta(SECRETS_META))
        if new is not None:
            self.set_meta(SECRETS_META, new)
        self.token_key, self._audit_key = secrets.tokens, secrets.audit
        self.backup_seal = secrets.backup_seal

    # -- master key rotation (sealing.reseal): every sealed blob, where it lives
    @property
    def seal(self) -> Seal:
        return self._seal

    def sealed_blobs(self) -> list[tuple[tuple, str, bytes]]:
        """(row, AAD, blob) of the master check and of every key version."""
        check = self._db.execute("SELECT v FROM meta WHERE k='master_check'").fetchone()
        rows = self._db.execute("SELECT vault, name, version, sealed_private FROM key_versions")
        return [(("meta", "master_check"), "meta:master_check", bytes(check[0]))] + [
            (("key_versions", r[0], r[1], r[2]), _aad(r[0], r[1], r[2]), bytes(r[3])) for r in rows]

    def put_sealed(self, row: tuple, blob: bytes) -> None:
        """The same secret re-sealed: nothing else of the row changes."""
        if row[0] == "meta":
            self._db.execute("UPDATE meta SET v=? WHERE k=?", (blob, row[1]))
        else:
            self._db.execute("UPDATE key_versions SET sealed_private=? WHERE vault=? AND name=? "
                             "AND version=?", (blob, *row[1:]))

    # -- meta --
    def meta(self, k: str) -> str | None:
        row = self._db.execute("SELECT v FROM meta WHERE k=?", (k,)).fetchone()
        if row is None:
            return None
        v = row["v"]
        return bytes(v).decode() if isinstance(v, bytes | memoryview) else v

    def set_meta(self, k: str, v: str) -> None:
        # Stored as bytes: the column is a BLOB (BYTEA), which PostgreSQL would not take
        # text into verbatim. Rows written as text by earlier releases still read (above).
        self._db.execute(_upsert("meta", "k, v", "k"), (k, v.encode()))

    # -- identities --
    def add_identity(self, i: Identity) -> None:
        self.put_identity(i, new=True)

    def put_identity(self, i: Identity, new: bool = False) -> None:
        sql = (f"INSERT INTO identities ({_IDENTITY_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)" if new
               else _upsert("identities", _IDENTITY_COLUMNS, "object_id"))
        self._db.execute(sql, (i.object_id, i.client_id, i.tenant_id, i.display_name, i.type,
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
        return bool(self._db.execute("SELECT EXISTS (SELECT 1 FROM identities WHERE tenant_id=?) OR "
                                     "EXISTS (SELECT 1 FROM vaults WHERE tenant_id=?)",
                                     (tenant_id, tenant_id)).fetchone()[0])

    def policies_of(self, object_id: str) -> list[str]:
        """The vaults where `object_id` has an access policy."""
        return [r["vault"] for r in self._db.execute(
            "SELECT vault FROM policies WHERE object_id=? ORDER BY vault", (object_id,))]

    # -- vaults --
    def vault(self, name: str) -> Vault | None:
        row = self._db.execute(f"SELECT {_VAULT_COLUMNS} FROM vaults WHERE name=?", (name,)).fetchone()
        return None if row is None else _vault(row)

    def vaults(self) -> list[Vault]:
        return [_vault(r) for r in self._db.execute(f"SELECT {_VAULT_COLUMNS} FROM vaults ORDER BY name")]

    def put_vault(self, v: Vault) -> None:
        self._db.execute(_upsert("vaults", _VAULT_COLUMNS, "name"),
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
        return {r["object_id"]: tuple(json.loads(r["permissions"])) for r in rows}

    def set_policy(self, vault: str, object_id: str, permissions) -> None:
        self._db.execute(_upsert("policies", "vault, object_id, permissions", "vault, object_id"),
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
        versions = [KeyVersion(r["version"], r["size"], bytes(r["public_der"]), bool(r["enabled"]),
                               r["nbf"], r["exp"], tuple(json.loads(r["key_ops"])), r["created"],
                               r["updated"], r["kty"])
                    for r in self._db.execute(
                        "SELECT version, size, public_der, enabled, nbf, exp, key_ops, created, updated, "
                        "kty FROM key_versions WHERE vault=? AND name=? ORDER BY ord", (vault, name))]
        return Key(vault, name, row["created"], versions, row["deleted_at"], row["scheduled_purge"])

    def key_names(self, vault: str, deleted: bool) -> list[str]:
        cond = "IS NOT NULL" if deleted else "IS NULL"
        return [r["name"] for r in self._db.execute(
            f"SELECT name FROM keys WHERE vault=? AND deleted_at {cond} ORDER BY name", (vault,))]

    def put_key(self, k: Key) -> None:
        self._db.execute(_upsert("keys", "vault, name, created, deleted_at, scheduled_purge", "vault, name"),
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
        return self._seal.open(row["sealed_private"], _aad(vault, name, version))

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
        vaults = [r["name"] for r in self._db.execute(
            "SELECT name FROM vaults WHERE scheduled_purge IS NOT NULL AND scheduled_purge <= ?", (now,))]
        keys = [(r["vault"], r["name"]) for r in self._db.execute(
            "SELECT vault, name FROM keys WHERE scheduled_purge IS NOT NULL AND scheduled_purge <= ?",
            (now,))]
        return vaults, keys

    def due_expiries(self, now: float) -> list[tuple[str, str, str, float]]:
        """Versions of live keys whose `exp` has passed and not yet been announced."""
        return [tuple(r) for r in self._db.execute(
            "SELECT kv.vault, kv.name, kv.version, kv.exp FROM key_versions kv "
            "JOIN keys k ON k.vault = kv.vault AND k.name = kv.name "
            "JOIN vaults v ON v.name = kv.vault "
            "WHERE kv.exp IS NOT NULL AND kv.exp <= ? AND k.deleted_at IS NULL "
            "AND v.deleted_at IS NULL AND (kv.expiry_announced IS NULL OR kv.expiry_announced != kv.exp)",
            (now,))]

    def mark_expiry_announced(self, vault: str, name: str, version: str, exp: float) -> None:
        self._db.execute("UPDATE key_versions SET expiry_announced=? WHERE vault=? AND name=? AND version=?",
                         (exp, vault, name, version))

    # -- events --
    def add_event(self, e: Event) -> int:
        """Inside the change's transaction; other instances' subscribers hear of it at commit."""
        row = self._db.execute("INSERT INTO events (type, vault, key, version, kid, object_id, time, "
                               "tenant_id) VALUES (?,?,?,?,?,?,?,?) RETURNING seq",
                               (e.type, e.vault, e.key, e.version, e.kid, e.objectId, e.time,
                                e.tenantId)).fetchone()
        self._db.announce_change()
        return int(row["seq"])

    def events_after(self, seq: int, limit: int, tenant_id: str) -> list[Event]:
        return [Event(type=r["type"], vault=r["vault"], key=r["key"], version=r["version"], kid=r["kid"],
                      objectId=r["object_id"], time=r["time"], seq=r["seq"], tenantId=r["tenant_id"])
                for r in self._db.execute("SELECT seq, type, vault, key, version, kid, object_id, time, "
                                          "tenant_id FROM events WHERE tenant_id=? AND seq > ? "
                                          "ORDER BY seq LIMIT ?", (tenant_id, seq, limit))]

    def last_event_seq(self) -> int:
        return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])

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
        self._db.execute(_upsert("closed_chains", "vault_id, chain, name, tenant_id, closed", "vault_id"),
                         (v.id, v.audit_chain, v.name, v.tenant_id, entry["time"]))

    def audit_chain_of(self, vault_id: str) -> str | None:
        """The chain of a live or purged vault, by the vault's id."""
        row = self._db.execute("SELECT audit_chain FROM vaults WHERE id=? UNION ALL "
                               "SELECT chain FROM closed_chains WHERE vault_id=?",
                               (vault_id, vault_id)).fetchone()
        return None if row is None else row["audit_chain"]

    def _append_audit(self, chain: str, entry: dict) -> None:
        head = self._db.execute("SELECT seq, last FROM audit_heads WHERE chain=?", (chain,)).fetchone()
        seq, prev = (1, audit.GENESIS) if head is None else (head["seq"] + 1, bytes(head["last"]))
        mac = audit.entry_mac(self._audit_key, chain, seq, prev, entry)
        self._db.execute("INSERT INTO audit (chain, seq, entry, prev, mac) VALUES (?,?,?,?,?)",
                         (chain, seq, audit.canonical(entry).decode(), prev, mac))
        self._db.execute(_upsert("audit_heads", "chain, seq, last, mac", "chain"),
                         (chain, seq, mac, audit.head_mac(self._audit_key, chain, seq, mac)))

    def audit_entries(self, chain: str, limit: int, after: int = 0, *, newest: bool = False,
                      since: float | None = None) -> list[dict]:
        """Up to `limit` entries after seq `after` (and at or after time `since`), oldest
        first; `newest`: the last `limit` of them (`audit show --tail`), still oldest first."""
        query = "SELECT seq, entry FROM audit WHERE chain=? AND seq > ?"
        args: list = [chain, after]
        if since is not None:
            query += f" AND {self._db.json_number('entry', 'time')} >= ?"
            args.append(since)
        query += f" ORDER BY seq {'DESC' if newest else 'ASC'} LIMIT ?"
        rows = self._db.execute(query, (*args, limit)).fetchall()
        return [dict(json.loads(r["entry"]), seq=r["seq"]) for r in (reversed(rows) if newest else rows)]

    def verify_audit(self, chain: str) -> audit.Verification:
        rows = self._db.execute("SELECT seq, entry, prev, mac FROM audit WHERE chain=? ORDER BY seq",
                                (chain,))
        head = self._db.execute("SELECT seq, last, mac FROM audit_heads WHERE chain=?", (chain,)).fetchone()
        return audit.verify(self._audit_key, chain, rows, head)


def _identity(r) -> Identity:
    return Identity(r["object_id"], r["client_id"], r["tenant_id"], r["display_name"], r["type"],
                    tuple(json.loads(r["roles"])), bytes(r["secret_hash"]), r["created"],
                    bool(r["disabled"]), r["generation"])


def _vault(r) -> Vault:
    return Vault(r["name"], r["tenant_id"], r["subscription"], r["location"], r["retention_days"],
                 bool(r["purge_protection"]), r["owner"], r["created"], r["deleted_at"],
                 r["scheduled_purge"], r["id"], r["audit_chain"])
