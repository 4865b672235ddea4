"""YAML loading and validation: files -> typed objects + errors that name file, object and field.

One bad document (or one bad object in a ``kind: List``) never stops the others: it becomes a
``ConfigError`` and loading continues. Kinds vipd does not use (Deployments, kind Cluster configs
…) are listed in ``LoadResult.ignored`` rather than reported as errors, so a user's whole manifest
directory can be pointed at vipd unchanged.
"""

from __future__ import annotations

import difflib
import functools
import gc
import hashlib
import os
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel, ValidationError

from agent.config import cilium, core, safeyaml
from agent.config.cilium import Resource
from agent.config.safeyaml import DEFAULT_LIMITS, Limits, YamlError

# The kinds vipd reads. A new kind (any group) is one model class with KIND and API_VERSIONS
# added here; unknown kinds of its group then become errors with "did you mean …?".
KINDS: dict[str, type[Resource]] = {m.KIND: m for m in (*cilium.CILIUM_KINDS, *core.CORE_KINDS)}

# The other kinds that exist in the API groups vipd knows, so a manifest directory shared with a
# cluster loads (they are listed as ignored). Any other kind in these groups is a typo.
OTHER_KINDS: dict[str, frozenset[str]] = {
    "": frozenset({  # core/v1
        "Binding", "ComponentStatus", "Endpoints", "Event", "LimitRange", "Namespace",
        "PersistentVolume", "PersistentVolumeClaim", "Pod", "PodTemplate",
        "ReplicationController", "ResourceQuota", "ServiceAccount"}),
    "discovery.k8s.io": frozenset(),
    "cilium.io": frozenset({
        "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "CiliumEndpoint",
        "CiliumEndpointSlice", "CiliumExternalWorkload", "CiliumIdentity", "CiliumNode",
        "CiliumNodeConfig", "CiliumPodIPPool", "CiliumL2AnnouncementPolicy",
        "CiliumEgressGatewayPolicy", "CiliumLocalRedirectPolicy", "CiliumEnvoyConfig",
        "CiliumClusterwideEnvoyConfig", "CiliumCIDRGroup", "CiliumBGPNodeConfig",
        "CiliumGatewayClassConfig"}),
}


def api_group(api_version: str) -> str:
    return api_version.rpartition("/")[0]


def _group_kinds(group: str) -> dict[str, str]:
    """Every kind of ``group`` vipd knows of -> "vipd" (read) or "other" (exists, ignored); None
    for groups vipd knows nothing about."""
    mine = {k: "vipd" for k, m in KINDS.items() if any(api_group(v) == group
                                                       for v in m.API_VERSIONS)}
    if not mine and group not in OTHER_KINDS:
        return {}
    return {**{k: "other" for k in OTHER_KINDS.get(group, ())}, **mine}


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    by_lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f"; did you mean {by_lower[close[0]]}?" if close else ""


@dataclass(frozen=True)
class ConfigError:
    file: str
    document: int
    kind: str | None
    namespace: str | None
    name: str | None
    field: str
    message: str

    @property
    def object(self) -> str:
        if len(self.name or "") > 253 or len(self.kind or "") > 253:   # never echo a huge value
            return replace(self, kind=(self.kind or "")[:80] or None,
                           name=(self.name or "")[:80] + "...").object
        kind = self.kind or "<no kind>"
        if self.name is None:
            return f"{kind} (document {self.document + 1})"
        return f"{kind}/{self.namespace}/{self.name}" if self.namespace else f"{kind}/{self.name}"

    def __str__(self) -> str:
        if self.kind is None and self.name is None and not self.field:
            return f"{self.file}: {self.message[:600]}"   # the file as a whole
        where = f"{self.field[:200]}: " if self.field else ""
        return f"{self.file}: {self.object[:300]}: {where}{self.message[:600]}"


