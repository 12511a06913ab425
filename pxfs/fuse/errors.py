"""The wrapper of every FUSE handler: errno mapping (the one place where the FUSE layer catches
broad exceptions) and the handler's duration.

pyfuse3 ends ``pyfuse3.main()`` (and leaves a dead mount) when anything but ``FUSEError`` escapes a
handler, so every handler is wrapped: a ``PxfsError`` becomes its errno, anything else is a bug that
is logged with the operation's name and answered with EIO. The same wrapper times the handler for
whoever set ``op_timer`` on the operations object (the mount's metrics), so no handler repeats it.
"""

from __future__ import annotations

import errno
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Concatenate, ParamSpec, Protocol, TypeVar

import pyfuse3

from pxfs.errors import PxfsError

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
OpTimer = Callable[[str, float], None]  # (operation name, seconds it took)


class Timed(Protocol):
    op_timer: OpTimer | None  # None: handlers are not timed (metrics off)


S = TypeVar("S", bound=Timed)


def _errno_of(exc: BaseException) -> int | None:
    """The errno a failure maps to, or None for a bug (an ExceptionGroup of pxfs errors counts)."""
    if isinstance(exc, PxfsError):
        return exc.errno
    if isinstance(exc, BaseExceptionGroup):
        codes = [_errno_of(e) for e in exc.exceptions]
        if codes and all(c is not None for c in codes):
            return errno.ENOSPC if errno.ENOSPC in codes else codes[0]
    return None


def fuse_op(fn: Callable[Concatenate[S, P], Awaitable[T]]) -> Callable[Concatenate[S, P], Awaitable[T]]:
    name = fn.__name__

    @functools.wraps(fn)
    async def handler(self: S, *args: P.args, **kwargs: P.kwargs) -> T:
        timer = self.op_timer
        start = time.perf_counter() if timer is not None else 0.0
        try:
            return await fn(self, *args, **kwargs)
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
        finally:
            if timer is not None:  # failures too: a slow ENOSPC is as slow as a slow success
                timer(name, time.perf_counter() - start)

    return handler
