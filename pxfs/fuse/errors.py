"""Errno mapping for FUSE handlers: the one place where the FUSE layer catches broad exceptions.

pyfuse3 ends ``pyfuse3.main()`` (and leaves a dead mount) when anything but ``FUSEError`` escapes a
handler, so every handler is wrapped: a ``PxfsError`` becomes its errno, anything else is a bug that
is logged with the operation's name and answered with EIO.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import pyfuse3

from pxfs.errors import PxfsError

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


def _errno_of(exc: BaseException) -> int | None:
    """The errno a failure maps to, or None for a bug (an ExceptionGroup of pxfs errors counts)."""
    if isinstance(exc, PxfsError):
        return exc.errno
    if isinstance(exc, BaseExceptionGroup):
        codes = [_errno_of(e) for e in exc.exceptions]
        if codes and all(c is not None for c in codes):
            return errno.ENOSPC if errno.ENOSPC in codes else codes[0]
    return None


def fuse_op(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    name = fn.__name__

    @functools.wraps(fn)
    async def handler(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            code = _errno_of(exc)
            if code is None:
                log.exception("fuse op=%s failed unexpectedly", name)
                code = errno.EIO
            elif code in (errno.EIO, errno.ENOSPC):
                log.warning("fuse op=%s failed: %s", name, exc)
            else:
                log.debug("fuse op=%s: %s", name, exc)
            raise pyfuse3.FUSEError(code) from None

    return handler
