"""Every Prometheus metric a pxfs process exports, defined once (prometheus-client).

Names are in base units with the ``pxfs_`` prefix, counters end in ``_total``, labels are few and
of low cardinality (``volume``, ``node``, ``pool``, ``op``, ``state``). Values that already live in
an object (pool usage, a volume's in-sync set, follower lag) are read at scrape time by a collector
instead of being copied into gauges on every change.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

disable_created_metrics()  # no *_created series: they double the output and say nothing here
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(namespace="pxfs", registry=REGISTRY)  # pxfs_process_resident_memory_bytes, cpu seconds

_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

CHUNK_PUT_SECONDS = Histogram("pxfs_chunk_put_seconds", "Time to store one chunk in this node's pools",
                              buckets=_FAST, registry=REGISTRY)
CHUNK_GET_SECONDS = Histogram("pxfs_chunk_get_seconds", "Time to read and verify one chunk from this node's pools",
                              buckets=_FAST, registry=REGISTRY)
CHUNK_PUT_BYTES = Counter("pxfs_chunk_put_bytes_total", "Bytes of chunks put to this node (stored or deduplicated)",
                          registry=REGISTRY)
CHUNK_GET_BYTES = Counter("pxfs_chunk_get_bytes_total", "Bytes of chunks read from this node", registry=REGISTRY)
VERIFY_FAILURES = Counter("pxfs_verify_failures_total", "Chunks found missing or corrupt by verify (scrub)",
                          registry=REGISTRY)
METADATA_BATCH_SECONDS = Histogram("pxfs_metadata_batch_seconds",
                                   "Time from a metadata operation to its acknowledgement by the in-sync set",
                                   ["volume"], buckets=_FAST, registry=REGISTRY)
REPAIR_BYTES = Counter("pxfs_repair_bytes_total", "Bytes of chunks copied to replicas that lacked them",
                       ["volume"], registry=REGISTRY)
GC_DELETED_BYTES = Counter("pxfs_gc_deleted_bytes_total", "Bytes of chunks garbage collection deleted",
                           registry=REGISTRY)

VOLUME_STATES = ("healthy", "degraded", "waiting", "unavailable")


class OpTimes(Collector):
    """``pxfs_fuse_op_seconds{op}``: the mount's FUSE request durations, kept in plain lists.

    Every request of a mount runs on its one trio thread, so counting needs no lock. prometheus_client's
    Histogram takes three per observation: about 2.4 us per request on the 2-core test machine against
    0.6 us here (scripts/bench-metrics), a tax of a few per cent on the fastest requests (a cached
    getattr). A scrape (in a worker thread) reads the lists while requests add to them: it may see a
    sum one observation ahead of its counts.
    """

    NAME, HELP = "pxfs_fuse_op_seconds", "Time to answer one FUSE request, by operation"

    def __init__(self, buckets: tuple[float, ...] = _FAST) -> None:
        self._bounds = buckets
        self._ops: dict[str, tuple[list[int], list[float]]] = {}  # op -> (count per bucket and +Inf, [sum])

    def observe(self, op: str, seconds: float) -> None:
        entry = self._ops.get(op)
        if entry is None:
            entry = self._ops[op] = ([0] * (len(self._bounds) + 1), [0.0])
        entry[0][bisect_left(self._bounds, seconds)] += 1
        entry[1][0] += seconds

    def collect(self) -> Iterator[Any]:
        h = HistogramMetricFamily(self.NAME, self.HELP, labels=["op"])
        for op, (counts, total) in sorted(list(self._ops.items())):
            running, buckets = 0, []
            for bound, n in zip((*self._bounds, math.inf), list(counts), strict=True):
                running += n
                buckets.append((floatToGoString(bound), running))
            h.add_metric([op], buckets, total[0])
        yield h

    def describe(self) -> Iterator[Any]:
        yield HistogramMetricFamily(self.NAME, self.HELP, labels=["op"])


_op_times: list[OpTimes] = []


def fuse_op_timer() -> Callable[[str, float], None]:
    """What the mount's FUSE handlers report their durations to (``pxfs.fuse.errors.fuse_op``)."""
    for old in _op_times:
        REGISTRY.unregister(old)
    _op_times[:] = [OpTimes()]
    REGISTRY.register(_op_times[0])
    return _op_times[0].observe


class Scraped(Collector):
    """Values computed at scrape time by ``fn`` -> [(name, help, labels, [(label values, value)])]:
    a counter when the name ends in ``_total`` (a count an object keeps, such as the read cache's
    hits), a gauge otherwise."""

    def __init__(self, fn: Callable[[], list[tuple[str, str, list[str], list[tuple[list[str], float]]]]]) -> None:
        self._fn = fn

    def collect(self) -> Iterator[Any]:
        for name, doc, labels, samples in self._fn():
            g = (CounterMetricFamily(name, doc, labels=labels) if name.endswith("_total")
                 else GaugeMetricFamily(name, doc, labels=labels))
            for values, value in samples:
                g.add_metric(values, value)
            yield g


_scraped: list[Scraped] = []


def register(fn: Callable[[], list[tuple[str, str, list[str], list[tuple[list[str], float]]]]]) -> None:
    """The process's scrape-time values (one node or one mount per process: a second call replaces)."""
    for old in _scraped:
        REGISTRY.unregister(old)
    _scraped[:] = [Scraped(fn)]
    REGISTRY.register(_scraped[0])


def exposition() -> bytes:
    return generate_latest(REGISTRY)
