"""`keyservice`: the daemon (`serve`) and its client commands.

Client commands read KEYSERVICE_URL and KEYSERVICE_CREDENTIAL (a credential file such as
DATA_DIR/admin.credential), KEYSERVICE_TIMEOUT (seconds per HTTP request, default 10) and
KEYSERVICE_CA (`SETTINGS`: the environment, else the settings file's [keyservice]
section, `daemonkit.config`). They print the answer in `--output` (`daemonkit.cliout`)
and report a failure once, in the shape and with the exit code both CLIs share
(docs/operations.md, "Exit codes"). A command that is not done within its deadline (four
requests' worth: token, call, and the one retry of both after a 401, plus a few
seconds) exits 3 with its stacks on stderr rather than hang (`daemonkit.deadline`);
`events` follows the stream for as long as it lasts.
"""
import asyncio
import json
import sqlite3
import sys
import time
import uuid
from pathlib import Path

import click

from daemonkit import deadline, fips
from daemonkit.clicommand import ClientGroup, emit, output_format, version
from daemonkit.cliout import EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_USAGE, CliError
from daemonkit.config import ConfigError, Settings
from daemonkit.fips import version_message as fips_version_message
from daemonkit.logsetup import FORMATS as LOG_FORMATS
from daemonkit.logsetup import LEVELS as LOG_LEVELS
from daemonkit.logsetup import configure as configure_logging
from daemonkit.rfc3339 import format_time, parse_time

from .client import Credential, KeyServiceClient, KeyServiceError, KeyServiceUnavailable, parse_kid

DEFAULT_TIMEOUT = 10.0  # seconds per HTTP request
DEADLINE_MARGIN = 5.0  # seconds on top of the requests' own: start-up and teardown

SETTINGS = Settings("keyservice", {
    "KEYSERVICE_URL": "URL of the key service",
    "KEYSERVICE_CREDENTIAL": "credential file of the identity to act as (JSON, 0600)",
    "KEYSERVICE_TIMEOUT": f"seconds one request may take, (0, 3600] (default {DEFAULT_TIMEOUT:g})",
    "KEYSERVICE_CA": "CA certificate that signed the service's (https://; default: system CAs)",
    "KEYSERVICE_STATE": "serve's state: sqlite (default, in the data directory) or a "
                        "postgresql:// URL (docs/operations.md, \"State on PostgreSQL\")",
}, secrets=frozenset({"KEYSERVICE_STATE"}))  # a URL may carry the database password


def _translate(e: Exception) -> CliError | None:
    if isinstance(e, KeyServiceError):
        unavailable = isinstance(e, KeyServiceUnavailable) or e.status >= 500
        return CliError(e.message, code=e.code, status=e.status or None,
                        exit_code=EXIT_UNAVAILABLE if unavailable else EXIT_REFUSED)
    return None


class KeyServiceCommands(ClientGroup):
    settings = SETTINGS
    # Key Vault's epoch-seconds fields (and the audit log's `time`), printed in RFC 3339.
    time_keys = frozenset({"created", "updated", "nbf", "exp", "createdDate", "deletedDate",
                           "scheduledPurgeDate", "time", "since", "expires_on"})
    translate = staticmethod(_translate)


def _print(obj) -> None:
    emit(obj)


class ObjectId(click.ParamType):
    """An identity's object id: a UUID, as the directory makes them. Checked here, so a
    typo or a display name given by mistake says so instead of an opaque 404."""
    name = "OBJECT_ID"

    def convert(self, value, param, ctx):
        try:
            return str(uuid.UUID(value))
        except ValueError:
            self.fail(f"{value!r} is not an object id (a UUID such as "
                      "3f2504e0-4f89-11d3-9a0c-0305e82c3301; `identity list` shows them)", param, ctx)


OBJECT_ID = ObjectId()


CLEAR = "clear"  # what an Rfc3339 option gives for its word that removes the setting


class Rfc3339(click.ParamType):
    """An RFC 3339 time, or one of `clear` (the words that remove the setting: CLEAR)."""
    name = "TIME"

    def __init__(self, *clear: str):
        self.clear = clear

    def convert(self, value, param, ctx):
        if value in self.clear:
            return CLEAR
        try:
            return parse_time(value)
        except ValueError as e:
            self.fail(f"{e}{' or ' + ' / '.join(self.clear) if self.clear else ''}", param, ctx)


