"""`nbdserver`: the daemon (`serve`) and the client commands of the disk platform.

Client commands talk to the API at NBDSERVER_API with the bearer token of
NBDSERVER_TOKEN_FILE or NBDSERVER_TOKEN (`client.SETTINGS`: the environment, else the
settings file); they print the answer in `--output` (`daemonkit.cliout`) and report a
failure once, in the shape and with the exit code both CLIs share (docs/operations.md).
Each request has NBDSERVER_TIMEOUT, and the whole command a deadline of two requests'
worth (`daemonkit.deadline`), re-armed while it follows an operation that answers.
"""

from __future__ import annotations

import os
import re
import sys

import click

from daemonkit import deadline
from daemonkit.clicommand import ClientGroup, emit, output_format, version
from daemonkit.cliout import EXIT_INTERRUPTED, EXIT_USAGE, CliError
from daemonkit.cliprogress import ProgressLine
from daemonkit.fips import version_message as fips_version_message
from daemonkit.https import listener_tls_options
from daemonkit.logsetup import FORMATS as LOG_FORMATS
from daemonkit.logsetup import LEVELS as LOG_LEVELS

from .admission import ConnectionLimits
from .client import SETTINGS, api, request_timeout, use_api_ca, wait_operation
from .host.cli import attach, attachments, detach
from .runtime import configure_logging, parse_hostport, run
from .status import status

_LIMITS = ConnectionLimits()  # the defaults, shown in --help


DEADLINE_MARGIN = 5.0  # seconds on top of the requests' own: start-up and teardown


class PlatformCommands(ClientGroup):
    settings = SETTINGS
    # The API's epoch-seconds fields, printed in RFC 3339.
    time_keys = frozenset({"created", "since", "started", "ended"})

    def before_command(self, ctx):
        arm_deadline()


# --------------------------------------------------------------------------- the daemon
@click.group(cls=PlatformCommands)
@click.version_option(version(), prog_name="nbdserver",
                      message=fips_version_message("NBDSERVER_FIPS", ("pinned", "system")))
@click.option("--api-ca", metavar="FILE", expose_value=False, is_eager=True, callback=use_api_ca,
              help="CA certificate of an https:// API (also NBDSERVER_CA)")
def main():
    """Encrypted managed disks over NBD."""


def ceph_client(conf: str | None, client_id: str, keyring: str | None) -> dict | None:
    """The cluster of RBD disks, checked here: a keyring others can read is refused, as
    it would let them act as this server on the cluster."""
    if not conf:
        if keyring:
            raise click.UsageError("--ceph-keyring needs --ceph-conf")
        return None
    if not os.path.isfile(conf):
        raise click.UsageError(f"--ceph-conf {conf}: no such file")
    if keyring:
        try:
            mode = os.stat(keyring).st_mode
        except OSError as e:
            raise click.UsageError(f"--ceph-keyring {keyring}: {e.strerror}") from None
        if mode & 0o077:
            raise click.UsageError(f"--ceph-keyring {keyring} is readable by others "
                                   f"(mode {mode & 0o777:o}): make it 0600")
    return {"conf": os.path.abspath(conf), "client_id": client_id,
            "keyring": os.path.abspath(keyring) if keyring else None}


def arm_deadline() -> None:
    """Two requests' worth: the call and, for commands that follow an operation, one poll."""
    seconds = 2 * request_timeout() + DEADLINE_MARGIN
    deadline.arm(seconds, f"nbdserver {' '.join(sys.argv[1:3])}", output_format())


@main.command(cls=click.Command)
@click.option("--data-dir", required=True, type=click.Path(file_okay=False), help="state, disks, keys")
@click.option("--nbd-listen", default="127.0.0.1:10809", show_default=True)
@click.option("--api-listen", default="127.0.0.1:8080", show_default=True)
@click.option("--keyservice-url", required=True, envvar="KEYSERVICE_URL", show_envvar=True)
@click.option("--keyservice-vault-domain", envvar="KEYSERVICE_VAULT_DOMAIN", show_envvar=True,
              help="the key service's --vault-domain: key URLs in Key Vault's host form "
                   "(https://VAULT.DOMAIN/keys/NAME) are then accepted for encryption sets")
