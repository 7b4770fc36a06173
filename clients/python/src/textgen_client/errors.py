"""The exceptions the client raises: one base class, one subclass per answer a caller handles differently."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from textgen_client.models import Task


class TextgenClientError(Exception):
    """Base class of every exception raised by textgen_client."""


class APIConnectionError(TextgenClientError):
    """The server could not be reached, or the connection failed before an answer arrived."""


class APIError(TextgenClientError):
    """The server answered with an error status; ``message`` is its ``{"error": ...}`` text."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        headers: Mapping[str, str] | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(f"{status_code}: {message}")
        self.message = message
        self.status_code = status_code
        self.headers: dict[str, str] = {k.lower(): v for k, v in (headers or {}).items()}
        self.body = body

    @property
    def request_id(self) -> str | None:
        """The server's ``x-request-id`` for this answer (quote it when reporting a problem)."""
        return self.headers.get("x-request-id")


class BadRequestError(APIError):
    """400: the request is invalid; the message names the offending field."""


class AuthenticationError(APIError):
    """401: missing or wrong ``X-API-ID`` / ``X-API-KEY``."""


class InsufficientCreditsError(APIError):
    """402: the account's credits do not cover the request's worst case."""


class NotFoundError(APIError):
    """404: no such task for this account."""


class ConflictError(APIError):
    """409: the request conflicts with the task's state (a finished task cannot be cancelled, a duplicate
    idempotent request is still being admitted)."""


class PayloadTooLargeError(APIError):
    """413: the request body is larger than the server accepts."""


class UnprocessableEntityError(APIError):
    """422: an ``Idempotency-Key`` was reused with a different request body."""


class _RetryAfterError(APIError):
    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        headers: Mapping[str, str] | None = None,
        body: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, headers=headers, body=body)
        self.retry_after = retry_after


class RateLimitError(_RetryAfterError):
    """429: over the account's rate limit; ``retry_after`` is the server's Retry-After in seconds."""


class ServiceUnavailableError(_RetryAfterError):
    """503: temporarily unavailable; ``retry_after`` is the server's Retry-After in seconds."""


class ServerError(APIError):
    """Any other 5xx answer."""


class StreamError(TextgenClientError):
    """The stream ended with an ``error`` event: the generation failed after the response had started."""

    def __init__(self, message: str, *, status_code: int | None, task_id: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.task_id = task_id


class StreamInterrupted(TextgenClientError):
    """The connection ended before the stream's last chunk. ``task_id`` (when known) lets you look the task up."""

    def __init__(self, message: str, *, task_id: str | None) -> None:
        super().__init__(message)
        self.task_id = task_id


class WaitTimeout(TextgenClientError):
    """``wait`` reached its deadline; ``task`` is the last state seen (still pending or running)."""

    def __init__(self, task: Task, timeout: float) -> None:
        super().__init__(f"task {task.id} still {task.status} after {timeout:g} s")
        self.task = task
        self.timeout = timeout


class WebhookVerificationError(TextgenClientError):
    """A webhook's signature or timestamp did not verify; do not trust its body."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    402: InsufficientCreditsError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
}


def error_for(
    status_code: int, message: str, headers: Mapping[str, str], body: Any, retry_after: float | None
) -> APIError:
    """The exception for an error answer."""
    if status_code == 429:
        return RateLimitError(
            message, status_code=status_code, headers=headers, body=body, retry_after=retry_after
        )
    if status_code == 503:
        return ServiceUnavailableError(
            message, status_code=status_code, headers=headers, body=body, retry_after=retry_after
        )
    cls = _BY_STATUS.get(status_code, ServerError if status_code >= 500 else APIError)
    return cls(message, status_code=status_code, headers=headers, body=body)
