"""Key service: a small key vault (identities, vaults, RSA keys, access policies,
audit chain, change events) in the shape of Azure Key Vault's key operations."""
