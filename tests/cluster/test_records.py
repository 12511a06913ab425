"""Control-store records: one decoder, versioned, and a bad record is refused or skipped, never a crash."""

from __future__ import annotations

import json

import pytest

from pxfs.cluster import records
from pxfs.errors import Corrupt, Invalid
from pxfs.model import VolumeInfo


def _vol(**kw: object) -> VolumeInfo:
    v = VolumeInfo(name="db1", size=1 << 30, repl=3, block_size=1 << 20, labels={"app": "pg"},
                   replicas=["n2", "n3", "n1"], coordinator="n2", epoch=4, created_ns=123,
                   in_sync=["n2", "n3"], min_replicas=2, uid="abc")
    for k, val in kw.items():
        setattr(v, k, val)
    return v


def test_volume_round_trip() -> None:
    v = _vol()
    back = records.decode_volume("volumes/db1", records.encode_volume(v))
    assert (back.name, back.replicas, back.coordinator, back.epoch, back.in_sync, back.min_replicas, back.uid) == (
        "db1", ["n2", "n3", "n1"], "n2", 4, ["n2", "n3"], 2, "abc")


def test_version_1_upgrades_with_every_replica_in_sync() -> None:
    old = {"name": "db1", "size": 1 << 30, "repl": 2, "block_size": 1 << 20, "labels": {}, "replicas": ["n1", "n2"],
           "coordinator": "n1", "epoch": 3, "created_ns": 99, "source": ""}
    v = records.decode_volume("volumes/db1", json.dumps(old).encode())
    assert v.in_sync == ["n1", "n2"] and v.min_replicas == 1 and v.uid


def test_in_sync_outside_replicas_is_dropped() -> None:
    v = records.decode_volume("volumes/db1", records.encode_volume(_vol(in_sync=["n2", "n9"])))
    assert v.in_sync == ["n2"]


@pytest.mark.parametrize("raw", [b"", b"garbage", b"[]", b'{"name": "db1"}', b'{"v": 99, "name": "db1"}',
                                 b'{"v": 2, "name": "other", "size": 1, "repl": 1, "block_size": 1}',
                                 b'{"v": 2, "name": "db1", "size": -1, "repl": 1, "block_size": 1}',
                                 b'{"v": 2, "name": "db1", "size": 1, "repl": 1, "block_size": 1, "replicas": "n1"}'])
def test_bad_volume_records(raw: bytes) -> None:
    with pytest.raises(Corrupt):
        records.decode_volume("volumes/db1", raw)
    with pytest.raises(Invalid):
        records.validate("volumes/db1", raw)


def test_decode_all_skips_and_logs_bad_records(caplog: pytest.LogCaptureFixture) -> None:
    good = records.encode_volume(_vol())
    got = records.volumes([("volumes/bad", b"{"), ("volumes/db1", good)])
    assert [v.name for v in got] == ["db1"]
    assert any("volumes/bad" in r.getMessage() for r in caplog.records)


def test_node_records() -> None:
    from pxfs.model import NodeInfo, PoolInfo

    n = NodeInfo(id="n1", address="127.0.0.1:7000", labels={"zone": "a"},
                 pools=[PoolInfo(node="n1", path="/p", klass="high", capacity=10, used=1, free=9)])
    assert records.decode_node("nodes/n1", records.encode_node(n)).pools[0].capacity == 10
    with pytest.raises(Corrupt):
        records.decode_node("nodes/n2", records.encode_node(n))
    with pytest.raises(Invalid):
        records.validate("nodes/n1", b'{"id": "n1"}')
    records.validate("usage/db1", b"{}")
    with pytest.raises(Invalid):
        records.validate("usage/db1", b"nope")
