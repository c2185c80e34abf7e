"""The platform's stack fixtures (both daemons as processes), reused, not copied: the
tests here start them with `--fips` through `make_stack(nbd_args=..., ks_args=...)`."""

from tests.platform.conftest import make_stack  # noqa: F401 - a fixture, used by name
from tests.tls.conftest import pki  # noqa: F401,E402 - the TLS tests' certificates, a fixture