@dataclass(frozen=True)
class ObjectSet:
    """Every valid object, by kind. Lists are sorted oldest first (creationTimestamp, then name),
    which is the order "first wins" rules use."""

    cluster_configs: tuple[cilium.CiliumBGPClusterConfig, ...] = ()
    peer_configs: tuple[cilium.CiliumBGPPeerConfig, ...] = ()
    advertisements: tuple[cilium.CiliumBGPAdvertisement, ...] = ()
    node_config_overrides: tuple[cilium.CiliumBGPNodeConfigOverride, ...] = ()
    node_configs: tuple[cilium.CiliumBGPNodeConfig, ...] = ()
    peering_policies: tuple[cilium.CiliumBGPPeeringPolicy, ...] = ()
    lb_pools: tuple[cilium.CiliumLoadBalancerIPPool, ...] = ()
    nodes: tuple[core.Node, ...] = ()
    services: tuple[core.Service, ...] = ()
    endpoint_slices: tuple[core.EndpointSlice, ...] = ()
    secrets: tuple[core.Secret, ...] = ()
    config_maps: tuple[core.ConfigMap, ...] = ()

    _FIELD_OF_KIND: typing.ClassVar[dict[str, str]] = {
        "CiliumBGPClusterConfig": "cluster_configs",
        "CiliumBGPPeerConfig": "peer_configs",
        "CiliumBGPAdvertisement": "advertisements",
        "CiliumBGPNodeConfigOverride": "node_config_overrides",
        "CiliumBGPNodeConfig": "node_configs",
        "CiliumBGPPeeringPolicy": "peering_policies",
        "CiliumLoadBalancerIPPool": "lb_pools",
        "Node": "nodes",
        "Service": "services",
        "EndpointSlice": "endpoint_slices",
        "Secret": "secrets",
        "ConfigMap": "config_maps",
    }

    @classmethod
    def from_objects(cls, objects: Iterable[Resource]) -> "ObjectSet":
        buckets: dict[str, dict[str, Resource]] = {f: {} for f in cls._FIELD_OF_KIND.values()}
        for obj in objects:
            buckets[cls._FIELD_OF_KIND[obj.KIND]][obj.key] = obj   # later duplicates replace
        return cls(**{f: tuple(sorted(b.values(), key=_age_key)) for f, b in buckets.items()})

    def all(self) -> list[Resource]:
        return [o for f in self._FIELD_OF_KIND.values() for o in getattr(self, f)]

    def replace(self, **changes) -> "ObjectSet":
        return ObjectSet(**{f: getattr(self, f) for f in self._FIELD_OF_KIND.values()} | {
            k: tuple(sorted(v, key=_age_key)) for k, v in changes.items()})

    def node(self, name: str) -> core.Node | None:
        return next((n for n in self.nodes if n.name == name), None)

    def peer_config(self, name: str) -> cilium.CiliumBGPPeerConfig | None:
        return next((p for p in self.peer_configs if p.name == name), None)

    def node_config_override(self, name: str) -> cilium.CiliumBGPNodeConfigOverride | None:
        return next((o for o in self.node_config_overrides if o.name == name), None)

    def secret(self, namespace: str, name: str) -> core.Secret | None:
        return next((s for s in self.secrets if s.namespace == namespace and s.name == name), None)

    def service(self, namespace: str, name: str) -> core.Service | None:
        return next((s for s in self.services if s.namespace == namespace and s.name == name),
                    None)

    def endpoint_slices_for(self, namespace: str, service_name: str) -> list[core.EndpointSlice]:
        return self._slices_by_service.get((namespace, service_name), [])

    @functools.cached_property
    def _slices_by_service(self) -> dict[tuple[str, str], list[core.EndpointSlice]]:
        # built once per snapshot: advertisement rules look endpoints up per service
        index: dict[tuple[str, str], list[core.EndpointSlice]] = {}
        for e in self.endpoint_slices:
            if e.service_name:
                index.setdefault((e.namespace, e.service_name), []).append(e)
        return index


def _age_key(obj: Resource):
    # Objects without a timestamp (plain files) sort after timestamped ones, then by name.
    ts = obj.metadata.creation_timestamp
    return (ts is None, ts or "", obj.namespace or "", obj.name)


