"""The start-up plan's costly outputs, kept across restarts (``<state-dir>/plan-memo.pickle``).

At 20,000 Services the first plan of a start spends ~2.5 s of CPU on three parts that are
pure functions of inputs a restart usually finds unchanged: LB-IPAM's result, the datapath
frontends and every peer's VIP paths. The agent writes them when it stops
(:func:`save`, from the last plan it applied) under a digest of *every* input of those
parts (:func:`inputs_digest`): the configuration's content fingerprint (each file's
sha256), the LB-IPAM allocations and ClusterConfig order a restart reads from the state
dir, the agent's flags (``PlanSettings``), this file format and the agent's code. A start
whose digest matches loads them (:func:`load`, ~0.3 s) instead of computing them; anything
else — another digest, a truncated or corrupt file, another vipd version, a configuration
with refused files whose last good objects were kept — computes as without a memo. Each
peer's paths carry the non-Service inputs they were built from (``PeerPaths.inputs``:
instance, peer, Node, advertisements, interfaces, ...), which the plan compares with the
current ones before using them (``NodePlan.anticipate_paths``).

Pickled with compact reducers for the 20,000-fold objects (datapath keys, services and
backends, addresses, prefixes): loading rebuilds them without re-validating what this agent
validated when it computed them.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import os
import pickle
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

__all__ = ["FILE", "PlanMemo", "inputs_digest", "write", "read", "load", "save", "discard"]

FILE = "plan-memo.pickle"
FORMAT = b"vipd-plan-memo 1\n"


@dataclass(frozen=True)
class PlanMemo:
    digest: str
    lbipam: Any                      # LbIpamResult
    frontends: Mapping | None        # ServiceKey -> datapath Service (None: no datapath)
    owners: Mapping
    contested: bool
    paths: Mapping                   # (instance, peer address) -> PeerPaths


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """The agent's version, the content of its Python modules, and the Python and pydantic
    versions (whose objects are pickled): another build never reads this build's memo."""
    import sys

    import pydantic

    from agent.version import version

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(f"{version()}\0{sys.version}\0{pydantic.VERSION}".encode())
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def inputs_digest(*, config_fingerprint: str, kept: tuple, allocations: Mapping,
                  cluster_config_order: tuple, settings) -> str | None:
    """The digest of every input of the memoized parts; None when the configuration has no
    content fingerprint (the Kubernetes source) or holds kept objects (files refused, their
    last good objects kept: the files alone no longer say what the objects are)."""
    if not config_fingerprint or kept:
        return None
    h = hashlib.sha256(FORMAT + code_digest().encode())
    h.update(b"\0config\0" + config_fingerprint.encode())
    h.update(b"\0order\0" + repr(tuple(cluster_config_order)).encode())
    h.update(b"\0settings\0" + repr(settings).encode())
    h.update(b"\0allocations\0")
    h.update("\n".join(f"{k}\0{' '.join(v)}" for k, v in sorted(allocations.items())).encode())
    return h.hexdigest()


# -- compact pickling -------------------------------------------------------------------------

_new, _set = object.__new__, object.__setattr__


def _service_key(cls, vip, port: int, proto):
    key = _new(cls)
    _set(key, "vip", vip)
    _set(key, "port", port)
    _set(key, "proto", proto)
    _set(key, "_hash", hash((vip, port, proto)))   # hashes of enums and strings differ per process
    return key


def _built(cls, fields: dict):
    return cls(**fields)


def _satisfied():
    from agent.controlplane.lbipam import _SATISFIED

    return _SATISFIED


def _v4(n: int):
    return ipaddress.IPv4Address(n)


def _net(cls, n: int, length: int):
    return cls((n, length))


@functools.lru_cache(maxsize=1)
def _classes() -> tuple[dict, type, type, Any, Any]:
    from agent.bgp.messages import PathAttributes
    from agent.controlplane.lbipam import _SATISFIED
    from agent.datapath.model import Backend, Service, ServiceKey, trusted

    return ({cls: tuple(cls.__slots__) for cls in (Backend, Service)}, ServiceKey, PathAttributes, _SATISFIED,
            trusted)


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        t = type(obj)
        slotted, service_key, path_attributes, satisfied, trusted = _classes()
        if obj is satisfied:   # LB-IPAM's one "satisfied" condition: its next pass checks identity
            return _satisfied, ()
        names = slotted.get(t)
        if names is not None:   # frozen, validated when computed: rebuilt field by field
            return trusted, (t, *(getattr(obj, n) for n in names))
        if t is service_key:
            return _service_key, (t, obj.vip, obj.port, obj.proto)
        if t is path_attributes:   # a few shared ones; the constructor hashes them anew
            return _built, (t, {f: getattr(obj, f) for f in t.__dataclass_fields__ if not f.startswith("_")})
        if t is ipaddress.IPv4Address:   # ipaddress pickles through the text form
            return _v4, (int(obj),)
        if t is ipaddress.IPv4Network or t is ipaddress.IPv6Network:
            return _net, (t, int(obj.network_address), obj.prefixlen)
        return NotImplemented


def write(fh, memo: PlanMemo) -> None:
    """The header, the digest, then the parts as separate pickles straight into ``fh``: a
    reader checks the digest before unpickling anything else, and the writer's pickle memo
    (one entry per object) holds one part at a time (writing all at once at 20,000 Services
    raised the stopping agent's peak RSS by ~35 MB)."""
    fh.write(FORMAT)
    pickler = _Pickler(fh, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dump(memo.digest)
    for group in (("lbipam",), ("frontends", "owners", "contested"), ("paths",)):
        pickler.clear_memo()
        pickler.dump(tuple(getattr(memo, name) for name in group))


def read(fh, digest: str) -> PlanMemo | None:
    """The memo in ``fh`` if it was made for ``digest``; None for anything else."""
    if fh.read(len(FORMAT)) != FORMAT:
        return None
    try:
        if pickle.load(fh) != digest:
            return None
        (lbipam,) = pickle.load(fh)
        frontends, owners, contested = pickle.load(fh)
        (paths,) = pickle.load(fh)
    except Exception:  # noqa: BLE001 - truncated, corrupt, or classes this build lacks: recompute
        return None
    if fh.read(1):   # trailing bytes: not a file this code wrote
        return None
    return PlanMemo(digest, lbipam, frontends, owners, contested, paths)


# -- the file (the controller owns the state dir) ---------------------------------------------

def load(state_dir: Path, digest: str | None) -> PlanMemo | None:
    if digest is None:
        return None
    try:
        with open(Path(state_dir) / FILE, "rb", buffering=1 << 20) as fh:
            return read(fh, digest)
    except OSError:
        return None


def save(state_dir: Path, memo: PlanMemo) -> int:
    """Write atomically (temp file, fsync, rename); returns the size in bytes."""
    path = Path(state_dir) / FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb", buffering=1 << 20) as fh:
            write(fh, memo)
            fh.flush()
            os.fsync(fh.fileno())
            size = fh.tell()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return size


def discard(state_dir: Path) -> None:
    (Path(state_dir) / FILE).unlink(missing_ok=True)
