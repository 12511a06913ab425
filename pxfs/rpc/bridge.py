"""The trio <-> pycapnp bridge: the only module of pxfs that knows about asyncio.

pycapnp 2.x runs its RPC on the running asyncio loop (``capnp.kj_loop()``); pxfs runs on trio.
Following shared/notes/trio-capnp.md (hosting 1, the measured fastest and public-API only), one
dedicated thread runs an asyncio loop with the KJ loop attached, and every capnp object is created
and used only by coroutines on that thread:

* trio -> capnp: ``await bridge.run(coro_fn, *args)`` submits ``coro_fn(*args)`` to the capnp
  thread and parks the trio task until it finishes. The future's done-callback reschedules the
  task through the trio token, so no worker thread is parked per call. Cancelling the trio task
  cancels the coroutine (and with it the pending RPC).
* capnp -> trio: server methods run on the capnp thread; ``await bridge.to_trio(fn, *args)``
  runs ``fn(*args)`` as a task in the bridge's trio nursery and awaits its result from asyncio.

A capnp object must also *die* on the capnp thread (its destructor needs the KJ loop; elsewhere the
process aborts). Hence: failures cross to trio without their tracebacks (``_scrubbed``); client
objects hand their capabilities back through ``dispose`` and are stripped at close (``track``);
and the cycle collector runs on the capnp thread only: opening a bridge turns automatic garbage
collection off for the process, and it stays off.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import capnp
import outcome
import trio

log = logging.getLogger(__name__)

T = TypeVar("T")

# Attributes of client objects that hold capnp references (see Bridge.track).
CAPNP_ATTRS = ("cap", "_client", "_session", "_caps")
GC_INTERVAL = 0.5
FULL_GC_EVERY = 60  # rounds


class CapnpError(Exception):
    """A capnp failure handed to trio as plain text: the original exception stays on its thread."""

    def __init__(self, description: str, kind: str) -> None:
        super().__init__(description)
        self.description = description
        self.type = kind


async def _scrubbed(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``fn`` on the capnp thread; re-raise failures without their tracebacks.

    A traceback keeps the frames of the failed call alive, and with them capnp requests and
    promises; dropping those later on the trio thread (no KJ loop there) aborts the process. So
    the frames die here, on the capnp thread, and trio gets an exception that refers to nothing.
    """
    try:
        return await fn(*args)
    except capnp.KjException as exc:
        err: BaseException = CapnpError(str(getattr(exc, "description", exc)), str(getattr(exc, "type", "")))
    except BaseException as exc:  # noqa: BLE001 - re-raised below, stripped of its frames
        exc.__traceback__ = None
        exc.__context__ = exc.__cause__ = None
        err = exc
    raise err


async def within(seconds: float, awaitable: Awaitable[T]) -> T:
    """On the capnp thread: await ``awaitable`` for at most ``seconds`` (TimeoutError after)."""
    return await asyncio.wait_for(awaitable, seconds)