def _usage(message: str) -> CliError:
    return CliError(message, code="UsageError", exit_code=EXIT_USAGE)


def _call(fn, *, bounded: bool = True):
    """Run `fn(client)` against the service the settings name; `bounded`: within a
    deadline (every command but `events`, which follows the stream for good)."""
    url = SETTINGS.get("KEYSERVICE_URL")
    cred_path = SETTINGS.get("KEYSERVICE_CREDENTIAL")
    if not url or not cred_path:
        raise _usage("set KEYSERVICE_URL and KEYSERVICE_CREDENTIAL (a credential file), in the "
                     "environment or the settings file (see --help)")
    timeout = _request_timeout()
    if bounded:
        deadline.arm(4 * timeout + DEADLINE_MARGIN, f"keyservice {' '.join(sys.argv[1:3])}",
                     output_format())
    cred = load_credential(cred_path)
    ssl_context = _client_ssl(url)

    async def run():
        async with KeyServiceClient(url, cred, ssl=ssl_context, timeout=timeout) as client:
            return await fn(client)
    return asyncio.run(run())


def load_credential(path: str) -> Credential:
    """The credential file, or a usage error that says what is wrong with it."""
    try:
        return Credential.load(path)
    except OSError as e:
        raise _usage(f"cannot read credential file {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise _usage(f"credential file {path} is not JSON ({e}); it should hold client_id, "
                     "client_secret, tenant_id and object_id, as `identity create "
                     "--output-credential` writes it") from None
    except (KeyError, TypeError) as e:
        raise _usage(f"credential file {path} lacks {e}: it should hold client_id, "
                     "client_secret, tenant_id and object_id") from None


def _request_timeout() -> float:
    try:
        return SETTINGS.seconds("KEYSERVICE_TIMEOUT", DEFAULT_TIMEOUT)
    except ConfigError as e:
        raise _usage(str(e)) from None


def _client_ssl(url):
    """KEYSERVICE_CA: the CA that signed the service's certificate (else the system's CAs)."""
    from daemonkit.tls import TlsConfigError

    from .client import client_context
    ca = SETTINGS.get("KEYSERVICE_CA")
    if not ca:
        return None  # https:// verifies against the system's CAs; http:// needs nothing
    if not url.startswith("https://"):
        raise _usage(f"KEYSERVICE_CA is set but KEYSERVICE_URL is not https://: {url}")
    try:
        return client_context(ca)
    except TlsConfigError as e:
        raise _usage(str(e)) from None


def _show(method, path, body=None, params=None):
    result = _call(lambda c: c.request(method, path, body, params))
    _print(result if result is not None else {"status": "ok"})


@click.group(cls=KeyServiceCommands)
@click.version_option(version(), prog_name="keyservice",
                      message=fips_version_message("KEYSERVICE_FIPS", ("pinned", "system")))
def main():
    """Key service: a key vault for the encrypted disk platform."""


@main.command(cls=click.Command)
@click.option("--data-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--listen", default="127.0.0.1:8443", show_default=True, help="HOST:PORT")
@click.option("--base-url", help="URL clients use to reach the service (the base of every kid)")
@click.option("--master-key-file", type=click.Path(dir_okay=False),
              help="default: $CREDENTIALS_DIRECTORY/master-key, else DATA_DIR/master-key")
@click.option("--token-lifetime", default=3600, show_default=True, type=click.IntRange(60, 86400),
              help="bearer token lifetime, seconds")
@click.option("--heartbeat", default=5.0, show_default=True, type=click.FloatRange(0.1, 60),
              help="seconds between change-stream keepalives")
@click.option("--tls-dir", type=click.Path(file_okay=False),
              help="HTTPS with DIR/server-cert.pem and DIR/server-key.pem (see `keyservice tls init`)")
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="HTTPS certificate (with --tls-key)")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="its private key (0600)")
@click.option("--insecure-plain-http", is_flag=True,
              help="allow plain HTTP on a non-loopback address (only behind a TLS proxy on this host)")
