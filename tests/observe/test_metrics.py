"""The metrics registry without a process around it: the mount's lock-free FUSE histogram and the
scrape-time collector's counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from pxfs.observe.metrics import OpTimes, Scraped


def exposition(collector: object) -> dict[str, float]:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)  # type: ignore[arg-type]
    out = {}
    for ln in generate_latest(registry).decode().splitlines():
        if ln.startswith("# TYPE "):
            out["TYPE " + ln.split()[2]] = ln.split()[3]  # type: ignore[assignment]
        elif ln and not ln.startswith("#"):
            name, value = ln.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_op_times_is_a_prometheus_histogram_with_inclusive_bounds() -> None:
    times = OpTimes(buckets=(0.001, 0.01))
    for s in (0.0005, 0.001, 0.002, 0.5):
        times.observe("read", s)
    times.observe("write", 0.01)
    m = exposition(times)
    assert m["TYPE pxfs_fuse_op_seconds"] == "histogram"
    assert m['pxfs_fuse_op_seconds_bucket{le="0.001",op="read"}'] == 2  # le: a bound includes its value
    assert m['pxfs_fuse_op_seconds_bucket{le="0.01",op="read"}'] == 3
    assert m['pxfs_fuse_op_seconds_bucket{le="+Inf",op="read"}'] == 4
    assert m['pxfs_fuse_op_seconds_count{op="read"}'] == 4
    assert abs(m['pxfs_fuse_op_seconds_sum{op="read"}'] - 0.5035) < 1e-9
    assert m['pxfs_fuse_op_seconds_bucket{le="0.01",op="write"}'] == 1


def test_scraped_values_ending_in_total_are_counters() -> None:
    m = exposition(Scraped(lambda: [("pxfs_x_total", "x", ["result"], [(["hit"], 3.0)]),
                                    ("pxfs_y_bytes", "y", [], [([], 7.0)])]))
    assert m["TYPE pxfs_x_total"] == "counter" and m['pxfs_x_total{result="hit"}'] == 3
    assert m["TYPE pxfs_y_bytes"] == "gauge" and m["pxfs_y_bytes"] == 7
