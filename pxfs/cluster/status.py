"""The cluster's status document (``pxfs status --json``, a node's ``/api/status``), built in one place."""

from __future__ import annotations

from typing import Any

from pxfs.model import NodeInfo, VolumeInfo


def report(info: dict[str, str], nodes: list[NodeInfo], vols: list[VolumeInfo], store: dict[str, Any],
           members: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """health: healthy, degraded (a node down, a volume not healthy, a store member sick) or needs recovery."""
    up = sum(1 for n in nodes if n.state == "up")
    degraded = [v.name for v in vols if v.state != "healthy"]
    sick = [m["endpoint"] for m in members or [] if not m["healthy"]]
    health = "healthy" if up == len(nodes) and not degraded and not sick else "degraded"
    if store.get("problem", ""):
        health = "needs recovery"
    store = dict(store)
    if members is not None:
        store["members"] = members
    return {"cluster": info, "health": health, "store": store, "nodes": [n.to_json() for n in nodes],
            "volumes": [v.to_json() for v in vols]}


async def of_admin(admin: Any) -> dict[str, Any]:
    """The document from a ``ClusterAdmin`` (or an ``AdminClient``: the same methods)."""
    return report(await admin.cluster_info(), await admin.list_nodes(), await admin.list_volumes(),
                  await admin.store_check())
