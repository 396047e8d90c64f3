"""Typed API errors, shared by every protocol; each protocol renders them in its own shape.

Routes (and the Frontend behind them) raise these; a protocol's route class (`protocol_route_class`)
turns them, and FastAPI's own request validation errors, into that protocol's error response.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import get_route_path

from inferd.engine.tokenizer import InvalidTextError
from inferd.server.request_id import HEADER as REQUEST_ID_HEADER
from inferd.server.request_id import client_request_id
from inferd.writable import with_surrogates_escaped

logger = logging.getLogger(__name__)

ErrorKind = Literal[
    "invalid_request",
    "not_found",
    "authentication",
    "generation",
    "unavailable",
    "overloaded",
    "timeout",
    "too_large",
]


class ApiError(Exception):
    """An error a client should see; `field` names the offending request field when there is one."""

    kind: ErrorKind = "generation"
    # Seconds a client should wait before trying again (sent as `Retry-After`); None: no header.
    retry_after_s: int | None = None
    # A protocol's code for this error where it has a more precise one than its kind's.
    code: str | None = None

    def __init__(self, message: str, field: str | None = None) -> None:
        # A message may quote the client's text: a lone surrogate in it (a JSON "\ud800") is
        # written as that escape, or the error's own answer would fail to encode (a plain 500).
        message = with_surrogates_escaped(message)
        super().__init__(message)
        self.message = message
        self.field = None if field is None else with_surrogates_escaped(field)


class InvalidRequestError(ApiError):
    """Bad input: a field out of range, a prompt too long for the context, an unsupported option."""

    kind: ErrorKind = "invalid_request"


class ModelNotFoundError(ApiError):
    kind: ErrorKind = "not_found"


class AuthenticationError(ApiError):
    kind: ErrorKind = "authentication"


class GenerationError(ApiError):
    """The engine failed while producing the answer."""

    kind: ErrorKind = "generation"


class ServiceUnavailableError(ApiError):
    """The engine is not running, or the server is shutting down."""

    kind: ErrorKind = "unavailable"


class OverloadedError(ApiError):
    """The queue is full: refused at once (429), to be retried after `retry_after_s`."""

    kind: ErrorKind = "overloaded"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeoutError(ApiError):
    """The request ran past its timeout and was aborted (408)."""

    kind: ErrorKind = "timeout"


class PayloadTooLargeError(ApiError):
    """The request body is over the server's limit (413)."""

    kind: ErrorKind = "too_large"


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready; nobody reads the response."""


# nginx's "client closed request": what the access log shows for such a request.
CLIENT_CLOSED_STATUS = 499


def from_validation_error(exc: RequestValidationError) -> InvalidRequestError:
    """FastAPI's 422 details -> one InvalidRequestError naming the first offending field."""
    errors: list[dict[str, Any]] = list(exc.errors())
    if not errors:
        return InvalidRequestError("invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return InvalidRequestError(f"the request body is not valid JSON: {first.get('msg')}")
    # loc is ("body", field, then keys, indexes and union-branch tags): the top-level field is the
    # one to name. A value no branch of a union takes has an error for each branch: the one that
    # got furthest into the value says the most; branches that failed at the same place are joined.
    located = [(_location(error), _message(error)) for error in errors]
    located = [(where, msg) for where, msg in located if where[:1] == located[0][0][:1]]
    deepest = max(len(where) for where, _ in located)
    location = next(where for where, _ in located if len(where) == deepest)
    messages = list(dict.fromkeys(msg for where, msg in located if where == location))
    message = ", or ".join(messages)
    field = ".".join(location) or None
    return InvalidRequestError(
        f"{field}: {message}" if field else message, field=location[0] if location else None
    )


def _message(error: dict[str, Any]) -> str:
    """An error's message; a validator's own (a ValueError it raised) without the "Value error, "
    pydantic puts before it, which says nothing to a client."""
    message = str(error.get("msg", "invalid value"))
    if error.get("type") == "value_error":
        return message.removeprefix("Value error, ")
    return message


def _location(error: dict[str, Any]) -> list[str]:
    """An error's place in the body without pydantic's union-branch tags (``str``,
    ``list[dict[str,any]]``, a model's class name), which name no field of the request."""
    return [str(part) for part in error.get("loc", ()) if part != "body" and not _is_branch_tag(part)]


def _is_branch_tag(part: object) -> bool:
    if not isinstance(part, str):
        return False  # an index
    # A parametrised type (and "[key]", a mapping key's own mark), a plain one, or a model's class;
    # a mapping's keys (logit_bias' token ids) are kept.
    return "[" in part or part in _TYPE_TAGS or (part.isidentifier() and part[:1].isupper())


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "bytes", "list", "dict", "none"})


