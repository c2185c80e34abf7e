"""Typed refusals of the disk platform. The API maps each class to one HTTP status."""


class PlatformError(Exception):
    status = 400
    code = "BadRequest"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(PlatformError):
    pass


class NotFound(PlatformError):
    status = 404
    code = "NotFound"


class Conflict(PlatformError):
    status = 409
    code = "Conflict"


class RuleViolation(PlatformError):
    """A rule of the reference design refuses the operation; the message names the rule."""

    status = 409
    code = "RuleViolation"

    def __init__(self, rule: str, message: str):
        super().__init__(f"{message} (rule: {rule})")
        self.rule = rule


class AccessMissing(PlatformError):
    """The encryption set's identity lacks a permission on the key vault."""

    status = 403
    code = "KeyAccessMissing"


class KeyUnavailable(PlatformError):
    """The key service cannot be reached (not a revocation)."""

    status = 503
    code = "KeyServiceUnavailable"


class InsufficientStorage(PlatformError):
    """The platform's own file system is full (not the caller's fault, not a bug)."""

    status = 507
    code = "InsufficientStorage"


class PlatformVaultUntrusted(PlatformError):
    """The platform's own vault is not the platform's alone (another owner, no purge
    protection, or other identities granted on it): the platform will not start."""

    status = 409
    code = "PlatformVaultUntrusted"
