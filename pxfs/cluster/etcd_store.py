"""The etcd backend of the control store: etcd v3 through its JSON gateway, with httpx on trio.

Why the gateway and httpx: httpx's AsyncClient runs on trio (through anyio) and is maintained; the
Python gRPC clients of etcd are unmaintained or asyncio-only, and grpcio/protobuf in the control path
would clash with the CSI stubs' protobuf (see shared notes, integrations.md). The gateway speaks JSON:
keys and values in base64, int64 fields as strings, fields at their default value left out.

Every key lives under a prefix (``/pxfs/`` unless the store URL names another), so one etcd cluster can
hold several pxfs clusters. Two key families are this backend's own, beside the records of
``pxfs.cluster.records``:

  alive/<node id>       {"ts"} under the node's lease: the node is up while its lease lives
  election/<name>       {"node", "lease"} under the holder's lease: who runs ``name`` (the manager)

CAS is a transaction on the key's mod revision when this store read the expected value itself (so a
value that went A -> B -> A since is not taken for unchanged), else on the value; expected ``None`` is
``create_revision == 0``. Calls try each endpoint in turn, failing over on connection errors and on
etcd's "no leader" answers, within ``call_timeout``; when none answers they raise ``Unavailable``.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from pxfs.cluster import records
from pxfs.errors import Invalid, PxfsError, Unauthorized, Unavailable
from pxfs.model import NodeInfo

log = logging.getLogger(__name__)
# httpx logs every request at INFO: with a keepalive a second per node that would drown the node's log.
logging.getLogger("httpx").setLevel(logging.WARNING)

DEFAULT_PREFIX = "/pxfs/"
LEASE_TTL = 3          # seconds: the heartbeat window of the embedded store (DOWN_AFTER)
CALL_TIMEOUT = 5.0     # one store call, over every endpoint: the same bound as RemoteStore
ATTEMPT_TIMEOUT = 1.5  # one endpoint: past an etcd election (1 s by default), short of the lease TTL
NODE_REFRESH = 60.0    # seconds between writes of an unchanged node record
ALIVE_PREFIX = "alive/"
ELECTION_PREFIX = "election/"
_REV_CACHE_MAX = 10000
# gRPC codes the gateway passes on: worth another endpoint (or the same one a moment later).
_RETRY_CODES = {4, 8, 10, 14}  # DeadlineExceeded, ResourceExhausted, Aborted, Unavailable
_AUTH_CODES = {16}             # Unauthenticated: an expired or revoked token


@dataclass(frozen=True)
class EtcdSettings:
    """Where the etcd cluster is and how to log in to it (cluster.json ``store`` and ``etcd``)."""

    endpoints: tuple[str, ...]          # HOST:PORT
    prefix: str = DEFAULT_PREFIX
    ca: str = ""                        # PEM files; any of them set means https
    cert: str = ""
    key: str = ""
    user: str = ""
    password: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.ca or self.cert)

    def urls(self) -> list[str]:
        scheme = "https" if self.tls else "http"
        return [f"{scheme}://{e}" for e in self.endpoints]

    def describe(self) -> str:
        return "etcd://" + ",".join(self.endpoints)


def parse_url(text: str) -> tuple[tuple[str, ...], str]:
    """``etcd://h1:2379,h2:2379[/prefix]`` -> (endpoints, prefix); Invalid naming the URL otherwise."""
    what = f"store {text!r}"
    if not text.startswith("etcd://"):
        raise Invalid(what, "expected etcd://HOST:PORT[,HOST:PORT...][/PREFIX]")
    rest = text.removeprefix("etcd://")
    hosts, slash, prefix = rest.partition("/")
    endpoints = tuple(h.strip() for h in hosts.split(",") if h.strip())
    if not endpoints:
        raise Invalid(what, "names no etcd endpoint (etcd://HOST:PORT[,HOST:PORT...])")
    for e in endpoints:
        host, sep, port = e.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise Invalid(what, f"endpoint {e!r} is not HOST:PORT")
    prefix = "/" + prefix.strip("/") + "/" if slash and prefix.strip("/") else DEFAULT_PREFIX
    return endpoints, prefix


