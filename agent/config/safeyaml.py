"""YAML text -> Python documents, with limits that hold against hostile input (pure: text in,
documents or errors out).

libyaml builds the node graph (fast, in C); before any node becomes a Python value the graph is
checked: nesting depth, alias expansion (a "billion laughs" file is a few hundred bytes whose
aliases expand to billions of nodes), duplicate mapping keys (the Kubernetes API server rejects
them; PyYAML silently keeps the last) and documents per file. libyaml's composer recurses once
per nesting level in C, so a cheap upper bound on the depth is computed from the text first and,
when it is high, the exact depth comes from libyaml's event stream (iterative) before composing.

Timestamps stay strings, as they do when Kubernetes converts YAML to JSON.

Fast path: a file written in the plain subset of YAML that configuration generators and
``kubectl get -o yaml`` produce is parsed by yaml_rs (Rust, ~8x faster than libyaml's Python
composer) when the text proves that both parsers give the same values: no anchors, aliases,
tags, block scalars, directives, tabs or non-ASCII text, and no plain scalar that YAML 1.1
(PyYAML, the API server's go-yaml) and YAML 1.2 (yaml_rs) resolve differently (``yes``, ``0777``,
``1e3``, ``12:30`` ...). Anything else, and every file yaml_rs refuses (syntax, duplicate keys),
takes the path above, so values and error messages never depend on which parser ran.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import yaml

# The accelerator (see the module docstring); without it (or with VIPD_FAST_YAML=0, for
# comparisons: benchmarks/config_parse.py) every file takes libyaml, with the same results.
try:
    import yaml_rs
except ImportError:  # pragma: no cover - installed by scripts/install-deps
    yaml_rs = None
if os.environ.get("VIPD_FAST_YAML") == "0":
    yaml_rs = None

__all__ = ["Limits", "YamlError", "DocumentError", "Document", "load_documents", "decode"]


@dataclass(frozen=True)
class Limits:
    """Bounds on configuration input; a file beyond one is rejected with an error that names
    the limit (docs/configuration.md, "Limits")."""

    max_file_bytes: int = 10 * 1024 * 1024      # per file
    max_dir_bytes: int = 256 * 1024 * 1024      # all manifests of the directory together
    max_files: int = 5_000                      # manifests per directory
    max_documents: int = 100_000                # YAML documents per file
    max_document_bytes: int = 1536 * 1024       # per document (object), etcd's request limit
    max_document_values: int = 100_000          # per document: commas + line breaks
    max_depth: int = 100                        # nesting of mappings/sequences
    alias_expansion: int = 10                   # expanded nodes <= this x written nodes (+10,000)
    # the daemon's parser process (agent.config.worker): address space and silence before it
    # is killed and the file it was reading is reported
    worker_memory_bytes: int = 2 * 1024 * 1024 * 1024
    worker_timeout_s: float = 60.0


DEFAULT_LIMITS = Limits()

# `--config-limit NAME=VALUE` (vipd run, vipctl config validate): the names users write
LIMIT_NAMES = {"file-bytes": "max_file_bytes", "dir-bytes": "max_dir_bytes",
               "files": "max_files", "documents": "max_documents",
               "document-bytes": "max_document_bytes", "document-values": "max_document_values",
               "depth": "max_depth", "parser-memory-bytes": "worker_memory_bytes",
               "parser-timeout-seconds": "worker_timeout_s"}


def parse_limits(settings: list[str], base: Limits = DEFAULT_LIMITS) -> Limits:
    """["files=10000", "dir-bytes=1073741824"] -> Limits; ValueError naming what is allowed."""
    import dataclasses

    changes: dict = {}
    for item in settings:
        name, sep, value = item.partition("=")
        if name not in LIMIT_NAMES or not sep:
            raise ValueError(f"{item!r}: expected NAME=VALUE with NAME one of "
                             f"{', '.join(LIMIT_NAMES)}")
        try:
            number = float(value) if name == "parser-timeout-seconds" else int(value)
        except ValueError:
            raise ValueError(f"{item!r}: {value!r} is not a number") from None
        if number <= 0:
            raise ValueError(f"{item!r}: must be positive")
        changes[LIMIT_NAMES[name]] = number
    return dataclasses.replace(base, **changes)


class YamlError(Exception):
    """The whole file is unusable (syntax, encoding, a limit); ``line`` is 1-based or None."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line

    def __str__(self) -> str:
        msg = self.args[0]
        return f"{msg} (line {self.line})" if self.line else msg