@click.option("--keyservice-credential", type=click.Path(dir_okay=False),
              help="credential file of the platform identity "
                   "(default: $CREDENTIALS_DIRECTORY/keyservice-credential)")
@click.option("--master-key-file", type=click.Path(dir_okay=False), default=None,
              help="32-byte platform master key "
                   "(default: $CREDENTIALS_DIRECTORY/platform-master-key or DATA_DIR/master.key)")
@click.option("--lease-seconds", default=60.0, show_default=True,
              help="re-check every key this often, whatever the change stream says")
@click.option("--grace-seconds", default=3600.0, show_default=True,
              help="keep serving this long while the key service is unreachable")
@click.option("--idle-close-seconds", type=click.FloatRange(0), default=60.0, show_default=True,
              help="wipe a disk's key this long after its last NBD client left (0: at once)")
@click.option("--workers", default=8, show_default=True, help="I/O worker threads")
@click.option("--io-processes", type=click.IntRange(0), default=None,
              help="processes serving plain-TCP NBD connections (default: one per core; "
                   "0 or 1: all in this process; docs/operations.md)")
@click.option("--cache", type=click.Choice(["none", "writeback"]), default="writeback",
              show_default=True, help="cache mode of disks without their own (none: O_DIRECT; "
                                      "docs/operations.md)")
@click.option("--storage", default="file", show_default=True, envvar="NBDSERVER_STORAGE",
              show_envvar=True, help="where new disks go: file (DATA_DIR) or rbd:POOL "
                                     "(Ceph RBD; docs/operations.md, \"Disks on Ceph RBD\")")
@click.option("--ceph-conf", type=click.Path(dir_okay=False), envvar="CEPH_CONF", show_envvar=True,
              help="ceph.conf of the cluster of RBD disks")
@click.option("--ceph-id", default="admin", show_default=True, envvar="CEPH_ID", show_envvar=True,
              help="cephx client name, without client.")
@click.option("--ceph-keyring", type=click.Path(dir_okay=False), envvar="CEPH_KEYRING",
              show_envvar=True, help="that client's keyring, 0600 (default: what ceph.conf says)")
@click.option("--state", metavar="sqlite|postgresql://...", envvar="NBDSERVER_STATE", show_envvar=True,
              help="where the platform's state lives: sqlite in DATA_DIR (default), or a PostgreSQL "
                   "database several servers share (docs/operations.md, \"State on PostgreSQL\")")
@click.option("--disk-lease-seconds", type=click.FloatRange(1, 3600), default=15.0, show_default=True,
              help="with --state postgresql://: a disk's lease; a dead server's disks are taken "
                   "over within this long (docs/operations.md, \"State on PostgreSQL\")")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="INFO",
              show_default=True)
@click.option("--log-format", type=click.Choice(LOG_FORMATS), default="text", show_default=True,
              help="json: one object per line, with request ids (docs/operations.md, \"Logs\")")
@click.option("--metrics-listen", metavar="HOST:PORT",
              help="also serve /metrics, /healthz and /readyz here (per-disk series only to "
                   "loopback clients or with the API token; docs/operations.md, \"Monitoring\")")
@click.option("--tls-mode", type=click.Choice(["off", "optional", "required"]),
              help="NBD TLS; default: required unless --nbd-listen is loopback (docs/tls.md)")
@click.option("--tls-dir", type=click.Path(file_okay=False),
              help="server-cert.pem, server-key.pem, ca-cert.pem (see `nbdserver tls init`)")
@click.option("--tls-verify-clients", is_flag=True,
              help="require client certificates signed by the TLS directory's ca-cert.pem")
@click.option("--tls-psk-file", type=click.Path(dir_okay=False),
              help="TLS-PSK keys, psktool format (identity:hexkey per line, 0600)")