@click.option("--http-header-timeout", default=10.0, show_default=True, type=click.FloatRange(0.1, 600),
              help="seconds a client has to send a request's headers (slowloris guard)")
@click.option("--http-body-timeout", default=30.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help="seconds a client has to send a request's body after its headers")
@click.option("--max-connections", default=512, show_default=True, type=click.IntRange(1, 65536),
              help="open HTTP connections; more are answered 503")
@click.option("--reserved-vault-prefix", "reserved", multiple=True,
              help="also reserve vault names starting with this for the platform role "
                   "(repeat; nbd-platform is always reserved)")
@click.option("--vault-domain", help="also serve vault V as https://V.DOMAIN/keys (Key Vault's "
              "addressing, for the Azure SDKs; docs/azure-clients.md)")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="INFO",
              show_default=True)
@click.option("--log-format", type=click.Choice(LOG_FORMATS), default="text", show_default=True,
              help="json: one object per line, with request ids (docs/operations.md, \"Logs\")")
@click.option("--metrics-listen", metavar="HOST:PORT",
              help="also serve /metrics, /healthz and /readyz here, plain HTTP "
                   "(docs/operations.md, \"Monitoring\")")
@click.option("--pkcs11-module", type=click.Path(dir_okay=False),
              help="PKCS#11 library for RSA-HSM keys (docs/operations.md, \"HSM\")")
@click.option("--pkcs11-token", help="label of the token to use (with --pkcs11-module)")
@click.option("--pkcs11-pin-file", type=click.Path(dir_okay=False),
              help="the token's user PIN, a 0600 file; default $CREDENTIALS_DIRECTORY/pkcs11-pin")
@click.option("--seal", type=click.Choice(["file", "pkcs11"]), default="file", show_default=True,
              help="pkcs11: the master key sealed by an AES key in the token (new data directories)")
@click.option("--state", metavar="sqlite|postgresql://...",
              help="where vaults, keys and the audit log live: sqlite in the data directory "
                   "(default), or a PostgreSQL database several instances share (also "
                   "KEYSERVICE_STATE; docs/operations.md, \"State on PostgreSQL\")")
@click.option("--fips", "fips_mode", is_flag=True, envvar="KEYSERVICE_FIPS", show_envvar=True,
              help="FIPS mode: all cryptography in OpenSSL's FIPS provider, or no start "
                   "(docs/operations.md, \"FIPS mode\")")
@click.option("--fips-dir", type=click.Path(file_okay=False), envvar="FIPS_DIR",
              help="the FIPS provider trees (default: the checkout's .cache/fips)")