def settings_from(store: str, etcd: dict[str, str], cluster_dir: Path) -> EtcdSettings:
    """Settings from cluster.json: ``store`` is the URL; ``etcd`` may name ca, cert, key (PEM files),
    user and password_file (paths relative to the cluster directory)."""
    endpoints, prefix = parse_url(store)
    unknown = set(etcd) - {"ca", "cert", "key", "user", "password_file"}
    if unknown:
        raise Invalid("cluster.json etcd", f"unknown setting(s) {', '.join(sorted(unknown))} "
                      "(ca, cert, key, user, password_file)")

    def path(name: str) -> str:
        value = etcd.get(name, "")
        if not value:
            return ""
        p = Path(value) if Path(value).is_absolute() else cluster_dir / value
        if not p.is_file():
            raise Invalid(f"cluster.json etcd.{name} {value!r}", f"no such file ({p})")
        return str(p)

    password = ""
    if etcd.get("password_file"):
        try:
            password = Path(path("password_file")).read_text().strip()
        except OSError as exc:
            raise Invalid(f"etcd password file {etcd['password_file']!r}", exc.strerror or str(exc)) from None
    if bool(etcd.get("user")) != bool(password):
        raise Invalid("cluster.json etcd", "user and password_file go together")
    if bool(etcd.get("cert")) != bool(etcd.get("key")):
        raise Invalid("cluster.json etcd", "cert and key go together")
    return EtcdSettings(endpoints, prefix, path("ca"), path("cert"), path("key"), etcd.get("user", ""), password)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _range_end(prefix: bytes) -> bytes:
    """The first key after every key starting with ``prefix`` (etcd's prefix range)."""
    p = bytearray(prefix)
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return b"\0"  # every key


class EtcdError(PxfsError):
    """etcd answered with an error that another endpoint would answer the same way."""