@click.option("--keyservice-ca", type=click.Path(dir_okay=False), envvar="KEYSERVICE_CA", show_envvar=True,
              help="CA certificate that signed the key service's (https://; default: system CAs)")
@click.option("--insecure-keyservice-http", is_flag=True,
              help="allow an http:// key service on a non-loopback address")
@click.option("--max-connections", type=click.IntRange(1), default=_LIMITS.max_connections,
              show_default=True,
              help="NBD connections in total (never more than RLIMIT_NOFILE less --fd-reserve)")
@click.option("--max-connections-per-peer", type=click.IntRange(1), default=_LIMITS.max_per_peer,
              show_default=True, help="NBD connections from one address (IPv6: one /64)")
@click.option("--handshake-timeout", type=click.FloatRange(0, min_open=True),
              default=_LIMITS.handshake_timeout, show_default=True,
              help="seconds an NBD connection may take to reach transmission")
@click.option("--fd-reserve", type=click.IntRange(0), default=_LIMITS.fd_reserve, show_default=True,
              help="file descriptors kept from NBD clients for the key service, disks and API")
@click.option("--buffer-budget-mib", type=click.IntRange(32), default=None,
              help="MiB of NBD read buffers and unsent replies over all connections "
                   "(default: 1 GiB or a quarter of RAM)")
@click.option("--export-list", type=click.Choice(["all", "authenticated", "none"]),
              default="authenticated", show_default=True,
              help="who may list the NBD exports: anyone, clients with a verified TLS "
                   "certificate, or nobody (clients connect by disk name)")
@click.option("--fips", "fips_mode", is_flag=True, envvar="NBDSERVER_FIPS", show_envvar=True,
              help="FIPS mode: all cryptography in OpenSSL's FIPS provider, or no start "
                   "(docs/operations.md, \"FIPS mode\")")
@click.option("--fips-dir", type=click.Path(file_okay=False), envvar="FIPS_DIR",
              help="the FIPS provider trees, pinned/ and system/ (default: the checkout's .cache/fips)")
@listener_tls_options("api", "api_listen")
def serve(api_ssl, data_dir, fips_mode, fips_dir, nbd_listen, api_listen, keyservice_url,
          keyservice_vault_domain,
          keyservice_credential, master_key_file,
          lease_seconds, grace_seconds, idle_close_seconds, workers,
          io_processes, cache, log_level, tls_mode, tls_dir,
          tls_verify_clients, tls_psk_file, keyservice_ca, insecure_keyservice_http, max_connections,
          max_connections_per_peer, handshake_timeout, fd_reserve, buffer_budget_mib, export_list,
          log_format, metrics_listen, storage, ceph_conf, ceph_id, ceph_keyring, state,
          disk_lease_seconds):
    """Run the NBD server and the disk platform."""
    if fips_mode:  # first: this re-executes the process once (daemonkit/fips.py)
        start_fips(fips_dir, data_dir)
    from keyservice.client import client_ssl_for

    from .daemon import StartupError, serve_forever
    from .iopool import default_processes
    from .tls import ServerTls, TlsConfigError, resolve_mode, server_context_for
    from .visibility import ExportList

    configure_logging(log_level, log_format)
    nbd_addr = parse_hostport(nbd_listen, 10809)
    try:
        mode = resolve_mode(tls_mode, nbd_addr[0])
        tls_context = server_context_for(mode, ServerTls(tls_dir, tls_verify_clients, tls_psk_file))
        ks_ssl = client_ssl_for(keyservice_url, keyservice_ca, insecure_keyservice_http)
    except TlsConfigError as e:
        raise click.UsageError(str(e)) from None
    if keyservice_credential is None:
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if not creds:
            raise click.UsageError("give --keyservice-credential (or run under systemd with LoadCredential=)")
        keyservice_credential = os.path.join(creds, "keyservice-credential")
    try:
        run(lambda stop: serve_forever(
            stop, data_dir=data_dir, nbd_listen=nbd_addr,
            api_listen=parse_hostport(api_listen, 8080), api_ssl=api_ssl,
            keyservice_url=keyservice_url,
            vault_domain=keyservice_vault_domain,
            credential_file=keyservice_credential, master_key_file=master_key_file,
            lease=lease_seconds, grace=grace_seconds, idle_close=idle_close_seconds,
            io_processes=default_processes() if io_processes is None else io_processes,
            workers=workers, cache=cache, ssl=ks_ssl,
            tls_mode=mode, tls_context=tls_context,
            nbd_limits=ConnectionLimits(max_connections, max_connections_per_peer,
                                        handshake_timeout, fd_reserve,
                                        (buffer_budget_mib << 20) if buffer_budget_mib
                                        else _LIMITS.buffer_budget),
            nbd_export_list=ExportList(export_list),
            metrics_listen=parse_hostport(metrics_listen, 9108) if metrics_listen else None,
            storage=storage, ceph=ceph_client(ceph_conf, ceph_id, ceph_keyring),
            state=None if state in (None, "", "sqlite") else state, disk_lease=disk_lease_seconds))
    except StartupError as e:
        click.echo(f"nbdserver: cannot start: {e}", err=True)
        sys.exit(1)