class Bridge:
    """An asyncio+KJ loop in its own thread, joined to the trio run that opened it."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        # Every client object that may hold capnp references: stripped on the capnp thread at close,
        # so none is left for a destructor to run on the trio thread after the loop is gone.
        self._tracked: weakref.WeakSet[Any] = weakref.WeakSet()
        self._background: set[asyncio.Future] = set()  # started by background(); referenced until done

    # -- lifetime -----------------------------------------------------------------------------

    def _thread_main(self) -> None:
        async def main() -> None:
            async with capnp.kj_loop():
                self._loop = asyncio.get_running_loop()
                self._stop = asyncio.Event()
                self._ready.set()
                collector = asyncio.ensure_future(self._collect_garbage())
                await self._stop.wait()
                collector.cancel()
                gc.collect()

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - reported to the opener, not swallowed
            self._error = exc
            log.exception("capnp thread failed")
        finally:
            self._ready.set()

    @staticmethod
    async def _collect_garbage() -> None:
        """Cyclic garbage may hold capnp objects, whose destructors need this thread's KJ loop: the
        cycle collector runs here, never on the trio thread (automatic collection is off while a
        bridge is open)."""
        gc.freeze()  # what exists by now (modules, the schema) lives for good: never scan it again
        rounds = 0
        while True:
            await asyncio.sleep(GC_INTERVAL)
            rounds += 1
            # Young objects every round; the whole heap, whose scan grows with it, only now and then.
            gc.collect(2 if rounds % FULL_GC_EVERY == 0 else 1 if rounds % 10 == 0 else 0)

    async def _start(self, nursery: trio.Nursery) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._nursery = nursery
        gc.disable()
        self._thread = threading.Thread(target=self._thread_main, name="pxfs-capnp", daemon=True)
        self._thread.start()
        await trio.to_thread.run_sync(self._ready.wait)
        if self._loop is None:
            raise RuntimeError(f"capnp loop did not start: {self._error!r}")

    def track(self, holder: Any) -> None:
        self._tracked.add(holder)

    async def _strip_all(self) -> None:
        for holder in list(self._tracked):
            for name in CAPNP_ATTRS:
                holder.__dict__.pop(name, None)

    async def _close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            try:
                with trio.move_on_after(5):
                    await self.run(self._strip_all)
            except Exception:  # noqa: BLE001 - closing: nothing left to report to
                log.debug("strip at close failed", exc_info=True)
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass
        if self._thread is not None:
            await trio.to_thread.run_sync(self._thread.join, 5)

    # -- trio -> asyncio ----------------------------------------------------------------------

    async def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run coroutine ``fn(*args)`` on the capnp thread and return its result to trio."""
        if self._loop is None:
            raise RuntimeError("bridge is not open")
        fut = asyncio.run_coroutine_threadsafe(_scrubbed(fn, *args), self._loop)
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()
        aborted = False

        def wake(result: outcome.Outcome) -> None:
            if not aborted:
                trio.lowlevel.reschedule(task, result)
            else:
                self.dispose([result])  # a late result may hold capnp objects: free it over there

        def done(f: concurrent.futures.Future) -> None:
            try:
                token.run_sync_soon(wake, outcome.capture(f.result))
            except trio.RunFinishedError:
                pass

        fut.add_done_callback(done)

        def abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
            nonlocal aborted
            aborted = True
            fut.cancel()
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def dispose(self, holder: list[Any]) -> None:
        """Hand a list of capnp objects to the capnp thread, which empties it (their destructors run
        there); the caller must keep no other reference."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(holder.clear)
        except RuntimeError:
            pass

    def background(self, coro_fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """From the capnp thread, start ``coro_fn(*args)`` there without waiting for it (fire and forget)."""
        task = asyncio.ensure_future(coro_fn(*args))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- asyncio -> trio ----------------------------------------------------------------------

    async def to_trio(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """From a coroutine on the capnp thread, run ``fn(*args)`` in trio and await the result."""
        assert self._token is not None and self._nursery is not None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        scope_box: list[trio.CancelScope] = []

        def settle(result: outcome.Outcome) -> None:
            if fut.done():
                return
            if isinstance(result, outcome.Error):
                fut.set_exception(result.error)
            else:
                fut.set_result(result.value)

        async def runner() -> None:
            with trio.CancelScope() as scope:
                scope_box.append(scope)
                if fut.cancelled():
                    return
                result = await outcome.acapture(fn, *args)
                if isinstance(result, outcome.Error) and isinstance(result.error, trio.Cancelled):
                    result = outcome.Error(asyncio.CancelledError())
                try:
                    loop.call_soon_threadsafe(settle, result)
                except RuntimeError:
                    pass

        def start() -> None:
            assert self._nursery is not None
            self._nursery.start_soon(runner)

        self._token.run_sync_soon(start)
        try:
            return await fut
        except asyncio.CancelledError:
            token = self._token

            def cancel() -> None:
                for scope in scope_box:
                    scope.cancel()

            try:
                token.run_sync_soon(cancel)
            except trio.RunFinishedError:
                pass
            raise


@asynccontextmanager
async def open_bridge() -> AsyncIterator[Bridge]:
    """Start the capnp thread for the lifetime of an ``async with`` block."""
    body_error: Exception | None = None
    async with trio.open_nursery() as nursery:
        bridge = Bridge()
        await bridge._start(nursery)
        try:
            yield bridge
        except Exception as exc:  # noqa: BLE001 - re-raised below
            # Re-raised below, outside the nursery, so callers see the error itself rather than
            # an ExceptionGroup: they map PxfsError subclasses to exit codes and errnos.
            body_error = exc
        finally:
            with trio.CancelScope(shield=True):
                await bridge._close()
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error
