"""Answers that grow with a file or a volume come in bounded pages (issue 13): a block map of more
entries than one message holds is read whole at open, chunk references and the places chunks are
used in page by page, and freeing such a file is one small batch plus bounded purge steps — through
real `pxfs node` processes."""

from __future__ import annotations

import stat

import blake3
import trio

from pxfs.meta.slices import whole
from tests.cluster.test_hostile import BLOCK, create_volume, opened, put_everywhere
from tests.cluster.test_opids import seqs
from tests.conftest import Cluster

REG = stat.S_IFREG | 0o644
DATA = [b"chunk %d" % i for i in range(5)]
HASHES = [blake3.blake3(d).digest() for d in DATA]
N = 40000  # block map entries: more than two pages of 16384


async def test_a_block_map_of_many_pages(shared_cluster: Cluster) -> None:
    c = shared_cluster
    await create_volume(c, "paged")
    async with opened(c, "paged") as (_vs, vol, info):
        await put_everywhere(c, info, DATA)
        f = await vol.create(1, b"f", REG, 0, 0)
        blocks = {i: (HASHES[i % 5], 1) for i in range(N)}  # one byte of each block: a sparse file
        for lo in range(0, N, 10000):
            part = {i: blocks[i] for i in range(lo, lo + 10000)}
            await vol.commit(f.ino, part, (lo + 9999) * BLOCK + 1, 0, held=list(info.replicas))
        attr, got = await vol.open(f.ino)
        blocks = {i: whole(h, n) for i, (h, n) in blocks.items()}
        assert attr.size == (N - 1) * BLOCK + 1 and got == blocks
        page, more = await vol.block_page(f.ino, 100, 10)
        assert page == {i: blocks[i] for i in range(100, 110)} and more
        page, more = await vol.block_page(f.ino, N - 3, 0)
        assert len(page) == 3 and not more
        await vol.release(f.ino)
        await vol.release(f.ino)  # create counted a handle too
        assert await vol.chunk_refs(page=2) == sorted(HASHES)  # three pages of two
        assert sorted(await vol.chunk_refs()) == sorted(HASHES)

        # Where chunks are used: paged in (path, offset) order, whatever the pass's size.
        d = await vol.mkdir(1, b"d", 0o755, 0, 0)
        g = await vol.create(d.ino, b"g", REG, 0, 0)
        await vol.commit(g.ino, {0: (HASHES[1], 1)}, 1, 0, held=list(info.replicas))
        await vol.release(g.ino)
        want = [(HASHES[1], b"/d/g", 0, 1)] + [(HASHES[1], b"/f", i * BLOCK, 1) for i in range(1, N, 5)]
        assert await vol.locate([HASHES[1]], page=1000) == want  # 9 pages
        assert await vol.locate([HASHES[1], bytes(32)]) == want
        assert await vol.locate([bytes(32)]) == []
        await vol.unlink(d.ino, b"g")
        await vol.rmdir(1, b"d")

        before = (await seqs(c, "paged", [info.coordinator]))[info.coordinator]
        await vol.unlink(1, b"f")
        assert (await vol.statfs())["inodes"] == 1
        with trio.fail_after(60):
            while (await vol.statfs())["used"]:
                await trio.sleep(0.2)  # the purge steps of the supervision rounds, observed
        after = (await seqs(c, "paged", [info.coordinator]))[info.coordinator]
        assert after - before >= N // 4096  # the unlink, then a batch per 4096 entries
