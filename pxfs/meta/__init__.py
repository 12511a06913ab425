"""Volume metadata: POSIX semantics (``fs.Meta``) over a tiny transactional KV (``kv``)."""

from pxfs.meta.fs import RENAME_EXCHANGE, RENAME_NOREPLACE, XATTR_CREATE, XATTR_REPLACE, Attr, Meta
from pxfs.meta.kv import KV, Batch, MemKV, RocksKV

__all__ = [
    "KV",
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "XATTR_CREATE",
    "XATTR_REPLACE",
    "Attr",
    "Batch",
    "MemKV",
    "Meta",
    "RocksKV",
]