def serve(data_dir, listen, base_url, master_key_file, token_lifetime, heartbeat, tls_dir, tls_cert,
          tls_key, insecure_plain_http, http_header_timeout, http_body_timeout, max_connections, reserved,
          vault_domain, log_level, log_format, metrics_listen, pkcs11_module, pkcs11_token,
          pkcs11_pin_file, seal, state, fips_mode, fips_dir):
    """Run the key service daemon."""
    if fips_mode:  # first: this re-executes the process once (daemonkit/fips.py)
        start_fips(fips_dir, data_dir)
    from daemonkit.httpguard import HttpLimits
    from daemonkit.tls import TlsConfigError

    from .database import StateError, is_postgres
    from .sealing import MasterKeyError
    from .server import ServeConfig, open_service
    from .server import serve as run_server
    from .tls import check_plain_http, server_context_from
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise click.UsageError("--listen must be HOST:PORT")
    try:
        ssl_context = server_context_from(tls_dir, tls_cert, tls_key)
        check_plain_http(host.strip("[]") or "127.0.0.1", ssl_context is not None, insecure_plain_http)
    except TlsConfigError as e:
        click.echo(f"keyservice: cannot start: {e}", err=True)
        sys.exit(2)
    if metrics_listen is not None:
        m_host, m_sep, m_port = metrics_listen.rpartition(":")
        if not m_sep or not m_port.isdigit():
            raise click.UsageError("--metrics-listen must be HOST:PORT")
    configure_logging(log_level, log_format)
    config = ServeConfig(data_dir=data_dir, host=host.strip("[]") or "127.0.0.1", port=int(port),
                         base_url=base_url, master_key_file=master_key_file,
                         token_lifetime=token_lifetime, heartbeat=heartbeat, ssl_context=ssl_context,
                         vault_domain=vault_domain,
                         metrics_listen=(m_host.strip("[]") or "127.0.0.1", int(m_port))
                         if metrics_listen is not None else None)
    config.reserved_vault_prefixes += tuple(reserved)
    if (pkcs11_module is None) != (pkcs11_token is None) or (pkcs11_pin_file and not pkcs11_module):
        raise click.UsageError("--pkcs11-module and --pkcs11-token go together (and --pkcs11-pin-file "
                               "with them)")
    config.pkcs11 = (pkcs11_module, pkcs11_token, pkcs11_pin_file) if pkcs11_module else None
    if seal == "pkcs11" and (not pkcs11_module or master_key_file):
        raise click.UsageError("--seal pkcs11 needs --pkcs11-module and --pkcs11-token, and takes "
                               "no --master-key-file")
    config.seal = seal
    try:
        state = state or SETTINGS.get("KEYSERVICE_STATE")
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    if state not in (None, "", "sqlite") and not is_postgres(state):
        raise click.UsageError("--state takes sqlite or a postgresql:// URL")
    config.state = state if is_postgres(state) else None
    config.http_limits = HttpLimits(header_timeout=http_header_timeout, body_timeout=http_body_timeout,
                                    max_connections=max_connections)
    try:
        service = open_service(config)
    except (MasterKeyError, StateError) as e:
        click.echo(f"keyservice: cannot start: {e}", err=True)
        sys.exit(1)
    except (OSError, sqlite3.Error) as e:
        click.echo(f"keyservice: cannot start: data directory {data_dir}: {e}", err=True)
        sys.exit(1)
    if fips_mode:
        service.record({"time": time.time(), "operation": "StartInFipsMode", "caller": "keyservice",
                        "status": 200, "fips": fips.STATUS.summary()})
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(run_server(config, service))
    except OSError as e:  # e.g. the port is taken
        click.echo(f"keyservice: cannot listen on {listen}: {e.strerror or e}", err=True)
        sys.exit(1)


def start_fips(fips_dir, data_dir: Path) -> None:
    from .domain import rsakeys
    try:
        status = fips.activate(fips_dir, Path(data_dir).resolve() / "fips")
    except fips.FipsError as e:
        click.echo(f"keyservice: cannot start in FIPS mode: {e}", err=True)
        sys.exit(1)
    rsakeys.FIPS_MODE = True
    click.echo(f"keyservice: {status.summary()}", err=True)


# -- identities --
@main.group()
def identity():
    """Identities (the directory)."""


@identity.command("create")
@click.argument("name")
@click.option("--type", "type_", default="managedIdentity", show_default=True,
              type=click.Choice(["user", "servicePrincipal", "managedIdentity"]))
@click.option("--role", "roles", multiple=True, type=click.Choice(["admin", "platform"]))
@click.option("--tenant-id", help="a new tenant (admins of the home tenant only); default: your own")
@click.option("--output-credential", type=click.Path(dir_okay=False),
              help="also write the new credential file here (0600)")
def identity_create(name, type_, roles, tenant_id, output_credential):
    """Create an identity; prints its client secret once."""
    request = {"displayName": name, "type": type_, "roles": list(roles)}
    if tenant_id:
        request["tenantId"] = tenant_id
    body = _call(lambda c: c.request("POST", "/identities", request))
    _print_credential(body, output_credential)


def _print_credential(body, output_credential):
    if output_credential:
        Credential(body["clientId"], body["clientSecret"], body["tenantId"],
                   body["objectId"]).dump(output_credential)
    _print(body)


@identity.command("list")
def identity_list():
    """The identities of your tenant (admin)."""
    _show("GET", "/identities")


@identity.command("show")
@click.argument("object_id", type=OBJECT_ID)
def identity_show(object_id):
    _show("GET", f"/identities/{object_id}")


@identity.command("disable")
@click.argument("object_id", type=OBJECT_ID)
def identity_disable(object_id):
    """No new tokens, and its current tokens stop working at once."""
    _show("PATCH", f"/identities/{object_id}", {"enabled": False})


