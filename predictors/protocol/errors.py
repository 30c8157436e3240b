"""One exception hierarchy for user-facing errors, mapped once to HTTP status and gRPC code.

Everything a client can cause derives from :class:`ClientError`. Each subclass also
derives from the KServe error its status corresponds to, so KServe's own REST handlers
and gRPC interceptor map it correctly too, and :func:`http_status` / :func:`grpc_code`
give the mapping for our own routes.
"""

from __future__ import annotations

from http import HTTPStatus

import grpc
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady, ServerNotLive, ServerNotReady


class ClientError(Exception):
    """A request the client can fix. ``status`` is the HTTP status, ``code`` the gRPC status."""

    status: HTTPStatus = HTTPStatus.BAD_REQUEST
    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class BadInput(ClientError, InvalidInput):
    """Malformed or invalid request content: 400 / INVALID_ARGUMENT."""

    def __init__(self, reason: str) -> None:
        ClientError.__init__(self, reason)


class InvalidImage(BadInput):
    """Bytes that are not a decodable image within the limits."""


class DisallowedURL(BadInput):
    """An image URL that the network guard refuses (scheme, private address, allow-list)."""


class FetchFailed(BadInput):
    """An allowed URL that could not be fetched (timeout, HTTP error, wrong content type, too big)."""


class PayloadTooLarge(BadInput):
    """A request body or batch larger than the configured limit: 413 / RESOURCE_EXHAUSTED."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthorized(ClientError):
    """Missing or wrong API key: 401 / UNAUTHENTICATED."""

    status = HTTPStatus.UNAUTHORIZED
    code = grpc.StatusCode.UNAUTHENTICATED


class UnknownModel(ClientError, ModelNotFound):
    """No model of that name is served: 404 / NOT_FOUND."""

    status = HTTPStatus.NOT_FOUND
    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, model_name: str) -> None:
        ClientError.__init__(self, f"Model with name {model_name} does not exist.")


def http_status(exc: BaseException) -> int:
    """HTTP status for any exception: ClientError's own, 404 for KServe's ModelNotFound, 400 for InvalidInput."""
    if isinstance(exc, ClientError):
        return int(exc.status)
    if isinstance(exc, ModelNotFound):
        return int(HTTPStatus.NOT_FOUND)
    if isinstance(exc, InvalidInput):
        return int(HTTPStatus.BAD_REQUEST)
    if isinstance(exc, ModelNotReady):
        return int(HTTPStatus.SERVICE_UNAVAILABLE)
    return int(HTTPStatus.INTERNAL_SERVER_ERROR)


def grpc_code(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, ClientError):
        return exc.code
    if isinstance(exc, ModelNotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, InvalidInput):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, (ModelNotReady, ServerNotReady, ServerNotLive)):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED
    return grpc.StatusCode.INTERNAL