@dataclass(frozen=True)
class DocumentError:
    """One document is unusable (a duplicate key); the file's other documents still load."""

    field: str
    message: str
    kind: str | None = None
    name: str | None = None
    namespace: str | None = None


@dataclass(frozen=True)
class Document:
    index: int                    # 0-based among the file's non-empty documents
    value: Any = None
    error: DocumentError | None = None


def decode(data: bytes) -> str:
    """UTF-8 (an optional BOM is dropped) or YamlError naming where the bad byte is."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise YamlError(f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} "
                        "(manifests must be UTF-8)", line) from None


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """libyaml's parser with PyYAML's safe constructors; timestamps stay strings."""


_Loader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)

_COLLECTIONS = (yaml.MappingNode, yaml.SequenceNode)
# Block nesting needs one column of indentation (or one "- " / "? " / ": " indicator) per level,
# and flow nesting one bracket: this bounds the depth from above without parsing.
_BLOCK_PREFIX = re.compile(r"(?m)^([ \t]*(?:(?:[-?:][ \t]+)[ \t]*)*)")
_DOC_START = re.compile(r"(?m)^---(?=[ \t\r\n]|$)")
_SAFE_COMPOSE_DEPTH = 5_000   # libyaml's recursive composer is fine far beyond this


def _depth_bound(text: str, chunks: list[str]) -> int:
    # libyaml ends a document at a "---" in column 0 in every context (inside a flow collection
    # or a quoted scalar it is an error), so flow nesting never crosses these splits.
    flow = max((c.count("[") + c.count("{") for c in chunks), default=0)
    if flow > _SAFE_COMPOSE_DEPTH:
        return flow
    block = max((len(m) for m in _BLOCK_PREFIX.findall(text)), default=0)
    return flow + block + 1


def _depth_at_most(text: str, limit: int) -> bool:
    """True when no document of ``text`` nests deeper than ``limit`` (an upper bound from the
    text alone); it implies ``_depth_bound(...) <= limit``, at a fraction of its cost."""
    block = limit // 2
    # a block prefix (spaces, tabs, "- ", "? ", ": ") is a run of these characters at a line start
    if re.search(r"\n[ \t?:-]{%d}" % block, "\n" + text):
        return False
    flow = text.count("[") + text.count("{")
    if flow > limit - block:
        # pieces between "---" lines: each one or more whole documents (not every document
        # start, e.g. "--- {a: 1}", is a split here), so their counts still bound the depth
        pieces = text.split("\n---\n")
        flow = max(map(str.count, pieces, repeat("["))) + max(map(str.count, pieces, repeat("{")))
    return flow <= limit - block


def _exact_depth(text: str, limit: int) -> None:
    depth = 0
    try:
        for event in yaml.parse(text, Loader=_Loader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > limit:
                    raise YamlError(f"nested deeper than {limit} levels", event.start_mark.line + 1)
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    except yaml.YAMLError as exc:
        raise _syntax_error(exc) from None


def _syntax_error(exc: yaml.YAMLError) -> YamlError:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    msg = f"invalid YAML: {problem}" + (f" ({context})" if context else "")
    return YamlError(msg[:300], mark.line + 1 if mark is not None else None)


def _scalar_text(node) -> str | None:
    return node.value if isinstance(node, yaml.ScalarNode) else None


def _child(node, key: str):
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if _scalar_text(k) == key:
                return v
    return None


def _identity(root) -> tuple[str | None, str | None, str | None]:
    meta = _child(root, "metadata")
    return (_scalar_text(_child(root, "kind")) if _child(root, "kind") is not None else None,
            _scalar_text(_child(meta, "name")) if _child(meta, "name") is not None else None,
            _scalar_text(_child(meta, "namespace")) if _child(meta, "namespace") is not None else None)


def _path_to(root, target) -> str:
    """The field path of ``target`` below ``root`` (only asked for when reporting an error)."""
    stack: list[tuple[Any, str]] = [(root, "")]
    seen: set[int] = set()
    while stack:
        node, path = stack.pop()
        if node is target:
            return path
        if id(node) in seen or not isinstance(node, _COLLECTIONS):
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(node.value))
        else:
            for k, v in node.value:
                key = _scalar_text(k) or "?"
                stack.append((v, f"{path}.{key}" if path else key))
    return ""


def _check_graph(root, limits: Limits) -> tuple[int, int, DocumentError | None]:
    """Walk one document's node graph once: -> (written nodes, expanded nodes, duplicate-key
    error). Depth beyond the limit and recursive aliases raise YamlError."""
    written = 0
    expanded_of: dict[int, int] = {}      # collection id -> nodes it expands to
    on_path: set[int] = set()
    dup: DocumentError | None = None
    # iterative post-order: (node, depth, children_done)
    stack: list[tuple[Any, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        if not isinstance(node, _COLLECTIONS):
            continue
        nid = id(node)
        if done:
            on_path.discard(nid)
            total = 1
            if isinstance(node, yaml.SequenceNode):
                for v in node.value:
                    total += expanded_of.get(id(v), 1)
            else:
                for k, v in node.value:
                    total += expanded_of.get(id(k), 1) + expanded_of.get(id(v), 1)
            expanded_of[nid] = total
            continue
        if nid in expanded_of:
            continue                      # an alias of a node already measured
        if nid in on_path:
            raise YamlError("an alias refers to a node that contains it (recursive alias)",
                            node.start_mark.line + 1)
        if depth > limits.max_depth:
            raise YamlError(f"nested deeper than {limits.max_depth} levels",
                            node.start_mark.line + 1)
        on_path.add(nid)
        written += 1 + len(node.value)
        stack.append((node, depth, True))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((v, depth + 1, False) for v in node.value)
        else:
            keys: set[tuple[str, str]] = set()
            for k, v in node.value:
                if dup is None and isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    ident = (k.tag, k.value)
                    if ident in keys:
                        kind, name, namespace = _identity(root)
                        parent = _path_to(root, node)
                        dup = DocumentError(
                            f"{parent}.{k.value}" if parent else k.value,
                            f"duplicate key {k.value[:80]!r} (line {k.start_mark.line + 1}); a "
                            "mapping may hold each key once (the API server rejects this too)",
                            kind, name, namespace)
                    keys.add(ident)
                stack.append((k, depth + 1, False))
                stack.append((v, depth + 1, False))
    return written, expanded_of.get(id(root), 1), dup


def load_documents(text: str, limits: Limits = DEFAULT_LIMITS) -> list[Document]:
    """Every non-empty document of ``text``. Raises YamlError when the file as a whole is
    unusable (syntax, depth, aliasing, too many documents)."""
    # "---" in column 0 always starts a document (see _depth_bound): refuse before parsing.
    # Each limit is first checked on the whole text (a cheap bound: a file within a per-document
    # limit has no document beyond it); only a file beyond the bound is split into documents.
    chunks: list[str] = []

    def split() -> list[str]:
        if not chunks:
            chunks.extend(_DOC_START.split(text))
        return chunks

    if text.count("---") > limits.max_documents and len(split()) - 1 > limits.max_documents:
        raise YamlError(f"{len(chunks) - 1:,} documents in one file; the limit is "
                        f"{limits.max_documents:,} (split it into several files)")
    if len(text) > limits.max_document_bytes:
        biggest = max(range(len(split())), key=lambda i: len(chunks[i]))
        if len(chunks[biggest]) > limits.max_document_bytes:
            line = 1 + sum(c.count("\n") for c in chunks[:biggest])
            raise YamlError(f"a document of {len(chunks[biggest]):,} bytes; the limit is "
                            f"{limits.max_document_bytes:,} per object (Kubernetes' etcd refuses "
                            "bigger objects too)", line)
    # Building nodes costs ~3 µs each in libyaml's composer: a 1 MB flow list of 500,000 numbers
    # takes seconds. Every value but the first of a collection follows a "," or a line break.
    if text.count(",") + text.count("\n") > limits.max_document_values:
        busiest = max(range(len(split())),
                      key=lambda i: chunks[i].count(",") + chunks[i].count("\n"))
        values = chunks[busiest].count(",") + chunks[busiest].count("\n")
        if values > limits.max_document_values:
            line = 1 + sum(c.count("\n") for c in chunks[:busiest])
            raise YamlError(f"a document with about {values:,} values (commas and lines); the "
                            f"limit is {limits.max_document_values:,} per object", line)
    fast = _fast_documents(text, limits)
    if fast is not None:
        return fast
    if not _depth_at_most(text, _SAFE_COMPOSE_DEPTH) \
            and _depth_bound(text, split()) > _SAFE_COMPOSE_DEPTH:
        _exact_depth(text, limits.max_depth)
    loader = _Loader(text)
    out: list[Document] = []
    written = expanded = 0
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
                continue                  # an empty document (a stray "---")
            if len(out) >= limits.max_documents:
                raise YamlError(f"more than {limits.max_documents:,} documents in one file; "
                                f"the limit is {limits.max_documents:,} (split it into several "
                                "files)")
            w, e, dup = _check_graph(node, limits)
            written += w
            expanded += e
            if expanded > limits.alias_expansion * written + 10_000:
                raise YamlError(f"aliases expand to more than {limits.alias_expansion}x the "
                                f"nodes written ({expanded:,} > {written:,}); refusing a YAML "
                                "alias bomb", node.start_mark.line + 1)
            if dup is not None:
                out.append(Document(len(out), None, dup))
                continue
            out.append(Document(len(out), loader.construct_document(node)))
    except yaml.YAMLError as exc:
        raise _syntax_error(exc) from None
    except RecursionError:
        raise YamlError(f"nested too deeply (limit {limits.max_depth} levels)") from None
    finally:
        loader.dispose()
    return out


# ------------------------------------------------------------------------------ the fast path

# Bytes the fast path never takes: control characters, tabs and CR (non-ASCII is refused
# before), anchors/aliases/tags (&, *, !), block scalars (|, >), directives and reserved
# indicators (%, @, `), merge keys (<), complex keys (?): where libyaml and yaml_rs differ at the
# edges, or where the limits on aliases need libyaml's node graph.
_SLOW_BYTES = bytes(range(0, 10)) + bytes(range(11, 32)) + b"\x7f&*!|>%@`<?"
_NOT_SLOW = bytes(c for c in range(128) if c not in _SLOW_BYTES)
# Candidates for the exact check below, found by short literal searches (each a memchr-speed
# scan) in a translation of the text: flow indicators, line breaks, comments and ":" become
# spaces (a plain token starts after one), signs "+", "0" and "." "0", digits 1-9 "1", letters
# lower case. Plain scalars whose value may differ between YAML 1.1 and 1.2 start with a 0, a dot
# or a sign and one of those (0777, .5, -.5), hold an exponent (1e3), are a 1.1 boolean or "=",
# or hold an underscore (1_000) or "digit:digit" (1.1's base 60: 12:30).
_TOKENS = bytes.maketrans(b"\n,[]{}#:-.ABCDEFGHIJKLMNOPQRSTUVWXYZ23456789",
                          b"        +0abcdefghijklmnopqrstuvwxyz11111111")
_MAYBE_AMBIGUOUS = (b" 0", b" +0", b"1e", b"0e", b" yes ", b" no ", b" on ", b" off ", b" = ")
_BREAKS = bytes.maketrans(b"\n,[]{}", b"      ")
_DIGITS = bytes.maketrans(b"023456789", b"111111111")
# The exact check. A plain token ends at whitespace, a flow indicator, a comment or a ": ".
_START = r"(?<![^\s,\[\]{}])"
_END = r"(?=[\s,\[\]{}#]|:(?=[\s,\[\]{}]|$)|$)"
# Plain scalars YAML 1.1 and 1.2 resolve differently: 1.1 booleans, "=", and number-like tokens
# other than decimal integers (<= 18 digits), simple decimals (1.5, 3.), IPv4 addresses, versions
# and CIDRs, and IPv6 addresses (which contain "::" or a hex letter, unlike 1.1's 12:30).
_AMBIGUOUS = re.compile(
    _START + r"(?:(?:[Yy]es|YES|[Nn]o|NO|[Oo]n|ON|[Oo]ff|OFF|=)" + _END
    # a token that can be a number at all: digits, hex letters, base prefixes, ".", "_", ":",
    # a signed exponent (uids like 3c5e8f12-9a7b-... are never numbers)
    + r"|(?=[-+]?[0-9._](?:[0-9a-fA-FxXoO_.:]|[eE][-+])*" + _END + r")"
    + r"(?![-+]?(?:0|[1-9][0-9]{0,17})(?:\.[0-9]*)?" + _END + r")"
    + r"(?![0-9]+(?:\.[0-9]+){2,}(?:/[0-9]+)?" + _END + r")"
    + r"(?![0-9a-fA-F:.]*(?:::|:[0-9]*[a-fA-F])[0-9a-fA-F:.]*(?:/[0-9]+)?" + _END + r")"
    + r"[-+]?[0-9._])", re.MULTILINE)
# Document end markers and flow collections used as keys ("[a, b]: c", which PyYAML refuses).
# A flow collection right after "{" or "," (spaces and line breaks removed) may be a key.
_FLOW_IN_FLOW = (b"{[", b"{{", b",[", b",{")
_SLOW_STRUCTURE = re.compile(r"(?m:^\.\.\.)|[\]}] *:(?=[\s,\[\]{}]|$)")


# a quoted scalar starting a token, on one line ('' is an escaped quote in single quotes)
_QUOTED = re.compile(rb"""(?<![^\s,\[\]{}:])(?:"(?:[^"\\\n]|\\.)*"|'(?:[^'\n]|'')*')""")


