"""A Kubernetes API server fake for tests: the real HTTP/JSON protocol, no etcd, no auth.

No kube-apiserver can be installed on the test machines, so the Kubernetes-mode tests run this
instead and drive it with the real ``kubectl`` (proof that it speaks what real clients speak):

* discovery (``/api``, ``/apis``, ``/api/v1``, ``/apis/<group>/<version>``, ``/version``) for
  the kinds vipd reads (generated from :data:`agent.config.loader.KINDS`) plus Namespaces,
  coordination.k8s.io Leases and CustomResourceDefinitions;
* LIST with ``metadata.resourceVersion``; WATCH (``?watch=1&resourceVersion=N``) as a chunked
  stream of JSON lines: ADDED / MODIFIED / DELETED, BOOKMARK when ``allowWatchBookmarks``, and
  an ERROR event with a 410 Gone Status when N is older than the kept history;
* create (POST), replace (PUT), patch (JSON merge patch), server-side apply with field
  ownership (``metadata.managedFields``, 409 conflicts unless ``force``, removal of fields a
  manager stops applying: :mod:`agent.lab.ssa`), delete, and the ``status`` subresource
  (PUT/PATCH/apply change only ``status``; the main resource never does);
* ``apiextensions.k8s.io/v1`` CustomResourceDefinitions: a non-structural schema or a wrong
  name is refused, and once a kind's CRD exists its objects are pruned by the schema, as a real
  API server prunes unknown fields;
* test controls under ``/fake/``: ``POST /fake/compact`` forgets the event history (every
  watch resuming from before it gets 410), ``POST /fake/close-watches`` ends every open watch,
  ``POST /fake/outage?seconds=S&userAgent=vipd`` cuts one client off for S seconds (its watches
  end, its requests are refused, and the history is compacted when it ends) while kubectl
  keeps working.

Run it: ``python -m agent.lab.kubeapi --listen 127.0.0.1:0 --port-file F`` (prints the port).
Plain HTTP, so kubeconfigs point at ``http://HOST:PORT`` (see :func:`kubeconfig`).
"""

from __future__ import annotations

import argparse
import copy
import json
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from agent.lab import ssa
from agent.sources.kubernetes import plural

__all__ = ["ApiResource", "FakeApiServer", "RESOURCES", "kubeconfig", "plural"]

HISTORY = 10_000          # events kept for watches that resume (older -> 410 Gone)


@dataclass(frozen=True)
class ApiResource:
    group: str            # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


CRD = ApiResource("apiextensions.k8s.io", "v1", "customresourcedefinitions",
                  "CustomResourceDefinition", False)


def _resources() -> list[ApiResource]:
    from agent.config.loader import KINDS

    out = [ApiResource("", "v1", "namespaces", "Namespace", False),
           ApiResource("coordination.k8s.io", "v1", "leases", "Lease", True),
           CRD]
    for kind, model in sorted(KINDS.items()):
        for api_version in model.API_VERSIONS:
            group, _, version = api_version.rpartition("/")
            out.append(ApiResource(group, version, plural(kind), kind, model.NAMESPACED))
    return out


