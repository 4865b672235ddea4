"""The Kubernetes source (``vipd run --kubernetes``): the API server instead of a directory.

For every kind vipd reads — Nodes, Services, EndpointSlices, Secrets (the BGP secrets
namespace only) and the cilium.io kinds in each version vipd accepts (v2 and v2alpha1) — one
task LISTs, then WATCHes from the list's resourceVersion with bookmarks (so a resumed watch
starts from a recent version), re-LISTs when the server answers 410 Gone (history compacted)
and reconnects with exponential back-off when the connection drops. Objects are validated by
the same function the file source uses (:func:`agent.config.loader.validate_document`) and
installed into the same :class:`~agent.store.Store` as one snapshot: after the source, there
is one code path.

The client is a small asyncio HTTP/1.1 client over the standard library (see
docs/kubernetes.md for why): GET with JSON bodies and chunked watch streams, bearer tokens and
TLS from a kubeconfig or the in-cluster service account.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import shutil
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator
from urllib.parse import urlencode, urlsplit

from agent.log import get_logger

__all__ = ["ClusterAccess", "KubeClient", "KubernetesSource", "ApiStatusError", "watched_resources"]

log = get_logger("config")   # the configuration source, like the file source

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
WATCH_TIMEOUT_S = 300          # the server ends a watch after this; we resume from the last rv
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.5, 30.0
NOT_SERVED_RETRY_S = 60.0      # a kind whose API version this cluster does not serve (no CRD)


class ApiStatusError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(f"HTTP {code}: {message}")
        self.code = code


# ------------------------------------------------------------------------------ cluster access


@dataclass
class ClusterAccess:
    """Where the API server is and how to authenticate (a kubeconfig or the service account)."""

    server: str
    token: str | None = None
    ssl_context: ssl.SSLContext | None = None
    origin: str = ""            # what the user gave: the kubeconfig path or "in-cluster"

    @classmethod
    def in_cluster(cls) -> "ClusterAccess":
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise ValueError("--kubernetes without --kubeconfig needs the in-cluster environment "
                             "(KUBERNETES_SERVICE_HOST/PORT are not set); give --kubeconfig PATH "
                             "when vipd runs outside a Pod")
        token_file = SERVICE_ACCOUNT / "token"
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise ValueError(f"in-cluster config: cannot read the service account token "
                             f"{token_file}: {exc.strerror}") from None
        ctx = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt"))
        if ":" in host:
            host = f"[{host}]"
        return cls(f"https://{host}:{port}", token, ctx, "in-cluster")

    @classmethod
    def from_kubeconfig(cls, path: str | Path) -> "ClusterAccess":
        import yaml

        where = f"kubeconfig {path}"
        try:
            cfg = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ValueError(f"{where}: cannot read: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"{where}: not YAML: {exc}") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{where}: must be a mapping (apiVersion: v1, kind: Config)")

        def named(section: str, name: str) -> dict:
            for entry in cfg.get(section) or []:
                if isinstance(entry, dict) and entry.get("name") == name:
                    return entry.get(section[:-1]) or {}
            raise ValueError(f"{where}: {section}: no entry named {name!r}")

        current = cfg.get("current-context")
        if not current:
            raise ValueError(f"{where}: current-context is not set")
        context = named("contexts", current)
        cluster = named("clusters", context.get("cluster", ""))
        user = named("users", context["user"]) if context.get("user") else {}
        server = cluster.get("server")
        if not server:
            raise ValueError(f"{where}: clusters[{context.get('cluster')}].cluster.server is not set")
        ctx = None
        if server.startswith("https://"):
            ctx = ssl.create_default_context()
            if cluster.get("certificate-authority-data"):
                ctx.load_verify_locations(cadata=base64.b64decode(
                    cluster["certificate-authority-data"]).decode())
            elif cluster.get("certificate-authority"):
                ctx.load_verify_locations(cafile=cluster["certificate-authority"])
            if cluster.get("insecure-skip-tls-verify"):
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            cert, key, tmp = _client_cert(user)
            try:
                if cert:
                    ctx.load_cert_chain(cert, key)
            finally:
                if tmp:   # the key is in memory now; leave no copy on disk
                    shutil.rmtree(tmp, ignore_errors=True)
        token = user.get("token")
        if not token and user.get("tokenFile"):
            token = Path(user["tokenFile"]).read_text().strip()
        return cls(server.rstrip("/"), token, ctx, str(path))


def _client_cert(user: dict) -> tuple[str | None, str | None, str | None]:
    """-> (certificate file, key file, temporary directory to remove after loading)."""
    if user.get("client-certificate"):
        return user["client-certificate"], user.get("client-key"), None
    if user.get("client-certificate-data"):
        # ssl wants files; a private temporary directory holds them for the load only
        d = tempfile.mkdtemp(prefix="vipd-kube-")
        paths = []
        for name in ("client-certificate-data", "client-key-data"):
            p = Path(d) / name
            p.write_bytes(base64.b64decode(user.get(name, "")))
            p.chmod(0o600)
            paths.append(str(p))
        return paths[0], paths[1], d
    return None, None, None


# ---------------------------------------------------------------------------------- the client


class KubeClient:
    """GET and WATCH over HTTP/1.1, one connection per request (watches are long-lived)."""

    def __init__(self, access: ClusterAccess):
        self.access = access
        url = urlsplit(access.server)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.tls = access.ssl_context if url.scheme == "https" else None

    async def _open(self, path: str, method: str = "GET", body: bytes | None = None,
                    content_type: str = "application/json"):
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self.tls), 10)
        auth = f"Authorization: Bearer {self.access.token}\r\n" if self.access.token else ""
        payload = (f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                   if body is not None else "")
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                     f"Accept: application/json\r\nUser-Agent: vipd\r\n{auth}{payload}"
                     "Connection: close\r\n\r\n".encode() + (body or b""))
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 30)
        parts = status_line.decode("latin-1").split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            writer.close()
            raise ConnectionError(f"{self.access.server}: not an HTTP response: {status_line[:80]!r}")
        headers = {}
        while True:
            line = await asyncio.wait_for(reader.readline(), 30)
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        return int(parts[1]), headers, reader, writer

    @staticmethod
    async def _chunks(reader, headers, idle_s: float = 60) -> AsyncIterator[bytes]:
        """The body, chunk by chunk; a peer silent for ``idle_s`` (a half-open connection) is
        an error, so the caller reconnects."""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await asyncio.wait_for(reader.readline(), idle_s)
                if not size_line:
                    raise ConnectionError("stream ended inside a chunked body")
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    return
                data = await asyncio.wait_for(reader.readexactly(size + 2), idle_s)
                yield data[:-2]
        elif "content-length" in headers:
            yield await reader.readexactly(int(headers["content-length"]))
        else:
            yield await reader.read()

    async def get_json(self, path: str) -> dict:
        return await self.request_json("GET", path)

    async def request_json(self, method: str, path: str, body: dict | None = None,
                           content_type: str = "application/json") -> dict:
        data = json.dumps(body).encode() if body is not None else None
        code, headers, reader, writer = await asyncio.wait_for(
            self._open(path, method, data, content_type), 40)
        try:
            reply = b"".join([c async for c in self._chunks(reader, headers)])
        finally:
            writer.close()
        if code not in (200, 201):
            raise ApiStatusError(code, _message(reply))
        return json.loads(reply)

    async def watch(self, path: str) -> AsyncIterator[dict]:
        """The events of a watch stream, one JSON object per line, until the server ends it."""
        code, headers, reader, writer = await self._open(path)
        try:
            if code != 200:
                body = b"".join([c async for c in self._chunks(reader, headers)])
                raise ApiStatusError(code, _message(body))
            buf = b""
            # the server ends a watch after timeoutSeconds; silence well beyond that = dead link
            async for chunk in self._chunks(reader, headers, idle_s=WATCH_TIMEOUT_S + 60):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
            if buf.strip():
                yield json.loads(buf)
        finally:
            writer.close()


def _message(body: bytes) -> str:
    try:
        return str(json.loads(body).get("message", ""))[:300]
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace")


# ----------------------------------------------------------------------------------- the source


def plural(kind: str) -> str:
    """The resource name of a kind, as the API server names vipd's kinds."""
    low = kind.lower()
    return low[:-1] + "ies" if low.endswith("y") else low + "s"


