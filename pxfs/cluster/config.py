"""The cluster directory: what a client or node needs to find and join a cluster.

Layout of DIR (``pxfs cluster init`` / ``pxfs up``):
  cluster.json   {"id", "name", "seed": "HOST:PORT", "nodes": ["HOST:PORT", ...], "store": "embedded",
                  "etcd": {}}
                 ``store`` is ``embedded`` (the seed holds it) or ``etcd://H1:2379,H2:2379[/PREFIX]``
                 (see pxfs.cluster.backends); ``etcd`` may name ``ca``, ``cert``, ``key`` (PEM files),
                 ``user`` and ``password_file``, paths relative to DIR. With etcd ``seed`` is only an
                 address clients try first, and may be empty
  ca.pem ca.key  the cluster CA (pxfs.rpc.pki); ca.key (0600) issues every credential: keep it here only
  admin/         the admin credential the CLI uses by default (``--credential`` / PXFS_CREDENTIAL override)
  nodes/<id>/    (``pxfs up`` only) node.json with its start arguments, pid, node.log, pool/, state/
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pxfs.durable import replace_file
from pxfs.errors import Exists, Invalid, NotFound
from pxfs.rpc import pki

# The commit window: a coordinator refuses a commit whose first chunk put began longer ago than this
# (the mount puts its chunks again, which refreshes their age, and retries), so a chunk a commit will
# name is never older than the window when it is named. A GC round sweeps only for the grace minus
# the window after its mark began, so it cannot delete a chunk a commit named after its mark: the
# grace must be the window plus the sweep's time, at least another window and a margin.
COMMIT_WINDOW = 60.0
MIN_COMMIT_WINDOW = 5.0
SWEEP_MARGIN = 20.0
MAX_GC_GRACE = 30 * 86400.0


def min_gc_grace(window: float = COMMIT_WINDOW) -> float:
    return 2 * window + SWEEP_MARGIN


MIN_GC_GRACE = min_gc_grace()


def check_gc_grace(grace: float, what: str, window: float = COMMIT_WINDOW) -> float:
    """The one rule for a GC grace period (cluster.json, `pxfs up`, `pxfs gc`, the node's RPC)."""
    least = min_gc_grace(window)
    if not least <= grace <= MAX_GC_GRACE:  # NaN fails too
        raise Invalid(what, f"must be {least:g} s (twice the commit window of {window:g} s, and "
                      f"{SWEEP_MARGIN:g} s) to 30 days: a younger chunk may be about to be named by a commit")
    return grace


def check_commit_window(window: float, what: str) -> float:
    if not MIN_COMMIT_WINDOW <= window <= 3600:  # NaN fails too
        raise Invalid(what, f"must be {MIN_COMMIT_WINDOW:g} to 3600 s")
    return window


@dataclass
class ClusterConfig:
    id: str
    name: str
    seed: str
    nodes: list[str] = field(default_factory=list)
    store: str = "embedded"
    etcd: dict[str, str] = field(default_factory=dict)  # TLS and login for an etcd store
    # Fault handling (seconds; bytes/s): see pxfs.cluster.manager and pxfs.cluster.repair.
    failover_after: float = 2.0
    replace_after: float = 600.0
    repair_rate: float = 200e6
    # Automatic GC rounds at least this often (0: only `pxfs gc`); a full pool, or puts of a tenth of
    # a pool since the last round, start one sooner (pxfs.cluster.gc).
    gc_interval: float = 600.0
    gc_grace: float = MIN_GC_GRACE  # a chunk younger than this is never collected (>= min_gc_grace)
    commit_window: float = COMMIT_WINDOW  # see COMMIT_WINDOW

    def addresses(self) -> list[str]:
        """Where a client tries to connect: the seed first, then every known node."""
        out = [self.seed] if self.seed else []
        out += [a for a in self.nodes if a != self.seed]
        return out


def init_cluster(directory: Path, name: str, seed: str, store: str = "embedded", cluster_id: str = "",
                 etcd: dict[str, str] | None = None) -> ClusterConfig:
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "cluster.json").exists():
        raise Exists(f"cluster directory {str(directory)!r}", "already initialised (cluster.json exists)")
    cfg = ClusterConfig(id=cluster_id or str(uuid.uuid4()), name=name, seed=seed, nodes=[seed] if seed else [],
                        store=store, etcd=dict(etcd or {}))
    os.chmod(directory, 0o700)
    pki.make_ca(directory, name)
    pki.issue(directory, directory / "admin", "admin", "admin")
    save_config(directory, cfg)
    return cfg


def save_config(directory: Path, cfg: ClusterConfig) -> None:
    replace_file(directory / "cluster.json", (json.dumps(asdict(cfg), indent=2) + "\n").encode())


def load_config(directory: Path) -> ClusterConfig:
    path = directory / "cluster.json"
    try:
        raw = json.loads(path.read_text())
        return ClusterConfig(**raw)
    except FileNotFoundError:
        raise NotFound(f"cluster directory {str(directory)!r}",
                       "no cluster.json (run `pxfs cluster init --dir DIR` or `pxfs up --dir DIR`)") from None
    except (ValueError, TypeError) as exc:
        raise Invalid(f"cluster config {str(path)!r}", f"unreadable: {exc}") from None


CREDENTIAL_ENV = "PXFS_CREDENTIAL"


def credential_dir(directory: Path) -> Path:
    """The credential a client of this cluster uses: ``$PXFS_CREDENTIAL`` (``--credential``), else the
    cluster directory's admin credential."""
    explicit = os.environ.get(CREDENTIAL_ENV)
    return Path(explicit) if explicit else directory / "admin"


def load_credential(directory: Path) -> pki.Credential:
    return pki.load(credential_dir(directory))