@identity.command("enable")
@click.argument("object_id", type=OBJECT_ID)
def identity_enable(object_id):
    _show("PATCH", f"/identities/{object_id}", {"enabled": True})


@identity.command("delete")
@click.argument("object_id", type=OBJECT_ID)
def identity_delete(object_id):
    """Delete an identity and its access policies."""
    _show("DELETE", f"/identities/{object_id}")


@identity.command("reset-secret")
@click.argument("object_id", type=OBJECT_ID)
@click.option("--output-credential", type=click.Path(dir_okay=False),
              help="also write the new credential file here (0600)")
def identity_reset_secret(object_id, output_credential):
    """A new client secret, printed once; the old secret and its tokens stop working."""
    body = _call(lambda c: c.request("POST", f"/identities/{object_id}/secret"))
    _print_credential(body, output_credential)


# -- vaults --
@main.group()
def vault():
    """Vaults."""


@vault.command("create")
@click.argument("name")
@click.option("--location", required=True)
@click.option("--subscription", required=True)
@click.option("--retention-days", default=90, show_default=True, type=int)
@click.option("--enable-purge-protection", is_flag=True)
def vault_create(name, location, subscription, retention_days, enable_purge_protection):
    _show("POST", "/vaults", {"name": name, "location": location, "subscription": subscription,
                              "softDeleteRetentionInDays": retention_days,
                              "enablePurgeProtection": enable_purge_protection})


@vault.command("show")
@click.argument("name")
@click.option("--deleted", is_flag=True, help="show the soft-deleted vault")
def vault_show(name, deleted):
    _show("GET", f"/{'deletedvaults' if deleted else 'vaults'}/{name}")


@vault.command("list")
@click.option("--deleted", is_flag=True)
def vault_list(deleted):
    _show("GET", "/deletedvaults" if deleted else "/vaults")


@vault.command("delete")
@click.argument("name")
def vault_delete(name):
    _show("DELETE", f"/vaults/{name}")


@vault.command("recover")
@click.argument("name")
def vault_recover(name):
    _show("POST", f"/deletedvaults/{name}/recover")


@vault.command("purge")
@click.argument("name")
def vault_purge(name):
    _show("DELETE", f"/deletedvaults/{name}")


@vault.command("update")
@click.argument("name")
@click.option("--enable-purge-protection", is_flag=True, required=True)
def vault_update(name, enable_purge_protection):
    _show("PATCH", f"/vaults/{name}", {"enablePurgeProtection": enable_purge_protection})


# -- keys --
@main.group()
def key():
    """Keys."""


def _key_path(vault, name, version=None):
    return f"/vaults/{vault}/keys/{name}" + (f"/{version}" if version else "")


@key.command("create")
@click.argument("vault")
@click.argument("name")
@click.option("--size", default=3072, show_default=True, type=int)
@click.option("--kty", type=click.Choice(["RSA", "RSA-HSM"]), default="RSA", show_default=True,
              help="RSA-HSM: made and used inside the service's PKCS#11 token, never exported")
@click.option("--ops", type=click.Choice(["import"]),
              help="import: a key-exchange key for BYOK (RSA-HSM; it can do nothing else)")
def key_create(vault, name, size, kty, ops):
    body = {"kty": kty, "key_size": size}
    if ops:
        body["key_ops"] = [ops]
    _show("POST", _key_path(vault, name) + "/create", body)


@key.command("import")
@click.argument("vault")
@click.argument("name")
@click.option("--pem", "pem_file", type=click.File("r"), help="unencrypted PEM private key")
@click.option("--byok-file", type=click.File("rb"),
              help="BYOK: a key transfer blob for --kek-kid (docs/keyservice-api.md, \"BYOK\")")
@click.option("--kek-kid", help="the key-exchange key the --byok-file was made for")
def key_import(vault, name, pem_file, byok_file, kek_kid):
    if (pem_file is None) == (byok_file is None) or (byok_file is None) != (kek_kid is None):
        raise click.UsageError("give --pem FILE, or --byok-file FILE with --kek-kid KID")
    if pem_file is not None:
        _show("PUT", _key_path(vault, name), {"pem": pem_file.read()})
        return
    from .byok import transfer_blob_jwk
    _show("PUT", _key_path(vault, name), {"key": transfer_blob_jwk(byok_file.read(), kek_kid)})


