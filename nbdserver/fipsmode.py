"""nbdserver's FIPS mode (`serve --fips`): daemonkit.fips for TLS and `cryptography`, and
the XTS engine's own library context with only the FIPS provider in it.

In FIPS mode the engine fetches AES-256-XTS with "fips=yes" from the provider tree
`DIR/pinned` (built with the OpenSSL it links, scripts/lib/openssl.sh), and
`crypto.generate_dek()` draws from that provider's DRBG. I/O worker processes inherit
`ENGINE_ENV` and do the same before they open a disk (`resume_in_worker`), so no
process of the daemon encrypts outside the provider. The provider runs its integrity
check and self-tests as it loads, in each process.

The engine loads its own copy of the pinned tree's fips.so (`DATA_DIR/fips/engine/`):
`cryptography`'s libcrypto has the same provider loaded in this process, and one shared
object cannot serve two libcryptos (the provider keeps its core's functions in globals,
and refuses a second core). The copy is byte for byte the module the configuration's
MAC covers, so the integrity check is the same.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from daemonkit import fips
from daemonkit.fips import FipsError, FipsStatus

from .crypto import _xts

# The engine's configuration and module copy, JSON, for I/O worker processes.
ENGINE_ENV = "NBDSERVER_FIPS_ENGINE"


def activate(fips_dir: str | None, data_dir: str) -> FipsStatus:
    """`serve --fips`, before anything else: re-executes once (daemonkit.fips.activate),
    then loads the engine's provider. Raises FipsError."""
    config_dir = Path(data_dir).resolve() / "fips"
    status = fips.activate(fips_dir, config_dir)
    pinned = fips.tree(fips.provider_dir(fips_dir), "pinned")
    config = pinned.write_config(config_dir, "openssl-fips-engine.cnf")
    modules = config_dir / "engine"
    modules.mkdir(mode=0o700, exist_ok=True)
    tmp = modules / "fips.so.tmp"
    shutil.copyfile(pinned.module, tmp)
    os.replace(tmp, modules / "fips.so")
    enable_engine(str(config), str(modules))
    os.environ[ENGINE_ENV] = json.dumps({"config": str(config), "modules": str(modules)})
    return status


def enable_engine(config: str, modules: str) -> None:
    try:
        name, version, _build = _xts.enable_fips(config, modules)
    except RuntimeError as e:
        raise FipsError(f"FIPS provider of the XTS engine: {e} ({modules}/fips.so)") from None
    fips.STATUS.providers["engine"] = {"libcrypto": _xts.OPENSSL_VERSION, "name": name,
                                       "version": version}


def resume_in_worker() -> None:
    """An I/O worker of a FIPS-mode server: the engine's provider before any disk opens.
    The worker's `ssl` and `cryptography` read the inherited OPENSSL_CONF by themselves."""
    value = os.environ.get(ENGINE_ENV)
    if value:
        engine = json.loads(value)
        enable_engine(engine["config"], engine["modules"])
        fips.STATUS.enabled = True
