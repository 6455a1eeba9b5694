"""Errors that map onto gRPC statuses, shared by every service.

Service code raises ``ServiceError(code, message)`` (or an engine error); the one error
interceptor per server turns it into the status with that message. Anything else is a
bug: it becomes INTERNAL with the trace id, and the traceback goes to the log.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """An error with the gRPC status it should reach the caller as."""

    def __init__(self, code: grpc.StatusCode, message: str,
                 trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailers = trailers


def invalid_argument(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, message)


def unavailable(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status an expected exception maps to; None for a bug (→ INTERNAL)."""
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    try:
        from llmesh.engine.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError
    except ImportError:  # a service without the engine installed
        InvalidRequestError = ModelLoadError = UnsupportedModelError = ()  # noqa: N806
    if InvalidRequestError and isinstance(exc, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if UnsupportedModelError and isinstance(exc, (UnsupportedModelError, ModelLoadError)):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "deadline exceeded"
    if isinstance(exc, grpc.aio.AioRpcError):
        # A downstream call failed: pass its status on, naming where it came from.
        return exc.code(), exc.details() or exc.code().name
    return None
