"""A block's content as slices: what a block map entry holds and how a reader assembles it.

A block is a list of slices ``(hash, offset, length)``: the chunk named ``hash`` holds the bytes
``[offset, offset + length)`` of the block, later slices over earlier ones, zeros wherever no slice
reaches (JuiceFS's slices, one level: a block's slices, no chunk-within-chunk). A whole-block write is
one slice at offset 0; a small write is one small slice added to the block, so it costs a chunk of its
own size instead of a rewrite of the block. The writer merges a block's slices when they pile up
(``plan``): size-tiered, as an LSM tree compacts, the newest slices into one as long as the next
older one is no bigger than what is merged, so a log appended record by record rewrites each byte a
few times rather than the whole block per record; a block holds at most ``MERGE_AT`` slices after a
write, and the chunks it names stay within twice its length.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

Slice = tuple[bytes, int, int]  # (BLAKE3 hash of the chunk, offset in the block, length)
Block = tuple[Slice, ...]
BlockMap = dict[int, Block]  # block index -> slices; a missing index is a hole


@dataclass(frozen=True)
class BlockWrite:
    """What a commit does to one block: replace its slices (no slices: punch a hole), or ``append``
    slices over the ones it has."""

    slices: Block
    append: bool = False


def as_write(w: BlockWrite | tuple[bytes, int]) -> BlockWrite:
    """A ``(hash, length)`` pair is the block written whole as one chunk."""
    return w if isinstance(w, BlockWrite) else BlockWrite(whole(*w))

# Slices a writer lets a block reach before it merges them: a read of the block fetches at most this
# many chunks, and a merge rewrites the block once per this many small writes.
MERGE_AT = 16
# What a block map entry may hold at all (a mount merges long before): bounds one entry's bytes.
MAX_SLICES = 64


def whole(digest: bytes, length: int) -> Block:
    """A block written as one chunk (the empty block when ``length`` is 0: a hole)."""
    return ((digest, 0, length),) if length else ()


def extent(block: Block) -> int:
    """Bytes of the block the slices reach (the rest, up to the block end, reads as zeros)."""
    return max((off + n for _h, off, n in block), default=0)


def referenced(block: Block) -> int:
    """Bytes of chunks the block names (what it costs on a pool, before dedup)."""
    return sum(n for _h, _off, n in block)


def hashes(block: Block) -> list[bytes]:
    return [h for h, _off, _n in block]


def cut(block: Block, keep: int) -> Block:
    """The block truncated to its first ``keep`` bytes: slices shortened or dropped."""
    out = []
    for h, off, n in block:
        n = min(n, keep - off)
        if n > 0:
            out.append((h, off, n))
    return tuple(out)


def add(block: Block, new: Iterable[Slice]) -> Block:
    """``new`` written over ``block``; slices wholly hidden by later ones are dropped (their chunks
    are then named no more, and garbage collection may take them)."""
    merged = list(block) + [s for s in new if s[2] > 0]
    kept: list[Slice] = []
    covered: list[tuple[int, int]] = []  # ranges hidden by the slices kept so far (the later ones)
    for s in reversed(merged):
        _h, off, n = s
        if not _within(covered, off, off + n):
            kept.append(s)
            covered = union(covered, off, off + n)
    return tuple(reversed(kept))


@dataclass(frozen=True)
class Plan:
    """How a writer stores the ranges it wrote over a block's ``old`` slices: each range as a slice
    of its own over them (``append``), or ``keep`` the oldest slices as they are and replace the rest
    with one chunk of the block's bytes ``[lo, hi)`` (the ranges included)."""

    append: bool
    keep: Block = ()
    lo: int = 0
    hi: int = 0


def plan(old: Block, ranges: list[tuple[int, int]], end: int) -> Plan:
    """``ranges`` (sorted, disjoint) written over ``old``; ``end``: the block's extent afterwards."""
    new_bytes = sum(b - a for a, b in ranges)
    if len(old) + len(ranges) <= MERGE_AT and referenced(old) + new_bytes <= 2 * end:
        return Plan(append=True)
    merged = new_bytes
    k = 0  # the newest k old slices go into the merge
    while k < len(old) and (old[-1 - k][2] <= merged or len(old) - k + 1 > MERGE_AT // 2):
        merged += old[-1 - k][2]
        k += 1
    parts = [(off, off + n) for _h, off, n in old[len(old) - k:]] + list(ranges)
    lo, hi = min(a for a, _b in parts), max(b for _a, b in parts)
    keep = old[:len(old) - k]
    if 2 * (hi - lo) >= end or referenced(keep) + (hi - lo) > 2 * end:
        return Plan(append=False, lo=0, hi=end)  # as dear as merging it all: one chunk
    return Plan(append=False, keep=keep, lo=lo, hi=hi)


def assemble(block: Block, lo: int, hi: int, data: Callable[[bytes], bytes]) -> bytes:
    """Bytes ``[lo, hi)`` of the block, ``data(hash)`` giving each chunk's bytes."""
    if len(block) == 1 and block[0][1] == 0:
        h, _off, n = block[0]
        piece = data(h)[lo:min(hi, n)]
        return piece + bytes(hi - lo - len(piece)) if len(piece) < hi - lo else piece
    out = bytearray(hi - lo)
    for h, off, n in block:
        a, b = max(lo, off), min(hi, off + n)
        if a < b:
            out[a - lo:b - lo] = memoryview(data(h))[a - off:b - off]
    return bytes(out)


def _within(ranges: list[tuple[int, int]], lo: int, hi: int) -> bool:
    return any(a <= lo and hi <= b for a, b in ranges)


def union(ranges: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """Sorted, disjoint ``ranges`` with ``[lo, hi)`` added (touching ranges merge)."""
    out: list[tuple[int, int]] = []
    for a, b in sorted([*ranges, (lo, hi)]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out
