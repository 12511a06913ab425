"""The volume plugin's calls (``/VolumeDriver.*``) on pxfs volumes.

Every pxfs volume of the cluster is a plugin volume (scope global: the same volume from any host).
A volume in use on this host has one pxfs mount at ``MOUNT_ROOT/NAME``, made at the first Mount and
unmounted at the last Unmount; the callers' IDs are counted in a state file, so a plugin restarted
in between still knows who holds what (and the mount daemons never stopped).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from pxfs.client import mounts, volumes
from pxfs.client.connect import open_cluster
from pxfs.durable import replace_file
from pxfs.errors import Invalid, NotFound, PxfsError
from pxfs.paths import is_name
from pxfs.rpc.bridge import Bridge
from pxfs.sizes import parse_size

log = logging.getLogger(__name__)

DEFAULT_SIZE = 10 << 30
OPTS = "size, repl, blockSize, label (KEY=VALUE[,KEY=VALUE]), minReplicas"


@dataclass
class PluginConfig:
    socket: Path
    cluster_dir: Path
    mount_root: Path = Path("/var/lib/pxfs/plugin/volumes")
    state_dir: Path = Path("/var/lib/pxfs/plugin")
    log_dir: Path = Path("/var/log/pxfs")


def spec_from_opts(name: str, opts: dict[str, Any]) -> tuple[volumes.VolumeSpec, bool]:
    """The volume ``Create`` asks for, and whether its size was given."""
    spec = volumes.VolumeSpec(name, DEFAULT_SIZE)
    for key, raw in opts.items():
        value = str(raw)
        try:
            if key == "size":
                spec.size = parse_size(value, "option size")
            elif key == "repl":
                spec.repl = int(value)
            elif key in ("blockSize", "block-size", "block_size"):
                spec.block_size = parse_size(value, "option blockSize")
            elif key == "minReplicas":
                spec.min_replicas = int(value)
            elif key in ("label", "labels"):
                for item in filter(None, (x.strip() for x in value.split(","))):
                    k, sep, v = item.partition("=")
                    if not sep or not k:
                        raise Invalid(f"option label {value!r}", "expected KEY=VALUE[,KEY=VALUE]")
                    spec.labels[k] = v
            else:
                raise Invalid(f"option {key!r}", f"unknown (pxfs takes {OPTS})")
        except ValueError:
            raise Invalid(f"option {key}={value!r}", "expected a whole number") from None
    return spec, "size" in opts


class Plugin:
    def __init__(self, cfg: PluginConfig, bridge: Bridge) -> None:
        self.cfg, self.bridge = cfg, bridge
        self._lock = trio.Lock()  # one change of the references or mounts at a time
        self._state = cfg.state_dir / "references.json"

    # -- references: caller IDs per volume, kept on disk -----------------------------------------
    def _refs(self) -> dict[str, list[str]]:
        try:
            data = json.loads(self._state.read_text())
            return {str(k): [str(i) for i in v] for k, v in data.get("volumes", {}).items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as exc:
            raise Invalid(f"plugin state {str(self._state)!r}", f"unreadable: {exc}") from None

    def _save(self, refs: dict[str, list[str]]) -> None:
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        body = {"version": 1, "volumes": {k: v for k, v in sorted(refs.items()) if v}}
        replace_file(self._state, (json.dumps(body, indent=1) + "\n").encode(), 0o600)

    def _mountpoint(self, name: str) -> Path:
        if not is_name(name):
            raise Invalid(f"volume {name!r}", "not a pxfs volume name (1-63 letters, digits, '_', '.', '-')")
        return self.cfg.mount_root / name

    def _serving(self, name: str) -> bool:
        rec = mounts.read_registry(self._mountpoint(name).resolve())
        return rec is not None and rec.volume == name and rec.serving()

    # -- the protocol ---------------------------------------------------------------------------
    async def handle(self, path: str, req: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        calls = {"/Plugin.Activate": self.activate, "/VolumeDriver.Create": self.create,
                 "/VolumeDriver.Remove": self.remove, "/VolumeDriver.Mount": self.mount,
                 "/VolumeDriver.Unmount": self.unmount, "/VolumeDriver.Path": self.path,
                 "/VolumeDriver.Get": self.get, "/VolumeDriver.List": self.list,
                 "/VolumeDriver.Capabilities": self.capabilities}
        call = calls.get(path)
        if call is None:
            return 404, {"Err": f"{path}: not a volume plugin call"}
        try:
            return 200, await call(req)
        except PxfsError as err:
            log.info("%s %s: %s", path, req.get("Name", ""), err)
            return 500, {"Err": str(err)}

    @staticmethod
    def _name(req: dict[str, Any]) -> str:
        name = req.get("Name")
        if not isinstance(name, str) or not name:
            raise Invalid("request", "no Name")
        return name

    async def activate(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"Implements": ["VolumeDriver"]}

    async def capabilities(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"Capabilities": {"Scope": "global"}}

    async def create(self, req: dict[str, Any]) -> dict[str, Any]:
        name = self._name(req)
        self._mountpoint(name)
        opts = req.get("Opts") or {}
        if not isinstance(opts, dict):
            raise Invalid(f'volume "{name}"', "Opts is not an object")
        spec, sized = spec_from_opts(name, opts)
        async with open_cluster(self.cfg.cluster_dir, self.bridge, peer="plugin") as c:
            existing = await volumes.find_volume(c, name)
            if existing is not None and not opts:
                return {"Err": ""}  # `volume create NAME` of a volume that exists: that one
            _v, made = await volumes.ensure_volume(c, spec, size_ok=None if sized else (lambda _s: True))
        if made:
            log.info("volume=%s created (%d bytes, repl %d)", name, spec.size, spec.repl)
        return {"Err": ""}

    async def remove(self, req: dict[str, Any]) -> dict[str, Any]:
        name = self._name(req)
        async with self._lock:
            holders = self._refs().get(name, [])
            if holders:
                raise Invalid(f'volume "{name}"', f"in use by {len(holders)} container(s) on this host")
            async with open_cluster(self.cfg.cluster_dir, self.bridge, peer="plugin") as c:
                await volumes.delete_volume(c, name)
        log.info("volume=%s removed", name)
        return {"Err": ""}

    async def mount(self, req: dict[str, Any]) -> dict[str, Any]:
        name, caller = self._name(req), str(req.get("ID") or "")
        mp = self._mountpoint(name)
        async with self._lock:
            refs = self._refs()
            if not await trio.to_thread.run_sync(self._serving, name):
                async with open_cluster(self.cfg.cluster_dir, self.bridge, peer="plugin") as c:
                    await c.admin.get_volume(name)  # NotFound names it before a mount is tried
                mp.mkdir(parents=True, exist_ok=True)
                self.cfg.log_dir.mkdir(parents=True, exist_ok=True)
                rec = await trio.to_thread.run_sync(lambda: mounts.mount(
                    self.cfg.cluster_dir, name, mp, fuse_options={"allow_other"},
                    log_path=self.cfg.log_dir / f"mount-{name}.log"))
                log.info("volume=%s mounted at %s (pid %d) for %s", name, mp, rec.pid, caller)
            holders = refs.setdefault(name, [])
            if caller not in holders:
                holders.append(caller)
            self._save(refs)
        return {"Mountpoint": str(mp), "Err": ""}

    async def unmount(self, req: dict[str, Any]) -> dict[str, Any]:
        name, caller = self._name(req), str(req.get("ID") or "")
        mp = self._mountpoint(name)
        async with self._lock:
            refs = self._refs()
            holders = refs.get(name, [])
            if caller in holders:
                holders.remove(caller)
            if not holders:
                if await trio.to_thread.run_sync(self._serving, name):
                    await trio.to_thread.run_sync(mounts.unmount, mp.resolve())
                    log.info("volume=%s unmounted from %s (last user %s)", name, mp, caller)
                refs.pop(name, None)
            self._save(refs)
        return {"Err": ""}

    async def path(self, req: dict[str, Any]) -> dict[str, Any]:
        name = self._name(req)
        mp = self._mountpoint(name)
        return {"Mountpoint": str(mp) if await trio.to_thread.run_sync(self._serving, name) else "", "Err": ""}

    async def get(self, req: dict[str, Any]) -> dict[str, Any]:
        name = self._name(req)
        if not is_name(name):
            raise NotFound(f'volume "{name}"', "no such volume")
        async with open_cluster(self.cfg.cluster_dir, self.bridge, peer="plugin") as c:
            v = await c.admin.get_volume(name)
        mounted = await trio.to_thread.run_sync(self._serving, name)
        status = {"size": v.size, "used": v.used, "repl": v.repl, "state": v.state,
                  "replicas": ",".join(v.replicas), "users": len(self._refs().get(name, []))}
        vol: dict[str, Any] = {"Name": v.name, "Status": status}
        if mounted:
            vol["Mountpoint"] = str(self._mountpoint(name))
        return {"Volume": vol, "Err": ""}

    async def list(self, req: dict[str, Any]) -> dict[str, Any]:
        async with open_cluster(self.cfg.cluster_dir, self.bridge, peer="plugin") as c:
            vols = await c.admin.list_volumes()
        out = []
        for v in vols:
            entry = {"Name": v.name}
            if await trio.to_thread.run_sync(self._serving, v.name):
                entry["Mountpoint"] = str(self._mountpoint(v.name))
            out.append(entry)
        return {"Volumes": out, "Err": ""}
