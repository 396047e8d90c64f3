"""Typed API errors, shared by every protocol; each protocol renders them in its own shape.

Routes (and the Frontend behind them) raise these; a protocol's route class (`protocol_route_class`)
turns them, and FastAPI's own request validation errors, into that protocol's error response.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

ErrorKind = Literal["invalid_request", "not_found", "authentication", "generation", "unavailable"]


class ApiError(Exception):
    """An error a client should see; `field` names the offending request field when there is one."""

    kind: ErrorKind = "generation"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


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
    """The engine is not running."""

    kind: ErrorKind = "unavailable"


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
    # loc is ("body", field, then indexes or union-branch tags): the top-level field is the one to name.
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(location) or None
    message = str(first.get("msg", "invalid value"))
    return InvalidRequestError(
        f"{field}: {message}" if field else message, field=location[0] if location else None
    )


ErrorRenderer = Callable[[ApiError], Response]


def protocol_route_class(render: ErrorRenderer) -> type[APIRoute]:
    """An APIRoute class whose routes answer API and validation errors through `render`."""

    class ProtocolRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
            handler = super().get_route_handler()

            async def handle(request: Request) -> Response:
                try:
                    return await handler(request)
                except RequestValidationError as exc:
                    return render(from_validation_error(exc))
                except ApiError as exc:
                    return render(exc)
                except ClientDisconnected:
                    return Response(status_code=CLIENT_CLOSED_STATUS)

            return handle

    return ProtocolRoute
