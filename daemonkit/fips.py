"""FIPS mode (`--fips`): the daemon's cryptography runs in OpenSSL's FIPS provider, or the
daemon does not start.

A daemon process holds up to three libcryptos, each of which must load a FIPS provider it
can use (docs/operations.md, "FIPS mode"):
- the system's (Debian 12's OpenSSL 3.0): Python's `ssl`, so every TLS listener and client,
  `ssl.RAND_bytes`, and `hashlib`/`hmac`'s SHA-2. Its libssl finds no TLS cipher in a 3.5
  provider, so it loads the provider tree `DIR/system`, built from an OpenSSL 3.0 source;
- the `cryptography` wheel's (a later OpenSSL): RSA, AES-GCM seals, HKDF. It cannot draw
  random bytes from a 3.0 provider, so it loads `DIR/pinned`, the provider of the OpenSSL
  release scripts/lib/openssl.sh pins (a provider loads in its own or a later libcrypto);
- nbdserver's XTS engine (that pinned OpenSSL, static): `DIR/pinned` too, in a library
  context of its own (`nbdserver/fipsmode.py`).
The first two read their configuration once, when first used, from OPENSSL_CONF and
OPENSSL_MODULES, and both read the same variables. So `activate()` checks both trees (in
scratch library contexts of the system's libcrypto, where their integrity checks and
self-tests run and the first failing one is named), writes one configuration per tree
(the provider, the base provider, default properties "fips=yes"), and re-executes the
process; in the new process `boot()`, called by each daemon package's `__init__` before
anything imports `ssl` or `cryptography`, points the variables at one configuration, lets
the system's libcrypto start, then at the other for `cryptography`'s. `activate()` then
verifies that both are in FIPS mode and returns what runs.

A provider tree (scripts/lib/fips.sh) has `lib/ossl-modules/fips.so`, `ssl/fipsmodule.cnf`
(the `openssl fipsinstall` output: the module's integrity MAC) and `VERSION`. DIR is
`--fips-dir`, else $FIPS_DIR, else the checkout's `.cache/fips`. Nothing here falls back:
a missing module or configuration, a failed integrity check or self-test, or a libcrypto
not in FIPS mode after the re-exec raises `FipsError`.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Set in the re-executed process (and inherited by its children): JSON, per role the
# configuration and modules directory boot() gives a libcrypto, and the provider's release.
ACTIVE_ENV = "DAEMONKIT_FIPS"
ROLES = ("system", "pinned")
DIR_ENV = "FIPS_DIR"
# The OpenSSL releases whose FIPS provider is in a certificate (FIPS 140-2: 3.0.8, 3.0.9;
# FIPS 140-3: 3.1.2): only a module built from one of those is a validated module.
VALIDATED = frozenset({"3.0.8", "3.0.9", "3.1.2"})
DEFAULT_DIR = Path(__file__).resolve().parent.parent / ".cache" / "fips"


class FipsError(Exception):
    """FIPS mode cannot be had; the message says which check failed. Start is refused."""


@dataclass(frozen=True)
class ProviderTree:
    """One FIPS provider build: its module, its module configuration, its release."""

    root: Path

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "ossl-modules"

    @property
    def module(self) -> Path:
        return self.modules / "fips.so"

    @property
    def module_config(self) -> Path:
        return self.root / "ssl" / "fipsmodule.cnf"

    def check(self, role: str) -> ProviderTree:
        if not self.root.is_dir():
            raise FipsError(f"FIPS module missing: no provider tree {self.root} ({role})")
        if not self.module.is_file():
            raise FipsError(f"FIPS module missing: no {self.module} ({role} provider)")
        if not self.module_config.is_file():
            raise FipsError(f"FIPS module configuration missing: no {self.module_config} "
                            f"({role} provider; made by `openssl fipsinstall`)")
        return self

    def config_text(self) -> str:
        """An OpenSSL configuration with the FIPS provider (and base, which has no
        algorithms, for key encoders) active and every fetch restricted to fips=yes."""
        return (
            "config_diagnostics = 1\n"
            "openssl_conf = openssl_init\n"
            f".include {self.module_config}\n"
            "[openssl_init]\nproviders = provider_sect\nalg_section = algorithm_sect\n"
            "[provider_sect]\nfips = fips_sect\nbase = base_sect\n"
            "[base_sect]\nactivate = 1\n"
            "[algorithm_sect]\ndefault_properties = fips=yes\n")

    def write_config(self, directory: Path, name: str) -> Path:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = directory / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.config_text())
        os.replace(tmp, path)
        return path


def provider_dir(option: str | None) -> Path:
    return Path(option or os.environ.get(DIR_ENV) or DEFAULT_DIR)


def version_message(env: str, roles: tuple[str, ...]) -> str:
    """click's `--version` message: the version, whether FIPS mode is on (`env`, the
    daemon's FIPS variable, or an inherited activation) and which provider releases
    `--fips` loads. Reads a few files, loads nothing."""
    on = os.environ.get(env, "").lower() in ("1", "true", "yes", "on")
    return "%(prog)s, version %(version)s\n" + version_line(on, roles).replace("%", "%%")


def version_line(enabled: bool, roles: tuple[str, ...]) -> str:
    base = provider_dir(None)
    found = []
    for role in roles:
        version_file = (base / role).resolve() / "VERSION"
        try:
            release = version_file.read_text().strip()
        except OSError:
            found.append(f"{role}: missing")
            continue
        validated = "validated release" if release in VALIDATED else "not a validated build"
        found.append(f"{role}: OpenSSL FIPS provider {release}, {validated}")
    on = enabled or bool(os.environ.get(ACTIVE_ENV))
    return f"FIPS mode: {'on' if on else 'off'} ({'; '.join(found)})"


def tree(base: Path, role: str) -> ProviderTree:
    """`role` is "system" or "pinned"; resolved, so a tree behind a link is reported."""
    return ProviderTree((base / role).resolve()).check(role)


@dataclass
class FipsStatus:
    """What runs in FIPS mode, for --version, health, metrics and the audit log."""

    enabled: bool = False
    providers: dict[str, dict[str, str]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"enabled": self.enabled, "providers": self.providers}

    def summary(self) -> str:
        if not self.enabled:
            return "FIPS mode: off"
        return "FIPS mode: on (" + ", ".join(
            f"{role}: {p['libcrypto']} with {p['name']} {p['version']}"
            for role, p in self.providers.items()) + ")"


STATUS = FipsStatus()  # this process's; set by activate()


def health(body: dict) -> dict:
    """A /healthz body with `fips` (mode and providers) added in FIPS mode; without
    `--fips` the body stays what it was."""
    return {**body, "fips": STATUS.as_dict()} if STATUS.enabled else body


def random_bytes(n: int) -> bytes:
    """Secrets the daemons make outside a libcrypto call (identity secrets, token ids): in
    FIPS mode from the FIPS provider's DRBG through the system's libcrypto, else from the
    kernel as before (what `secrets` uses)."""
    if STATUS.enabled:
        import ssl
        return ssl.RAND_bytes(n)
    return os.urandom(n)


class FipsCollector:
    """`PREFIX_fips_mode`: 1 in FIPS mode, with one series per provider in use, so a
    dashboard or an alert sees the mode and the provider release without logs."""

    def __init__(self, prefix: str, status: FipsStatus = STATUS):
        self.prefix, self.status = prefix, status

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        family = GaugeMetricFamily(f"{self.prefix}_fips_mode",
                                   "1 when every cryptographic operation runs in OpenSSL's FIPS "
                                   "provider (--fips), per provider in use",
                                   labels=["role", "provider", "version"])
        if not self.status.enabled:
            family.add_metric(["", "", ""], 0)
        for role, p in sorted(self.status.providers.items()):
            family.add_metric([role, p["name"], p["version"]], 1)
        yield family


# ----------------------------------------------------------------- the system's libcrypto
class _Param(ctypes.Structure):  # OSSL_PARAM (include/openssl/core.h)
    _fields_ = [("key", ctypes.c_char_p), ("data_type", ctypes.c_uint), ("data", ctypes.c_void_p),
                ("data_size", ctypes.c_size_t), ("return_size", ctypes.c_size_t)]


_UTF8_STRING, _UTF8_PTR = 4, 6
_SELF_TEST_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(_Param), ctypes.c_void_p)


@functools.cache
def _libcrypto() -> ctypes.CDLL:
    import _ssl
    lib = ctypes.CDLL(_ssl.__file__)  # dlsym through it finds the libcrypto _ssl links
    for name, res, args in [
        ("OSSL_LIB_CTX_new", ctypes.c_void_p, []),
        ("OSSL_LIB_CTX_free", None, [ctypes.c_void_p]),
        ("OSSL_LIB_CTX_load_config", ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p]),
        ("OSSL_SELF_TEST_set_callback", None, [ctypes.c_void_p, _SELF_TEST_CB, ctypes.c_void_p]),
        ("OSSL_PROVIDER_set_default_search_path", ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p]),
        ("OSSL_PROVIDER_available", ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p]),
        ("OSSL_PROVIDER_load", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
        ("OSSL_PROVIDER_unload", ctypes.c_int, [ctypes.c_void_p]),
        ("OSSL_PROVIDER_get_params", ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(_Param)]),
        ("EVP_default_properties_is_fips_enabled", ctypes.c_int, [ctypes.c_void_p]),
        ("ERR_clear_error", None, []),
    ]:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def _param_text(params, key: bytes) -> str | None:
    i = 0
    while params[i].key is not None:
        p = params[i]
        if p.key == key and p.data:
            if p.data_type == _UTF8_STRING:
                return ctypes.string_at(p.data).decode(errors="replace")
            if p.data_type == _UTF8_PTR:
                return ctypes.cast(p.data, ctypes.POINTER(ctypes.c_char_p))[0].decode(errors="replace")
        i += 1
    return None


def _provider_params(lib: ctypes.CDLL, prov: int) -> dict[str, str]:
    values = [ctypes.c_char_p() for _ in range(2)]
    params = (_Param * 3)()
    for i, key in enumerate((b"name", b"version")):
        params[i] = _Param(key, _UTF8_PTR, ctypes.cast(ctypes.pointer(values[i]), ctypes.c_void_p), 0, 0)
    if not lib.OSSL_PROVIDER_get_params(prov, params):
        return {"name": "?", "version": "?"}
    return {k: (v.value or b"?").decode() for k, v in zip(("name", "version"), values, strict=True)}


def check_provider(provider: ProviderTree, config: Path, role: str) -> dict[str, str]:
    """Loads the provider into a fresh library context of the system's libcrypto: its
    integrity check and self-tests run, and the first one to fail is named. Returns its
    name and version. (The system's OpenSSL 3.0 loads a 3.5 provider well enough for
    that, though its libssl then finds no TLS cipher in it.)"""
    lib = _libcrypto()
    failed: list[str] = []

    def event(params, _arg) -> int:
        if _param_text(params, b"st-phase") == "Fail" and not failed:
            failed.append(f"{_param_text(params, b'st-type')} {_param_text(params, b'st-desc')}")
        return 1

    callback = _SELF_TEST_CB(event)  # kept alive until the context is freed below
    ctx = lib.OSSL_LIB_CTX_new()
    try:
        lib.OSSL_SELF_TEST_set_callback(ctx, callback, None)
        ok = (lib.OSSL_PROVIDER_set_default_search_path(ctx, str(provider.modules).encode())
              and lib.OSSL_LIB_CTX_load_config(ctx, str(config).encode())
              and lib.OSSL_PROVIDER_available(ctx, b"fips"))
        lib.ERR_clear_error()
        if failed:
            what = "integrity check failed" if "Integrity" in failed[0] else "self-test failed"
            raise FipsError(f"FIPS provider {what}: {failed[0]} ({provider.module}, {role})")
        if not ok:
            raise FipsError(f"the FIPS provider {provider.module} ({role}) does not load")
        prov = lib.OSSL_PROVIDER_load(ctx, b"fips")
        info = _provider_params(lib, prov)
        lib.OSSL_PROVIDER_unload(prov)
        return info
    finally:
        lib.OSSL_LIB_CTX_free(ctx)


def boot() -> None:
    """In a process `activate()` re-executed (or its children): each libcrypto starts with
    its own configuration. Must run before anything imports `ssl`, `hashlib` or
    `cryptography`: the daemon packages' `__init__` call it. A no-op otherwise."""
    value = os.environ.get(ACTIVE_ENV)
    if not value or "_ssl" in sys.modules:
        return
    roles = json.loads(value)
    system_conf, system_modules = roles["system"]["config"], roles["system"]["modules"]
    os.environ.update(OPENSSL_CONF=system_conf, OPENSSL_MODULES=system_modules)
    import _hashlib  # noqa: F401 - the system's libcrypto reads its configuration now
    import _ssl  # noqa: F401
    os.environ.update(OPENSSL_CONF=roles["pinned"]["config"], OPENSSL_MODULES=roles["pinned"]["modules"])
    from cryptography.hazmat.bindings._rust import openssl  # noqa: F401 - and cryptography's
    # Children that are not ours (none today) would read the system's configuration.
    os.environ.update(OPENSSL_CONF=system_conf, OPENSSL_MODULES=system_modules)


