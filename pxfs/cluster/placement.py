"""Where a volume's replicas go: distinct nodes, distinct zones where the labels allow, most room first.

Thin provisioning: the sizes of the volumes placed on a node may add up to at most ``overcommit``
times the node's pool capacity. Real usage is bounded by the pools themselves (ENOSPC at the reserve).
"""

from __future__ import annotations

from pxfs.errors import Invalid, NoSpace
from pxfs.model import NodeInfo

OVERCOMMIT = 4.0


def node_capacity(n: NodeInfo) -> int:
    return sum(p.capacity for p in n.pools)


def node_free(n: NodeInfo) -> int:
    return sum(p.free for p in n.pools)


def place(volume: str, nodes: list[NodeInfo], repl: int, size: int, committed: dict[str, int],
          overcommit: float = OVERCOMMIT, exclude: frozenset[str] = frozenset(),
          zones_taken: set[str] | None = None, avoid: frozenset[str] = frozenset()) -> list[str]:
    """Pick ``repl`` node ids for a volume of ``size`` bytes; raise with the reason when impossible.

    ``committed`` maps node id -> bytes of volume sizes already placed there. Nodes in ``avoid`` are
    taken only when distinct zones or the count need them (the embedded store's seed: a volume
    without it keeps its whole in-sync set changeable while the seed is down).
    """
    up = [n for n in nodes if n.state == "up" and n.pools and n.id not in exclude]
    if len(up) < repl:
        raise Invalid(f'volume "{volume}"', f"not enough nodes for repl={repl} (have {len(up)} up)")
    fits = [n for n in up if committed.get(n.id, 0) + size <= overcommit * node_capacity(n)]
    if len(fits) < repl:
        best = max((overcommit * node_capacity(n) - committed.get(n.id, 0) for n in up), default=0)
        raise NoSpace(f'volume "{volume}"',
                      f"size {size} exceeds the thin-provisioning limit ({overcommit:g}x pool capacity) on "
                      f"{len(up) - len(fits)} of {len(up)} nodes; need {repl} nodes, the roomiest has "
                      f"{max(0, int(best))} bytes left")
    fits.sort(key=lambda n: (n.id in avoid, -node_free(n), n.id))
    chosen: list[NodeInfo] = []
    zones: set[str] = set(zones_taken or ())
    for n in fits:  # first pass: one node per zone
        zone = n.labels.get("zone", f"node:{n.id}")
        if zone not in zones:
            chosen.append(n)
            zones.add(zone)
        if len(chosen) == repl:
            break
    for n in fits:  # second pass: fewer zones than repl, so share zones but never nodes
        if len(chosen) == repl:
            break
        if n not in chosen:
            chosen.append(n)
    return [n.id for n in chosen]