@dataclass(frozen=True)
class Watched:
    api_version: str
    kind: str
    plural: str
    namespace: str | None = None    # only this namespace (the BGP secrets)

    @property
    def path(self) -> str:
        prefix = f"/apis/{self.api_version}" if "/" in self.api_version else f"/api/{self.api_version}"
        ns = f"/namespaces/{self.namespace}" if self.namespace else ""
        return f"{prefix}{ns}/{self.plural}"


def watched_resources(secrets_namespace: str = "kube-system") -> list[Watched]:
    from agent.config.loader import KINDS

    out = []
    for kind, model in sorted(KINDS.items()):
        if kind == "ConfigMap":    # the MetalLB bgp-config is a migration input, not watched
            continue
        for api_version in model.API_VERSIONS:
            out.append(Watched(api_version, kind, plural(kind),
                               secrets_namespace if kind == "Secret" else None))
    return out


@dataclass
class _Cache:
    items: dict[str, dict] = field(default_factory=dict)     # namespace/name -> raw object
    resource_version: str = ""
    synced: bool = False


class KubernetesSource:
    """List + watch the API server into ``store`` (same interface as the file source:
    :meth:`reload` for the first complete snapshot, :meth:`run` to follow changes)."""

    def __init__(self, access: ClusterAccess, store, *, secrets_namespace: str = "kube-system",
                 settle_s: float = 0.1):
        self.access = access
        self.client = KubeClient(access)
        self.store = store
        self.resources = watched_resources(secrets_namespace)
        self.caches = {w: _Cache() for w in self.resources}
        self.settle_s = settle_s
        self._dirty = asyncio.Event()
        self._validated: dict[tuple[str, str, str], tuple] = {}   # (kind, key, rv) -> result
        self._logged: set[str] = set()
        self._not_served: set[Watched] = set()
        self.relists = 0          # 410 Gone answers handled (tests and logs read it)
        self.resyncs = 0          # SIGHUPs handled
        self._tasks: dict[Watched, asyncio.Task] = {}
        self._epoch = 0           # bumped by a resync or a stop: older watch loops end

    @property
    def origin(self) -> str:
        return f"kubernetes {self.access.server} ({self.access.origin})"

    # -- listing -----------------------------------------------------------------------------
    async def _list(self, w: Watched) -> None:
        try:
            body = await self.client.get_json(w.path)
        except ApiStatusError as exc:
            if exc.code != 404:
                raise
            if w not in self._not_served:
                log.info("API version not served by this cluster; retrying later",
                         resource=f"{w.plural}.{w.api_version}")
                self._not_served.add(w)
            self.caches[w] = _Cache(synced=True)
            return
        self._not_served.discard(w)
        items = {}
        for obj in body.get("items") or []:
            obj.setdefault("apiVersion", w.api_version)
            obj.setdefault("kind", w.kind)
            items[_key(obj)] = obj
        self.caches[w] = _Cache(items, str(body.get("metadata", {}).get("resourceVersion", "")), True)
        self._dirty.set()

    async def reload(self) -> bool:
        """The first complete snapshot: every kind listed. Retries (with back-off) until the API
        server answers, logging why it does not."""
        delay = BACKOFF_FIRST_S
        while True:
            try:
                await asyncio.gather(*(self._list(w) for w in self.resources))
                break
            except (OSError, asyncio.TimeoutError, ApiStatusError, ValueError) as exc:
                log.error("cannot list from the Kubernetes API server; retrying",
                          server=self.access.server, error=str(exc) or repr(exc), retry_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
        return self._install()

    def request_reload(self) -> None:
        """SIGHUP: list every kind again and watch from there (a full resync: whatever a watch
        may have missed — a proxy that dropped an event, an object edited behind the API
        server's back — is then what the server has)."""
        log.info("SIGHUP: listing every kind again", kinds=len(self.resources))
        self.resyncs += 1
        self._epoch += 1
        for w in self.resources:
            self.caches[w].resource_version = ""
            task = self._tasks.get(w)
            if task is not None:
                task.cancel()
                self._tasks[w] = asyncio.create_task(self._follow(w, self._epoch),
                                                     name=f"watch {w.path}")

    # -- watching ----------------------------------------------------------------------------
    async def _follow(self, w: Watched, epoch: int) -> None:
        """Watch one kind until stopped or resynced (``epoch`` is then old): resume from the
        last resourceVersion, re-list on 410 Gone, back off on errors."""
        delay = BACKOFF_FIRST_S
        # Python 3.11's wait_for can swallow a cancellation that races with data arriving, so
        # the loop also checks that it is still wanted
        while epoch == self._epoch:
            try:
                cache = self.caches[w]
                if not cache.resource_version or w in self._not_served:
                    if w in self._not_served:
                        await asyncio.sleep(NOT_SERVED_RETRY_S)
                    await self._list(w)
                    if w in self._not_served:
                        continue
                    cache = self.caches[w]
                query = urlencode({"watch": "1", "resourceVersion": cache.resource_version,
                                   "allowWatchBookmarks": "true",
                                   "timeoutSeconds": str(WATCH_TIMEOUT_S)})
                async for event in self.client.watch(f"{w.path}?{query}"):
                    if epoch != self._epoch:
                        return
                    if self._apply_event(w, event) == "gone":
                        break
                    delay = BACKOFF_FIRST_S
            except asyncio.CancelledError:
                raise
            except ApiStatusError as exc:
                if exc.code == 410:    # some servers answer an expired watch with HTTP 410
                    log.info("watch expired (410 Gone); re-listing", resource=w.path,
                             resource_version=self.caches[w].resource_version)
                    self.relists += 1
                    self.caches[w].resource_version = ""
                    continue
                delay = await self._back_off("watch refused; resuming after back-off", w, exc,
                                             delay)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                delay = await self._back_off("watch interrupted; resuming after back-off", w, exc,
                                             delay)

    async def _back_off(self, message: str, w: Watched, exc: Exception, delay: float) -> float:
        """Log why, sleep ``delay`` (±20 % so agents do not retry in step), -> the next delay."""
        log.warning(message, resource=w.path, resource_version=self.caches[w].resource_version,
                    error=str(exc) or repr(exc), retry_s=round(delay, 2))
        await asyncio.sleep(delay * random.uniform(0.8, 1.2))
        return min(delay * 2, BACKOFF_MAX_S)

    def _apply_event(self, w: Watched, event: dict) -> str:
        cache = self.caches[w]
        etype, obj = event.get("type"), event.get("object") or {}
        if etype == "ERROR":
            code = obj.get("code")
            if code == 410:
                # our resourceVersion is older than the server's history: list again (deletions
                # made meanwhile are then simply absent)
                log.info("watch expired (410 Gone); re-listing", resource=w.path,
                         resource_version=cache.resource_version)
                self.relists += 1
                cache.resource_version = ""
                return "gone"
            raise ApiStatusError(int(code or 500), str(obj.get("message", "")))
        rv = str(obj.get("metadata", {}).get("resourceVersion", ""))
        if etype == "BOOKMARK":
            cache.resource_version = rv or cache.resource_version
            return "bookmark"
        obj.setdefault("apiVersion", w.api_version)
        obj.setdefault("kind", w.kind)
        if etype in ("ADDED", "MODIFIED"):
            cache.items[_key(obj)] = obj
        elif etype == "DELETED":
            cache.items.pop(_key(obj), None)
        cache.resource_version = rv or cache.resource_version
        self._dirty.set()
        return etype or ""

    async def run(self, stop: asyncio.Event | None = None) -> None:
        self._tasks = {w: asyncio.create_task(self._follow(w, self._epoch), name=f"watch {w.path}")
                       for w in self.resources}
        try:
            while stop is None or not stop.is_set():
                await self._dirty.wait()
                await asyncio.sleep(self.settle_s)    # a kubectl apply of many objects: one pass
                self._dirty.clear()
                self._install()
        finally:
            self._epoch += 1
            pending, self._tasks = set(self._tasks.values()), {}
            while pending:      # again until they end: a cancellation can be swallowed (3.11)
                for t in pending:
                    t.cancel()
                _, pending = await asyncio.wait(pending, timeout=1.0)

    async def close(self) -> None:
        pass

    def live(self, kind: str, name: str, namespace: str = "") -> tuple[str, str, dict] | None:
        """(api version, plural, object) of ``kind`` ``name`` as the watches last saw it, in
        the first version that has it (v2 before v2alpha1), or None."""
        for w, cache in self.caches.items():
            if w.kind == kind and (obj := cache.items.get(f"{namespace}/{name}")) is not None:
                return w.api_version, w.plural, obj
        return None

    def objects(self, kind: str) -> list[dict]:
        """Every object of ``kind`` the watches last saw (first version that has it)."""
        seen: dict[str, dict] = {}
        for w, cache in self.caches.items():
            if w.kind == kind:
                for key, obj in cache.items.items():
                    seen.setdefault(key, obj)
        return list(seen.values())

    def served_version(self, kind: str) -> str:
        """The first API version of ``kind`` this cluster serves (v2 before v2alpha1)."""
        versions = [w for w in self.resources if w.kind == kind]
        return next((w.api_version for w in versions if w not in self._not_served),
                    versions[0].api_version)

    # -- installing --------------------------------------------------------------------------
    def _install(self) -> bool:
        from agent.config import ObjectSet
        from agent.config.loader import validate_document

        t0 = time.monotonic()
        objects, errors, ignored = [], [], []
        fp = hashlib.sha256()
        validated = {}
        for w, cache in self.caches.items():
            for key, raw in sorted(cache.items.items()):
                if w.kind == "CiliumBGPNodeConfig" and _derived(raw):
                    continue     # an output (vipd's or Cilium's operator's), not configuration
                rv = str(raw.get("metadata", {}).get("resourceVersion", ""))
                vkey = (w.api_version + "/" + w.kind, key, rv)
                result = self._validated.get(vkey)
                if result is None or not rv:
                    result = validate_document(_without_server_fields(raw),
                                               f"kubernetes:{w.path}/{key.rsplit('/', 1)[-1]}")
                validated[vkey] = result
                obj, errs, ign = result
                fp.update(f"{vkey}\0".encode() + (b"" if rv else json.dumps(raw).encode()))
                if obj is not None:
                    objects.append(obj)
                errors.extend(errs)
                if ign:
                    ignored.append(ign)
        self._validated = validated
        # the same object in two versions (cilium.io v2 and v2alpha1): the first listed wins
        seen, unique = set(), []
        for obj in objects:
            if obj.key not in seen:
                seen.add(obj.key)
                unique.append(obj)
        changed = self.store.replace(ObjectSet.from_objects(unique), errors=errors, ignored=ignored,
                                     fingerprint=fp.hexdigest(), source=self.origin)
        if changed:
            log.info("configuration loaded", source=self.origin, generation=self.store.current.generation,
                     objects=len(unique), errors=len(errors), load_s=round(time.monotonic() - t0, 3))
            now = {str(e) for e in errors}
            for e in sorted(now - self._logged):
                log.warning("invalid object ignored", error=e)
            self._logged = now
        return changed


def _derived(raw: dict) -> bool:
    """A CiliumBGPNodeConfig owned by a CiliumBGPClusterConfig: derived from it (by vipd's
    write-back or Cilium's operator), so reading it back as input would only echo it — and keep
    a node's sessions up after it left every ClusterConfig."""
    refs = (raw.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("kind") == "CiliumBGPClusterConfig" for r in refs)


def _key(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace') or ''}/{meta.get('name') or ''}"


def _without_server_fields(raw: dict) -> dict:
    """The object as a user wrote it: the server's bookkeeping (managedFields) is not config."""
    meta = {k: v for k, v in (raw.get("metadata") or {}).items() if k != "managedFields"}
    return {**raw, "metadata": meta}
