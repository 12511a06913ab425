"""``pxfs credential issue|revoke|revoked``: credentials from the cluster CA, and their revocation."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from pxfs.cli.output import emit_json, line, table
from pxfs.client.connect import cluster_admin
from pxfs.errors import Invalid
from pxfs.rpc import pki


def register(sub: argparse._SubParsersAction, client: Any) -> None:
    cr = sub.add_parser("credential", help="credentials for nodes, mounts and admins").add_subparsers(
        dest="sub", required=True, metavar="SUB")
    p = client(cr.add_parser("issue", help="a new credential signed by the cluster CA, written to --out DIR"))
    p.add_argument("--role", required=True, choices=pki.ROLES)
    p.add_argument("--name", required=True, help="who holds it: a node id for --role node, any label otherwise")
    p.add_argument("--volume", action="append", default=[], metavar="NAME",
                   help="(mount) a volume it may mount; repeat; none: every volume")
    p.add_argument("--days", type=float, default=pki.DEFAULT_DAYS)
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(run=cmd_issue, sync=True)
    p = client(cr.add_parser("revoke", help="every node refuses this credential from now on"))
    p.add_argument("target", metavar="DIR|SERIAL", help="a credential directory, or its serial (hex)")
    p.set_defaults(run=cmd_revoke)
    p = client(cr.add_parser("revoked", help="the revoked credentials"))
    p.set_defaults(run=cmd_revoked)


def cmd_issue(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    if (out / "cert.pem").exists():
        raise Invalid(f"credential {str(out)!r}", "exists: choose another --out (a credential is never overwritten)")
    who = pki.issue(args.cluster, out, args.name, args.role, args.volume, args.days)
    d = {"serial": f"{who.serial:x}", "name": who.name, "role": who.role,
         "volumes": sorted(who.volumes) if who.volumes is not None else None, "path": str(out)}
    if args.json:
        emit_json(d)
    else:
        line(f"credential {d['serial']} for {d['role']} {d['name']!r} written to {d['path']}")
    return 0


def _target(text: str) -> tuple[int, str]:
    path = Path(text)
    if path.is_dir():
        who = pki.load(path).identity
        return who.serial, who.name
    try:
        return int(text, 16), ""
    except ValueError:
        raise Invalid(f"credential {text!r}", "neither a credential directory nor a hex serial") from None


async def cmd_revoke(args: argparse.Namespace) -> int:
    serial, name = _target(args.target)
    async with cluster_admin(args.cluster) as (admin, _conn, _bridge, _cfg):
        await admin.revoke_credential(serial, name)
    if args.json:
        emit_json({"serial": f"{serial:x}", "name": name, "revoked": True})
    else:
        line(f"credential {serial:x} revoked: every node refuses it within seconds")
    return 0


async def cmd_revoked(args: argparse.Namespace) -> int:
    async with cluster_admin(args.cluster) as (admin, _conn, _bridge, _cfg):
        found = await admin.revoked_credentials()
    if args.json:
        emit_json(found)
        return 0
    table(None, ["SERIAL", "NAME", "REVOKED"], [[r["serial"], r["name"], time.strftime("%Y-%m-%d %H:%M:%S",
                                                                              time.localtime(r["at"]))]
                                          for r in found])
    return 0