def start_fips(fips_dir, data_dir) -> None:
    from daemonkit.fips import FipsError

    from .fipsmode import activate
    try:
        status = activate(fips_dir, data_dir)
    except FipsError as e:
        click.echo(f"nbdserver: cannot start in FIPS mode: {e}", err=True)
        sys.exit(1)
    click.echo(f"nbdserver: {status.summary()}", err=True)


# --------------------------------------------------------------------------- the client
def follow(op: dict, *, quiet: bool = False, no_wait: bool = False):
    """A long operation the API accepted: with --no-wait, the operation itself (its id is
    what `operation wait` takes); otherwise its result, its id and progress on stderr."""
    if no_wait:
        return op
    line = None
    if not quiet:
        click.echo(f"operation {op['id']} ({op['kind']}): started", err=True)
        line = ProgressLine(op["kind"])

    def show(o: dict) -> None:
        if line is not None:
            line.update(1.0 if o["status"] == "succeeded" else o.get("progress", 0.0), o.get("bytesTotal"))
    try:
        return wait_operation(op, show, arm_deadline)
    except KeyboardInterrupt:
        raise CliError(f"stopped following operation {op['id']}; it goes on in the server: "
                       f"`nbdserver operation wait {op['id']}`", code="Interrupted",
                       exit_code=EXIT_INTERRUPTED) from None
    finally:
        if line is not None:
            line.done()


def out(obj):
    emit(obj)


@main.group()
def des():
    """Disk encryption sets (customer-managed keys)."""


@des.command("create")
@click.argument("name")
@click.option("--key-url", required=True, help="{base}/vaults/{vault}/keys/{name}[/{version}]")
@click.option("--subscription")
@click.option("--location")
@click.option("--allow-cross-subscription", is_flag=True,
              help="accept a vault in another subscription (the vault owner's explicit consent)")
@click.option("--auto-rotate", is_flag=True,
              help="follow the key's latest version: re-wrap every DEK after `key rotate`")
@click.option("--double-encryption", is_flag=True,
              help="EncryptionAtRestWithPlatformAndCustomerKeys: each disk encrypted twice, "
                   "under a platform key and under this key")
def des_create(name, key_url, subscription, location, allow_cross_subscription, auto_rotate,
               double_encryption):
    """Create an encryption set; grant its identity get, wrapKey, unwrapKey on the vault."""
    out(api("POST", "/encryption-sets", {"name": name, "keyUrl": key_url, "subscription": subscription,
                                        "location": location,
                                        "allowCrossSubscription": allow_cross_subscription or None,
                                        "rotationToLatestKeyVersionEnabled": auto_rotate or None,
                                        "encryptionType": "EncryptionAtRestWithPlatformAndCustomerKeys"
                                        if double_encryption else None}))