@key.command("show")
@click.argument("vault")
@click.argument("name")
@click.option("--version")
@click.option("--deleted", is_flag=True)
def key_show(vault, name, version, deleted):
    _show("GET", f"/vaults/{vault}/deletedkeys/{name}" if deleted else _key_path(vault, name, version))


@key.command("list")
@click.argument("vault")
@click.argument("name", required=False)
@click.option("--deleted", is_flag=True)
def key_list(vault, name, deleted):
    """List VAULT's keys; with NAME, that key's versions."""
    if name:
        _show("GET", _key_path(vault, name) + "/versions")
    else:
        _show("GET", f"/vaults/{vault}/{'deletedkeys' if deleted else 'keys'}")


@key.command("versions")
@click.argument("vault")
@click.argument("name")
def key_versions(vault, name):
    _show("GET", _key_path(vault, name) + "/versions")


@key.command("rotate")
@click.argument("vault")
@click.argument("name")
def key_rotate(vault, name):
    _show("POST", _key_path(vault, name) + "/rotate")


@key.command("delete")
@click.argument("vault")
@click.argument("name")
def key_delete(vault, name):
    _show("DELETE", _key_path(vault, name))


@key.command("recover")
@click.argument("vault")
@click.argument("name")
def key_recover(vault, name):
    _show("POST", f"/vaults/{vault}/deletedkeys/{name}/recover")


@key.command("purge")
@click.argument("vault")
@click.argument("name")
def key_purge(vault, name):
    _show("DELETE", f"/vaults/{vault}/deletedkeys/{name}")


@key.command("update")
@click.argument("vault")
@click.argument("name")
@click.option("--version", help="default: the current version")
@click.option("--enable/--disable", "enabled", default=None, help="allow or stop every operation")
@click.option("--expires", type=Rfc3339("never"), metavar="TIME|never",
              help="no operation from this RFC 3339 time on (2027-01-01T00:00:00Z); never: remove")
@click.option("--not-before", type=Rfc3339("none"), metavar="TIME|none",
              help="no operation before this RFC 3339 time; none: remove")
@click.option("--ops", help="the operations the version allows, comma-separated (wrapKey,unwrapKey)")
def key_update(vault, name, version, enabled, expires, not_before, ops):
    """Change a key version's attributes: enabled, expiry, not-before, operations."""
    attributes = {}
    if enabled is not None:
        attributes["enabled"] = enabled
    if expires is not None:  # JSON null removes the attribute (Key Vault's PATCH)
        attributes["exp"] = None if expires == CLEAR else int(expires)
    if not_before is not None:
        attributes["nbf"] = None if not_before == CLEAR else int(not_before)
    body: dict = {"attributes": attributes} if attributes else {}
    if ops is not None:
        body["key_ops"] = [o.strip() for o in ops.split(",") if o.strip()]
    if not body:
        raise _usage("give at least one of --enable/--disable, --expires, --not-before, --ops")
    _show("PATCH", _key_path(vault, name, version), body)


def _set_enabled(vault, name, version, enabled):
    _show("PATCH", _key_path(vault, name, version), {"attributes": {"enabled": enabled}})


@key.command("disable")
@click.argument("vault")
@click.argument("name")
@click.option("--version")
def key_disable(vault, name, version):
    _set_enabled(vault, name, version, False)


@key.command("enable")
@click.argument("vault")
@click.argument("name")
@click.option("--version")
def key_enable(vault, name, version):
    _set_enabled(vault, name, version, True)


def _crypto(op, vault, name, version, value, alg):
    _show("POST", _key_path(vault, name, version) + "/" + op, {"alg": alg, "value": value})


@key.command("wrap")
@click.argument("vault")
@click.argument("name")
@click.option("--version")
@click.option("--value", required=True, help="base64url bytes to wrap")
@click.option("--alg", default="RSA-OAEP-256", show_default=True)
def key_wrap(vault, name, version, value, alg):
    _crypto("wrapkey", vault, name, version, value, alg)


