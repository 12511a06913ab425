"""Every Prometheus metric a pxfs process exports, defined once (prometheus-client).

Names are in base units with the ``pxfs_`` prefix, counters end in ``_total``, labels are few and
of low cardinality (``volume``, ``node``, ``pool``, ``op``, ``state``). Values that already live in
an object (pool usage, a volume's in-sync set, follower lag) are read at scrape time by a collector
instead of being copied into gauges on every change.
"""

from __future__ import annotations

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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

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
FUSE_OP_SECONDS = Histogram("pxfs_fuse_op_seconds", "Time to answer one FUSE request, by operation", ["op"],
                            buckets=_FAST, registry=REGISTRY)

VOLUME_STATES = ("healthy", "degraded", "waiting", "unavailable")


def fuse_op_timer() -> Callable[[str, float], None]:
    """What the mount's FUSE handlers report their durations to (``pxfs.fuse.errors.fuse_op``)."""
    children: dict[str, Any] = {}  # labels() costs a lock and a lookup: once per op, not per request

    def observe(op: str, seconds: float) -> None:
        child = children.get(op)
        if child is None:
            child = children[op] = FUSE_OP_SECONDS.labels(op)
        child.observe(seconds)

    return observe


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
