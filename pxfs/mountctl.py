"""The line between ``pxfs umount`` and a mount daemon: flush before the kernel lets go, and the
outcome of the last flush after it.

Once the kernel has unmounted, nobody can reach the data still buffered in the daemon; so
``pxfs umount`` first asks the daemon to flush everything (``flush``) and leaves the mount in place
when that fails: the data stays where the application can still fsync it, and the daemon keeps
retrying on its timer. Only after ``ok`` does it unmount; the daemon then flushes what came in
between and answers on the same connection, ``ok`` or ``error <why>`` (it then keeps the data and
retries until it succeeds or is signalled).

The daemon listens on a Unix socket (mode 0600, root's) named in the mount's registry file.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from pxfs.errors import PxfsError, Unavailable

log = logging.getLogger(__name__)

FLUSH = b"flush\n"
_LINE_MAX = 4096


class ControlServer:
    """The daemon's side: ``flush_all`` flushes every buffered write (raises the first failure)."""

    def __init__(self, flush_all: Callable[[], Awaitable[None]]) -> None:
        self._flush_all = flush_all
        self._final: str | None = None
        self._final_set = trio.Event()
        self._answering = 0
        self._answered = trio.Event()

    async def serve(self, path: Path, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(str(path))
            os.chmod(path, 0o600)
            sock.listen()
            task_status.started()
            await trio.serve_listeners(self._answer, [trio.SocketListener(sock)])
        finally:
            sock.close()
            path.unlink(missing_ok=True)

    async def _answer(self, stream: trio.SocketStream) -> None:
        async with stream:
            if await stream.receive_some(_LINE_MAX) != FLUSH:
                return
            try:
                await self._flush_all()
            except PxfsError as err:
                await stream.send_all(f"error {err}\n".encode())
                return
            await stream.send_all(b"ok\n")
            self._answering += 1
            try:
                await self._final_set.wait()  # the unmount that follows, and its last flush
                assert self._final is not None
                await stream.send_all(self._final.encode())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # that umount went away (^C): nobody to tell
            finally:
                self._answering -= 1
                if not self._answering:
                    self._answered.set()

    def finished(self, err: PxfsError | None) -> None:
        """The flush after the kernel unmounted: succeeded (None) or failed with ``err``."""
        if not self._final_set.is_set():
            self._final = "ok\n" if err is None else f"error {err}\n"
            self._final_set.set()

    async def drain(self, timeout: float = 5.0) -> None:
        """Give the umounts waiting for ``finished``'s answer the time to read it."""
        with trio.move_on_after(timeout):
            if self._answering:
                await self._answered.wait()


def _read_line(conn: socket.socket, what: str) -> str:
    data = b""
    while not data.endswith(b"\n"):
        piece = conn.recv(_LINE_MAX)
        if not piece:
            raise Unavailable(what, "mount process closed its control socket without an answer")
        data += piece
    return data.decode(errors="replace").strip()


class ControlClient:
    """``pxfs umount``'s side: ``flush`` before the unmount, ``outcome`` after it (blocking calls)."""

    def __init__(self, path: Path, pid: int | None, timeout: float) -> None:
        self.what = f"mount process {pid}" if pid else f"mount control {str(path)!r}"
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn.settimeout(timeout)
        try:
            self._conn.connect(str(path))
        except OSError:
            self._conn.close()
            raise

    def close(self) -> None:
        self._conn.close()

    def flush(self) -> str | None:
        """Ask the daemon to flush everything; None when it did, else its error."""
        self._conn.sendall(FLUSH)
        return self._answer()

    def outcome(self) -> str | None:
        """After the unmount: None when the last flush succeeded, else its error."""
        return self._answer()

    def _answer(self) -> str | None:
        try:
            reply = _read_line(self._conn, self.what)
        except TimeoutError:
            raise Unavailable(self.what, "no answer to flush") from None
        if reply == "ok":
            return None
        return reply.removeprefix("error ").strip() or "flush failed"
