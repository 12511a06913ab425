"""CSI's gRPC status codes for pxfs failures (the spec names a code per failure of each call)."""

from __future__ import annotations

import grpc

from pxfs.errors import Conflict, Exists, Invalid, NoSpace, NotFound, PxfsError, Unauthorized, Unavailable


class CsiError(Exception):
    """A failure with the status code the CSI spec gives it; ``message`` names object and cause."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_CODES: list[tuple[type[PxfsError], grpc.StatusCode]] = [
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Exists, grpc.StatusCode.ALREADY_EXISTS),
    (NoSpace, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Invalid, grpc.StatusCode.INVALID_ARGUMENT),
    (Unauthorized, grpc.StatusCode.PERMISSION_DENIED),
    (Conflict, grpc.StatusCode.ABORTED),
]


def code_of(err: PxfsError) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.INTERNAL


def invalid(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def require(value: object, field: str) -> None:
    if not value:
        raise invalid(f"{field}: missing")