@key.command("unwrap")
@click.argument("vault")
@click.argument("name")
@click.option("--version")
@click.option("--value", required=True, help="base64url wrapped bytes")
@click.option("--alg", default="RSA-OAEP-256", show_default=True)
def key_unwrap(vault, name, version, value, alg):
    _crypto("unwrapkey", vault, name, version, value, alg)


# -- access policies --
@main.group()
def policy():
    """Vault access policies."""


@policy.command("set")
@click.argument("vault")
@click.option("--object-id", required=True, type=OBJECT_ID)
@click.option("--key-permissions", required=True, help="comma-separated, e.g. get,wrapKey,unwrapKey")
def policy_set(vault, object_id, key_permissions):
    perms = [p.strip() for p in key_permissions.split(",") if p.strip()]
    _show("PUT", f"/vaults/{vault}/accessPolicies/{object_id}", {"permissions": {"keys": perms}})


@policy.command("delete")
@click.argument("vault")
@click.option("--object-id", required=True, type=OBJECT_ID)
def policy_delete(vault, object_id):
    _show("DELETE", f"/vaults/{vault}/accessPolicies/{object_id}")


@policy.command("list")
@click.argument("vault")
def policy_list(vault):
    _show("GET", f"/vaults/{vault}/accessPolicies")


# -- audit --
@main.group()
def audit():
    """The audit log (hash-chained)."""


@audit.command("show")
@click.argument("vault")
@click.option("--limit", type=click.IntRange(1, 10000), help="the first N entries (default 1000)")
@click.option("--tail", type=click.IntRange(1, 10000), help="the last N entries")
@click.option("--since", type=Rfc3339(), metavar="TIME",
              help="only entries at or after this RFC 3339 time (2026-12-06T07:55:00Z)")
def audit_show(vault, limit, tail, since):
    """VAULT's audit entries, oldest first."""
    if limit is not None and tail is not None:
        raise _usage("give --limit (the first N entries) or --tail (the last N), not both")
    params = {"tail": str(tail)} if tail is not None else {"limit": str(limit or 1000)}
    if since is not None:
        params["since"] = format_time(since)
    _show("GET", f"/vaults/{vault}/audit", params=params)


@audit.command("verify")
@click.argument("vault")
def audit_verify(vault):
    """Verify VAULT's chain; exits 1 if any entry was edited or removed."""
    result = _call(lambda c: c.request("GET", f"/vaults/{vault}/audit/verify"))
    _print(result)
    sys.exit(0 if result.get("valid") else 1)


@main.command()
@click.option("--since", type=int, help="resume after this seq")
def events(since):
    """Follow the change stream; one JSON event per line."""
    async def follow(c):
        async for e in c.events(since):
            click.echo(json.dumps(e), nl=True)
    _call(follow, bounded=False)


# -- backup --
@main.command("backup")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--data-dir", default="/var/lib/keyservice", show_default=True,
              type=click.Path(file_okay=False), help="the key service's data directory (running or not)")
@click.option("--include-master-key", is_flag=True,
              help="also copy the master key (0600): the backup then opens every key on its own")
@click.option("--master-key-file", type=click.Path(dir_okay=False),
              help="the master key's place when not the default (with --include-master-key)")
def backup(directory, data_dir, include_master_key, master_key_file):
    """Back up the key service's database, online, into the new DIRECTORY (0700, files 0600).

    Reads the data directory itself (SQLite's online backup), so it runs on the service's
    host as its user; restore: docs/operations.md, "Backup and restore"."""
    from daemonkit.backup import BackupError

    from .service_backup import backup_keyservice
    try:
        manifest = backup_keyservice(data_dir, directory, include_master_key=include_master_key,
                                     master_key_file=master_key_file)
    except BackupError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(manifest, indent=2, sort_keys=True))


# -- master key --
@main.command("rotate-master-key")
@click.option("--data-dir", default="/var/lib/keyservice", show_default=True,
              type=click.Path(file_okay=False), help="the key service's data directory (running or not)")
@click.option("--master-key-file", type=click.Path(dir_okay=False),
              help="the keyring's place when not the default")
@click.option("--status", "action", flag_value="status",
              help="only report which master key seals how many records")
