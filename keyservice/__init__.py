"""Key service: a small key vault (identities, vaults, RSA keys, access policies,
audit chain, change events) in the shape of Azure Key Vault's key operations."""

# FIPS mode (`serve --fips`): in the process daemonkit.fips re-executed, each libcrypto must
# read its own configuration before anything imports `ssl` or `cryptography`.
from daemonkit.fips import boot as _fips_boot  # noqa: E402

_fips_boot()