class EtcdStore:
    """The ``ControlStore`` protocol on etcd; also the node's lease (heartbeats, election)."""

    def __init__(self, settings: EtcdSettings, *, ttl: int = LEASE_TTL, call_timeout: float = CALL_TIMEOUT,
                 attempt_timeout: float = ATTEMPT_TIMEOUT, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings, self.ttl = settings, ttl
        self._transport = transport  # tests: answers that a real etcd cannot be made to give
        self.call_timeout, self.attempt_timeout = call_timeout, attempt_timeout
        self._urls = settings.urls()
        self._current = 0             # the endpoint that answered last: tried first
        self._client: httpx.AsyncClient | None = None
        self._token: str | None = None
        self._auth_lock = trio.Lock()
        self._revs: dict[str, tuple[bytes, int]] = {}  # key -> (value, mod revision) as last read here
        self._lease: str | None = None
        self._renewed = 0.0
        self._lease_lock = trio.Lock()
        self._alive_on: str | None = None  # the lease the alive key was put under
        self._node_raw: bytes | None = None  # the node record as last written
        self._node_put = 0.0
        self.what = f"control store {settings.describe()}"

    # -- transport ------------------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            verify: ssl.SSLContext | bool = True
            if self.settings.tls:
                ctx = ssl.create_default_context(cafile=self.settings.ca or None)
                if self.settings.cert:
                    ctx.load_cert_chain(self.settings.cert, self.settings.key)
                verify = ctx
            # httpx's own timeout is a backstop; trio.fail_after bounds each attempt.
            self._client = httpx.AsyncClient(verify=verify, timeout=httpx.Timeout(self.call_timeout),
                                             limits=httpx.Limits(max_keepalive_connections=4),
                                             transport=self._transport)
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _order(self) -> list[int]:
        n = len(self._urls)
        return [(self._current + i) % n for i in range(n)]

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One gateway call: the first endpoint that answers, within ``call_timeout``."""
        return (await self._post_noting(path, body))[0]

    async def _post_noting(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """``_post``, and whether an earlier attempt of this call may have been applied (it was sent
        and its answer lost): a retried transaction then finds its own write as "changed"."""
        deadline = trio.current_time() + self.call_timeout
        errors: dict[str, str] = {}
        reauthed = False
        maybe_applied = False
        while True:
            for i in self._order():
                url = self._urls[i]
                left = deadline - trio.current_time()
                if left <= 0:
                    break
                headers = {}
                if self.settings.user:
                    token = await self._auth_token(url, min(left, self.attempt_timeout))
                    if not token:
                        errors[url] = "authentication got no answer"
                        continue
                    headers["Authorization"] = token
                try:
                    with trio.fail_after(min(left, self.attempt_timeout)):
                        r = await self._http().post(url + path, json=body, headers=headers)
                        data = r.json() if r.content else {}
                except trio.TooSlowError:
                    errors[url] = f"no answer in {min(left, self.attempt_timeout):g}s"
                    maybe_applied = True
                    continue
                except httpx.HTTPError as exc:
                    errors[url] = str(exc) or type(exc).__name__
                    # Only a failed connect is known not to have reached etcd.
                    maybe_applied |= not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
                    continue
                except ValueError:
                    errors[url] = f"HTTP {r.status_code}: not JSON"
                    continue
                if r.status_code == 200 and "error" not in data:
                    self._current = i
                    return data, maybe_applied
                code = int(data.get("code", 0))
                msg = data.get("message") or data.get("error") or f"HTTP {r.status_code}"
                if code in _AUTH_CODES and self.settings.user and not reauthed:
                    reauthed = True  # the token expired (etcd's simple tokens live 5 minutes): log in again
                    self._token = None
                    errors[url] = msg
                    continue
                if code in _RETRY_CODES or r.status_code >= 500 or "leader" in msg:
                    errors[url] = msg
                    continue
                if code in _AUTH_CODES or code == 7 or "user name is empty" in msg:
                    # Unauthenticated, PermissionDenied, or no user configured for an etcd with auth on
                    raise Unauthorized(self.what, f"{path}: {msg}")
                raise EtcdError(self.what, f"{path}: {msg}")
            if trio.current_time() >= deadline:
                detail = "; ".join(f"{u}: {e}" for u, e in errors.items()) or "no endpoint tried"
                raise Unavailable(self.what, f"no etcd member answers within {self.call_timeout:g}s ({detail})")
            await trio.sleep(min(0.1, max(0.0, deadline - trio.current_time())))

    async def _auth_token(self, url: str, timeout: float) -> str:
        async with self._auth_lock:
            if self._token is None:
                body = {"name": self.settings.user, "password": self.settings.password}
                try:
                    with trio.fail_after(timeout):
                        r = await self._http().post(url + "/v3/auth/authenticate", json=body)
                        data = r.json()
                except (trio.TooSlowError, httpx.HTTPError, ValueError) as exc:
                    # The call goes on to fail over like any other: no token is no answer.
                    log.debug("etcd authenticate at %s failed: %s", url, exc)
                    return ""
                if r.status_code != 200 or not data.get("token"):
                    raise Unauthorized(f"etcd user {self.settings.user!r}",
                                       data.get("message") or f"authentication refused (HTTP {r.status_code})")
                self._token = str(data["token"])
            return self._token

    # -- keys and values ------------------------------------------------------------------------

    def _key(self, key: str) -> bytes:
        return (self.settings.prefix + key).encode()

    def _remember(self, kv: dict[str, Any]) -> tuple[str, bytes]:
        key = _unb64(kv.get("key")).decode()[len(self.settings.prefix):]
        value = _unb64(kv.get("value"))
        if len(self._revs) >= _REV_CACHE_MAX:
            self._revs.clear()  # only an optimisation of CAS: forgetting is always safe
        self._revs[key] = (value, int(kv.get("mod_revision", 0)))
        return key, value

    async def get(self, key: str) -> bytes | None:
        data = await self._post("/v3/kv/range", {"key": _b64(self._key(key))})
        kvs = data.get("kvs") or []
        if not kvs:
            self._revs.pop(key, None)
            return None
        return self._remember(kvs[0])[1]

    async def put(self, key: str, value: bytes) -> None:
        await self._post("/v3/kv/put", {"key": _b64(self._key(key)), "value": _b64(value)})
        self._revs.pop(key, None)

    async def delete(self, key: str) -> bool:
        data = await self._post("/v3/kv/deleterange", {"key": _b64(self._key(key))})
        self._revs.pop(key, None)
        return int(data.get("deleted", 0)) > 0

    async def range(self, prefix: str) -> list[tuple[str, bytes]]:
        p = self._key(prefix)
        data = await self._post("/v3/kv/range", {"key": _b64(p), "range_end": _b64(_range_end(p))})
        return sorted(self._remember(kv) for kv in data.get("kvs") or [])

    async def cas(self, key: str, expected: bytes | None, value: bytes) -> bool:
        k = _b64(self._key(key))
        if expected is None:
            compare = {"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
        elif key in self._revs and self._revs[key][0] == expected:
            compare = {"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": str(self._revs[key][1])}
        else:
            compare = {"key": k, "target": "VALUE", "result": "EQUAL", "value": _b64(expected)}
        data, maybe_applied = await self._post_noting("/v3/kv/txn", {
            "compare": [compare],
            "success": [{"request_put": {"key": k, "value": _b64(value)}}],
            "failure": [{"request_range": {"key": k}}],
        })
        if data.get("succeeded"):
            rev = int(data.get("header", {}).get("revision", 0))
            self._revs[key] = (value, rev)  # a txn's header revision is the one its put made
            return True
        kvs = (data.get("responses") or [{}])[0].get("response_range", {}).get("kvs") or []
        if not kvs:
            self._revs.pop(key, None)
            return False
        _key, current = self._remember(kvs[0])
        # The key holds our value after an attempt whose answer was lost: that attempt made it.
        return maybe_applied and current == value

    # -- the node's lease: heartbeats, liveness, election ----------------------------------------

    async def lease(self) -> str:
        """This store's lease, granted or kept alive (at most every ttl/3); a new one if it expired."""
        async with self._lease_lock:
            now = trio.current_time()
            if self._lease is not None and now - self._renewed < self.ttl / 3:
                return self._lease
            if self._lease is not None:
                data = await self._post("/v3/lease/keepalive", {"ID": self._lease})
                if int(data.get("result", {}).get("TTL", 0)) > 0:
                    self._renewed = now
                    return self._lease
                log.warning("%s: lease %s expired (no keepalive for %ds): this node was seen down", self.what,
                            self._lease, self.ttl)
                self._lease = None
            data = await self._post("/v3/lease/grant", {"TTL": str(self.ttl)})
            self._lease, self._renewed = str(data["ID"]), now
            return self._lease

    async def revoke(self) -> None:
        """Give the lease up (a clean stop): the node is down and its election keys free at once."""
        lease, self._lease = self._lease, None
        if lease is not None:
            try:
                await self._post("/v3/lease/revoke", {"ID": lease})
            except PxfsError as err:
                log.info("%s: lease %s not revoked (%s); it expires in %ds", self.what, lease, err, self.ttl)

    async def heartbeat(self, node: NodeInfo) -> None:
        lease = await self.lease()
        if self._alive_on != lease:
            alive = json.dumps({"ts": time.time()}).encode()
            await self._post("/v3/kv/put", {"key": _b64(self._key(ALIVE_PREFIX + node.id)), "value": _b64(alive),
                                            "lease": lease})
            self._alive_on = lease
        raw = records.encode_node(node)
        now = trio.current_time()
        # Written when it changes, and once a minute in case the record went (a restored etcd).
        if raw != self._node_raw or now - self._node_put >= NODE_REFRESH:
            await self.put(f"nodes/{node.id}", raw)
            self._node_raw, self._node_put = raw, now

    async def liveness(self) -> list[NodeInfo]:
        # One transaction: the node records and the alive keys from one revision.
        nodes_p, alive_p = self._key("nodes/"), self._key(ALIVE_PREFIX)
        data = await self._post("/v3/kv/txn", {"success": [
            {"request_range": {"key": _b64(nodes_p), "range_end": _b64(_range_end(nodes_p))}},
            {"request_range": {"key": _b64(alive_p), "range_end": _b64(_range_end(alive_p))}},
        ]})
        responses = data.get("responses") or [{}, {}]
        kvs = [[self._remember(kv) for kv in (r.get("response_range", {}).get("kvs") or [])] for r in responses]
        alive = {k.removeprefix(ALIVE_PREFIX) for k, _ in kvs[1]}
        out = []
        for n in records.decode_all(sorted(kvs[0]), records.decode_node):
            n.state = "up" if n.id in alive else "down"
            n.last_seen_ms = 0
            out.append(n)
        return out

    async def campaign(self, name: str, holder: str) -> bool:
        """Whether ``holder`` holds election ``name`` now: taken if free (create-if-absent under this
        store's lease), kept while the lease lives; it frees itself when the lease expires."""
        lease = await self.lease()
        k = _b64(self._key(ELECTION_PREFIX + name))
        mine = json.dumps({"node": holder, "lease": lease}, sort_keys=True).encode()
        data = await self._post("/v3/kv/txn", {
            "compare": [{"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
            "success": [{"request_put": {"key": k, "value": _b64(mine), "lease": lease}}],
            "failure": [{"request_range": {"key": k}}],
        })
        if data.get("succeeded"):
            return True
        kvs = (data.get("responses") or [{}])[0].get("response_range", {}).get("kvs") or []
        return bool(kvs) and _unb64(kvs[0].get("value")) == mine

    async def resign(self, name: str, holder: str) -> bool:
        """Give election ``name`` up if ``holder`` holds it under this store's lease (the lease, and
        so the node's liveness, stays)."""
        if self._lease is None:
            return False
        k = _b64(self._key(ELECTION_PREFIX + name))
        mine = json.dumps({"node": holder, "lease": self._lease}, sort_keys=True).encode()
        data = await self._post("/v3/kv/txn", {
            "compare": [{"key": k, "target": "VALUE", "result": "EQUAL", "value": _b64(mine)}],
            "success": [{"request_delete_range": {"key": k}}],
        })
        return bool(data.get("succeeded"))

    async def holder(self, name: str) -> str:
        """The node holding election ``name``, "" when none."""
        raw = await self.get(ELECTION_PREFIX + name)
        try:
            return str(json.loads(raw)["node"]) if raw else ""
        except (ValueError, KeyError, TypeError):
            return ""

    # -- watches ----------------------------------------------------------------------------------

    async def watch(self, prefix: str, changed: Callable[[list[str]], None]) -> None:
        """Call ``changed(keys)`` with the keys under ``prefix`` as they change, and ``changed([])``
        each time the watch is (re)established (changes may have been missed meanwhile). Reconnects,
        to the next endpoint after a failure, resuming after the last revision seen. Runs until
        cancelled. A frozen member stalls it unnoticed: callers keep polling as a backstop."""
        p = self._key(prefix)
        next_rev = 0
        at = self._current
        while True:
            create: dict[str, Any] = {"key": _b64(p), "range_end": _b64(_range_end(p))}
            if next_rev:
                create["start_revision"] = str(next_rev)
            url = self._urls[at]
            try:
                headers = {}
                if self.settings.user:
                    headers["Authorization"] = await self._auth_token(url, self.attempt_timeout)
                async with self._http().stream("POST", url + "/v3/watch", json={"create_request": create},
                                               headers=headers,
                                               timeout=httpx.Timeout(self.attempt_timeout, read=None)) as r:
                    if r.status_code != 200:
                        raise ValueError(f"HTTP {r.status_code}")
                    async for line in r.aiter_lines():
                        if not line.strip():
                            continue
                        result = json.loads(line).get("result", {})
                        if result.get("canceled") or result.get("compact_revision"):
                            next_rev = 0  # compacted past our revision: from now on (callers re-read)
                            break
                        events = result.get("events") or []
                        if events:
                            next_rev = max(int(e["kv"].get("mod_revision", 0)) for e in events) + 1
                            changed([_unb64(e["kv"].get("key")).decode()[len(self.settings.prefix):]
                                     for e in events])
                        elif result.get("created"):
                            changed([])
            except (httpx.HTTPError, ValueError, KeyError, PxfsError) as exc:
                log.debug("%s: watch of %r at %s broke: %s", self.what, prefix, url, exc)
                at = (at + 1) % len(self._urls)
            await trio.sleep(0.2)

    # -- members ----------------------------------------------------------------------------------

    async def members(self) -> list[dict[str, Any]]:
        """Each endpoint's health as it answers now: {"endpoint", "healthy", "leader", "version", "error"}."""
        out: list[dict[str, Any]] = []

        async def one(url: str, endpoint: str) -> None:
            entry: dict[str, Any] = {"endpoint": endpoint, "healthy": False}
            try:
                with trio.fail_after(self.attempt_timeout):
                    r = await self._http().get(url + "/health")
                    entry["healthy"] = r.status_code == 200 and r.json().get("health") == "true"
                    if not entry["healthy"]:
                        entry["error"] = r.json().get("reason", "") or f"HTTP {r.status_code}"
                    headers = {}
                    if self.settings.user:
                        headers["Authorization"] = await self._auth_token(url, self.attempt_timeout)
                    s = (await self._http().post(url + "/v3/maintenance/status", json={}, headers=headers)).json()
                    entry["version"] = s.get("version", "")
                    entry["leader"] = bool(s.get("leader")) and s.get("leader") == s.get("header", {}).get("member_id")
            except trio.TooSlowError:
                entry["error"] = f"no answer in {self.attempt_timeout:g}s"
            except (httpx.HTTPError, ValueError, PxfsError) as exc:
                entry["error"] = str(exc) or type(exc).__name__
            out.append(entry)

        async with trio.open_nursery() as nursery:
            for url, endpoint in zip(self._urls, self.settings.endpoints, strict=True):
                nursery.start_soon(one, url, endpoint)
        order = list(self.settings.endpoints)
        return sorted(out, key=lambda e: order.index(e["endpoint"]))


class EtcdElection:
    """The manager role: held by whichever node holds the etcd election key under its lease."""

    def __init__(self, store: EtcdStore, name: str, node_id: str) -> None:
        self._store, self.name, self.node_id = store, name, node_id
        self._held = False

    async def lead(self) -> bool:
        try:
            held = await self._store.campaign(self.name, self.node_id)
        except PxfsError as err:
            # Unknown: act as not holding it. Whoever does hold it goes on; CAS orders their changes.
            if self._held:
                log.warning("node=%s %s: election unknown (%s): standing down", self.node_id, self.name, err)
            held = False
        if held != self._held:
            log.warning("node=%s %s: %s", self.node_id, self.name, "elected: running it here" if held
                        else "lost the election: another node runs it")
        self._held = held
        return held

    async def resign(self) -> None:
        try:
            if await self._store.resign(self.name, self.node_id):
                log.warning("node=%s %s: resigned: another node may run it", self.node_id, self.name)
        except PxfsError as err:
            log.info("node=%s %s: not resigned (%s); it frees itself with the lease", self.node_id, self.name, err)
        self._held = False