@click.option("--retire", "action", flag_value="retire",
              help="drop the older keys no sealed record names any more")
@click.option("--pkcs11-module", type=click.Path(dir_okay=False),
              help="--seal pkcs11 data directories: the module, as for serve")
@click.option("--pkcs11-token", help="label of the token that seals the keyring")
@click.option("--pkcs11-pin-file", type=click.Path(dir_okay=False),
              help="the token's user PIN, a 0600 file; default $CREDENTIALS_DIRECTORY/pkcs11-pin")
@click.option("--state", metavar="sqlite|postgresql://...",
              help="the state serve uses (also KEYSERVICE_STATE), for its sealed records")
def rotate_master_key(data_dir, master_key_file, action, pkcs11_module, pkcs11_token,
                      pkcs11_pin_file, state):
    """Put a new master key first in the keyring; the older ones stay readable.

    Safe while the service runs: it re-seals every private key under the new key at its
    next start. Then --retire drops the old key (docs/operations.md, "Rotating the master
    key"). Prints the keys, the records under each, and what can be retired."""
    from .database import StateError, is_postgres
    from .master_rotation import rotate_master_key
    from .sealing import MasterKeyError
    if (pkcs11_module is None) != (pkcs11_token is None):
        raise click.UsageError("--pkcs11-module and --pkcs11-token go together")
    try:
        state = state or SETTINGS.get("KEYSERVICE_STATE")
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    if state not in (None, "", "sqlite") and not is_postgres(state):
        raise click.UsageError("--state takes sqlite or a postgresql:// URL")
    try:
        token = None
        if pkcs11_module:
            from .hsm import Pkcs11Token, read_pin
            token = Pkcs11Token(pkcs11_module, pkcs11_token, read_pin(pkcs11_pin_file))
        try:
            result = rotate_master_key(data_dir, master_key_file, action or "rotate", token,
                                       state=state if is_postgres(state) else None)
        finally:
            if token is not None:
                token.close()
    except (MasterKeyError, StateError) as e:  # HsmConfigError included
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(result, indent=2, sort_keys=True))


# -- status --
@main.command("status")
def status():
    """Ready or not and why, audit chains and entries, change-stream subscribers (needs
    only KEYSERVICE_URL). Exit 1: not ready; 3: unreachable."""
    from .status import readiness
    url = SETTINGS.get("KEYSERVICE_URL")
    if not url:
        raise _usage("set KEYSERVICE_URL, in the environment or the settings file (see --help)")
    timeout = _request_timeout()
    deadline.arm(timeout + DEADLINE_MARGIN, "keyservice status", output_format())
    report = asyncio.run(readiness(url, ssl=_client_ssl(url), timeout=timeout))
    _print(report)
    if not report["ready"]:
        sys.exit(EXIT_REFUSED)


# -- TLS --
@main.group()
def tls():
    """Certificates for HTTPS (test and demo set-ups; docs/tls.md for a real CA)."""


@tls.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--host", "hosts", multiple=True,
              help="a name or IP clients use to reach the service (repeat); loopback is always in")
@click.option("--days", default=825, show_default=True, type=click.IntRange(1, 3650))
@click.option("--force", is_flag=True, help="make a new CA even if DIRECTORY has one")
@click.option("--ca-key", type=click.Path(dir_okay=False),
              help="keep the CA's private key here (0600), not in DIRECTORY/ca-key.pem")
@click.option("--no-ca-key", is_flag=True,
              help="keep no CA key: it signs these certificates, then is gone")
def tls_init(directory, hosts, days, force, ca_key, no_ca_key):
    """Create a CA, a server and a client certificate in DIRECTORY (keys 0600)."""
    from daemonkit.tlsca import CaError, init_ca
    if ca_key and no_ca_key:
        raise click.UsageError("--ca-key and --no-ca-key contradict each other")
    try:
        written = init_ca(directory, hosts=hosts, days=days, force=force, ca_key_file=ca_key,
                          keep_ca_key=not no_ca_key)
    except CaError as e:
        raise click.UsageError(str(e)) from None
    _print({"directory": str(Path(directory).resolve()), "written": [p.name for p in written]})


__all__ = ["main", "parse_kid"]
