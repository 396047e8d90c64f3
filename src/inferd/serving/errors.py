"""Errors of the inference data plane; each protocol adapter maps them to its own status codes."""

from __future__ import annotations


class InferenceError(Exception):
    """Base class: the message is safe to send back to the client."""


class InvalidInputError(InferenceError):
    """Malformed request: wrong shape or datatype, missing input, bad parameter (400 / INVALID_ARGUMENT)."""


class RuntimeFailedError(InvalidInputError):
    """The model's runtime raised on a request its checks let through: answered as a bad input (a
    model fails on what it is given), told apart in the failure metrics."""


class ModelNotFoundError(InferenceError):
    """No model (or version) of that name in the repository (404 / NOT_FOUND)."""


class ModelNotReadyError(InferenceError):
    """The model exists but failed to load or cannot serve this request (503 / UNAVAILABLE)."""


class ServerOverloadedError(InferenceError):
    """The model's queue is full: refused at once, retry later (429 + Retry-After / RESOURCE_EXHAUSTED)."""

    retry_after_s = 1


class RequestTimedOutError(InferenceError):
    """The request ran past its timeout and was aborted (408 / DEADLINE_EXCEEDED)."""
