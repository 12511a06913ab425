"""Control-store records: one decoder, versioned, and a bad record is refused or skipped, never a crash."""

from __future__ import annotations

import json
from pathlib import Path

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


# -- deletion only by tombstone, identity, recovery ------------------------------------------------


def test_tombstones_group_uids_by_name_and_skip_bad_keys() -> None:
    items = [("tombstones/db1/u1", records.encode_tombstone(1.0)), ("tombstones/db1/u2", b"{}"),
             ("tombstones/db2/u3", b"{}"), ("tombstones/broken", b"{}")]
    assert records.tombstones(items) == {"db1": {"u1", "u2"}, "db2": {"u3"}}


def test_local_spec_round_trip(tmp_path: Path) -> None:
    d = tmp_path / "db1"
    d.mkdir()
    assert records.read_local_spec(d) is None
    records.write_local_spec(d, _vol())
    assert records.read_local_spec(d) == _vol()
    assert not (d / "spec.json.tmp").exists()
    (d / "spec.json").write_bytes(b"not json")
    assert records.read_local_spec(d) is None  # unknown uid: such a copy is never deleted by record


def test_generation_file(tmp_path: Path) -> None:
    assert records.read_generation(tmp_path) == 0
    records.write_generation(tmp_path, 7)
    assert records.read_generation(tmp_path) == 7


@pytest.mark.parametrize(("raw", "recorded", "holds", "refused"), [
    (None, 0, False, ""),
    (None, 1, True, "no cluster identity"),
    (records.encode_identity("c1", 1), 1, True, ""),
    (records.encode_identity("c1", 2), 1, True, ""),
    (records.encode_identity("c1", 1), 2, True, "older than generation 2"),
    (records.encode_identity("c1", 1), 2, False, ""),
    (records.encode_identity("other", 5), 1, True, "belongs to cluster other"),
    (records.encode_identity("other", 5), 0, False, "belongs to cluster other"),
    (b"garbage", 1, True, "not JSON"),
])
def test_identity_problem(raw: bytes | None, recorded: int, holds: bool, refused: str) -> None:
    why = records.identity_problem(raw, "c1", recorded, holds)
    assert (refused in why) if refused else why == ""
    assert bool(why) == bool(refused)


def _copy(node: str, seq: int, epoch: int, h: str = "", uid: str = "abc") -> records.LocalReplica:
    return records.LocalReplica(node=node, spec=_vol(uid=uid), seq=seq, epoch=epoch, last_hash=h or f"h{seq}")


def test_local_replicas_round_trip() -> None:
    copies = [_copy("n1", 5, 4), _copy("n1", 3, 2, uid="other")]
    gen, back = records.decode_local_replicas("n1", records.encode_local_replicas(3, copies))
    assert gen == 3 and back == copies


def test_local_replicas_bad_entries_are_skipped() -> None:
    text = json.dumps({"generation": 1, "replicas": [{"spec": {"name": "x"}}, 7,
                                                     json.loads(records.encode_local_replicas(1, [_copy("n1", 1, 1)]))
                                                     ["replicas"][0]]})
    gen, back = records.decode_local_replicas("n1", text)
    assert gen == 1 and [c.seq for c in back] == [1]
    with pytest.raises(Corrupt):
        records.decode_local_replicas("n1", "[]")


def test_rebuild_volume_picks_newest_copy() -> None:
    copies = [_copy("n1", 9, 4), _copy("n2", 12, 4), _copy("n3", 12, 4), _copy("n4", 30, 3)]
    v = records.rebuild_volume("db1", copies, set())
    assert v is not None
    assert v.coordinator == "n2"  # highest (epoch, seq); ties broken by node id
    assert v.replicas == ["n2", "n3", "n1", "n4"] and v.in_sync == ["n2", "n3"]
    assert v.epoch == 5 and v.uid == "abc" and v.size == _vol().size
    assert v.min_replicas == 2
    assert records.decode_volume("volumes/db1", records.encode_volume(v)) == v


def test_rebuild_volume_diverged_last_batch_is_not_in_sync() -> None:
    v = records.rebuild_volume("db1", [_copy("n1", 12, 4, "a"), _copy("n2", 12, 4, "b")], set())
    assert v is not None and v.in_sync == [v.coordinator] and v.min_replicas == 1


def test_rebuild_volume_ignores_deleted_uids() -> None:
    copies = [_copy("n1", 50, 9, uid="old"), _copy("n2", 2, 1, uid="new")]
    v = records.rebuild_volume("db1", copies, {"old"})
    assert v is not None and v.uid == "new" and v.replicas == ["n2"] and v.coordinator == "n2"
    assert records.rebuild_volume("db1", copies, {"old", "new"}) is None
    assert records.rebuild_volume("db1", [_copy("n1", 1, 1, uid="")], set()) is None
