"""The CLIs' settings file, so a shell does not need five exports.

`$XDG_CONFIG_HOME/encrypted-disks/config` (default `~/.config/encrypted-disks/config`;
`$ENCRYPTED_DISKS_CONFIG` names another file), INI, one section per CLI whose keys are
the environment variables that CLI reads:

    [nbdserver]
    NBDSERVER_API = http://127.0.0.1:8080
    NBDSERVER_TOKEN_FILE = /var/lib/nbdserver/api.token
    [keyservice]
    KEYSERVICE_URL = http://127.0.0.1:8443
    KEYSERVICE_CREDENTIAL = /var/lib/keyservice/admin.credential

An environment variable wins over the file, and a command-line flag over both. A key the
section does not know is refused (a typo would otherwise be silently ignored), and a
file that holds a secret (a token itself, not a path to one) must be readable by its
owner only, as ssh insists for its keys: otherwise it is refused, not read.
"""

from __future__ import annotations

import configparser
import os
import stat
from collections.abc import Mapping


class ConfigError(Exception):
    pass


def config_path() -> str:
    explicit = os.environ.get("ENCRYPTED_DISKS_CONFIG")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "encrypted-disks", "config")


class Settings:
    """A CLI's settings: the environment first, then the file's section.

    `known`: every key the section may hold -> its help line; `secrets`: those keys
    whose value is itself a secret."""

    def __init__(self, section: str, known: Mapping[str, str], secrets: frozenset[str] = frozenset()):
        self.section, self.known, self.secrets = section, dict(known), secrets
        self._file: dict[str, str] | None = None

    def get(self, name: str, default: str | None = None) -> str | None:
        value = os.environ.get(name)
        if value:
            return value
        return self.from_file().get(name) or default

    def seconds(self, name: str, default: float) -> float:
        """A timeout setting: seconds in (0, 3600]; ConfigError naming it otherwise."""
        raw = self.get(name) or ""
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = 0.0
        if not 0 < value <= 3600:
            raise ConfigError(f"{name} must be seconds in (0, 3600], not {raw!r}")
        return value

    def from_file(self) -> dict[str, str]:
        if self._file is None:
            self._file = self._read(config_path())
        return self._file

    def _read(self, path: str) -> dict[str, str]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise ConfigError(f"cannot read the settings file {path}: {e.strerror}") from None
        with os.fdopen(fd) as f:
            mode = os.fstat(f.fileno()).st_mode
            parser = configparser.ConfigParser(interpolation=None)
            parser.optionxform = str.upper  # type: ignore[assignment,method-assign]
            try:
                parser.read_file(f, source=path)
            except (configparser.Error, UnicodeDecodeError) as e:
                raise ConfigError(f"the settings file {path} is not valid INI: "
                                  f"{str(e).splitlines()[0]}") from None
        if not parser.has_section(self.section):
            return {}
        values = dict(parser.items(self.section))
        unknown = sorted(set(values) - set(self.known))
        if unknown:
            raise ConfigError(f"the settings file {path}, section [{self.section}], has unknown "
                              f"key(s) {', '.join(unknown)}; known: {', '.join(self.known)}")
        held = sorted(k for k in values if k in self.secrets and values[k])
        if held and stat.S_IMODE(mode) & 0o077:
            raise ConfigError(f"the settings file {path} holds a secret ({', '.join(held)}) but "
                              f"is readable by others (mode {stat.S_IMODE(mode):04o}): "
                              f"chmod 600 {path}")
        return {k: v.strip() for k, v in values.items()}

    def help_text(self) -> str:
        return "\n".join(f"  {k}: {h}" for k, h in self.known.items())
