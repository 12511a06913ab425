"""Block entries as slices: what a commit that adds slices does to the block map and the quota."""

from __future__ import annotations

import errno

import pytest

from pxfs.errors import FsError
from pxfs.meta import keys, slices
from pxfs.meta.fs import Meta
from pxfs.meta.slices import BlockWrite, whole

BLOCK = 4096
H = [bytes([i]) * 32 for i in range(1, 80)]


def _file(meta: Meta) -> int:
    return meta.create(1, b"f", 0o100644, 0, 0).ino


def test_encoding_round_trips_and_keeps_the_one_chunk_form() -> None:
    one = whole(H[0], 100)
    assert len(keys.encode_block(one)) == 36  # a block stored whole reads as it always did
    many = ((H[0], 0, 100), (H[1], 7, 3))
    assert keys.decode_block(keys.encode_block(many)) == many
    assert keys.decode_block(keys.encode_block(one)) == one


def test_slices_over_a_block_and_the_quota_counts_its_length(meta: Meta) -> None:
    ino = _file(meta)
    meta.commit_blocks(ino, {0: (H[0], 100)}, 100)
    meta.commit_blocks(ino, {0: BlockWrite(((H[1], 50, 10),), append=True)}, 100)
    meta.commit_blocks(ino, {0: BlockWrite(((H[2], 90, 30),), append=True)}, 120)
    assert meta.get_blocks(ino)[1] == {0: ((H[0], 0, 100), (H[1], 50, 10), (H[2], 90, 30))}
    assert meta.statfs()["used"] == 120
    # A slice hidden by a later one is dropped: its chunk is no longer named.
    meta.commit_blocks(ino, {0: BlockWrite(((H[3], 40, 30),), append=True)}, 120)
    assert H[1] not in meta.chunk_refs()
    meta.setattr(ino, size=60)
    assert meta.get_blocks(ino)[1] == {0: ((H[0], 0, 60), (H[3], 40, 20))}
    assert meta.statfs()["used"] == 60
    assert [(p[2], p[3]) for p in meta.locate_chunks({H[3]})] == [(40, 20)]


def test_a_block_holds_a_bounded_number_of_slices(meta: Meta) -> None:
    ino = _file(meta)
    meta.commit_blocks(ino, {0: (H[0], BLOCK)}, BLOCK)
    for i in range(1, slices.MAX_SLICES):
        meta.commit_blocks(ino, {0: BlockWrite(((H[i], i, 1),), append=True)}, BLOCK)
    with pytest.raises(FsError) as e:
        meta.commit_blocks(ino, {0: BlockWrite(((H[70], 70, 1),), append=True)}, BLOCK)
    assert e.value.errno == errno.EINVAL
    meta.commit_blocks(ino, {0: (H[71], BLOCK)}, BLOCK)  # written whole: one slice again
    assert meta.get_blocks(ino)[1] == {0: whole(H[71], BLOCK)}


def test_a_slice_must_lie_within_its_block(meta: Meta) -> None:
    ino = _file(meta)
    for bad in [(H[0], BLOCK - 1, 2), (H[0], -1, 2)]:
        with pytest.raises(FsError) as e:
            meta.commit_blocks(ino, {0: BlockWrite((bad,), append=True)}, 2 * BLOCK)
        assert e.value.errno == errno.EINVAL
