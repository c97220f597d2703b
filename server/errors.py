"""The closed set of errors the server answers with, and how each maps onto HTTP and gRPC.

    RewardServeError
    ├── InvalidInput           422  INVALID_ARGUMENT   a field is missing, of the wrong type or out of range
    │   ├── MalformedRequest   400  INVALID_ARGUMENT   the body is not valid JSON / protobuf
    │   ├── TransformUnavailable 422 FAILED_PRECONDITION  a transform that needs statistics the server lacks
    │   ├── UnknownModel       422  NOT_FOUND          a model or combination this server does not have
    │   ├── InputTooLong       413  INVALID_ARGUMENT   an item exceeds max_length and on_overflow=error
    │   ├── TooManyItems       413  INVALID_ARGUMENT   more items than max_items_per_request, or than the queue holds
    │   └── UnscorableItem     422  INVALID_ARGUMENT   the forward fails on this item alone, or its score is not finite
    ├── PayloadTooLarge        413  RESOURCE_EXHAUSTED the request body exceeds max_body_bytes
    ├── Unauthorized           401  UNAUTHENTICATED    missing or wrong API key (or admin key)
    ├── Forbidden              403  PERMISSION_DENIED  reload is off, or the path is outside --allow-reload-from
    ├── ReloadFailed           422  FAILED_PRECONDITION the new checkpoint did not load or warm up; the old serves on
    ├── InsufficientMemory     507  RESOURCE_EXHAUSTED both models would not fit for the switch (with the figures)
    ├── Conflict               409  ABORTED            a reload is already running
    ├── RateLimited            429  RESOURCE_EXHAUSTED this client sent more than --rate-limit; retry after `retry_after`
    ├── Overloaded             503  UNAVAILABLE        the queue is full; retry after `retry_after` seconds
    ├── NotReady               503  UNAVAILABLE        the model is loading or the server is draining
    └── Internal               500  INTERNAL           a bug or a device failure; logged with its request id

gRPC codes are kept as names so that the core never imports grpc; the gRPC adapter resolves them.
"""
from __future__ import annotations

from typing import Any, ClassVar


class RewardServeError(Exception):
    http_status: ClassVar[int] = 500
    grpc_code: ClassVar[str] = "INTERNAL"
    kind: ClassVar[str] = "internal"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        """The one error-body shape both protocols use: {"error": {"type", "message", "request_id"?}}."""
        error: dict[str, Any] = {"type": self.kind, "message": self.message}
        if request_id:
            error["request_id"] = request_id
        return {"error": error}


class InvalidInput(RewardServeError):
    http_status, grpc_code, kind = 422, "INVALID_ARGUMENT", "invalid_input"


class MalformedRequest(InvalidInput):
    http_status, grpc_code, kind = 400, "INVALID_ARGUMENT", "malformed_request"


class TransformUnavailable(InvalidInput):
    http_status, grpc_code, kind = 422, "FAILED_PRECONDITION", "transform_unavailable"


class UnknownModel(InvalidInput):
    http_status, grpc_code, kind = 422, "NOT_FOUND", "unknown_model"


class InputTooLong(InvalidInput):
    http_status, grpc_code, kind = 413, "INVALID_ARGUMENT", "input_too_long"


class TooManyItems(InvalidInput):
    http_status, grpc_code, kind = 413, "INVALID_ARGUMENT", "too_many_items"


class UnscorableItem(InvalidInput):
    """Raised for one item (its batch's other items are scored): the model fails on it alone, or scores it NaN or
    infinite. The service prefixes the item's index."""

    http_status, grpc_code, kind = 422, "INVALID_ARGUMENT", "unscorable_item"


class PayloadTooLarge(RewardServeError):
    http_status, grpc_code, kind = 413, "RESOURCE_EXHAUSTED", "payload_too_large"


class Unauthorized(RewardServeError):
    http_status, grpc_code, kind = 401, "UNAUTHENTICATED", "unauthorized"


class Forbidden(RewardServeError):
    http_status, grpc_code, kind = 403, "PERMISSION_DENIED", "forbidden"


class ReloadFailed(RewardServeError):
    http_status, grpc_code, kind = 422, "FAILED_PRECONDITION", "reload_failed"


class InsufficientMemory(RewardServeError):
    http_status, grpc_code, kind = 507, "RESOURCE_EXHAUSTED", "insufficient_memory"


class Conflict(RewardServeError):
    http_status, grpc_code, kind = 409, "ABORTED", "conflict"


class Overloaded(RewardServeError):
    http_status, grpc_code, kind = 503, "UNAVAILABLE", "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(Overloaded):
    http_status, grpc_code, kind = 429, "RESOURCE_EXHAUSTED", "rate_limited"


class NotReady(RewardServeError):
    http_status, grpc_code, kind = 503, "UNAVAILABLE", "not_ready"


class Internal(RewardServeError):
    http_status, grpc_code, kind = 500, "INTERNAL", "internal"


class OutOfMemory(Exception):
    """Raised by a model backend when a batch does not fit on the device; the batcher splits and retries.

    Not a RewardServeError: it never reaches a client unless a single item cannot fit.
    """


def describe_validation_errors(errors: list[dict[str, Any]]) -> str:
    """Turns pydantic's error list into one message that names each field and what to fix.

    >>> describe_validation_errors([{"loc": ("items", 0, "text"), "msg": "Input should be a valid string"}])
    'items[0].text: Input should be a valid string'
    """
    parts = []
    for error in errors[:MAX_LISTED_ERRORS]:
        location = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.get("loc", ()))
        location = location.lstrip(".") or "body"
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{location}: {message}"[:MAX_ERROR_CHARS])
    if len(errors) > MAX_LISTED_ERRORS:  # a bounded answer, whatever the request: the first problems say what to fix
        parts.append(f"and {len(errors) - MAX_LISTED_ERRORS} more problems of the same request")
    return "; ".join(parts)


MAX_LISTED_ERRORS = 10
MAX_ERROR_CHARS = 500


class StartupError(ValueError):
    """A configuration the process cannot start with, not a request's error. The CLI prints it as one line and
    exits non-zero, so the message must say what is wrong and what to do."""


class DeviceUnavailable(StartupError):
    """The device asked for does not exist here."""


class NotARewardModel(StartupError):
    """The checkpoint cannot be served as a reward model (a causal LM, a classifier of several labels, no head)."""
