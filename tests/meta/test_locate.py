"""Where chunks are used (``Meta.locate_chunks``, scrub's and fsck's report): files by path from the
root, directories at any depth, unlinked-but-open files by inode (after the paths), in (path, offset) order."""

from __future__ import annotations

import stat

from pxfs.meta.fs import Meta
from tests.meta.conftest import BLOCK

ROOT = 1
H1, H2, H3 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32


def test_places_by_path_in_order(meta: Meta) -> None:
    meta.capacity = 1 << 30
    a = meta.mkdir(ROOT, b"a", 0o755, 0, 0)
    b = meta.mkdir(a.ino, b"b", 0o755, 0, 0)
    deep = meta.mknod(b.ino, b"deep", stat.S_IFREG | 0o644, 0, 0, 0)
    meta.commit_blocks(deep.ino, {0: (H1, 5), 2: (H2, 7)}, 2 * BLOCK + 7)
    top = meta.mknod(ROOT, b"top", stat.S_IFREG | 0o644, 0, 0, 0)
    meta.commit_blocks(top.ino, {1: (H1, 3)}, BLOCK + 3)
    gone = meta.create(ROOT, b"gone", stat.S_IFREG | 0o644, 0, 0)
    meta.commit_blocks(gone.ino, {0: (H1, 1)}, 1)
    meta.unlink(ROOT, b"gone")  # still open: an orphan
    assert meta.locate_chunks({H1, H2}) == [
        (H1, b"/a/b/deep", 0, 5),
        (H2, b"/a/b/deep", 2 * BLOCK, 7),
        (H1, b"/top", BLOCK, 3),
        (H1, f"<orphan ino {gone.ino}>".encode(), 0, 1),
    ]
    assert meta.locate_chunks({H3}) == []
    meta.rename(a.ino, b"b", ROOT, b"moved")
    assert [p for _h, p, _o, _n in meta.locate_chunks({H2})] == [b"/moved/deep"]