@dataclass
class LoadResult:
    objects: ObjectSet = field(default_factory=ObjectSet)
    errors: list[ConfigError] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)   # object key -> "file#doc"
    # False when the directory as a whole was refused (too many files, too many bytes): then
    # nothing in it can be trusted to be complete and the daemon keeps its previous objects.
    complete: bool = True

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class FileParse:
    """One file's parse: its valid objects (with document index), its errors and ignored
    documents. ``unusable`` says the file as a whole could not be read (syntax, encoding, a
    limit, empty): whoever applies it keeps the file's previous objects."""

    path: str
    digest: str = ""
    parsed: list = field(default_factory=list)    # (object, document index)
    errors: list[ConfigError] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    unusable: bool = False


MAX_ERRORS_PER_FILE = 100


def manifest_files(directory: Path) -> list[Path]:
    """Every ``*.yaml`` / ``*.yml`` directly in ``directory`` (dot files are editors' temp
    files), in name order."""
    return sorted(f for f in directory.iterdir() if f.suffix in (".yaml", ".yml")
                  and not f.name.startswith(".") and f.is_file())


def file_error(path: str, message: str) -> FileParse:
    return FileParse(str(path), errors=[ConfigError(str(path), 0, None, None, None, "", message)],
                     unusable=True)


def parse_bytes(data: bytes, filename: str, limits: Limits = DEFAULT_LIMITS,
                digest: str = "") -> FileParse:
    """The bytes of one manifest file -> FileParse (pure; never raises for bad input)."""
    if len(data) > limits.max_file_bytes:
        return file_error(filename, f"file is {len(data):,} bytes; the limit is "
                                    f"{limits.max_file_bytes:,} per file (split it)")
    if not data.strip():
        # Usually a file caught between truncate and write: its previous objects stay.
        out = file_error(filename, "file is empty; its previous objects (if any) stay applied "
                                   "(delete the file to remove them)")
        out.digest = digest
        return out
    result = LoadResult()
    items: list = []
    try:
        text = safeyaml.decode(data)
    except YamlError as exc:
        out = file_error(filename, str(exc))
        out.digest = digest
        return out
    unusable = not _parse_text(text, filename, items, result, limits)
    if len(result.errors) > MAX_ERRORS_PER_FILE:
        more = len(result.errors) - MAX_ERRORS_PER_FILE
        result.errors[MAX_ERRORS_PER_FILE:] = [ConfigError(
            filename, 0, None, None, None, "", f"... and {more:,} more errors in this file "
            "(only the first ones are listed); the file's previous objects stay applied")]
    return FileParse(filename, digest, [(o, i) for o, _f, i in items], result.errors,
                     result.ignored, unusable)


