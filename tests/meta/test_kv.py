"""The KV engines: atomic sequenced batches, ordered scans, the replication log (both engines)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from pxfs.errors import Conflict, Corrupt, Invalid
from pxfs.meta.kv import KV, Batch, MemKV, RocksKV


def batch(*ops: tuple[bytes, bytes | None]) -> Batch:
    b = Batch()
    for key, value in ops:
        if value is None:
            b.delete(key)
        else:
            b.put(key, value)
    return b


def dump(kv: KV) -> list[tuple[bytes, bytes]]:
    return list(kv.scan(b""))


def test_batch_roundtrip() -> None:
    b = batch((b"a", b"1"), (b"", b""), (b"b", None), (b"\x00" * 300, b"x" * 70000))
    assert len(b) == 4
    assert Batch.decode(b.encode()).ops == b.ops
    assert Batch.decode(b"").ops == []


@pytest.mark.parametrize("cut", [1, 4, 6, 9])
def test_batch_decode_truncated_is_corrupt(cut: int) -> None:
    data = batch((b"key", b"value")).encode()
    with pytest.raises(Corrupt):
        Batch.decode(data[:-cut])


def test_batch_decode_bad_tag_is_corrupt() -> None:
    with pytest.raises(Corrupt):
        Batch.decode(b"\x07\x00\x00\x00\x00")


def test_empty_store(kv: KV) -> None:
    assert kv.seq == 0
    assert kv.get(b"a") is None
    assert dump(kv) == []
    assert kv.log_since(0) == []


def test_write_assigns_sequence_numbers(kv: KV) -> None:
    assert kv.write(batch((b"a", b"1"))) == 1
    assert kv.write(batch((b"b", b"2"), (b"a", None))) == 2
    assert kv.seq == 2
    assert kv.get(b"a") is None
    assert kv.get(b"b") == b"2"


def test_ops_apply_in_order(kv: KV) -> None:
    kv.write(batch((b"k", b"1"), (b"k", None), (b"j", None), (b"j", b"2"), (b"k", b"3")))
    assert dump(kv) == [(b"j", b"2"), (b"k", b"3")]


def test_reserved_keys_are_refused_and_nothing_applies(kv: KV) -> None:
    with pytest.raises(Invalid):
        kv.write(batch((b"a", b"1"), (b"\xffseq", b"x")))
    assert kv.seq == 0
    assert kv.get(b"a") is None


def test_scan_order_prefix_start_limit(kv: KV) -> None:
    keys = [b"a", b"b\x00", b"b", b"b\xff", b"ba", b"bb", b"c", b"\x00", b"\xfe\xff"]
    kv.write(batch(*[(k, k) for k in keys]))
    assert [k for k, _ in kv.scan(b"")] == sorted(keys)
    assert [k for k, _ in kv.scan(b"b")] == [b"b", b"b\x00", b"ba", b"bb", b"b\xff"]
    assert [k for k, _ in kv.scan(b"b", start=b"b\x01")] == [b"ba", b"bb", b"b\xff"]
    assert [k for k, _ in kv.scan(b"b", start=b"a")] == [b"b", b"b\x00", b"ba", b"bb", b"b\xff"]
    assert [k for k, _ in kv.scan(b"b", limit=2)] == [b"b", b"b\x00"]
    assert list(kv.scan(b"b", limit=0)) == []
    assert [k for k, _ in kv.scan(b"\xfe")] == [b"\xfe\xff"]
    assert all(v == k for k, v in kv.scan(b""))


def test_scan_hides_reserved_keys(kv: KV) -> None:
    kv.write(batch((b"a", b"1")))
    assert dump(kv) == [(b"a", b"1")]
    assert len(list(kv.scan(b"\xff"))) >= 2  # seq counter and one log entry, asked for explicitly


def test_log_records_every_batch(kv: KV) -> None:
    b1, b2 = batch((b"a", b"1")), batch((b"b", b"2"), (b"a", None))
    kv.write(b1)
    kv.write(b2)
    assert kv.log_since(0) == [(1, b1.encode()), (2, b2.encode())]
    assert kv.log_since(1) == [(2, b2.encode())]
    assert kv.log_since(2) == []
    with pytest.raises(Conflict):
        kv.log_since(3)


def test_follower_applies_log_and_converges(kv: KV) -> None:
    leader = MemKV()
    leader.write(batch((b"a", b"1"), (b"b", b"2")))
    leader.write(batch((b"a", None), (b"c", b"3")))
    for seq, data in leader.log_since(kv.seq):
        kv.apply(seq, data)
    assert kv.seq == 2
    assert dump(kv) == dump(leader)
    assert kv.log_since(0) == leader.log_since(0)  # a follower can become the next coordinator


def test_apply_out_of_order_is_conflict(kv: KV) -> None:
    data = batch((b"a", b"1")).encode()
    with pytest.raises(Conflict):
        kv.apply(2, data)
    kv.apply(1, data)
    with pytest.raises(Conflict):
        kv.apply(1, data)
    assert kv.seq == 1


def test_apply_corrupt_batch_changes_nothing(kv: KV) -> None:
    with pytest.raises(Corrupt):
        kv.apply(1, batch((b"a", b"1")).encode()[:-1])
    assert kv.seq == 0
    assert dump(kv) == []


def test_trim_log(kv: KV) -> None:
    for i in range(5):
        kv.write(batch((b"k%d" % i, b"v")))
    kv.trim_log(2)
    assert [s for s, _ in kv.log_since(3)] == [4, 5]
    with pytest.raises(Conflict):
        kv.log_since(2)
    kv.trim_log(10)  # never un-trims
    with pytest.raises(Conflict):
        kv.log_since(2)
    kv.trim_log(0)
    assert kv.log_since(5) == []
    assert len(dump(kv)) == 5  # data untouched
    assert kv.write(batch((b"z", b"1"))) == 6
    assert [s for s, _ in kv.log_since(5)] == [6]
    with pytest.raises(Invalid):
        kv.trim_log(-1)


def test_memkv_scan_survives_writes_during_iteration() -> None:
    kv = MemKV()
    kv.write(batch((b"a", b"1"), (b"c", b"3")))
    it = kv.scan(b"")
    assert next(it) == (b"a", b"1")
    kv.write(batch((b"a", None), (b"b", b"2")))
    assert list(it) == [(b"b", b"2"), (b"c", b"3")]


def test_rocks_reopen_keeps_data_seq_and_log(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    kv = RocksKV(path)
    b1 = batch((b"a", b"1"))
    kv.write(b1)
    kv.write(batch((b"b", b"2")))
    kv.write(batch((b"c", b"3")))
    kv.trim_log(2)
    kv.close()
    kv = RocksKV(path)
    try:
        assert kv.seq == 3
        assert dump(kv) == [(b"a", b"1"), (b"b", b"2"), (b"c", b"3")]
        assert [s for s, _ in kv.log_since(1)] == [2, 3]
        with pytest.raises(Conflict):
            kv.log_since(0)
        assert kv.write(batch((b"d", b"4"))) == 4
    finally:
        kv.close()


def test_trim_to_keeps_the_newest_entry_and_counts_what_it_drops(kv: KV) -> None:
    for i in range(5):
        kv.write(batch((b"k%d" % i, b"v" * 100)))
    entry = len(kv.log_entry(1) or b"")
    assert kv.trim_to(2) == 2 * entry and kv.trimmed == 2
    assert kv.trim_to(2) == 0  # nothing more to drop
    assert kv.trim_to(99) == 2 * entry and kv.trimmed == 4  # the newest stays: it names our history
    assert [s for s, _ in kv.log_since(4)] == [5]
    assert kv.log_entry(5) is not None


def test_log_floor_keeps_entries_and_bytes(kv: KV) -> None:
    for i in range(10):
        kv.write(batch((b"k%d" % i, b"v" * 1000)))
    entry = len(kv.log_entry(1) or b"")
    assert kv.log_floor(3, 1 << 20) == 7  # keep 8, 9, 10
    assert kv.log_floor(100, 2 * entry) == 8  # two entries' worth of bytes
    assert kv.log_floor(100, 1 << 20) == 0  # all of it fits
    kv.trim_to(5)
    assert kv.log_floor(100, 1 << 20) == 5


def test_a_full_copy_loads_into_an_empty_keyspace(kv: KV) -> None:
    source = MemKV()
    for i in range(3):
        source.write(batch((b"k%d" % i, b"v%d" % i)))
    last = source.log_entry(3)
    assert last is not None
    kv.load([(b"k0", b"v0"), (b"k1", b"v1")])
    assert kv.loading and kv.seq == 0
    with pytest.raises(Conflict):
        kv.apply(1, source.log_entry(1) or b"")  # a half copy takes no batches
    kv.load([(b"k2", b"v2")])
    kv.finish_load(3, last)
    assert not kv.loading and kv.seq == 3 and kv.trimmed == 2
    assert dump(kv) == dump(source) and kv.log_since(2) == [(3, last)]
    with pytest.raises(Conflict):
        kv.load([(b"x", b"y")])  # not empty any more
    with pytest.raises(Conflict):
        kv.finish_load(4, last)
    source.write(batch((b"k3", b"v3")))
    kv.apply(4, source.log_entry(4) or b"")
    assert dump(kv) == dump(source)


def test_a_full_copy_may_not_touch_reserved_keys(kv: KV) -> None:
    with pytest.raises(Invalid):
        kv.load([(b"\xffseq", b"\x00" * 8)])
    assert not kv.loading


def test_a_half_loaded_copy_says_so_after_a_restart(tmp_path: Path) -> None:
    kv = RocksKV(str(tmp_path / "db"))
    kv.load([(b"a", b"1")])
    kv.close()
    kv = RocksKV(str(tmp_path / "db"))
    try:
        assert kv.loading and kv.seq == 0
    finally:
        kv.close()


def test_compaction_gives_back_the_space_of_deleted_and_trimmed_records(tmp_path: Path) -> None:
    kv = RocksKV(str(tmp_path / "db"))
    try:
        for i in range(200):
            kv.write(batch((b"x%d" % i, b"v" * 60000)))
        for i in range(200):
            kv.write(batch((b"x%d" % i, None)))
        kv.trim_to(kv.seq)
        assert kv.churn_bytes > 2 * 200 * 60000 and kv.churn_deletes >= 400
        assert kv.disk_bytes() > 200 * 60000
        kv.compact()
        assert kv.disk_bytes() < 1 << 20 and kv.churn_bytes == 0
        assert dump(kv) == [] and kv.seq == 400
    finally:
        kv.close()
    kv.compact()  # after close: nothing to do, no error


def test_deferred_sync_counts_what_is_on_disk(tmp_path: Path) -> None:
    """Group commit: batches written with deferred_sync are durable once ``sync`` returns (which
    covers all of them at once), and a close puts any that were not synced on disk."""
    kv = RocksKV(str(tmp_path / "kv"))
    kv.deferred_sync = True
    for i in range(3):
        b = Batch()
        b.put(b"k%d" % i, b"v")
        kv.write(b)
    assert (kv.seq, kv.synced) == (3, 0)
    assert kv.sync() == 3 and kv.synced == 3
    b = Batch()
    b.put(b"k9", b"v")
    kv.write(b)
    assert kv.synced == 3
    kv.close()
    again = RocksKV(str(tmp_path / "kv"))
    assert again.seq == again.synced == 4 and again.get(b"k9") == b"v"
    again.close()


def test_touched_counts_the_owners_gets_scanned_keys_and_writes(kv: KV) -> None:
    b = Batch()
    for i in range(10):
        b.put(b"k%d" % i, b"v")
    kv.write(b)
    base = kv.touched
    assert base >= 10
    kv.get(b"k1")
    assert len(list(kv.scan(b"k", limit=4))) == 4
    assert kv.touched == base + 1 + 4
    # A worker thread's scan holds no event loop: not the owner's cost.
    done = threading.Thread(target=lambda: list(kv.scan(b"k")))
    done.start()
    done.join()
    assert kv.touched == base + 5
