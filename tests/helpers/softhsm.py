"""A real SoftHSM2 token in a temporary directory, for RSA-HSM keys (keyservice/hsm.py).

SOFTHSM2_CONF names a configuration of our own whose tokendir is a temporary directory,
so tokens never touch the machine's /var/lib/softhsm. SoftHSM reads SOFTHSM2_CONF once
per process, when the library initialises: so every token of a test run lives in one
tokendir (removed at exit), each under a label of its own, and the test process, which
opens sessions to look at what the service made, sees them all. The PIN goes to a 0600
file, as the key service wants it.
"""
import atexit
import os
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

MODULE = "/usr/lib/softhsm/libsofthsm2.so"


@dataclass
class SoftHsmToken:
    label: str
    pin: str
    pin_file: Path
    conf: Path
    module: str = MODULE

    @property
    def env(self) -> dict:
        """What a process needs to see this token."""
        return {"SOFTHSM2_CONF": str(self.conf)}

    def serve_args(self) -> list[str]:
        return ["--pkcs11-module", self.module, "--pkcs11-token", self.label,
                "--pkcs11-pin-file", str(self.pin_file)]

    def session(self, rw: bool = False):
        """A session of this test process on the token (to look at objects the service made).
        SoftHSM reads SOFTHSM2_CONF when the library initialises, once per process."""
        import pkcs11
        os.environ["SOFTHSM2_CONF"] = str(self.conf)
        lib = pkcs11.lib(self.module)
        try:
            token = lib.get_token(token_label=self.label)
        except pkcs11.exceptions.NoSuchToken:  # made after this process's SoftHSM started
            lib.reinitialize()
            token = lib.get_token(token_label=self.label)
        return token.open(user_pin=self.pin, rw=rw)


_conf: list[Path] = []


def _shared_conf() -> Path:
    if not _conf:
        top = Path(tempfile.mkdtemp(prefix="softhsm-"))
        atexit.register(shutil.rmtree, top, True)
        (top / "tokens").mkdir()
        conf = top / "softhsm2.conf"
        conf.write_text(f"directories.tokendir = {top / 'tokens'}\nobjectstore.backend = file\n"
                        "log.level = ERROR\n")
        _conf.append(conf)
        # Daemons this process starts inherit it (tests/helpers/servers.py passes os.environ).
        os.environ["SOFTHSM2_CONF"] = str(conf)
    return _conf[0]


def make_token(directory: Path, label: str = "keyservice-test") -> SoftHsmToken:
    if not os.path.exists(MODULE):
        import pytest
        pytest.skip("softhsm2 is not installed (scripts/lib/bootstrap.sh installs it)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    conf = _shared_conf()
    label = f"{label}-{secrets.token_hex(4)}"
    pin, so_pin = secrets.token_hex(8), secrets.token_hex(8)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin,
                    "--so-pin", so_pin], check=True, capture_output=True,
                   env=dict(os.environ, SOFTHSM2_CONF=str(conf)), timeout=60)
    pin_file = directory / "pin"
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(pin + "\n")
    return SoftHsmToken(label, pin, pin_file, conf)


P11KIT_CLIENT = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"


class RemoteToken:
    """`p11-kit server` running the token's module in a process of its own; a client loads
    p11-kit-client.so (P11_KIT_SERVER_ADDRESS names the socket) and the module's memory,
    where the token's keys are used, is never in the client's process."""

    def __init__(self, token: SoftHsmToken, directory: Path):
        if not (os.path.exists(P11KIT_CLIENT) and shutil.which("p11-kit")):
            import pytest
            pytest.skip("p11-kit and p11-kit-modules are not installed (the bootstrap installs them)")
        self.token = token
        self.socket = Path(directory) / "p11-kit.sock"
        self.proc = subprocess.Popen(
            ["p11-kit", "server", "--foreground", "--provider", token.module, "--name", str(self.socket),
             f"pkcs11:token={token.label}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ, **token.env))
        from tests.helpers.servers import wait_until
        wait_until(lambda: self.socket.exists() or self.proc.poll() is not None, timeout=20,
                   what="p11-kit server's socket")
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise RuntimeError(f"p11-kit server failed: {err}")

    @property
    def env(self) -> dict:
        return {"P11_KIT_SERVER_ADDRESS": f"unix:path={self.socket}"}

    def serve_args(self) -> list[str]:
        return ["--pkcs11-module", P11KIT_CLIENT, "--pkcs11-token", self.token.label,
                "--pkcs11-pin-file", str(self.token.pin_file)]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