@des.command("show")
@click.argument("name")
def des_show(name):
    out(api("GET", f"/encryption-sets/{name}"))


@des.command("list")
def des_list():
    out(api("GET", "/encryption-sets")["value"])


@des.command("update")
@click.argument("name")
@click.option("--key-url", help="rotate now to this key or key version")
@click.option("--auto-rotate/--no-auto-rotate", default=None,
              help="follow the key's latest version, or stay on the active one")
def des_update(name, key_url, auto_rotate):
    """Rotate: re-wrap every DEK under the set with a new key or key version, online;
    or switch automatic rotation on or off."""
    if key_url is None and auto_rotate is None:
        raise click.UsageError("give --key-url, --auto-rotate/--no-auto-rotate, or both")
    out(api("PATCH", f"/encryption-sets/{name}",
            {"keyUrl": key_url, "rotationToLatestKeyVersionEnabled": auto_rotate}))


@des.command("delete")
@click.argument("name")
def des_delete(name):
    api("DELETE", f"/encryption-sets/{name}")


@main.group()
def disk():
    """Managed disks (each served as the NBD export of the same name)."""


@disk.command("create")
@click.argument("name")
@click.option("--size", help="e.g. 10G; default: the source's size")
@click.option("--des", help="encryption set (customer-managed key); default: platform-managed key")
@click.option("--source", help="snapshot:NAME or image:NAME")
@click.option("--count", type=int, help="make NAME-0 .. NAME-(N-1) (a scale set)")
@click.option("--subscription")
@click.option("--location")
@click.option("--quiet", is_flag=True, help="no progress on stderr")
@click.option("--no-wait", is_flag=True, help="print the operation and return (see `operation wait`)")
@click.option("--cache", type=click.Choice(["none", "writeback"]),
              help="cache mode (none: O_DIRECT); default: the server's --cache")
@click.option("--storage", metavar="file|rbd:POOL",
              help="a file, or an image in a Ceph RBD pool; default: the server's --storage")
def disk_create(name, size, des, source, count, subscription, location, quiet, no_wait, cache, storage):
    """Create a disk (SIZE: 10G or 10GiB binary, 10GB decimal, 1.5G; docs/platform.md)."""
    op = api("POST", "/disks", {"name": name, "size": size, "diskEncryptionSet": des, "source": source,
                                "count": count, "subscription": subscription, "location": location,
                                "cache": cache, "storage": storage})
    result = follow(op, quiet=quiet, no_wait=no_wait)
    out(result[0] if count is None and not no_wait else result)


@disk.command("resize")
@click.argument("name")
@click.option("--size", required=True, help="the new, larger size: 20G, 20GiB, 20GB, 1.5T")
def disk_resize(name, size):
    """Grow a disk, online: attached clients keep their size, every new connection sees
    the new one (a disk never shrinks). Reconnect the host, then grow its file system."""
    out(api("PATCH", f"/disks/{name}", {"size": size}))


@disk.command("usage")
@click.argument("name")
def disk_usage(name):
    """Bytes the disk's file holds on the platform's storage, against its size."""
    out(api("GET", f"/disks/{name}/usage"))


@disk.command("show")
@click.argument("name")
def disk_show(name):
    out(api("GET", f"/disks/{name}"))


@disk.command("list")
def disk_list():
    out(api("GET", "/disks")["value"])


@disk.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="delete even while attached")
def disk_delete(name, force):
    api("DELETE", f"/disks/{name}" + ("?force=1" if force else ""))


@disk.command("update")
@click.argument("name")
@click.option("--des", help="move under this encryption set")
@click.option("--platform-key", is_flag=True, help="move to the platform-managed key")
def disk_update(name, des, platform_key):
    """Change the key that wraps the disk's DEK (no data is re-encrypted; online)."""
    out(api("PATCH", f"/disks/{name}", {"diskEncryptionSet": des, "platformKey": platform_key or None}))


