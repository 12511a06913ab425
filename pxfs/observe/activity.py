"""What a node's cluster page shows beside the status document: recent events and I/O rates.

Events are the node's own log records at WARNING and above (pxfs logs every failover, replica
change, change of the in-sync set, quarantined chunk and failed repair there, by design), its
repair rounds and the volumes it starts to coordinate; a bounded ring keeps the newest, in memory
only. Rates come from running totals the node keeps (bytes put and read, chunks verified by
scrubs), sampled over a short window. Each node serves its own at ``/api/activity``; a page asks
every node that is up, so any node's page shows the whole cluster (a node that is down shows
nothing, and its ring is gone with it).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import trio

EVENTS_KEPT = 200
WINDOW = 10.0  # seconds the rates are averaged over
SAMPLE_EVERY = 2.0
FETCH_TIMEOUT = 2.0  # per node, at each page view: a silent node costs the page this much at most
# Whose INFO records are events too: repair rounds that copied, a node taking over a volume.
EVENT_LOGGERS = ("pxfs.cluster.repair", "pxfs.volume.coordinator")


@dataclass
class Totals:
    """Running totals of a node's chunk service since it started."""

    put_bytes: int = 0
    get_bytes: int = 0
    verified: int = 0  # chunks re-read and re-hashed (scrub)
    bad: int = 0  # of those, missing or corrupt (a corrupt one is quarantined)
    last_verify: float = 0.0  # time.time() of the newest verify call


class EventLog(logging.Handler):
    """The newest ``kept`` event records of this process (handlers run on any thread: the lock)."""

    def __init__(self, kept: int = EVENTS_KEPT) -> None:
        super().__init__(level=logging.INFO)
        self._ring: deque[dict[str, Any]] = deque(maxlen=kept)

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING and not record.name.startswith(EVENT_LOGGERS):
            return
        try:
            message = record.getMessage()[:500]
        except (TypeError, ValueError):  # a bad format string: logging's own report of it, not ours
            self.handleError(record)
            return
        self._ring.append({"ts": record.created, "level": record.levelname.lower(),
                           "source": record.name.removeprefix("pxfs."), "message": message})

    def events(self) -> list[dict[str, Any]]:
        """Newest first."""
        with self.lock:
            return list(reversed(self._ring))


class Rates:
    """Per-second rates of the totals over the last WINDOW seconds, from samples ``run`` takes."""

    def __init__(self, read: Callable[[], Totals]) -> None:
        self._read = read
        self._samples: deque[tuple[float, Totals]] = deque()

    def sample(self, now: float) -> None:
        self._samples.append((now, Totals(**asdict(self._read()))))
        while len(self._samples) > 2 and now - self._samples[1][0] >= WINDOW:
            self._samples.popleft()

    def rates(self) -> dict[str, float]:
        if len(self._samples) < 2:
            return {"put_bytes": 0.0, "get_bytes": 0.0, "verified": 0.0}
        (t0, a), (t1, b) = self._samples[0], self._samples[-1]
        dt = max(t1 - t0, 1e-6)
        return {"put_bytes": (b.put_bytes - a.put_bytes) / dt, "get_bytes": (b.get_bytes - a.get_bytes) / dt,
                "verified": (b.verified - a.verified) / dt}

    async def run(self) -> None:
        while True:
            self.sample(trio.current_time())
            await trio.sleep(SAMPLE_EVERY)


class Activity:
    """One node's events and rates, and the gathering of every node's for the page."""

    def __init__(self, node_id: str, totals: Totals) -> None:
        self.node_id = node_id
        self.totals = totals
        self.log = EventLog()
        self.rates = Rates(lambda: self.totals)

    def local(self) -> dict[str, Any]:
        """This node's ``/api/activity``."""
        t = self.totals
        return {"node": self.node_id, "events": self.log.events(), "rates": self.rates.rates(),
                "totals": asdict(t), "last_verify_ago": time.time() - t.last_verify if t.last_verify else None}

    async def gather(self, nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every node's activity (``nodes`` as in the status document); unreachable ones say why."""
        out: dict[str, dict[str, Any]] = {}

        async def fetch(client: httpx.AsyncClient, node: dict[str, Any]) -> None:
            try:
                r = await client.get(f"http://{node['http']}/api/activity")
                r.raise_for_status()
                doc = r.json()
                if not isinstance(doc, dict) or not isinstance(doc.get("events"), list):
                    raise ValueError("not an activity document")
                out[node["id"]] = doc
            except (httpx.HTTPError, ValueError) as err:
                out[node["id"]] = {"node": node["id"], "error": f"no answer: {err or type(err).__name__}"}

        async with httpx.AsyncClient(timeout=FETCH_TIMEOUT) as client, trio.open_nursery() as nursery:
            for n in nodes:
                if n["id"] == self.node_id:
                    out[n["id"]] = self.local()
                elif n.get("state") != "up":
                    out[n["id"]] = {"node": n["id"], "error": f"node is {n.get('state', 'unknown')}"}
                elif n.get("http"):
                    nursery.start_soon(fetch, client, n)
        return [out[n["id"]] for n in nodes if n["id"] in out]
