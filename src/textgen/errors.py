"""The one exception hierarchy. The HTTP layer turns each into ``{"error": message}``."""

from __future__ import annotations

from dataclasses import dataclass


class TextgenError(Exception):
    status_code = 500
    headers: dict[str, str]

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class ConfigurationError(TextgenError):
    """The process cannot start with the given configuration."""


class BadRequest(TextgenError):
    status_code = 400


class Unauthorized(TextgenError):
    status_code = 401


class PaymentRequired(TextgenError):
    status_code = 402


class Forbidden(TextgenError):
    status_code = 403


class AccountDisabled(Forbidden):
    """The account was disabled by the operator: every request is refused."""


class NotFound(TextgenError):
    status_code = 404


class MethodNotAllowed(TextgenError):
    status_code = 405


class Conflict(TextgenError):
    status_code = 409


class UnprocessableEntity(TextgenError):
    status_code = 422


class PayloadTooLarge(TextgenError):
    status_code = 413


class UnsupportedMediaType(TextgenError):
    status_code = 415


class RateLimited(TextgenError):
    status_code = 429


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """The tokens a generation used: counted by the local model, reported by an upstream."""

    input_tokens: int
    output_tokens: int


class UpstreamError(TextgenError):
    """The model provider failed; ``status_code`` is what the client should see.

    ``usage`` is set when the failed generation used tokens that are billed all the same: the local model
    generated them, or the upstream reported them (Gemini bills an answer it blocked)."""

    status_code = 502

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 502,
        retryable: bool = False,
        retry_after: float | None = None,
        usage: TokenUsage | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.retryable = retryable
        self.retry_after = retry_after
        self.usage = usage


class ServiceUnavailable(TextgenError):
    status_code = 503


class StorageUnavailable(ServiceUnavailable):
    """The database could not be reached or answered with a transient failure."""


class InsufficientCredits(PaymentRequired):
    pass
