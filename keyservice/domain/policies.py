"""Vault access policies: object id -> key permissions (Key Vault's names).

Every key operation names the permission it needs; a caller without it gets
403 with Key Vault's message naming the permission.
"""
from .errors import BadRequest, Forbidden

KEY_PERMISSIONS = ("get", "list", "create", "import", "update", "delete", "recover",
                   "purge", "wrapKey", "unwrapKey", "rotate", "backup", "restore")


def parse_permissions(value) -> tuple[str, ...]:
    """Validate a permission list; "all" expands to every permission."""
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise BadRequest("permissions.keys must be a list of strings")
    if "all" in value:
        return KEY_PERMISSIONS
    unknown = [p for p in value if p not in KEY_PERMISSIONS]
    if unknown:
        raise BadRequest(f"Unknown key permission(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(KEY_PERMISSIONS)}")
    return tuple(p for p in KEY_PERMISSIONS if p in value)  # canonical order, no duplicates


def require(policies: dict[str, tuple[str, ...]], object_id: str, vault: str, permission: str) -> None:
    if permission not in policies.get(object_id, ()):
        raise Forbidden(f"The user, group or application '{object_id}' does not have keys "
                        f"{permission} permission on key vault '{vault}'", permission=permission,
                        inner="AccessDenied")
