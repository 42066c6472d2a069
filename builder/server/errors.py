"""The server's one exception hierarchy; `app.error_middleware` maps it to JSON."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar


class BuilderError(Exception):
    """Base of every error the daemon reports to a client."""

    status = 500
    code = "internal_error"
    # Sent with every error of the class (and described in /openapi.json).
    response_headers: ClassVar[Mapping[str, str]] = {}

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = {**self.response_headers, **(headers or {})}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class BadRequest(BuilderError):
    status = 400
    code = "bad_request"


class InvalidField(BadRequest):
    code = "invalid_field"


class InvalidImageReference(BadRequest):
    code = "invalid_image_reference"


class UnresolvableImageReference(BadRequest):
    """A Dockerfile whose images the daemon cannot resolve as the engine would, so cannot check."""

    code = "unresolvable_image_reference"


class InvalidContext(BadRequest):
    code = "invalid_context"


class DockerfileNotFound(BadRequest):
    code = "dockerfile_not_found"


class InvalidDockerfile(BadRequest):
    """The Dockerfile is in the context but is not one the daemon will build: not a regular
    file, or a line over the limit."""

    code = "invalid_dockerfile"


class ImageNotAllowed(BuilderError):
    """A build would reach an image outside what the caller's namespace may use."""

    status = 403
    code = "image_not_allowed"


class Forbidden(BuilderError):
    status = 403
    code = "forbidden"


class IdempotencyKeyReused(BuilderError):
    status = 422
    code = "idempotency_key_reused"


class IdempotencyKeyInProgress(BuilderError):
    """Another request with the same Idempotency-Key is still being received."""

    status = 409
    code = "idempotency_key_in_progress"


class ContextTooLarge(BuilderError):
    status = 413
    code = "context_too_large"


class DockerfileTooLarge(BuilderError):
    status = 413
    code = "dockerfile_too_large"


class UploadStalled(BuilderError):
    status = 408
    code = "upload_stalled"


class UnsupportedMediaType(BuilderError):
    status = 415
    code = "unsupported_media_type"


class BuildNotFound(BuilderError):
    status = 404
    code = "build_not_found"
    # Clients may reach us before the build is registered; tell them to retry.
    response_headers: ClassVar[Mapping[str, str]] = {"Retry-After": "1"}

    def __init__(self, build_id: str) -> None:
        super().__init__(f"no build with id {build_id!r}")
        self.build_id = build_id


class BuildExpired(BuilderError):
    status = 410
    code = "build_expired"

    def __init__(self, build_id: str) -> None:
        super().__init__(f"build {build_id!r} and its log were removed by retention")
        self.build_id = build_id


class QueueFull(BuilderError):
    status = 429
    code = "queue_full"
    response_headers: ClassVar[Mapping[str, str]] = {"Retry-After": "10"}


class TenantQuotaExceeded(BuilderError):
    """One tenant's share of the daemon is used up; other tenants are still served."""

    status = 429
    code = "tenant_quota_exceeded"
    response_headers: ClassVar[Mapping[str, str]] = {"Retry-After": "10"}


class ShuttingDown(BuilderError):
    status = 503
    code = "shutting_down"
    response_headers: ClassVar[Mapping[str, str]] = {"Retry-After": "5"}


class StoreFailing(BuilderError):
    status = 503
    code = "store_unavailable"
    response_headers: ClassVar[Mapping[str, str]] = {"Retry-After": "5"}


class EngineUnavailable(BuilderError):
    status = 503
    code = "engine_unavailable"
    response_headers: ClassVar[Mapping[str, str]] = {"Retry-After": "5"}


class EngineSessionFailed(BuilderError):
    """The engine could not be reached for, or refused, the BuildKit session a build needs."""

    status = 502
    code = "engine_session_failed"


class InvalidSecret(BadRequest):
    """A build secret the daemon will not take: a bad id, a value over the limit, too many."""

    code = "invalid_secret"


class SecretsNotSupported(BadRequest):
    """Build secrets for a build whose builder cannot take them (the legacy builder)."""

    code = "secrets_not_supported"
