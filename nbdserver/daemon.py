"""`nbdserver serve`: the NBD server, the disk platform and its API in one process.

Start order: platform state and keys (no disk is opened: each opens when a client
attaches, so this costs the same for ten disks or ten thousand), the key access watcher,
the NBD listener, the API listener; then READY=1 to systemd. Stop order
is the reverse, finishing in-flight NBD requests before disks are closed and DEKs wiped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3

from aiohttp import web

from daemonkit.metrics import MetricsListener, metrics_response
from daemonkit.sdnotify import sd_notify
from daemonkit.statedb import StateError
from daemonkit.tls import is_loopback
from keyservice.client import CallTally, Credential, KeyServiceClient

from .api import build_app, load_api_token, observability_routes
from .exports import ExportCatalog
from .health import Readiness
from .iopool import IoPool
from .metrics import PlatformCollector, registry_for
from .platform.access import KeyAccess
from .platform.errors import PlatformError
from .platform.leases import DiskLeases
from .platform.sealing import MasterKeyError
from .platform.service import Platform
from .platform.state import SchemaTooNew
from .platform.storage import CephClient, VolumeStorage
from .protocol.handshake import TlsMode
from .server import NbdServer
from .visibility import ExportList

log = logging.getLogger("nbdserver")


class StartupError(Exception):
    """The daemon cannot start, for a reason its message gives (a condition, not a bug)."""


async def serve_forever(stop: asyncio.Event, *, data_dir, api_ssl=None,
                        nbd_listen, api_listen, keyservice_url,
                        credential_file, master_key_file=None, lease=60.0, grace=3600.0,
                        idle_close=60.0, workers=8, ssl=None, tls_mode=None, tls_context=None,
                        nbd_limits=None, nbd_export_list=None, metrics_listen=None,
                        io_processes=1, cache="writeback", vault_domain=None,
                        storage="file", ceph=None, state=None, disk_lease=15.0) -> None:
    catalog = ExportCatalog()
    tally = KeyServiceClient.tally = CallTally()  # this process's calls, for the metrics
    # Resolved before anything uses it: a relative path would mean another directory
    # for whoever starts the daemon from elsewhere (systemd, a shell in another cwd).
    data_dir = os.path.abspath(data_dir)
    try:
        credential = Credential.load(credential_file)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StartupError(f"cannot read the key service credential {credential_file}: {e}") from None
    try:
        volume_storage = VolumeStorage(data_dir, storage, CephClient(**ceph) if ceph else None)
    except ValueError as e:
        raise StartupError(str(e)) from None
    try:
        platform = Platform(data_dir, catalog, keyservice_url, credential,
                            ssl=ssl, master_key_file=master_key_file, idle_close=idle_close,
                            storage=volume_storage, state_url=state, default_cache=cache,
                            vault_domain=vault_domain)
    except (MasterKeyError, OSError, sqlite3.Error, SchemaTooNew, StateError) as e:
        raise StartupError(f"cannot open the platform's state in {data_dir}: {e}") from None
    try:
        await platform.start()
    except PlatformError as e:  # e.g. first start, the key service down: no platform key yet
        await platform.stop()
        raise StartupError(e.message) from None
    if state is not None:  # several servers may share this state: one serves each disk
        leases = DiskLeases(platform, disk_lease)
        platform.use_leases(leases)
        leases.start()
    access = KeyAccess(platform, lease=lease, grace=grace)
    platform.use_key_access(access)
    access.start()
    # tls_mode None: off (the CLI resolves the default; see nbdserver/tls.py).
    server = NbdServer(catalog, workers=workers, tls_mode=tls_mode or TlsMode.OFF,
                       tls_context=tls_context, limits=nbd_limits,
                       export_list=nbd_export_list or ExportList.AUTHENTICATED)
    if io_processes > 1:  # plain-TCP connections in transmission go to I/O worker processes
        server.handoff = IoPool(io_processes, catalog, admission=server.admission,
                                buffer_budget=server.limits.buffer_budget, threads=workers)
        server.handoff.start()
    nbd_addrs = await server.listen(*nbd_listen)
    nbd_host, nbd_port = nbd_addrs[0][:2]
    nbd_address = f"[{nbd_host}]:{nbd_port}" if ":" in nbd_host else f"{nbd_host}:{nbd_port}"
    from daemonkit.httpguard import GuardedRunner, HttpLimits  # slowloris guard
    token = load_api_token(data_dir)
    readiness = Readiness(catalog, access)

    def metrics(per_disk: bool):
        return metrics_response(registry_for(PlatformCollector(
            catalog, access, tally=tally, connections=lambda: len(server.connections),
            per_disk=per_disk)))
    runner = GuardedRunner(build_app(platform, token, nbd_address=nbd_address,
                                     readiness=readiness.report, metrics=metrics),
                           limits=HttpLimits.from_env("NBDSERVER_API"), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, api_listen[0], api_listen[1], ssl_context=api_ssl)
    await site.start()
    api_addr = runner.addresses[0][:2]  # the listener's real address (port 0: the one chosen)
    listener, extra = None, ""
    if metrics_listen is not None:
        listener = MetricsListener(observability_routes(
            token, readiness.report, metrics, token_accepted=False,
            names_for_all=is_loopback(metrics_listen[0])))
        extra = " metrics={}:{}".format(*await listener.start(*metrics_listen))
    log.info("serving NBD on %s:%s, API on %s:%s", *nbd_addrs[0], *api_addr)
    print(f"READY nbd={nbd_addrs[0][0]}:{nbd_addrs[0][1]} api={api_addr[0]}:{api_addr[1]}{extra}",
          flush=True)
    sd_notify("READY=1")
    await stop.wait()
    sd_notify("STOPPING=1")
    readiness.stopping = True
    log.info("shutting down: finishing in-flight requests")
    await server.shutdown()
    await runner.cleanup()
    if listener is not None:
        await listener.stop()
    await access.stop()
    await platform.stop()  # releases the disk leases once its disks are closed (serving.py)
