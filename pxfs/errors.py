"""The one error hierarchy of pxfs.

Every error names the object it is about and the cause, so that the FUSE layer
can map it to an errno, the CLI to one line and an exit code, and the RPC layer
to a typed remote error (see ``pxfs.rpc.errors``).
"""

from __future__ import annotations

import errno as _errno


class PxfsError(Exception):
    """Base class: ``str(err)`` is ``'<object>: <cause>'``."""

    code = "error"
    errno = _errno.EIO

    def __init__(self, obj: str, cause: str) -> None:
        super().__init__(f"{obj}: {cause}" if obj else cause)
        self.obj = obj
        self.cause = cause


class NotFound(PxfsError):
    code = "not-found"
    errno = _errno.ENOENT


class Exists(PxfsError):
    code = "exists"
    errno = _errno.EEXIST


class NoSpace(PxfsError):
    code = "no-space"
    errno = _errno.ENOSPC


class Unavailable(PxfsError):
    """A node, replica or service cannot be reached right now."""

    code = "unavailable"
    errno = _errno.EIO


class Invalid(PxfsError):
    code = "invalid"
    errno = _errno.EINVAL


class Unauthorized(PxfsError):
    code = "unauthorized"
    errno = _errno.EACCES


class Corrupt(PxfsError):
    """Stored bytes do not match their hash, or metadata is inconsistent."""

    code = "corrupt"
    errno = _errno.EIO


class Conflict(PxfsError):
    """A precondition no longer holds (stale epoch, changed record)."""

    code = "conflict"
    errno = _errno.EAGAIN


class PutsExpired(PxfsError):
    """A commit came later after its chunk puts than the commit window: put them again, then retry."""

    code = "puts-expired"
    errno = _errno.EAGAIN


class FsError(PxfsError):
    """A POSIX error with a precise errno, raised by the meta layer."""

    code = "posix"

    def __init__(self, errno: int, obj: str, cause: str = "") -> None:
        super().__init__(obj, cause or _errno.errorcode.get(errno, str(errno)))
        self.errno = errno


ERRORS: dict[str, type[PxfsError]] = {
    cls.code: cls
    for cls in (PxfsError, NotFound, Exists, NoSpace, Unavailable, Invalid, Unauthorized, Corrupt, Conflict,
                PutsExpired)
}