@disk.command("key-envelope")
@click.argument("name")
def disk_key_envelope(name):
    """The wrapped DEK, kid and alg: recovery with the key owner's unwrap (docs/format.md)."""
    out(api("GET", f"/disks/{name}/key-envelope"))


def _volume_group(kind: str, create_opt: str, create_help: str):
    grp = ClientGroup(kind, help=f"{kind.capitalize()}s.")

    @grp.command("create")
    @click.argument("name")
    @click.option(f"--{create_opt}", "source", required=True, help=create_help)
    @click.option("--quiet", is_flag=True, help="no progress on stderr")
    @click.option("--no-wait", is_flag=True, help="print the operation and return (see `operation wait`)")
    def create(name, source, quiet, no_wait):
        body = {"name": name, "disk": source} if create_opt == "disk" else {"name": name, "source": source}
        out(follow(api("POST", f"/{kind}s", body), quiet=quiet, no_wait=no_wait))

    @grp.command("show")
    @click.argument("name")
    def show(name):
        out(api("GET", f"/{kind}s/{name}"))

    @grp.command("list")
    def list_():
        out(api("GET", f"/{kind}s")["value"])

    @grp.command("delete")
    @click.argument("name")
    def delete(name):
        api("DELETE", f"/{kind}s/{name}")

    return grp


snapshot = _volume_group("snapshot", "disk", "the disk to snapshot (consistent while attached)")
image = _volume_group("image", "source", "disk:NAME or snapshot:NAME")
main.add_command(snapshot)
main.add_command(image)


@image.command("share")
@click.argument("name")
@click.option("--gallery", required=True)
def image_share(name, gallery):
    """Share an image to a gallery (refused for customer-managed images)."""
    out(api("POST", f"/images/{name}/share", {"gallery": gallery}))


@main.group()
def operation():
    """Long operations (disk, snapshot and image creation), kept across restarts."""


def _operation_id(op_id: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{16}", op_id):
        raise CliError(f"{op_id!r} is not an operation id (16 hexadecimal digits, as "
                       "`disk create --no-wait` and `operation list` print them)",
                       code="UsageError", exit_code=EXIT_USAGE)
    return op_id


@operation.command("list")
def operation_list():
    """Running operations first, then the others, newest first."""
    out(api("GET", "/operations")["value"])


@operation.command("show")
@click.argument("op_id", metavar="ID")
def operation_show(op_id):
    out(api("GET", f"/operations/{_operation_id(op_id)}"))


@operation.command("wait")
@click.argument("op_id", metavar="ID")
@click.option("--quiet", is_flag=True, help="no progress on stderr")
def operation_wait(op_id, quiet):
    """Follow an operation to its end; print its result (exit 1 if it failed, 3 if a
    restart interrupted it)."""
    out(follow(api("GET", f"/operations/{_operation_id(op_id)}"), quiet=quiet))


# --------------------------------------------------------------------------- TLS
@main.group()
def tls():
    """Certificates and keys for NBD over TLS (test and demo set-ups; docs/tls.md)."""


@tls.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--host", "hosts", multiple=True,
              help="a name or IP clients use to reach the server (repeat); loopback is always in")
@click.option("--client-name", default="client", show_default=True, help="CN of the client certificate")
@click.option("--psk-identity", help="also add a TLS-PSK key for this identity to DIRECTORY/keys.psk")
@click.option("--days", default=825, show_default=True, type=click.IntRange(1, 3650))
@click.option("--force", is_flag=True, help="make a new CA even if DIRECTORY has one")
@click.option("--ca-key", type=click.Path(dir_okay=False),
              help="keep the CA's private key here (0600), not in DIRECTORY/ca-key.pem")
@click.option("--no-ca-key", is_flag=True,
              help="keep no CA key: it signs these certificates, then is gone")
