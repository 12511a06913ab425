"""Every control-store key and record: one place that encodes, decodes, validates and versions them.

Key schema (values are JSON objects; records with a ``v`` field are versioned, older ones upgrade):

  cluster/identity          {"v":1, "id", "generation"}   which cluster this store belongs to; a node
                            refuses an empty, foreign or older store while it holds data
  nodes/<id>                NodeInfo of a registered node (labels, address, pools with usage)
  volumes/<name>            VolumeRecord v2: spec (size, repl, block size, labels), replicas, coordinator,
                            epoch (the fencing token is (coordinator, epoch)), in_sync (replicas known to
                            hold every acknowledged batch and chunk), min_replicas, uid, source,
                            max_inodes (absent or 0: derived from the size, VolumeInfo.inode_limit)
  tombstones/<name>/<uid>   {"v":1, "ts"} the volume with this uid was deleted: its replicas may go
  usage/<name>              the coordinator's report: used bytes, inodes, meta_bytes, seq, lagging,
                            repair, space
  mounts/<name>/<id>        {"ts", "node", "http"} of a live mount (renewed by its keepalive; http:
                            HOST:PORT of its /metrics, absent or "" when it serves none)
  removed/<id>              {"ts"} a node taken out with ``pxfs node remove``
  repair/<name>             {"ts"} the newest ``pxfs volume repair`` request
  schedules/<name>          {"every", "keep"} snapshot schedule
  revoked/<serial hex>      {"v":1, "name", "ts"} a credential every node refuses (``pxfs credential revoke``)

A replica keeps its own copy of its volume's record in ``STATE/volumes/<name>/spec.json``
(``write_local_spec``): the uid of the local copy, and what ``pxfs cluster recover`` rebuilds a lost
record from. ``STATE/store-generation`` holds the newest identity generation the node accepted.

Readers never build records from raw JSON themselves: an undecodable value is skipped and logged
for its key (``decode_all``), never a crash of the node that read it. Writers through the
``ControlStore`` RPC are checked with ``validate`` before anything is stored.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pxfs.durable import replace_file
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
            v.max_inodes = _int(key, "max_inodes", d.get("max_inodes", 0))
    except KeyError as err:
        raise Corrupt(f"control store record {key!r}", f"field {err} missing") from None
    return v


def encode_volume(v: VolumeInfo) -> bytes:
    return json.dumps({"v": VOLUME_VERSION, "name": v.name, "size": v.size, "repl": v.repl,
                       "block_size": v.block_size, "labels": dict(v.labels), "replicas": list(v.replicas),
                       "coordinator": v.coordinator, "epoch": v.epoch, "created_ns": v.created_ns,
                       "source": v.source, "in_sync": [r for r in v.in_sync if r in v.replicas],
                       "min_replicas": v.min_replicas, "uid": v.uid, "clone_done": v.clone_done,
                       "max_inodes": v.max_inodes},
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
                     seed=bool(d.get("seed", False)), http=str(d.get("http", "")))
    except (KeyError, TypeError, AttributeError) as err:
        raise Corrupt(f"control store record {key!r}", f"not a node record: {err!r}") from None
    if not isinstance(n.id, str) or key != f"nodes/{n.id}" or not isinstance(n.address, str):
        raise Corrupt(f"control store record {key!r}", "node id or address does not match the key")
    return n


REVOKED_PREFIX = "revoked/"


def revoked_key(serial: int) -> str:
    return f"{REVOKED_PREFIX}{serial:x}"


def encode_revoked(name: str, ts: float) -> bytes:
    return json.dumps({"v": 1, "name": name, "ts": ts}).encode()


def revoked(items: Iterable[tuple[str, bytes]]) -> dict[int, dict[str, Any]]:
    """Serial -> {name, ts} of every revoked credential in a ``range("revoked/")``."""
    out: dict[int, dict[str, Any]] = {}
    for key, raw in items:
        try:
            serial = int(key.removeprefix(REVOKED_PREFIX), 16)
            out[serial] = _obj(key, raw)
        except (ValueError, Corrupt) as err:
            skip_bad(key, err)
    return out


def encode_tombstone(ts: float) -> bytes:
    return json.dumps({"v": 1, "ts": ts}).encode()


def tombstones(items: Iterable[tuple[str, bytes]]) -> dict[str, set[str]]:
    """Volume name -> the uids deleted under that name, from a ``range("tombstones/")``."""
    out: dict[str, set[str]] = {}
    for key, _raw in items:
        name, sep, uid = key.removeprefix(TOMBSTONE_PREFIX).partition("/")
        if not key.startswith(TOMBSTONE_PREFIX) or not sep or not name or not uid:
            skip_bad(key, Corrupt(f"control store record {key!r}", "not tombstones/<name>/<uid>"))
            continue
        out.setdefault(name, set()).add(uid)
    return out


def encode_mount(ts: float, node: str, http: str) -> bytes:
    return json.dumps({"ts": ts, "node": node, "http": http}).encode()


def mounts(items: Iterable[tuple[str, bytes]], prefix: str) -> list[dict[str, Any]]:
    """Registrations under ``prefix`` (``mounts/<volume>/``) as ``{"id", "ts", "node", "http"}``."""
    out = []
    for key, raw in items:
        try:
            d = _obj(key, raw)
            ts = d.get("ts", 0)
            if not isinstance(ts, int | float):
                raise Corrupt(f"control store record {key!r}", "ts must be a number")
        except Corrupt as err:
            skip_bad(key, err)
            continue
        out.append({"id": key.removeprefix(prefix), "ts": float(ts), "node": str(d.get("node", "")),
                    "http": str(d.get("http", ""))})
    return out


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
        elif key.startswith(REVOKED_PREFIX):
            if not revoked([(key, value)]):
                raise Corrupt(f"control store record {key!r}", "not revoked/<serial hex>")
        else:
            decode_json(key, value)
    except Corrupt as err:
        raise Invalid(err.obj, err.cause) from None


# -- what a node keeps on its own disk ------------------------------------------------------------

SPEC_FILE = "spec.json"
GENERATION_FILE = "store-generation"


def write_local_spec(volume_dir: Path, v: VolumeInfo) -> None:
    replace_file(volume_dir / SPEC_FILE, encode_volume(v))


def read_local_spec(volume_dir: Path) -> VolumeInfo | None:
    """The record a replica last saw for its volume; None when it has none (or an undecodable one,
    logged): such a copy's uid is unknown, so nothing may ever delete it on a record's say-so."""
    path = volume_dir / SPEC_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return decode_volume(volume_key(volume_dir.name), raw)
    except Corrupt as err:
        skip_bad(str(path), err)
        return None


def read_generation(state: Path) -> int:
    try:
        return int((state / GENERATION_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return 0


def write_generation(state: Path, generation: int) -> None:
    replace_file(state / GENERATION_FILE, f"{generation}\n".encode())


def identity_problem(raw: bytes | None, cluster_id: str, recorded: int, holds_data: bool) -> str:
    """Why a node must not act on this store ("" when it may).

    A node that holds no replica has nothing a wrong store could make it delete, so only a foreign
    store is refused then; one that holds data refuses a store without identity (empty: a lost or
    replaced control store), another cluster's, or an older generation than it last accepted (a
    restored backup that does not know what was created or deleted since).
    """
    if raw is None:
        if not holds_data:
            return ""
        return 'the control store has no cluster identity (empty or replaced) while this node holds replicas: ' \
               'run "pxfs cluster recover"'
    try:
        cid, gen = decode_identity(raw)
    except Corrupt as err:
        return f"{err.obj}: {err.cause}" if holds_data else ""
    if cid != cluster_id:
        return f"the control store belongs to cluster {cid}, not to this cluster {cluster_id}"
    if holds_data and gen < recorded:
        return (f"the control store is at generation {gen}, older than generation {recorded} this node "
                "last accepted (a restored copy?)")
    return ""


# -- recovery of lost volume records ------------------------------------------------------------------


@dataclass
class LocalReplica:
    """One node's copy of a volume, as ``VolumeService.localReplicas`` reports it."""

    node: str
    spec: VolumeInfo
    seq: int
    epoch: int
    last_hash: str  # hex
    meta_bytes: int = 0  # size of the keyspace's files on the node's disk (snapshots not counted)
    log_entries: int = 0  # batches still in its replication log