def _colon_not_before_space(data: bytes) -> bool:
    return data.count(b":") != data.count(b": ") + data.count(b":\n") + data.endswith(b":")


def _plain_subset(text: str, data: bytes) -> bool:
    """True when yaml_rs reads ``text`` (``data``: its ASCII bytes) exactly as libyaml + PyYAML's
    safe constructors do, but for collections used as keys (see _fast_documents)."""
    if data.translate(None, _NOT_SLOW):
        return False
    # inside flow collections YAML 1.2 lets a plain scalar hold ":" (::1, a:b); libyaml does not.
    # A ":" inside a one-line quoted scalar ("2024-05-01T10:00:00Z", kubectl's timestamps) is fine.
    if (b"[" in data or b"{" in data) and _colon_not_before_space(data) \
            and _colon_not_before_space(_QUOTED.sub(b"", data)):
        return False
    # a ":" starting a token (": x", "[: x]", "a : b"): libyaml refuses an empty key
    if b" :" in b" " + data.translate(_BREAKS):
        return False
    if (b"]:" in data or b"}:" in data or b"] " in data or b"} " in data or b"..." in data) \
            and _SLOW_STRUCTURE.search(text):
        return False
    tokens = b" " + data.translate(_TOKENS) + b" "
    maybe = (b"_" in data or b"1:1" in data.translate(_DIGITS)
             or any(m in tokens for m in _MAYBE_AMBIGUOUS))
    return not (maybe and _AMBIGUOUS.search(text))


