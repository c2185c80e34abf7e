"""A real SoftHSM2 token in a temporary directory, for RSA-HSM keys (keyservice/hsm.py).

SOFTHSM2_CONF names a configuration of our own whose tokendir is in the test's
directory, so tokens never touch the machine's /var/lib/softhsm. The PIN goes to a
0600 file, as the key service wants it.
"""
import os
import secrets
import subprocess
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

    def session(self):
        """A session of this test process on the token (to look at objects the service made).
        SoftHSM reads SOFTHSM2_CONF when the library initialises, once per process."""
        import pkcs11
        os.environ["SOFTHSM2_CONF"] = str(self.conf)
        return pkcs11.lib(self.module).get_token(token_label=self.label).open(user_pin=self.pin)


def make_token(directory: Path, label: str = "keyservice-test") -> SoftHsmToken:
    if not os.path.exists(MODULE):
        import pytest
        pytest.skip("softhsm2 is not installed (scripts/lib/bootstrap.sh installs it)")
    directory = Path(directory)
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    pin, so_pin = secrets.token_hex(8), secrets.token_hex(8)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin,
                    "--so-pin", so_pin], check=True, capture_output=True,
                   env=dict(os.environ, SOFTHSM2_CONF=str(conf)), timeout=60)
    pin_file = directory / "pin"
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(pin + "\n")
    return SoftHsmToken(label, pin, pin_file, conf)
