"""PxfsError <-> Cap'n Proto remote exception.

A server method that fails with a PxfsError raises it again as an exception whose message is
``pxfs-error:<code>:<errno>:<object>\\x1f<cause>``; the client side parses that line back into
the same error class, so a mount can map a remote "no space" to ENOSPC.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import capnp

from pxfs.errors import ERRORS, FsError, PxfsError, Unavailable

log = logging.getLogger(__name__)

_WIRE = re.compile(r"pxfs-error:([a-z-]+):(\d+):([^\x1f\n]*)\x1f([^\n]*)")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class RemoteError(Exception):
    """Carries an encoded PxfsError out of a capnp server method."""


def _clean(text: str) -> str:
    # capnp cuts descriptions at NUL and the parser reads one line: escape what would break either.
    return text.replace("\0", "\\x00").replace("\n", "\\n").replace("\x1f", "\\x1f")


def encode(err: PxfsError) -> RemoteError:
    return RemoteError(f"pxfs-error:{err.code}:{err.errno}:{_clean(str(err.obj))}\x1f{_clean(str(err.cause))}")


def decode(exc: BaseException, peer: str) -> PxfsError:
    """Turn a capnp exception from ``peer`` into the PxfsError it carried, or Unavailable."""
    text = getattr(exc, "description", None) or str(exc)
    m = _WIRE.search(text)
    if m:
        code, errno, obj, cause = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        if code == "posix":
            return FsError(errno, obj, cause)
        return ERRORS.get(code, PxfsError)(obj, cause)
    if "disconnected" in text.lower() or "connection" in text.lower():
        return Unavailable(f"node {peer}", "connection lost")
    first = text.strip().splitlines()[-1] if text.strip() else type(exc).__name__
    return Unavailable(f"node {peer}", f"remote call failed: {first[:200]}")


class InFlight:
    """Calls running at once on one connection: past the limit a call is refused at once (a peer
    must not make the node hold unbounded work and memory for it)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.running = limit, 0

    def __enter__(self) -> InFlight:
        if self.running >= self.limit:
            raise Unavailable("connection", f"more than {self.limit} calls in flight on one connection: refused")
        self.running += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.running -= 1


def served(method: F) -> F:
    """Wrap a capnp server method: PxfsErrors travel typed, anything else is logged once."""

    @functools.wraps(method)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        limit: InFlight | None = getattr(self, "in_flight", None)
        try:
            if limit is not None:
                with limit:
                    return await method(self, *args, **kwargs)
            return await method(self, *args, **kwargs)
        except PxfsError as err:
            raise encode(err) from None
        except capnp.KjException:
            raise
        except Exception as err:  # noqa: BLE001 - the RPC boundary: log, answer, keep serving
            log.exception("rpc %s failed", method.__name__)
            raise encode(PxfsError(method.__name__, f"internal error: {type(err).__name__}: {err}")) from None

    return wrapper  # type: ignore[return-value]