def encode_local_replicas(generation: int, replicas: list[LocalReplica]) -> str:
    return json.dumps({"v": 1, "generation": generation,
                       "replicas": [{"spec": json.loads(encode_volume(r.spec)), "seq": r.seq, "epoch": r.epoch,
                                     "last_hash": r.last_hash, "meta_bytes": r.meta_bytes,
                                     "log_entries": r.log_entries} for r in replicas]}, sort_keys=True)


def decode_local_replicas(node: str, text: str) -> tuple[int, list[LocalReplica]]:
    """A node's answer: the generation it last accepted and its copies; bad entries skipped and logged."""
    what = f"local replicas of node {node}"
    d = _obj(what, text.encode())
    gen = _int(what, "generation", d.get("generation", 0))
    out = []
    for item in d.get("replicas", []) if isinstance(d.get("replicas"), list) else []:
        try:
            if not isinstance(item, dict) or not isinstance(item.get("spec"), dict):
                raise Corrupt(what, "entry is not an object with a spec")
            spec_d = item["spec"]
            spec = decode_volume(volume_key(str(spec_d.get("name", ""))), json.dumps(spec_d).encode())
            out.append(LocalReplica(node=node, spec=spec, seq=_int(what, "seq", item.get("seq")),
                                    epoch=_int(what, "epoch", item.get("epoch")),
                                    last_hash=str(item.get("last_hash", "")),
                                    meta_bytes=_int(what, "meta_bytes", item.get("meta_bytes", 0)),
                                    log_entries=_int(what, "log_entries", item.get("log_entries", 0))))
        except Corrupt as err:
            skip_bad(f"{what}: {str(item)[:80]}", err)
    return gen, out


