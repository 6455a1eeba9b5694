"""Engine errors. Each carries a message a user can act on; the gRPC layer maps the
classes to status codes (InvalidRequest → INVALID_ARGUMENT, Unsupported → FAILED_PRECONDITION)."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """The request itself is wrong (bad sampling field, prompt too long, ...)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnsupportedModelError(EngineError, ValueError):
    """The model files name an architecture, tensor type or field llmesh cannot serve."""


class ModelLoadError(EngineError, OSError):
    """The model files are missing or unreadable."""


class RequestNotFoundError(EngineError, KeyError):
    """No live request has this id."""


class EngineOverloadedError(EngineError):
    """The engine's waiting queue is full: the request was refused before it reached the
    core (nothing allocated); ``retry_after_s`` is when a slot is likely to be free."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineDeadError(EngineError):
    """The engine core is gone (its process died, or a step failed and it stopped): every
    in-flight request fails with this and new ones are refused."""


class EngineClosingError(EngineError):
    """The engine is shutting down: no fresh core is started in its place."""
