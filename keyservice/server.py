"""`keyservice serve`: open the store, bootstrap the admin, run the HTTP API.

Start-up order: the store (refuses without its master key), the admin
credential on first start, then the listener; READY=1 goes to systemd only
once the socket accepts. SIGTERM or SIGINT: STOPPING=1, stop accepting, end
the change streams, finish in-flight requests, close the database.
"""
import asyncio
import ctypes
import json
import logging
import os
import resource
import signal
import ssl as ssl_module
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from daemonkit.httpguard import GuardedRunner, HttpLimits
from daemonkit.httplog import MalformedRequestLog
from daemonkit.metrics import MetricsListener
from daemonkit.sdnotify import sd_notify, watchdog_loop
from daemonkit.statedb import StateUnavailable

from .api.addressing import Addressing
from .api.app import make_app
from .domain.names import DEFAULT_RESERVED_PREFIXES
from .domain.service import KeyService
from .master_rotation import reseal
from .store import Store
from .tokens import DEFAULT_LIFETIME, TokenSigner

log = logging.getLogger("keyservice")
SWEEP_INTERVAL = 60.0  # retention is counted in days; a minute of lateness is fine
EXPIRY_INTERVAL = 0.5  # key.expired must reach subscribers within a second of `exp`


@dataclass
class ServeConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8443
    base_url: str | None = None
    master_key_file: str | None = None
    token_lifetime: int = DEFAULT_LIFETIME
    heartbeat: float = 5.0
    ssl_context: ssl_module.SSLContext | None = None
    reserved_vault_prefixes: tuple[str, ...] = DEFAULT_RESERVED_PREFIXES
    http_limits: HttpLimits = HttpLimits()
    vault_domain: str | None = None  # vaults also as https://{vault}.{domain}/keys (docs/azure-clients.md)
    metrics_listen: tuple[str, int] | None = None  # a listener of its own for the probes and /metrics
    pkcs11: tuple[str, str, str | None] | None = None  # module, token label, PIN file (hsm.py)
    seal: str = "file"  # "pkcs11": the master key sealed in the token (hsm_seal.py)
    state: str | None = None  # a postgresql:// URL; None: SQLite in data_dir (store.py)


def open_service(config: ServeConfig) -> KeyService:
    token = None
    if config.pkcs11 is not None:
        from .hsm import Pkcs11Token, read_pin  # python-pkcs11 only where it is used
        module, label, pin_file = config.pkcs11
        token = Pkcs11Token(module, label, read_pin(pin_file))
        log.info("RSA-HSM keys in PKCS#11 token %r", label)
    if config.seal == "pkcs11":
        from .hsm_seal import master_from_token
        assert token is not None, "the CLI requires --pkcs11-module for --seal pkcs11"
        store = Store(config.data_dir, master_key=master_from_token(token, config.data_dir),
                      state=config.state)
    else:
        store = Store(config.data_dir, config.master_key_file, state=config.state)
    # After a master key rotation: every blob under the new key before serving (master_rotation.py).
    reseal(store)
    log.info("state in %s", store.describe())
    scheme = "https" if config.ssl_context else "http"
    host = f"[{config.host}]" if ":" in config.host else config.host
    base = config.base_url or f"{scheme}://{host}:{config.port}"
    service = KeyService(store, TokenSigner(store.token_key, config.token_lifetime), base_url=base,
                         reserved_prefixes=config.reserved_vault_prefixes,
                         audiences=Addressing(base, config.vault_domain).audiences)
    service.hsm = token
    path = Path(config.data_dir) / "admin.credential"

    def deliver(ident, secret):
        write_credential(path, {"client_id": ident.client_id, "client_secret": secret,
                                "tenant_id": ident.tenant_id, "object_id": ident.object_id})
    admin = service.bootstrap_admin(deliver)
    if admin is not None:
        log.info("created the admin identity %s; credential in %s", admin.object_id, path)
    return service


def write_credential(path: Path, data: dict) -> None:
    """Created 0600 from the start (never briefly world-readable), then fsynced."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def harden_process() -> None:
    """No core dumps: unwrapKey needs the private keys in this process's memory, and a
    core file would put them on disk in the clear (RLIMIT_CORE 0); PR_SET_DUMPABLE 0
    also keeps unprivileged users from attaching or reading /proc/PID/mem."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE, <linux/prctl.h>
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


async def serve(config: ServeConfig, service: KeyService) -> None:
    harden_process()
    logging.getLogger("aiohttp.server").addFilter(MalformedRequestLog())
    # Signal handlers first: a SIGTERM right after READY=1 must be a clean stop.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = make_app(service, heartbeat=config.heartbeat, vault_domain=config.vault_domain)
    # Changes committed by other instances on a shared database wake this one's change
    # streams too (a no-op on SQLite, which one process owns).
    service.store.follow_changes(lambda: loop.call_soon_threadsafe(app["bus"].publish))
    runner = GuardedRunner(app, limits=config.http_limits, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, ssl_context=config.ssl_context,
                       reuse_address=True)
    await site.start()
    log.info("listening on %s (kids use %s)", site.name, service.base_url)
    listener = None
    if config.metrics_listen is not None:
        from .api import health, metrics
        listener = MetricsListener({"/healthz": health.healthz, "/readyz": health.readyz,
                                    "/metrics": metrics.metrics},
                                   shared={k: app[k] for k in ("domain", "tally", "bus")})
        await listener.start(*config.metrics_listen)
    sd_notify("READY=1")
    timers = [
        asyncio.create_task(_every(app, SWEEP_INTERVAL, "sweep",
                                   "purged %d item(s) whose retention ended")),
        asyncio.create_task(_every(app, EXPIRY_INTERVAL, "announce_expiries",
                                   "%d key version(s) expired")),
        asyncio.create_task(watchdog_loop()),
    ]
    await stop.wait()
    sd_notify("STOPPING=1")
    log.info("stopping")
    for t in timers:
        t.cancel()
    if listener is not None:
        await listener.stop()
    await runner.cleanup()
    service.store.close()
    log.info("stopped")


async def _every(app, interval: float, method: str, message: str) -> None:
    """Run a time-driven domain task (retention sweep, expiry announcements)."""
    domain = app["domain"]
    while True:
        try:
            done = await domain.run(getattr(domain.service, method))
            if done:
                log.info(message, done)
        except StateUnavailable as e:  # the database is down: the next round retries
            log.warning("%s not run: %s", method, e)
        except Exception:
            log.exception("%s failed", method)
        await asyncio.sleep(interval)