def _fast_documents(text: str, limits: Limits = DEFAULT_LIMITS) -> list[Document] | None:
    """The documents of ``text`` by yaml_rs, or None when the text must take libyaml (see the
    module docstring). The size and document-count limits are checked before."""
    # yaml_rs recurses per nesting level (it crashes near 50,000): the bound comes first
    if yaml_rs is None or not text.isascii() or not _depth_at_most(text, limits.max_depth):
        return None
    data = text.encode("ascii")
    if not _plain_subset(text, data):
        return None
    try:
        # a leading document makes the result a list of documents even for one document
        values = yaml_rs.loads("0\n---\n" + text, parse_datetime=False,
                               duplicate_key_policy=yaml_rs.DuplicateKeyPolicy.Error)
    except Exception:  # noqa: BLE001 - syntax, duplicate key ...: libyaml says exactly what
        return None
    squeezed = data.translate(None, b" \n")
    if any(p in squeezed for p in _FLOW_IN_FLOW):
        # a flow collection as a key ("{[a]}", "{x: 1, {b: c}}") is a tuple or frozenset key
        # here and an error in PyYAML; json refuses such keys, at C speed
        try:
            json.dumps(values, check_circular=False)
        except (TypeError, ValueError):
            return None
    return [Document(i, v) for i, v in enumerate(v for v in values[1:] if v is not None)]
