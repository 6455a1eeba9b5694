"""Errors of the HTTP front in OpenAI's shape, from the same statuses the gRPC front sends.

Every refusal inside the gateway is a ``ServiceError`` (or a downstream gRPC status);
this is the one table that says which HTTP status and OpenAI error ``type`` each gRPC
status becomes, so both fronts refuse the same requests for the same reasons.
"""

from __future__ import annotations

import re
from typing import Any

import grpc

from llmesh.errors import ServiceError, status_for
from llmesh.overload import RETRY_AFTER, retry_after_s, retry_trailers

_BY_CODE: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", "model_not_allowed"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error", "model_not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error", None),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error", None),
    grpc.StatusCode.CANCELLED: (499, "cancelled", None),
}
_SAMPLING_FIELD = re.compile(r"^sampling\.(\w+)")


class HttpError(Exception):
    """An HTTP error response: status, message and OpenAI's ``param``/``code``."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def http_error_for(exc: BaseException) -> HttpError:
    """The HTTP error of any exception a request can end with (500 for a bug)."""
    if isinstance(exc, HttpError):
        return exc
    mapped = status_for(exc)
    if mapped is None:
        return HttpError(500, f"internal error ({type(exc).__name__}); see the gateway log", type_="server_error")
    code, message = mapped
    status, type_, err_code = _BY_CODE.get(code, (500, "server_error", None))
    headers = {}
    trailers = exc.trailers if isinstance(exc, ServiceError) else (
        exc.trailing_metadata() if isinstance(exc, grpc.aio.AioRpcError) else ())
    retry = retry_after_s(trailers)
    if retry is None and status == 429:
        retry = 1.0
    if retry is not None:
        # OpenAI's clients read retry-after-ms first (fractions of a second), then Retry-After.
        headers.update({name.title() if name == RETRY_AFTER else name: value
                        for name, value in retry_trailers(retry)})
    field = _SAMPLING_FIELD.match(message)
    param = field.group(1) if field else ("model" if status in (403, 404) else None)
    return HttpError(status, message, type_=type_, param=param, code=err_code, headers=headers)