def _verify_after_exec(roles: dict) -> dict[str, dict[str, str]]:
    """Both libcryptos that read OPENSSL_CONF must now fetch from the FIPS provider only."""
    import ssl

    from cryptography.hazmat.bindings._rust import openssl as rust_openssl
    from cryptography.hazmat.primitives import hashes
    lib = _libcrypto()
    if not (lib.EVP_default_properties_is_fips_enabled(None)
            and lib.OSSL_PROVIDER_available(None, b"fips")):
        raise FipsError("the system's OpenSSL did not start in FIPS mode")
    prov = lib.OSSL_PROVIDER_load(None, b"fips")
    system = _provider_params(lib, prov)
    lib.OSSL_PROVIDER_unload(prov)
    if not rust_openssl.is_fips_enabled():
        raise FipsError("cryptography's OpenSSL did not start in FIPS mode")
    try:  # MD5 is in no FIPS provider: if it hashes, something else answered the fetch
        h = hashes.Hash(hashes.MD5())
        h.update(b"")
        h.finalize()
    except Exception:  # noqa: BLE001 - UnsupportedAlgorithm or InternalError, both mean refused
        pass
    else:
        raise FipsError("cryptography's OpenSSL still serves MD5: not in FIPS mode")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    except ssl.SSLError as e:
        raise FipsError(f"the system's TLS cannot run in FIPS mode: {e}") from None
    return {"system": {"libcrypto": ssl.OPENSSL_VERSION, **system},
            "cryptography": {"libcrypto": rust_openssl.openssl_version_text(),
                             "name": roles["pinned"]["name"], "version": roles["pinned"]["version"]}}


def activate(fips_dir: str | None, config_dir: Path) -> FipsStatus:
    """Call first thing in `serve --fips`. The first call re-executes the process (it does
    not return); in the re-executed process it verifies and returns what runs. Raises
    FipsError, whose message the daemon prints before exiting non-zero."""
    if os.environ.get(ACTIVE_ENV):
        if "_ssl" not in sys.modules:
            raise FipsError("the daemon's package did not call daemonkit.fips.boot()")
        STATUS.providers.update(_verify_after_exec(json.loads(os.environ[ACTIVE_ENV])))
        STATUS.enabled = True
        return STATUS
    base = provider_dir(fips_dir)
    roles = {}
    for role in ROLES:
        provider = tree(base, role)
        config = provider.write_config(config_dir, f"openssl-fips-{role}.cnf")
        info = check_provider(provider, config, role)
        roles[role] = {"config": str(config), "modules": str(provider.modules), **info}
    env = dict(os.environ)
    env[ACTIVE_ENV] = json.dumps(roles)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    raise AssertionError("unreachable")
