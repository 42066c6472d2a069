"""The SDK's exceptions: one small hierarchy rooted at BuilderError (after httpx's)."""

from __future__ import annotations


class BuilderError(Exception):
    """Base of every error the SDK raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ContextError(BuilderError):
    """The local build context cannot be sent (raised before any upload)."""


class ClientClosedError(BuilderError, RuntimeError):
    """A request on a client after `close()` (a RuntimeError too, as httpx raises)."""


class BuilderConnectionError(BuilderError):
    """The daemon could not be reached (or kept dropping) within the retry budget."""


class BuilderHTTPError(BuilderError):
    """The daemon answered with an error status; `code` and `message` come from its JSON body."""

    def __init__(self, status: int, code: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class BuildFailed(BuilderError):
    def __init__(self, build_id: str, message: str) -> None:
        super().__init__(f"build {build_id} failed: {message}")
        self.build_id = build_id
        self.message = message


class BuildCancelled(BuilderError):
    def __init__(self, build_id: str, message: str = "build cancelled") -> None:
        super().__init__(f"build {build_id} was cancelled: {message}")
        self.build_id = build_id
        self.message = message