def read_file(path: str | Path, limits: Limits = DEFAULT_LIMITS) -> tuple[FileParse | None, bytes]:
    """Read one file within the size limit: -> (FileParse with the error, b"") when it cannot
    be read or is too large, else (None, bytes)."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > limits.max_file_bytes:
                return file_error(path, f"file is {size:,} bytes; the limit is "
                                        f"{limits.max_file_bytes:,} per file (split it)"), b""
            data = fh.read(limits.max_file_bytes + 1)
    except OSError as exc:
        return file_error(path, f"cannot read file: {exc.strerror or exc}"), b""
    return None, data


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_dir(path: str | Path, cache: "ParseCache | None" = None,
             limits: Limits = DEFAULT_LIMITS) -> LoadResult:
    """Every ``*.yaml`` / ``*.yml`` directly in ``path``, in name order."""
    p = Path(path)
    files = manifest_files(p)
    refused = check_dir(p, files, limits)
    if refused is not None:
        return LoadResult(errors=[refused], complete=False)
    return load_files(files, cache, limits)


def check_dir(directory: Path, files: list[Path], limits: Limits) -> ConfigError | None:
    """The directory-wide limits (file count, total bytes) -> an error, or None."""
    if len(files) > limits.max_files:
        return ConfigError(str(directory), 0, None, None, None, "",
                           f"{len(files):,} manifest files; the limit is {limits.max_files:,} "
                           "per directory (merge files into multi-document files)")
    total = 0
    for f in files:
        try:
            total += f.stat().st_size
        except OSError:
            continue
    if total > limits.max_dir_bytes:
        return ConfigError(str(directory), 0, None, None, None, "",
                           f"manifests total {total:,} bytes; the limit is "
                           f"{limits.max_dir_bytes:,} per directory")
    return None


class ParseCache:
    """Parsed and validated documents per file, keyed by the file's exact content: a reload
    after one file changed parses that file only (20,000 Services in 10 files: one file is
    ~0.5 s, all of them ~5 s). Unchanged files give the *same* objects, which the reconcilers'
    memos rely on. Holds only the files of the last load."""

    def __init__(self) -> None:
        self.files: dict[str, FileParse] = {}

    def get(self, path: str, digest: str) -> FileParse | None:
        hit = self.files.get(path)
        return hit if hit is not None and hit.digest == digest and digest else None

    def keep_only(self, seen: set) -> None:
        for name in [n for n in self.files if n not in seen]:
            del self.files[name]


def load_files(paths: Iterable[str | Path], cache: ParseCache | None = None,
               limits: Limits = DEFAULT_LIMITS) -> LoadResult:
    # Loading allocates millions of containers (20,000 Services) that live on: at the default
    # thresholds the cyclic GC rescans them over and over, which doubled the time of a load.
    # Refcounting frees what the load drops; cycles wait for the next collection.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return assemble([parse_file(p, cache, limits) for p in paths], cache)
    finally:
        if enabled:
            gc.enable()


def parse_file(path: str | Path, cache: ParseCache | None = None,
               limits: Limits = DEFAULT_LIMITS) -> FileParse:
    refused, data = read_file(path, limits)
    if refused is not None:
        return refused
    digest = digest_of(data)
    hit = cache.get(str(path), digest) if cache is not None else None
    return hit if hit is not None else parse_bytes(data, str(path), limits, digest)


def assemble(files: list[FileParse], cache: ParseCache | None = None) -> LoadResult:
    """Per-file parses -> one LoadResult (objects de-duplicated across files)."""
    result = LoadResult()
    parsed: list[tuple[Resource, str, int]] = []
    for fp in files:
        parsed.extend((obj, fp.path, index) for obj, index in fp.parsed)
        result.errors.extend(fp.errors)
        result.ignored.extend(fp.ignored)
        if cache is not None:
            cache.files[fp.path] = fp
    if cache is not None:
        cache.keep_only({fp.path for fp in files})
    _finish(parsed, result)
    return result


def load_documents(text: str, filename: str = "<input>") -> LoadResult:
    parsed: list[tuple[Resource, str, int]] = []
    result = LoadResult()
    _parse_text(text, filename, parsed, result)
    _finish(parsed, result)
    return result


def validate_document(doc: Any, filename: str = "<input>", index: int = 0, *, where: str = ""
                      ) -> tuple[Resource | None, list[ConfigError], str | None]:
    """One parsed YAML document -> (object or None, errors, ignored-reason or None). Values are
    checked strictly, as the API server does: 1 is not a boolean, "64512" is not an integer.
    ``where`` prefixes field paths (``items[3]`` inside a ``kind: List``)."""
    prefix = f"{where}." if where else ""
    if not isinstance(doc, dict):
        return None, [ConfigError(filename, index, None, None, None, where,
                                  f"a manifest must be a mapping, got {_type_name(doc)}")], None
    kind = doc.get("kind")
    api_version = doc.get("apiVersion")
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    name, namespace = meta.get("name"), meta.get("namespace")
    name = name if isinstance(name, str) else None
    namespace = namespace if isinstance(namespace, str) else None

    def err(fieldpath: str, msg: str) -> ConfigError:
        return ConfigError(filename, index, kind if isinstance(kind, str) else None, namespace,
                           name, prefix + fieldpath if fieldpath else where, msg)

    if not kind or not api_version:
        return None, [err("apiVersion" if not api_version else "kind",
                          "required (every manifest needs apiVersion and kind)")], None
    if not isinstance(kind, str) or not isinstance(api_version, str):
        bad = "kind" if not isinstance(kind, str) else "apiVersion"
        return None, [err(bad, f"must be a string, got {_type_name(doc[bad])}")], None
    model = KINDS.get(kind)
    if model is None:
        known = _group_kinds(api_group(api_version))
        if not known or known.get(kind) == "other":
            return None, [], f"{filename}: {api_version} {kind} {name or ''}: kind not used by vipd"
        group = api_group(api_version) or "core"
        return None, [err("kind", f"{kind!r} is not a kind of the {group} API group"
                          f"{did_you_mean(kind, known)}")], None
    if api_version not in model.API_VERSIONS:
        return None, [err("apiVersion", f"{api_version[:100]!r} is not served for {kind}; use one "
                          f"of {', '.join(model.API_VERSIONS)}")], None
    try:
        obj = model.model_validate(doc, strict=True)
    except ValidationError as exc:
        return None, [err(*_explain(model, e)) for e in exc.errors()], None
    return obj, [], None


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping", type(None): "null"}.get(type(value),
                                                                        type(value).__name__)


def _parse_text(text: str, filename: str, parsed: list, result: LoadResult,
                limits: Limits = DEFAULT_LIMITS) -> bool:
    """False when the text as a whole is unusable (the error is in ``result``)."""
    try:
        docs = safeyaml.load_documents(text, limits)
    except YamlError as exc:
        result.errors.append(ConfigError(filename, 0, None, None, None, "", str(exc)))
        return False
    for d in docs:
        if d.error is not None:
            e = d.error
            result.errors.append(ConfigError(filename, d.index, e.kind, e.namespace, e.name,
                                             e.field, e.message))
            continue
        doc = d.value
        if isinstance(doc, dict) and doc.get("kind") == "List":
            items = doc.get("items")
            if items is None:
                continue
            if not isinstance(items, list):
                result.errors.append(ConfigError(filename, d.index, "List", None, None, "items",
                                                 f"must be a list of objects, got "
                                                 f"{_type_name(items)}"))
                continue
            entries = [(item, f"items[{i}]") for i, item in enumerate(items)]
        else:
            entries = [(doc, "")]
        for item, where in entries:
            obj, errors, ignored = validate_document(item, filename, d.index, where=where)
            result.errors.extend(errors)
            if ignored:
                result.ignored.append(ignored)
            if obj is not None:
                parsed.append((obj, filename, d.index))
    return True


def _finish(parsed: list[tuple[Resource, str, int]], result: LoadResult) -> None:
    seen: dict[str, str] = {}
    kept: list[Resource] = []
    for obj, filename, index in parsed:
        where = f"{filename}#{index + 1}"
        if obj.key in seen:
            result.errors.append(ConfigError(
                filename, index, obj.KIND, obj.namespace, obj.name, "metadata.name",
                f"duplicate object: already defined in {seen[obj.key]}; names must be unique "
                "per kind (and namespace)"))
            continue
        seen[obj.key] = where
        kept.append(obj)
    result.objects = ObjectSet.from_objects(kept)
    result.sources = seen


# ------------------------------------------------------------------------------ error messages


def _explain(model: type[BaseModel], error: dict) -> tuple[str, str]:
    """pydantic error -> (field path in the manifest's spelling, message saying what is allowed)."""
    loc = list(error.get("loc", ()))
    msg = error.get("msg", "invalid")
    etype = error.get("type", "")
    # Errors raised by our own validators already say what is allowed; strip pydantic's prefix.
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    # Model-level validators report their own path ("spec.x[0].y: ..."): lift it into the field.
    if not loc and ": " in msg and msg.split(": ", 1)[0].startswith(("spec.", "metadata.")):
        path, msg = msg.split(": ", 1)
        return path, msg
    path = _format_loc(loc)
    got = error.get("input")
    if etype == "extra_forbidden":
        allowed = _allowed_fields(model, loc[:-1])
        msg = "unknown field" + (f"; allowed here: {', '.join(allowed)}" if allowed else "")
    elif etype == "missing":
        msg = "required field is missing"
    elif etype in ("greater_than_equal", "less_than_equal", "greater_than", "less_than",
                   "string_too_long", "string_too_short", "too_short", "too_long"):
        bounds = _bounds(model, loc)
        shown = f"{len(got)} items" if isinstance(got, (list, dict)) else _shown(got)
        if etype in ("string_too_long", "string_too_short"):
            shown = f"{len(got)} characters" if isinstance(got, str) else shown
        msg = f"{msg} (got {shown})" + (f"; allowed: {bounds}" if bounds else "")
    elif etype in ("int_parsing", "int_type", "bool_parsing", "bool_type", "string_type",
                   "literal_error", "dict_type", "list_type", "model_type", "int_from_float",
                   "model_attributes_type", "float_type", "enum", "string_pattern_mismatch"):
        msg = f"{msg} (got {_shown(got)})"
        if isinstance(got, bool) and etype in ("string_type", "literal_error"):
            msg += ("; YAML reads unquoted true/false/yes/no/on/off as booleans: quote the "
                    "value")
        elif isinstance(got, (int, float)) and not isinstance(got, bool) and etype in (
                "string_type", "literal_error"):
            msg += "; quote the value to make it a string"
        elif isinstance(got, str) and etype in ("int_type", "bool_type"):
            msg += "; write it without quotes"
        elif isinstance(got, bool) and etype == "int_type":
            msg += "; a boolean is not a number"
    return path, msg[:500]


def _shown(value: Any) -> str:
    """A value for an error message, never longer than a line (a mapping may be huge)."""
    if isinstance(value, dict):
        return f"a mapping of {len(value)} keys"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _format_loc(loc: list) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and (part.startswith("function-") or "[" in part
                                        or part in ("constrained-int", "int", "str")):
            continue   # pydantic union/validator branch labels, not fields
        else:
            out += ("." if out else "") + str(part)
    return out


def _unwrap(tp):
    """Optional[X] / list[X] / Annotated[X, ...] / dict[str, X] -> X (the model, if any)."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = args[0] if len(args) == 1 else tp
            if len(args) != 1:
                return tp
        elif origin in (list, tuple, dict):
            tp = typing.get_args(tp)[-1]
        else:
            return tp


def _resolve(model: type[BaseModel], loc: list):
    """Walk ``loc`` (aliases and indexes) through nested models; -> (model, FieldInfo|None)."""
    current: Any = model
    info = None
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None, info
        info = next((f for n, f in current.model_fields.items()
                     if part in (n, f.alias)), None)
        if info is None:
            return None, None
        current = _unwrap(info.annotation)
    return current, info


def _allowed_fields(model: type[BaseModel], loc: list) -> list[str]:
    target, _ = _resolve(model, loc) if loc else (model, None)
    if isinstance(target, type) and issubclass(target, BaseModel):
        return [f.alias or n for n, f in target.model_fields.items()]
    return []


def _bounds(model: type[BaseModel], loc: list) -> str:
    _, info = _resolve(model, loc)
    if info is None:
        return ""
    lo = hi = None
    metas = list(info.metadata)
    ann = info.annotation
    # constraints may sit on an Annotated inside Optional
    for arg in typing.get_args(ann) or ():
        if typing.get_origin(arg) is typing.Annotated:
            metas += [m for a in typing.get_args(arg)[1:] for m in getattr(a, "metadata", [a])]
    for m in metas:
        lo = getattr(m, "ge", lo) if getattr(m, "ge", None) is not None else lo
        hi = getattr(m, "le", hi) if getattr(m, "le", None) is not None else hi
        lo = getattr(m, "min_length", lo) if getattr(m, "min_length", None) is not None else lo
        hi = getattr(m, "max_length", hi) if getattr(m, "max_length", None) is not None else hi
    if lo is None and hi is None:
        return ""
    return f"{lo if lo is not None else ''}..{hi if hi is not None else ''}"