def rebuild_volume(name: str, copies: list[LocalReplica], deleted: set[str]) -> VolumeInfo | None:
    """A volume record rebuilt from the copies nodes hold, or None when none is usable.

    Copies of a deleted uid are ignored; of the remaining uids, the one whose best copy is newest
    wins. Replicas are the nodes that hold that uid, the coordinator the copy with the highest
    (epoch, seq), in sync the copies at its seq with its last batch, and the epoch goes past every
    copy's so no former coordinator's token stays valid.
    """
    live = [c for c in copies if c.spec.name == name and c.spec.uid and c.spec.uid not in deleted]
    if not live:
        return None
    best = min(live, key=lambda c: (-c.epoch, -c.seq, c.node))
    mine = sorted((c for c in live if c.spec.uid == best.spec.uid), key=lambda c: (-c.epoch, -c.seq, c.node))
    s = best.spec
    replicas = [c.node for c in mine]
    in_sync = [c.node for c in mine if c.seq == best.seq and c.last_hash == best.last_hash]
    return VolumeInfo(name=name, size=s.size, repl=s.repl, block_size=s.block_size, labels=dict(s.labels),
                      replicas=replicas, coordinator=best.node,
                      epoch=max(max(c.epoch for c in mine), s.epoch) + 1, created_ns=s.created_ns,
                      source=s.source, in_sync=in_sync, min_replicas=min(s.min_replicas, len(in_sync)),
                      uid=s.uid, clone_done=s.clone_done, max_inodes=s.max_inodes)
