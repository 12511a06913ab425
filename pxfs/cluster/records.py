"""Every control-store key and record: one place that encodes, decodes, validates and versions them.

Key schema (values are JSON objects; records with a ``v`` field are versioned, older ones upgrade):

  cluster/identity          {"v":1, "id", "generation"}   which cluster this store belongs to; a node
                            refuses an empty or foreign store while it holds data
  nodes/<id>                NodeInfo of a registered node (labels, address, pools with usage)
  volumes/<name>            VolumeRecord v2: spec (size, repl, block size, labels), replicas, coordinator,
                            epoch (the fencing token is (coordinator, epoch)), in_sync (replicas known to
                            hold every acknowledged batch and chunk), min_replicas, uid, source
  tombstones/<name>/<uid>   {"v":1, "ts"} the volume with this uid was deleted: its replicas may go
  usage/<name>              the coordinator's report: used bytes, inodes, seq, lagging, repair, space
  mounts/<name>/<id>        {"ts", "node"} of a live mount (renewed by its keepalive)
  removed/<id>              {"ts"} a node taken out with ``pxfs node remove``
  repair/<name>             {"ts"} the newest ``pxfs volume repair`` request
  schedules/<name>          {"every", "keep"} snapshot schedule

Readers never build records from raw JSON themselves: an undecodable value is skipped and logged
for its key (``decode_all``), never a crash of the node that read it. Writers through the
``ControlStore`` RPC are checked with ``validate`` before anything is stored.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from pxfs.errors import Corrupt, Invalid
from pxfs.model import NodeInfo, PoolInfo, VolumeInfo

log = logging.getLogger(__name__)
T = TypeVar("T")

IDENTITY_KEY = "cluster/identity"
VOLUME_PREFIX = "volumes/"
TOMBSTONE_PREFIX = "tombstones/"
VOLUME_VERSION = 2
_LOG_EVERY = 60.0
_last_logged: dict[str, float] = {}


def volume_key(name: str) -> str:
    return VOLUME_PREFIX + name


def tombstone_key(name: str, uid: str) -> str:
    return f"{TOMBSTONE_PREFIX}{name}/{uid}"


def _obj(key: str, raw: bytes) -> dict[str, Any]:
    try:
        d = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise Corrupt(f"control store record {key!r}", f"not JSON: {err}") from None
    if not isinstance(d, dict):
        raise Corrupt(f"control store record {key!r}", "not a JSON object")
    return d


def _strs(key: str, field: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
        raise Corrupt(f"control store record {key!r}", f"{field} must be a list of node ids")
    return list(value)


def _int(key: str, field: str, value: Any, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise Corrupt(f"control store record {key!r}", f"{field} must be an integer >= {lo}")
    return value


def decode_volume(key: str, raw: bytes) -> VolumeInfo:
    """A volume record; version 1 (no ``v``, no in-sync set) upgrades with every replica in sync,
    which is what the cluster that wrote it believed."""
    d = _obj(key, raw)
    version = d.get("v", 1)
    if version not in (1, VOLUME_VERSION):
        raise Corrupt(f"control store record {key!r}", f"volume record version {version!r} is not known here")
    try:
        name = d["name"]
        if not isinstance(name, str) or key != volume_key(name):
            raise Corrupt(f"control store record {key!r}", f"names volume {name!r}, not the key's")
        labels = d.get("labels", {})
        if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in labels.items()):
            raise Corrupt(f"control store record {key!r}", "labels must map text to text")
        replicas = _strs(key, "replicas", d.get("replicas", []))
        coordinator = d.get("coordinator", "")
        if not isinstance(coordinator, str):
            raise Corrupt(f"control store record {key!r}", "coordinator must be a node id")
        created = _int(key, "created_ns", d.get("created_ns", 0))
        v = VolumeInfo(name=name, size=_int(key, "size", d["size"], 1), repl=_int(key, "repl", d["repl"], 1),
                       block_size=_int(key, "block_size", d["block_size"], 1), labels=dict(labels),
                       replicas=replicas, coordinator=coordinator, epoch=_int(key, "epoch", d.get("epoch", 1), 1),
                       created_ns=created, source=str(d.get("source", "")))
        if version == 1:
            v.in_sync = list(replicas)
            v.uid = f"v1-{created:x}"
        else:
            v.in_sync = [r for r in _strs(key, "in_sync", d.get("in_sync", [])) if r in replicas]
            v.uid = str(d.get("uid", ""))
            v.min_replicas = _int(key, "min_replicas", d.get("min_replicas", 1), 1)
            v.clone_done = bool(d.get("clone_done", False))
    except KeyError as err:
        raise Corrupt(f"control store record {key!r}", f"field {err} missing") from None
    return v


def encode_volume(v: VolumeInfo) -> bytes:
    return json.dumps({"v": VOLUME_VERSION, "name": v.name, "size": v.size, "repl": v.repl,
                       "block_size": v.block_size, "labels": dict(v.labels), "replicas": list(v.replicas),
                       "coordinator": v.coordinator, "epoch": v.epoch, "created_ns": v.created_ns,
                       "source": v.source, "in_sync": [r for r in v.in_sync if r in v.replicas],
                       "min_replicas": v.min_replicas, "uid": v.uid, "clone_done": v.clone_done},
                      sort_keys=True).encode()


def encode_node(n: NodeInfo) -> bytes:
    d = n.to_json()
    d.pop("state")
    d.pop("last_seen_ms")
    return json.dumps(d).encode()


def decode_node(key: str, raw: bytes) -> NodeInfo:
    d = _obj(key, raw)
    try:
        pools = [PoolInfo(node=p["node"], path=p["path"], klass=p["class"], capacity=p["capacity"],
                          used=p["used"], free=p["free"], chunks=p.get("chunks", 0)) for p in d.get("pools", [])]
        n = NodeInfo(id=d["id"], address=d["address"], labels=dict(d.get("labels", {})), pools=pools,
                     seed=bool(d.get("seed", False)))
    except (KeyError, TypeError, AttributeError) as err:
        raise Corrupt(f"control store record {key!r}", f"not a node record: {err!r}") from None
    if not isinstance(n.id, str) or key != f"nodes/{n.id}" or not isinstance(n.address, str):
        raise Corrupt(f"control store record {key!r}", "node id or address does not match the key")
    return n


def decode_json(key: str, raw: bytes) -> dict[str, Any]:
    """Any other record (usage, mounts, repair, schedules, tombstones): a JSON object or Corrupt."""
    return _obj(key, raw)


def skip_bad(key: str, err: Exception) -> None:
    """Log an undecodable record once a minute per key: the reader goes on without it."""
    now = time.monotonic()
    if now - _last_logged.get(key, -_LOG_EVERY) >= _LOG_EVERY:
        _last_logged[key] = now
        log.error("control store: record %r skipped: %s", key, err)


def decode_all(items: Iterable[tuple[str, bytes]], decode: Callable[[str, bytes], T]) -> list[T]:
    out = []
    for key, raw in items:
        try:
            out.append(decode(key, raw))
        except (Corrupt, Invalid) as err:
            skip_bad(key, err)
    return out


def volumes(items: Iterable[tuple[str, bytes]]) -> list[VolumeInfo]:
    """Volume records of a ``range("volumes/")``; bad ones skipped and logged."""
    return decode_all(items, decode_volume)


def decode_identity(raw: bytes) -> tuple[str, int]:
    d = _obj(IDENTITY_KEY, raw)
    cid, gen = d.get("id"), d.get("generation")
    if not isinstance(cid, str) or not cid:
        raise Corrupt(f"control store record {IDENTITY_KEY!r}", "cluster id missing")
    return cid, _int(IDENTITY_KEY, "generation", gen, 1)


def encode_identity(cluster_id: str, generation: int) -> bytes:
    return json.dumps({"v": 1, "id": cluster_id, "generation": generation}).encode()


def validate(key: str, value: bytes) -> None:
    """Refuse a value a reader could not decode (called on every put and cas through the RPC)."""
    try:
        if key.startswith(VOLUME_PREFIX):
            decode_volume(key, value)
        elif key.startswith("nodes/"):
            decode_node(key, value)
        elif key == IDENTITY_KEY:
            decode_identity(value)
        else:
            decode_json(key, value)
    except Corrupt as err:
        raise Invalid(err.obj, err.cause) from None
