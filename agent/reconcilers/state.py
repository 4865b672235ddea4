"""The state directory: LB-IPAM allocations and the first-seen order of ClusterConfigs.

The one owner of those two files. ``apply`` writes a file only when the plan's value differs
from what was last written, so a pass that changes nothing writes nothing; a new agent on the
same state dir starts from them (stable VIPs, the same ClusterConfig owning the node).
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator

import yaml

from agent.reconcilers.errors import ErrorBook

__all__ = ["StateReconciler", "StateView", "atomic_write_yaml", "dump_yaml", "load_allocations",
           "LBIPAM_FILE", "ORDER_FILE"]

NAME = "state"
LBIPAM_FILE = "lbipam-allocations.yaml"
ORDER_FILE = "cluster-config-order.yaml"  # first-seen order of ClusterConfigs (see ownership.py)
LARGE_DOCUMENT = 2000   # entries: above this, write YAML's JSON form (a 20,000-Service status
                        # file takes ~0.1 s instead of ~7 s with PyYAML's emitter)


def dump_yaml(data: Any) -> str:
    """YAML text of ``data``: block style, or for large documents the JSON form (YAML is a
    superset of JSON: every YAML parser reads it, ``yaml.safe_load`` included), one line per
    top-level key and per entry of a large mapping, each line by json's C encoder."""
    return "".join(_yaml_chunks(data))


def _yaml_chunks(data: Any) -> Iterator[str]:
    """:func:`dump_yaml`'s text in pieces (a large document: one per line), so a file is
    written without the whole text in memory (20,000 Services: ~14 MB less at each write)."""
    size = sum(len(v) for v in data.values() if isinstance(v, (dict, list))) if isinstance(data, dict) else 0
    if size > LARGE_DOCUMENT:
        yield from _json_lines(data)
        yield "\n"
        return
    yield yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False,
                    default_flow_style=False)


def _json_lines(data: dict, depth: int = 0) -> Iterator[str]:
    import json

    pad = " " * (depth + 1)
    yield "{\n"
    sep = ""
    for k, v in data.items():
        yield f"{sep}{pad}{json.dumps(str(k), ensure_ascii=False)}: "
        if isinstance(v, dict) and len(v) > 50 and depth < 1:
            yield from _json_lines(v, depth + 1)
        else:
            yield json.dumps(v, ensure_ascii=False)
        sep = ",\n"
    yield "\n" + " " * depth + "}"


def atomic_write_yaml(path: Path, data: Any) -> None:
    """Write via a temp file + rename so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as fh:
        fh.writelines(_yaml_chunks(data))
    os.replace(tmp, path)


def load_allocations(state_dir: Path) -> dict[str, tuple[str, ...]]:
    """The persisted LB-IPAM allocations ({} when there are none yet)."""
    path = Path(state_dir) / LBIPAM_FILE
    if not path.exists():
        return {}
    data = _read(path) or {}
    return {k: tuple(v) for k, v in (data.get("allocations") or {}).items()}


def _read(path: Path):
    """A state file: large ones are written as JSON (dump_yaml), which json reads ~100x faster
    than PyYAML (20,000 allocations: 0.02 s instead of ~4 s, at every start); else YAML."""
    import json

    text = path.read_text()
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except ValueError:
            pass
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def load_order(state_dir: Path) -> tuple[str, ...]:
    path = Path(state_dir) / ORDER_FILE
    if not path.exists():
        return ()
    data = _read(path) or {}
    return tuple(str(n) for n in data.get("clusterConfigs") or ())


class StateView:
    """Read-only: what the state directory holds (as last written)."""

    def __init__(self, allocations: dict, order: tuple[str, ...]):
        self.allocations = MappingProxyType(allocations)
        self.cluster_config_order = order


class StateReconciler:
    name = NAME

    def __init__(self, state_dir: str | Path, *, log=None):
        self.state_dir = Path(state_dir)
        self.log = log
        self.allocations: dict[str, tuple[str, ...]] = load_allocations(self.state_dir)
        self.cluster_config_order: tuple[str, ...] = load_order(self.state_dir)
        self._written = None     # the LbIpamResult last persisted (same object: nothing to compare)

    async def apply(self, plan, errors: ErrorBook, now: float) -> None:
        try:
            if plan.cluster_config_order != self.cluster_config_order:
                atomic_write_yaml(self.state_dir / ORDER_FILE, {"clusterConfigs": list(plan.cluster_config_order)})
                self.cluster_config_order = plan.cluster_config_order
            if plan.lbipam is not None and plan.lbipam is not self._written:
                allocations = plan.lbipam.allocations    # tuples, as allocate() makes them
                if allocations != self.allocations:
                    # 20,000 entries take a moment: off the event loop (BGP keepalives, UPDATEs)
                    await asyncio.to_thread(self._write_allocations, allocations)
                    self.allocations = dict(allocations)
                self._written = plan.lbipam
        except Exception as exc:  # noqa: BLE001 - recorded, retried with backoff
            rec = errors.record(NAME, "", f"state directory {self.state_dir}: {exc}", now)
            if self.log is not None:
                self.log.error("reconcile failed", reconciler=NAME, error=rec.error, attempts=rec.attempts)
        else:
            errors.clear(NAME, "")

    def _write_allocations(self, allocations: dict) -> None:
        doc = {"allocations": {k: list(v) for k, v in sorted(allocations.items())}}
        atomic_write_yaml(self.state_dir / LBIPAM_FILE, doc)

    def view(self) -> StateView:
        return StateView(self.allocations, self.cluster_config_order)