RESOURCES = _resources()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _merge_patch(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge_patch(out.get(k), v)
    return out


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.status = _status(code, reason, message)


class Storage:
    """Objects per resource, one resourceVersion counter, an event history for watches."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.rv = 1
        self.objects: dict[ApiResource, dict[tuple[str, str], dict]] = {r: {} for r in RESOURCES}
        self.events: list[tuple[int, ApiResource, str, dict]] = []
        self.oldest = 1                 # a watch may resume from rv >= oldest - 1
        self.watch_epoch = 0            # bumped by close_watches()
        self.outage_until = 0.0         # /fake/outage: refuse one user agent until then
        self.outage_agent = ""
        self.compact_after_outage = False
        # the RBAC audit: (user agent, verb, group, resource[/subresource], namespace) of every
        # resource request, so a test can compare what a client used with what its Role grants
        self.audit: set[tuple[str, str, str, str, str]] = set()

    def _record(self, res: ApiResource, etype: str, obj: dict) -> None:
        self.events.append((self.rv, res, etype, copy.deepcopy(obj)))
        if len(self.events) > HISTORY:
            del self.events[: len(self.events) - HISTORY]
            self.oldest = self.events[0][0]
        self.lock.notify_all()

    def list(self, res: ApiResource, namespace: str | None) -> tuple[list[dict], int]:
        with self.lock:
            items = [copy.deepcopy(o) for (ns, _), o in sorted(self.objects[res].items())
                     if namespace is None or ns == namespace]
            return items, self.rv

    def get(self, res: ApiResource, namespace: str, name: str) -> dict:
        with self.lock:
            obj = self.objects[res].get((namespace, name))
            if obj is None:
                raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found')
            return copy.deepcopy(obj)

    def put(self, res: ApiResource, namespace: str, name: str, obj: dict, *,
            create: bool | None, subresource: str = "", manager: str = "",
            managed: list[dict] | None = None) -> tuple[dict, bool]:
        """create=True: must not exist; False: must exist; None: either. -> (object, created).
        ``managed``: the managedFields (server-side apply computed them); otherwise the
        fields this write changed are recorded as ``manager``'s (an Update)."""
        with self.lock:
            old = self.objects[res].get((namespace, name))
            if create is True and old is not None:
                raise ApiError(409, "AlreadyExists", f'{res.plural} "{name}" already exists')
            if create is False and old is None:
                raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found')
            if subresource == "status":
                if old is None:
                    raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found')
                new = {**old, "status": obj.get("status")}
                if new["status"] is None:
                    del new["status"]
            else:
                new = dict(obj)
                if old is not None and "status" in old and "status" not in new:
                    new["status"] = old["status"]     # the main resource does not write status
            if res == CRD:
                _check_crd(name, new)
            else:
                new = self._pruned(res, new)
            meta = dict(new.get("metadata") or {})
            sent_rv = meta.get("resourceVersion")
            if old is not None and sent_rv and sent_rv != old["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {res.plural} '
                               f'"{name}": the object has been modified; please apply your '
                               'changes to the latest version and try again')
            meta["name"] = name
            if res.namespaced:
                meta["namespace"] = namespace
            else:
                meta.pop("namespace", None)
            base = (old or {}).get("metadata", {})
            meta["uid"] = base.get("uid") or str(uuid.uuid4())
            meta["creationTimestamp"] = base.get("creationTimestamp") or _now()
            meta.pop("managedFields", None)
            if managed is None:
                managed = ssa.track_update(old, {**new, "metadata": meta}, manager or "unknown",
                                           subresource=subresource, api_version=res.group_version)
            if managed:
                meta["managedFields"] = managed
            if old is not None and {k: v for k, v in new.items() if k != "metadata"} == \
                    {k: v for k, v in old.items() if k != "metadata"} and \
                    {k: v for k, v in meta.items() if k != "resourceVersion"} == \
                    {k: v for k, v in old["metadata"].items() if k != "resourceVersion"}:
                return copy.deepcopy(old), False       # no-op update: no new resourceVersion
            self.rv += 1
            meta["resourceVersion"] = str(self.rv)
            if old is None or "generation" not in base:
                meta["generation"] = 1
            elif subresource != "status" and new.get("spec") != old.get("spec"):
                meta["generation"] = base["generation"] + 1
            else:
                meta["generation"] = base["generation"]
            new["metadata"] = meta
            new["apiVersion"], new["kind"] = res.group_version, res.kind
            self.objects[res][(namespace, name)] = new
            self._record(res, "ADDED" if old is None else "MODIFIED", new)
            return copy.deepcopy(new), old is None

    def _pruned(self, res: ApiResource, obj: dict) -> dict:
        """Once the kind's CRD is installed, fields its schema does not name are dropped, as a
        real API server prunes them (a CRD that forgets a field vipd reads shows here)."""
        crd = self.objects[CRD].get(("", f"{res.plural}.{res.group}"))
        if crd is None:
            return obj
        version = next((v for v in crd["spec"].get("versions") or [] if v.get("name") == res.version), None)
        if version is None:
            raise ApiError(404, "NotFound", f"the CRD {res.plural}.{res.group} does not serve "
                           f"version {res.version}")
        schema = (version.get("schema") or {}).get("openAPIV3Schema") or {}
        meta = obj.get("metadata")
        out = _prune(obj, schema)
        out["metadata"] = meta
        return out

    def delete(self, res: ApiResource, namespace: str, name: str) -> dict:
        with self.lock:
            obj = self.objects[res].pop((namespace, name), None)
            if obj is None:
                raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found')
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self._record(res, "DELETED", obj)
            return copy.deepcopy(obj)

    def compact(self) -> None:
        with self.lock:
            self.events.clear()
            self.oldest = self.rv + 1

    def in_outage(self, user_agent: str) -> bool:
        """True while ``user_agent`` is cut off; the first request after the outage compacts
        the history, so every watch of the cut-off client resumes into 410 Gone."""
        with self.lock:
            if time.monotonic() < self.outage_until:
                return user_agent.startswith(self.outage_agent)
            if self.compact_after_outage:
                self.compact_after_outage = False
                self.compact()
            return False

    def close_watches(self) -> None:
        with self.lock:
            self.watch_epoch += 1
            self.lock.notify_all()


class FakeApiServer:
    """The fake in a background thread: ``with FakeApiServer() as api: api.url``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, bookmark_interval: float = 1.0,
                 tls: tuple[str, str] | None = None, token: str | None = None):
        """``tls``: (certificate file, key file) to serve HTTPS; ``token``: require
        ``Authorization: Bearer <token>`` (401 otherwise), as a service account would."""
        self.storage = Storage()
        self.bookmark_interval = bookmark_interval
        self.token = token
        self.scheme = "https" if tls else "http"
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        if tls:
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"{self.scheme}://{host}:{port}"

    def start(self) -> "FakeApiServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="kubeapi",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.storage.close_watches()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "FakeApiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def kubeconfig(server_url: str, namespace: str = "default", *, ca_pem: bytes | None = None,
               token: str | None = None) -> str:
    """A kubeconfig (YAML) for kubectl and ``vipd run --kubernetes --kubeconfig``."""
    import base64

    ca = (f"    certificate-authority-data: {base64.b64encode(ca_pem).decode()}\n"
          if ca_pem else "")
    user = f"\n    token: {token}" if token else " {}"
    return (f"apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n"
            f"    server: {server_url}\n{ca}contexts:\n- name: fake\n  context:\n"
            f"    cluster: fake\n    user: fake\n    namespace: {namespace}\n"
            f"current-context: fake\nusers:\n- name: fake\n  user:{user}\n")


# ------------------------------------------------------------------------------------ HTTP


SHORT_NAMES = {"services": ["svc"], "nodes": ["no"], "namespaces": ["ns"], "configmaps": ["cm"],
               "customresourcedefinitions": ["crd", "crds"]}


def _discovery_resources(gv: str) -> list[dict]:
    out = []
    for r in RESOURCES:
        if r.group_version != gv:
            continue
        verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
        out.append({"name": r.plural, "singularName": r.kind.lower(), "namespaced": r.namespaced,
                    "kind": r.kind, "verbs": verbs, "shortNames": SHORT_NAMES.get(r.plural, [])})
        out.append({"name": f"{r.plural}/status", "singularName": "", "namespaced": r.namespaced,
                    "kind": r.kind, "verbs": ["get", "patch", "update"]})
    return out


def _groups() -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for r in RESOURCES:
        if r.group and r.version not in groups.setdefault(r.group, []):
            groups[r.group].append(r.version)
    return groups


def _handler(server: FakeApiServer):
    storage = server.storage

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):   # quiet: tests read the client's side
            pass

        # -- plumbing ---------------------------------------------------------------------
        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict:
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b"{}"
            ctype = self.headers.get("Content-Type", "")
            if "yaml" in ctype:
                import yaml

                return yaml.safe_load(raw) or {}
            return json.loads(raw or b"{}")

        def _route(self):
            """-> (resource, namespace, name, subresource, query) for a resource path."""
            parts = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            seg = [s for s in parts.path.split("/") if s]
            if seg[:1] == ["api"] and len(seg) >= 2:
                group, version, rest = "", seg[1], seg[2:]
            elif seg[:1] == ["apis"] and len(seg) >= 3:
                group, version, rest = seg[1], seg[2], seg[3:]
            else:
                raise ApiError(404, "NotFound", f"the server could not find {parts.path}")
            namespace = None
            if len(rest) >= 3 and rest[0] == "namespaces":   # /namespaces/NS/<plural>/...
                namespace, rest = rest[1], rest[2:]
            if not rest:
                raise ApiError(404, "NotFound", f"the server could not find {parts.path}")
            res = next((r for r in RESOURCES if r.group == group and r.version == version
                        and r.plural == rest[0]), None)
            if res is None:
                raise ApiError(404, "NotFound", f"the server could not find the requested "
                               f"resource ({rest[0]} in {group or 'core'}/{version})")
            name = rest[1] if len(rest) > 1 else None
            sub = rest[2] if len(rest) > 2 else ""
            if res.namespaced and name is not None and namespace is None:
                raise ApiError(404, "NotFound", f"{res.plural} are namespaced")
            return res, (namespace or "") if res.namespaced else "", name, sub, query, \
                namespace if res.namespaced else None

        def _audit(self, verb: str, res, sub: str, namespace) -> None:
            agent = self.headers.get("User-Agent", "").split("/")[0].split(" ")[0]
            resource = f"{res.plural}/{sub}" if sub else res.plural
            with storage.lock:
                storage.audit.add((agent, verb, res.group, resource, namespace or ""))

        def _discovery(self) -> dict | None:
            path = urlsplit(self.path).path.rstrip("/")
            if path == "/version":
                return {"major": "1", "minor": "29", "gitVersion": "v1.29.0-vipd-fake",
                        "platform": "linux/amd64"}
            if path == "/api":
                return {"kind": "APIVersions", "versions": ["v1"],
                        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                                        "serverAddress": self.headers.get("Host", "")}]}
            if path == "/apis":
                return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                    {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                     "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}}
                    for g, vs in sorted(_groups().items())]}
            if path == "/api/v1":
                return {"kind": "APIResourceList", "groupVersion": "v1",
                        "resources": _discovery_resources("v1")}
            seg = path.split("/")
            if len(seg) == 3 and seg[1] == "apis" and seg[2] in _groups():
                vs = _groups()[seg[2]]
                return {"kind": "APIGroup", "apiVersion": "v1", "name": seg[2],
                        "versions": [{"groupVersion": f"{seg[2]}/{v}", "version": v} for v in vs],
                        "preferredVersion": {"groupVersion": f"{seg[2]}/{vs[0]}", "version": vs[0]}}
            if len(seg) == 4 and seg[1] == "apis" and seg[3] in _groups().get(seg[2], ()):
                gv = f"{seg[2]}/{seg[3]}"
                return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                        "resources": _discovery_resources(gv)}
            return None

        def _guard(self, fn) -> None:
            try:
                if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                    raise ApiError(401, "Unauthorized", "Unauthorized")
                fn()
            except ApiError as exc:
                self._send(exc.status["code"], exc.status)
            except (ValueError, TypeError) as exc:
                self._send(400, _status(400, "BadRequest", str(exc)))
            except (BrokenPipeError, ConnectionResetError):
                pass
            except Exception as exc:  # noqa: BLE001 - a fake bug: answer 500, as a server would
                self._send(500, _status(500, "InternalError", f"fake API server: {exc!r}"))

        def _refused(self) -> bool:
            """During a /fake/outage, requests of that user agent get their connection closed."""
            if storage.in_outage(self.headers.get("User-Agent", "")):
                self.close_connection = True
                return True
            return False

        # -- verbs ------------------------------------------------------------------------
        def do_GET(self):
            if self._refused():
                return
            self._guard(self._get)

        def _get(self):
            disc = self._discovery()
            if disc is not None:
                return self._send(200, disc)
            if urlsplit(self.path).path.startswith("/openapi"):
                raise ApiError(404, "NotFound", "no OpenAPI document in the fake")
            if urlsplit(self.path).path == "/fake/audit":
                return self._send(200, {"requests": sorted(storage.audit)})
            res, ns, name, sub, query, list_ns = self._route()
            self._audit("get" if name is not None else "watch" if query.get("watch") in ("1", "true")
                        else "list", res, sub, ns if name is not None else list_ns)
            if name is not None:
                return self._send(200, storage.get(res, ns, name))
            if query.get("watch") in ("1", "true"):
                return self._watch(res, list_ns, query)
            items, rv = storage.list(res, list_ns)
            items = [o for o in items if _selected(o, query)]
            self._send(200, {"kind": f"{res.kind}List", "apiVersion": res.group_version,
                             "metadata": {"resourceVersion": str(rv)}, "items": items})

        def do_POST(self):
            self._guard(self._post)

        def _post(self):
            path = urlsplit(self.path).path
            if path == "/fake/compact":
                storage.compact()
                return self._send(200, {"compacted": storage.rv})
            if path == "/fake/close-watches":
                storage.close_watches()
                return self._send(200, {"closed": True})
            if path == "/fake/outage":
                # a network outage for one client (by User-Agent, e.g. vipd) while kubectl still
                # works: its watches end, its requests are refused for `seconds`, and the history
                # is compacted so that its resumed watches get 410 Gone
                q = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
                storage.outage_agent = q.get("userAgent", "vipd")
                storage.outage_until = time.monotonic() + float(q.get("seconds", "5"))
                storage.compact_after_outage = True
                storage.close_watches()
                return self._send(200, {"outage": True})
            res, ns, name, sub, query, _ = self._route()
            body = self._body()
            meta = body.get("metadata") or {}
            self._audit("create", res, sub, ns or meta.get("namespace") if res.namespaced else "")
            if res.namespaced:
                ns = ns or meta.get("namespace") or "default"
            obj, _ = storage.put(res, ns, meta.get("name") or "", body, create=True,
                                 manager=self._manager(query))
            self._send(201, obj)

        def do_PUT(self):
            self._guard(self._put)

        def _put(self):
            res, ns, name, sub, query, _ = self._route()
            self._audit("update", res, sub, ns)
            obj, created = storage.put(res, ns, name, self._body(), create=None, subresource=sub,
                                       manager=self._manager(query))
            self._send(201 if created else 200, obj)

        def do_PATCH(self):
            self._guard(self._patch)

        def _patch(self):
            res, ns, name, sub, query, _ = self._route()
            self._audit("patch", res, sub, ns)
            ctype = self.headers.get("Content-Type", "").split(";")[0]
            body = self._body()
            if ctype == "application/apply-patch+yaml":
                return self._apply(res, ns, name, sub, query, body)
            if ctype not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                raise ApiError(415, "UnsupportedMediaType",
                               f"the fake supports merge patches and server-side apply, not {ctype}")
            old = storage.get(res, ns, name)
            # strategic merge patch: treated as a merge patch ($-directives dropped); lists are
            # replaced whole. Enough for kubectl patch --type=merge and label/annotation edits.
            new = _merge_patch(old, _strip_directives(body))
            new.get("metadata", {}).pop("resourceVersion", None)
            obj, _ = storage.put(res, ns, name, new, create=False, subresource=sub,
                                 manager=self._manager(query))
            self._send(200, obj)

        def _manager(self, query: dict) -> str:
            """The field manager: ?fieldManager=, else the User-Agent's program name (as the
            API server defaults it)."""
            return query.get("fieldManager") or \
                self.headers.get("User-Agent", "unknown").split("/")[0].split(" ")[0]

        def _apply(self, res, ns, name, sub, query, body) -> None:
            """Server-side apply: ownership per field manager (agent.lab.ssa); the status
            subresource applies status only, the main resource everything but status."""
            manager = query.get("fieldManager")
            if not manager:
                raise ApiError(400, "BadRequest", "PATCH requests with the apply content type "
                               "(application/apply-patch+yaml) require fieldManager")
            if sub == "status":
                applied = {"status": body.get("status") or {}}
            else:
                applied = {k: v for k, v in body.items() if k != "status"}
                meta = dict(applied.get("metadata") or {})
                if meta.get("name") not in (None, name):
                    raise ApiError(400, "BadRequest", f"the name of the object "
                                   f"({meta.get('name')}) does not match the name on the URL ({name})")
                applied["metadata"] = {k: v for k, v in meta.items() if k in ssa.METADATA_OWNED}
            with storage.lock:
                try:
                    live = storage.get(res, ns, name)
                except ApiError:
                    if sub == "status":
                        raise
                    live = None
                try:
                    new, managed = ssa.apply(live, applied, manager,
                                             force=query.get("force") in ("true", "1"),
                                             subresource=sub, api_version=res.group_version)
                except ssa.ApplyConflict as exc:
                    status = _status(409, "Conflict", str(exc))
                    status["details"] = {"name": name, "group": res.group, "kind": res.plural,
                                         "causes": [{"reason": "FieldManagerConflict",
                                                     "message": f'conflict with "{m}"',
                                                     "field": ssa.describe(p)}
                                                    for m, p in exc.conflicts]}
                    return self._send(409, status)
                meta = dict(new.get("metadata") or {})
                meta.pop("resourceVersion", None)
                meta["name"] = name
                new["metadata"] = meta
                obj, created = storage.put(res, ns, name, new, create=None, subresource=sub,
                                           managed=managed)
            self._send(201 if created else 200, obj)

        def do_DELETE(self):
            self._guard(self._delete)

        def _delete(self):
            self._body()   # DeleteOptions (propagationPolicy...): read, not needed here
            res, ns, name, sub, query, list_ns = self._route()
            self._audit("delete" if name is not None else "deletecollection", res, sub,
                        ns if name is not None else list_ns)
            if name is None:
                items, _ = storage.list(res, list_ns)
                for o in items:
                    storage.delete(res, o["metadata"].get("namespace", ""), o["metadata"]["name"])
                return self._send(200, {"kind": f"{res.kind}List", "apiVersion": res.group_version,
                                        "metadata": {}, "items": items})
            self._send(200, storage.delete(res, ns, name))

        # -- watch ------------------------------------------------------------------------
        def _chunk(self, event: dict) -> None:
            data = json.dumps(event).encode() + b"\n"
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _watch(self, res: ApiResource, namespace: str | None, query: dict) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            bookmarks = query.get("allowWatchBookmarks") in ("1", "true")
            deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
            rv_text = query.get("resourceVersion") or "0"
            with storage.lock:
                epoch = storage.watch_epoch
                if rv_text == "0":
                    items, _ = storage.list(res, namespace)
                    start = storage.rv
                    initial = [{"type": "ADDED", "object": o} for o in items if _selected(o, query)]
                else:
                    start = int(rv_text)
                    initial = []
                    if start < storage.oldest - 1:
                        initial = [{"type": "ERROR", "object": _status(
                            410, "Expired", f"too old resource version: {start} "
                            f"({storage.oldest - 1})")}]
                        start = -1
            try:
                for ev in initial:
                    self._chunk(ev)
                if start < 0:
                    return self._end()
                last_bookmark = time.monotonic()
                while time.monotonic() < deadline:
                    with storage.lock:
                        if storage.watch_epoch != epoch:
                            break
                        pending = [(rv, t, o) for rv, r, t, o in storage.events
                                   if r == res and rv > start]
                        if not pending:
                            storage.lock.wait(0.2)
                            pending = [(rv, t, o) for rv, r, t, o in storage.events
                                       if r == res and rv > start]
                        current = storage.rv
                        if storage.watch_epoch != epoch:
                            break
                    for rv, etype, obj in pending:
                        start = rv
                        ns = obj["metadata"].get("namespace")
                        if (namespace is None or ns == namespace) and _selected(obj, query):
                            self._chunk({"type": etype, "object": obj})
                    if bookmarks and time.monotonic() - last_bookmark >= server.bookmark_interval:
                        start = max(start, current)
                        self._chunk({"type": "BOOKMARK", "object": {
                            "kind": res.kind, "apiVersion": res.group_version,
                            "metadata": {"resourceVersion": str(start)}}})
                        last_bookmark = time.monotonic()
                self._end()
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _end(self) -> None:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            self.close_connection = True

    return Handler


def _check_crd(name: str, crd: dict) -> None:
    """What the API server refuses in a CustomResourceDefinition, as far as the fake uses it."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    if name != f"{names.get('plural')}.{spec.get('group')}":
        raise ApiError(422, "Invalid", f'CustomResourceDefinition.apiextensions.k8s.io "{name}" '
                       f"is invalid: metadata.name: must be spec.names.plural+\".\"+spec.group")
    versions = spec.get("versions") or []
    if sum(1 for v in versions if v.get("storage")) != 1:
        raise ApiError(422, "Invalid", f'CustomResourceDefinition "{name}" is invalid: '
                       "spec.versions: must have exactly one version marked as storage version")
    for v in versions:
        missing = _untyped((v.get("schema") or {}).get("openAPIV3Schema") or {}, "")
        if missing:
            raise ApiError(422, "Invalid", f'CustomResourceDefinition "{name}" is invalid: '
                           f"spec.versions[{v.get('name')}].schema.openAPIV3Schema{missing}.type: "
                           "Required value: must not be empty for specified object fields "
                           "(not a structural schema)")