def tls_init(directory, hosts, client_name, psk_identity, days, force, ca_key, no_ca_key):
    """Create a CA, server and client certificates (keys 0600) in qemu/libnbd layout."""
    from daemonkit.tlsca import CaError, init_ca

    from .tls import TlsConfigError, write_psk_file
    if ca_key and no_ca_key:
        raise click.UsageError("--ca-key and --no-ca-key contradict each other")
    try:
        written = init_ca(directory, hosts=hosts, client_name=client_name, days=days, force=force,
                          ca_key_file=ca_key, keep_ca_key=not no_ca_key)
        if psk_identity:
            written.append(write_psk_file(os.path.join(directory, "keys.psk"), psk_identity))
    except (CaError, TlsConfigError) as e:
        raise click.UsageError(str(e)) from None
    out({"directory": os.path.abspath(directory), "written": [os.path.basename(p) for p in written]})


# --------------------------------------------------------------------------- backup
@main.command("backup")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--data-dir", default="/var/lib/nbdserver", show_default=True,
              type=click.Path(file_okay=False), help="the platform's data directory (running or not)")
@click.option("--include-data", is_flag=True,
              help="also copy every volume's ciphertext file, sparse (attached disks: snapshot "
                   "them first for a consistent image)")
@click.option("--include-master-key", is_flag=True,
              help="also copy the platform master key (0600): the backup is then as secret as "
                   "the data directory")
@click.option("--master-key-file", type=click.Path(dir_okay=False),
              help="the master key's place when not the default (with --include-master-key)")
def backup(directory, data_dir, include_data, include_master_key, master_key_file):
    """Back up the platform's state, online, into the new DIRECTORY (0700, files 0600).

    Reads the data directory itself (SQLite's online backup), so it runs on the server's
    host as its user; restore: docs/operations.md, "Backup and restore"."""
    import json

    from daemonkit.backup import BackupError

    from .platform.backup import backup_platform
    try:
        manifest = backup_platform(data_dir, directory, include_data=include_data,
                                   include_master_key=include_master_key,
                                   master_key_file=master_key_file)
    except BackupError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(manifest, indent=2, sort_keys=True))


# --------------------------------------------------------------------------- master key
@main.command("rotate-master-key")
@click.option("--data-dir", default="/var/lib/nbdserver", show_default=True,
              type=click.Path(file_okay=False), help="the platform's data directory (running or not)")
@click.option("--master-key-file", type=click.Path(dir_okay=False),
              help="the keyring's place when not the default")
@click.option("--status", "action", flag_value="status",
              help="only report which master key seals how many records")
@click.option("--retire", "action", flag_value="retire",
              help="drop the older keys no sealed record names any more")
@click.option("--state", metavar="sqlite|postgresql://...", envvar="NBDSERVER_STATE", show_envvar=True,
              help="the state serve uses, for its sealed records")
def rotate_master_key(data_dir, master_key_file, action, state):
    """Put a new platform master key first in the keyring; the older ones stay readable.

    Safe while the server runs: it re-seals every credential under the new key at its
    next start. Then --retire drops the old key (docs/operations.md, "Rotating the
    master key"). Prints the keys, the records under each, and what can be retired."""
    import json

    from daemonkit.statedb import StateError

    from .platform.sealing import MasterKeyError, rotate_master_key
    try:
        result = rotate_master_key(data_dir, master_key_file, action or "rotate", state)
    except (MasterKeyError, StateError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(result, indent=2, sort_keys=True))


# Host integration: attach a disk as a block device on this machine (nbdserver/host/).
main.add_command(attach)
main.add_command(detach)
main.add_command(attachments)
# They read the API's settings too (attach: the NBD address from GET /info), and their
# records' place; their help says so, as every client command's does.
for _host_command in (attach, detach, attachments):
    _host_command.epilog = ("\b\nEnvironment (or section [nbdserver] of the settings file):\n"
                            + SETTINGS.help_text() + "\n  NBDSERVER_RUN_DIR: where attachments are "
                            "recorded (default /run/nbdserver)")
main.add_command(status)


if __name__ == "__main__":
    main()