ErrorRenderer = Callable[[ApiError], Response]


def render_with_headers(render: ErrorRenderer, error: ApiError) -> Response:
    """`render(error)` plus the headers the error calls for (`Retry-After`)."""
    response = render(error)
    if error.retry_after_s is not None:
        response.headers["Retry-After"] = str(error.retry_after_s)
    return response


def protocol_route_class(render: ErrorRenderer) -> type[APIRoute]:
    """An APIRoute class whose routes answer every error in their protocol's shape through `render`:
    API errors, validation errors, FastAPI's own 4xx (a body that cannot be read), and, as a 500
    for that request alone, anything unexpected."""

    class ProtocolRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def handle(request: Request) -> Response:
                try:
                    return await handler(request)
                except RequestValidationError as exc:
                    return render(from_validation_error(exc))
                except ApiError as exc:
                    return render_with_headers(render, exc)
                except (ClientDisconnected, ClientDisconnect):  # ours, or starlette's from a body read
                    return Response(status_code=CLIENT_CLOSED_STATUS)
                except InvalidTextError as exc:  # text that reached the tokenizer unchecked
                    return render(InvalidRequestError(str(exc)))
                except HTTPException as exc:
                    if exc.status_code >= 500:
                        raise
                    return render(InvalidRequestError(f"invalid request: {exc.detail}"))
                except Exception:
                    return internal_error_response(render, request)

            return handle

    return ProtocolRoute


def internal_error_response(render: ErrorRenderer, request: Request) -> Response:
    """A 500 for an exception nobody expected, logged with its traceback under the request's id.

    The client gets that id and nothing of the exception: its text may hold server paths, library
    internals (a Rust panic's backtrace) or parts of other data. The id is the client's own
    ``X-Request-Id`` where it sent one, else a new one, sent back in that header too."""
    request_id = client_request_id(request.headers.get(REQUEST_ID_HEADER)) or uuid.uuid4().hex
    logger.exception("request %s to %s failed", request_id, request.url.path)
    message = (
        f"internal error: the server failed to answer this request; its log has the details under "
        f"request id {request_id}"
    )
    response = render(GenerationError(message))
    response.headers[REQUEST_ID_HEADER] = request_id
    return response


# The OpenAI-style routes outside /v1/ (vLLM's): their errors come in OpenAI's shape too, /v2/rerank
# in spite of KServe's /v2 prefix. SageMaker's /invocations answers its own errors (a body of no
# known kind) in OpenAI's shape, and so do the errors raised before it dispatches (a 401, a 413).
_OPENAI_PATHS = (
    "/tokenize",
    "/detokenize",
    "/score",
    "/rerank",
    "/v2/rerank",
    "/classify",
    "/pooling",
    "/reset_prefix_cache",
    "/invocations",
)


def is_openai_path(path: str) -> bool:
    """Whether ``path`` is served in the OpenAI API's shape (its errors too). A trailing slash
    keeps its path's shape for the 404 (`/invocations/`, which no route redirects)."""
    return path.startswith("/v1/") or path.rstrip("/") in _OPENAI_PATHS


async def unmatched_route_response(request: Request, exc: Exception) -> Response:
    """A 404 (no such path) or 405 (no such method) in the shape of the protocol the path belongs to:
    clients such as tritonclient or openai read the error body and fail on FastAPI's `detail`."""
    assert isinstance(exc, HTTPException)
    path = get_route_path(request.scope)  # under --root-path, the path the routes see
    message = f"{request.method} {path}: {exc.detail}"
    body: dict[str, Any]
    if is_openai_path(path):
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    elif path.startswith("/v2"):
        body = {"error": message}
    else:
        body = {"detail": exc.detail}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)