def _untyped(schema: dict, where: str) -> str:
    """The first schema node without a type (a structural schema has none), or ""."""
    if "type" not in schema and not schema.get("x-kubernetes-int-or-string") and \
            not schema.get("x-kubernetes-preserve-unknown-fields"):
        return where or "."
    for k, sub in (schema.get("properties") or {}).items():
        if (found := _untyped(sub, f"{where}.properties[{k}]")):
            return found
    for k in ("items", "additionalProperties"):
        if isinstance(schema.get(k), dict) and (found := _untyped(schema[k], f"{where}.{k}")):
            return found
    return ""


def _prune(value, schema: dict):
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return value
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if props is None:
            return {k: _prune(v, extra) for k, v in value.items()} if isinstance(extra, dict) else value
        return {k: _prune(v, props[k]) for k, v in value.items() if k in props}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_prune(v, schema["items"]) for v in value]
    return value


def _strip_directives(patch):
    if isinstance(patch, dict):
        return {k: _strip_directives(v) for k, v in patch.items() if not k.startswith("$")}
    if isinstance(patch, list):
        return [_strip_directives(v) for v in patch]
    return patch


def _selected(obj: dict, query: dict) -> bool:
    """fieldSelector metadata.name= / metadata.namespace= (what kubectl's delete --wait uses)."""
    sel = query.get("fieldSelector")
    if not sel:
        return True
    meta = obj.get("metadata", {})
    for term in sel.split(","):
        key, _, value = term.partition("=")
        value = value.lstrip("=")
        field = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace")}
        if key in field and field[key] != value:
            return False
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Kubernetes API server fake (tests only)")
    parser.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    parser.add_argument("--port-file", default=None, help="write the bound port here")
    parser.add_argument("--bookmark-interval", type=float, default=1.0)
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    server = FakeApiServer(host, int(port), bookmark_interval=args.bookmark_interval)
    if args.port_file:
        from pathlib import Path

        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(server.httpd.server_address[1]))
        tmp.rename(args.port_file)
    print(server.url, flush=True)
    server.httpd.serve_forever()


if __name__ == "__main__":
    main()
