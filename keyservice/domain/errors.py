"""Typed domain errors. The API edge maps each class to one HTTP status.

`code` follows Azure Key Vault's error codes where one exists, so that a
client written for Key Vault recognises the failure.
"""


class DomainError(Exception):
    code = "BadParameter"

    def __init__(self, message: str, code: str | None = None, inner: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.inner = inner  # Key Vault's "innererror.code", e.g. KeyDisabled


class BadRequest(DomainError):
    code = "BadParameter"


class Unauthorized(DomainError):
    code = "Unauthorized"


class Forbidden(DomainError):
    code = "Forbidden"

    def __init__(self, message: str, permission: str | None = None, inner: str | None = None):
        super().__init__(message, inner=inner)
        self.permission = permission


class NotFound(DomainError):
    code = "NotFound"


class Conflict(DomainError):
    code = "Conflict"


class TooManyRequests(DomainError):
    """Admission refused (rate or concurrency limit); `retry_after` in whole seconds."""
    code = "TooManyRequests"

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after
