"""Server-side apply for the API server fake (agent.lab.kubeapi): field ownership as the real
API server tracks it, enough that a client's use of it can be proven wrong.

* Every field set by a manager is recorded in ``metadata.managedFields`` (FieldsV1, one entry
  per manager, operation and subresource), for apply (``Apply``) and for create / update /
  patch (``Update``: the fields that request changed).
* Applying a field another manager owns with a *different* value is a 409 Conflict naming the
  manager and the field, unless ``force=true`` (then ownership moves to the applier).
  The same value is shared ownership, not a conflict.
* A field a manager applied before and no longer applies is removed, unless another manager
  still owns it.

Without schemas, list semantics are guessed as the built-in and Cilium types declare them:
lists of objects with a ``name`` (bgpInstances, peers, ports...) or ``type`` (conditions) are
maps keyed by it, ``ownerReferences`` by ``uid``; every other list is atomic (owned whole).
Of ``metadata`` only labels, annotations, ownerReferences and finalizers are owned, as in
Kubernetes. Pure functions: objects and field sets in, objects and field sets out.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime, timezone

__all__ = ["ApplyConflict", "apply", "track_update", "fieldset", "describe"]

Path = tuple[str, ...]      # FieldsV1 tokens: "f:spec", 'k:{"name":"x"}', then "." for an item
LIST_KEYS = ("uid", "name", "type")     # the first one every item has makes the list a map
METADATA_OWNED = ("labels", "annotations", "ownerReferences", "finalizers")


class ApplyConflict(Exception):
    def __init__(self, conflicts: list[tuple[str, Path]]):
        self.conflicts = conflicts
        super().__init__(f"Apply failed with {len(conflicts)} conflict"
                         f"{'s' if len(conflicts) != 1 else ''}: " + "; ".join(
                             f'conflict with "{m}": {describe(p)}' for m, p in conflicts))


def _list_key(items: list) -> str | None:
    if not items or not all(isinstance(i, dict) for i in items):
        return None
    return next((k for k in LIST_KEYS if all(k in i for i in items)), None)


def _item_token(key: str, item: dict) -> str:
    return "k:" + json.dumps({key: item[key]}, separators=(",", ":"))


def fieldset(obj: dict) -> set[Path]:
    """The leaf fields of ``obj`` (an object or a patch) a manager owns by setting them."""
    out: set[Path] = set()
    meta = obj.get("metadata") or {}
    for k in METADATA_OWNED:
        if k in meta:
            _walk(meta[k], ("f:metadata", f"f:{k}"), out)
    for k, v in obj.items():
        if k not in ("apiVersion", "kind", "metadata"):
            _walk(v, (f"f:{k}",), out)
    return out


def _walk(value, path: Path, out: set[Path]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _walk(v, path + (f"f:{k}",), out)
    elif isinstance(value, list) and (key := _list_key(value)):
        for item in value:
            item_path = path + (_item_token(key, item),)
            out.add(item_path + (".",))
            for k, v in item.items():
                _walk(v, item_path + (f"f:{k}",), out)
    else:
        out.add(path)


def describe(path: Path) -> str:
    """'.spec.bgpInstances[name="a"].localASN', as the API server words conflicting fields."""
    text = ""
    for tok in path:
        if tok.startswith("f:"):
            text += "." + tok[2:]
        elif tok.startswith("k:"):
            text += "[" + ",".join(f"{k}={json.dumps(v)}" for k, v in json.loads(tok[2:]).items()) + "]"
    return text or "."


def encode(paths: set[Path]) -> dict:
    """Field set -> FieldsV1 (nested maps, ``{}`` at the leaves, ``".": {}`` for items)."""
    root: dict = {}
    for path in sorted(paths):
        node = root
        for tok in path:
            node = node.setdefault(tok, {})
    return root


def decode(fields: dict, prefix: Path = ()) -> set[Path]:
    out: set[Path] = set()
    for tok, sub in (fields or {}).items():
        if sub:
            out |= decode(sub, prefix + (tok,))
        else:
            out.add(prefix + (tok,))
    return out


# --------------------------------------------------------------------------- reading, writing


def _children(value, tok: str):
    """(container, index-or-key) of ``tok`` inside ``value``, or None."""
    if tok.startswith("f:") and isinstance(value, dict):
        return tok[2:] if tok[2:] in value else None
    if tok.startswith("k:") and isinstance(value, list):
        (key, want), = json.loads(tok[2:]).items()
        return next((i for i, item in enumerate(value)
                     if isinstance(item, dict) and item.get(key) == want), None)
    return None


def value_at(obj, path: Path):
    node = obj
    for tok in path:
        if tok == ".":
            return node
        key = _children(node, tok)
        if key is None:
            return _MISSING
        node = node[key]
    return node


_MISSING = object()


def _remove(obj, path: Path) -> None:
    node, parents = obj, []
    for tok in path[:-1]:
        key = _children(node, tok)
        if key is None:
            return
        parents.append((node, key))
        node = node[key]
    last = path[-1]
    if last == ".":   # the item itself
        container, key = parents.pop() if parents else (None, None)
        if container is not None:
            del container[key]
    else:
        key = _children(node, last)
        if key is not None:
            del node[key]
    # a map or list left empty by the removal goes too
    for container, key in reversed(parents):
        if container[key] in ({}, []):
            del container[key]
        else:
            break


def merge(live, applied):
    """``applied`` over ``live``: maps merged, keyed lists merged by key, the rest replaced."""
    if isinstance(live, dict) and isinstance(applied, dict):
        out = dict(live)
        for k, v in applied.items():
            out[k] = merge(live.get(k), v) if k in live else copy.deepcopy(v)
        return out
    if isinstance(live, list) and isinstance(applied, list):
        key = _list_key(applied)
        if key and _list_key(live) == key:
            out = [copy.deepcopy(i) for i in live]
            for item in applied:
                at = next((n for n, i in enumerate(out) if i.get(key) == item[key]), None)
                if at is None:
                    out.append(copy.deepcopy(item))
                else:
                    out[at] = merge(out[at], item)
            return out
    return copy.deepcopy(applied)


# ------------------------------------------------------------------------------- ownership


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _entries(managed: list[dict]) -> dict[tuple[str, str, str], dict]:
    return {(e["manager"], e.get("operation", "Update"), e.get("subresource", "")): e
            for e in managed or []}


def _entry(manager: str, operation: str, subresource: str, api_version: str,
           paths: set[Path], previous: dict | None) -> dict:
    fields = encode(paths)
    e = {"manager": manager, "operation": operation, "apiVersion": api_version,
         "time": previous["time"] if previous and previous.get("fieldsV1") == fields else _now(),
         "fieldsType": "FieldsV1", "fieldsV1": fields}
    if subresource:
        e["subresource"] = subresource
    return e


def _content(obj: dict) -> dict:
    """What fields are compared on: the object without server bookkeeping."""
    meta = obj.get("metadata") or {}
    return {**obj, "metadata": {k: meta[k] for k in METADATA_OWNED if k in meta}}


def apply(live: dict | None, applied: dict, manager: str, *, force: bool, subresource: str,
          api_version: str) -> tuple[dict, list[dict]]:
    """-> (the new object, its managedFields). ``applied`` is what the manager applies (for
    the status subresource: only its status is looked at). Raises ApplyConflict."""
    live = copy.deepcopy(live) if live else {}
    entries = _entries((live.get("metadata") or {}).get("managedFields"))
    key = (manager, "Apply", subresource)
    mine_before = decode(entries[key]["fieldsV1"]) if key in entries else set()
    wanted = fieldset(applied)
    conflicts, taken = [], {}
    for other, e in entries.items():
        if other == key:
            continue
        owned = decode(e["fieldsV1"])
        clash = sorted(p for p in wanted & owned
                       if p[-1] != "." and value_at(_content(live), p) != value_at(applied, p))
        if clash and not force:
            conflicts += [(other[0], p) for p in clash]
        taken[other] = owned - set(clash) if force else owned
    if conflicts:
        raise ApplyConflict(conflicts)
    still_owned = set().union(*taken.values()) if taken else set()
    new = live
    # whole items first (their key field is how the item is found), then single fields
    for path in sorted(mine_before - wanted - still_owned, key=lambda p: (p[-1] != ".", -len(p))):
        _remove(new, path)
    new = merge(new, {k: v for k, v in applied.items() if k not in ("apiVersion", "kind")})
    managed = [_entry(m, op, sub, e.get("apiVersion", api_version), taken[(m, op, sub)], e)
               for (m, op, sub), e in entries.items() if (m, op, sub) != key and taken[(m, op, sub)]]
    managed.append(_entry(manager, "Apply", subresource, api_version, wanted, entries.get(key)))
    return new, managed


def track_update(old: dict | None, new: dict, manager: str, *, subresource: str,
                 api_version: str) -> list[dict]:
    """managedFields after a create / update / patch by ``manager``: it owns what it changed,
    the others lose it; removed fields are owned by nobody."""
    entries = _entries(((old or {}).get("metadata") or {}).get("managedFields"))
    before, after = _content(old or {}), _content(new)
    old_fields, new_fields = fieldset(before), fieldset(after)
    changed = {p for p in new_fields if value_at(before, p) != value_at(after, p) or p not in old_fields}
    gone = old_fields - new_fields
    key = (manager, "Update", subresource)
    out = []
    for k, e in entries.items():
        owned = decode(e["fieldsV1"]) - gone - (changed if k != key else set())
        if k == key:
            owned |= changed
        if owned:
            out.append(_entry(*k, e.get("apiVersion", api_version), owned, e))
    if key not in entries and changed:
        out.append(_entry(manager, "Update", subresource, api_version, changed, None))
    return out
