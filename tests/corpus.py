"""A generated corpus of bad configuration input: every supported kind mutated field by field
(wrong type, out of range, bad address, missing required field, unknown field, duplicated key),
plus truncations, non-UTF-8 bytes and hostile files (alias bombs, deep nesting, huge files, too
many documents or files). Used by tests/unit/config/test_bad_input_corpus.py (vipctl config
validate) and tests/e2e/controlplane/test_hostile_config.py (a running daemon).

Each case knows what a correct answer must name: the file, and for a document-level mistake
the object (``Kind/name``) and the field path.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import yaml

FILE = "case.yaml"


@dataclass
class Case:
    id: str
    files: dict[str, bytes]                       # name -> content; a callable writes huge dirs
    must_fail: bool = True                        # False: may be valid (a truncated prefix)
    names: tuple[str, ...] = ()                   # strings one error line must contain
    write: Callable | None = field(default=None, repr=False)   # writes files itself (10k files)


# One valid object of every supported kind, with most fields set.
BASE: dict[str, dict] = {
    "CiliumBGPClusterConfig": {
        "apiVersion": "cilium.io/v2", "kind": "CiliumBGPClusterConfig",
        "metadata": {"name": "cluster", "labels": {"team": "net"}},
        "spec": {"nodeSelector": {"matchLabels": {"bgp": "on"},
                                  "matchExpressions": [{"key": "rack", "operator": "In",
                                                        "values": ["r1"]}]},
                 "bgpInstances": [{"name": "i1", "localASN": 65001, "localPort": 179,
                                   "peers": [{"name": "tor", "peerAddress": "10.0.0.1",
                                              "peerASN": 65000,
                                              "peerConfigRef": {"name": "peer"}}]}]}},
    "CiliumBGPPeerConfig": {
        "apiVersion": "cilium.io/v2", "kind": "CiliumBGPPeerConfig",
        "metadata": {"name": "peer"},
        "spec": {"transport": {"peerPort": 179},
                 "timers": {"connectRetryTimeSeconds": 5, "holdTimeSeconds": 9,
                            "keepAliveTimeSeconds": 3},
                 "authSecretRef": "bgp-auth",
                 "gracefulRestart": {"enabled": True, "restartTimeSeconds": 120},
                 "ebgpMultihop": 2,
                 "families": [{"afi": "ipv4", "safi": "unicast",
                               "advertisements": {"matchLabels": {"advertise": "bgp"}}}]}},
    "CiliumBGPAdvertisement": {
        "apiVersion": "cilium.io/v2", "kind": "CiliumBGPAdvertisement",
        "metadata": {"name": "adv", "labels": {"advertise": "bgp"}},
        "spec": {"advertisements": [
            {"advertisementType": "Service",
             "service": {"addresses": ["LoadBalancerIP"], "aggregationLengthIPv4": 24},
             "selector": {"matchLabels": {"app": "web"}},
             "attributes": {"communities": {"standard": ["65000:100"], "wellKnown": ["no-export"],
                                            "large": ["1:2:3"]},
                            "localPreference": 200}}]}},
    "CiliumBGPNodeConfigOverride": {
        "apiVersion": "cilium.io/v2", "kind": "CiliumBGPNodeConfigOverride",
        "metadata": {"name": "node1"},
        "spec": {"bgpInstances": [{"name": "i1", "routerID": "10.0.0.2", "localPort": 1179,
                                   "localASN": 65001,
                                   "peers": [{"name": "tor", "localAddress": "10.0.0.2"}]}]}},
    "CiliumBGPNodeConfig": {
        "apiVersion": "cilium.io/v2", "kind": "CiliumBGPNodeConfig",
        "metadata": {"name": "node1"},
        "spec": {"bgpInstances": [{"name": "i1", "localASN": 65001, "routerID": "10.0.0.2",
                                   "localPort": 179,
                                   "peers": [{"name": "tor", "peerAddress": "10.0.0.1",
                                              "peerASN": 65000,
                                              "peerConfigRef": {"name": "peer"}}]}]}},
    "CiliumBGPPeeringPolicy": {
        "apiVersion": "cilium.io/v2alpha1", "kind": "CiliumBGPPeeringPolicy",
        "metadata": {"name": "policy"},
        "spec": {"nodeSelector": {"matchLabels": {"bgp": "on"}},
                 "virtualRouters": [{"localASN": 65001, "exportPodCIDR": True,
                                     "serviceSelector": {"matchLabels": {"app": "web"}},
                                     "neighbors": [{"peerAddress": "10.0.0.1/32",
                                                    "peerPort": 179, "peerASN": 65000,
                                                    "eBGPMultihopTTL": 1,
                                                    "connectRetryTimeSeconds": 10,
                                                    "holdTimeSeconds": 30,
                                                    "keepAliveTimeSeconds": 10}]}]}},
    "CiliumLoadBalancerIPPool": {
        "apiVersion": "cilium.io/v2", "kind": "CiliumLoadBalancerIPPool",
        "metadata": {"name": "pool"},
        "spec": {"blocks": [{"cidr": "172.16.0.0/24"}, {"start": "172.17.0.10",
                                                        "stop": "172.17.0.20"}],
                 "serviceSelector": {"matchLabels": {"app": "web"}},
                 "allowFirstLastIPs": "No", "disabled": False}},
    "Node": {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node1", "labels": {"bgp": "on", "rack": "r1"}},
        "spec": {"podCIDR": "10.1.0.0/24", "podCIDRs": ["10.1.0.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.2"}]}},
    "Service": {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
        "spec": {"type": "LoadBalancer", "loadBalancerIP": "172.16.0.5",
                 "externalTrafficPolicy": "Cluster", "sessionAffinity": "ClientIP",
                 "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}],
                 "loadBalancerSourceRanges": ["10.0.0.0/8"]}},
    "EndpointSlice": {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.1.0.10"], "conditions": {"ready": True},
                       "nodeName": "node1"}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]},
    "Secret": {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "bgp-auth", "namespace": "kube-system"},
        "data": {"password": "c2VjcmV0"}, "type": "Opaque"},
    "ConfigMap": {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "cfg", "namespace": "default"},
        "data": {"key": "value"}},
}

# Leaves whose type swap can be valid: IntOrString, free-form strings of core objects.
NOT_TYPED = {"Service": {"spec.ports[0].targetPort"}}
ADDRESS_FIELDS = ("peerAddress", "localAddress", "routerID", "address", "cidr", "start", "stop",
                  "loadBalancerIP", "addresses[0]", "podCIDR", "podCIDRs[0]",
                  "loadBalancerSourceRanges[0]")
REQUIRED = {
    "CiliumBGPClusterConfig": ["spec.bgpInstances", "spec.bgpInstances[0].name",
                               "spec.bgpInstances[0].peers[0].name"],
    "CiliumBGPPeerConfig": ["spec.gracefulRestart.enabled", "spec.families[0].afi"],
    "CiliumBGPAdvertisement": ["spec.advertisements", "spec.advertisements[0].advertisementType",
                               "spec.advertisements[0].service.addresses"],
    "CiliumBGPNodeConfigOverride": ["spec.bgpInstances", "spec.bgpInstances[0].name"],
    "CiliumBGPNodeConfig": ["spec.bgpInstances", "spec.bgpInstances[0].peers[0].name"],
    "CiliumBGPPeeringPolicy": ["spec.virtualRouters", "spec.virtualRouters[0].localASN",
                               "spec.virtualRouters[0].neighbors[0].peerAddress",
                               "spec.virtualRouters[0].neighbors[0].peerASN"],
    "CiliumLoadBalancerIPPool": ["spec"],
    "Service": ["spec.ports[0].port"],
    "EndpointSlice": ["endpoints[0].addresses"],
    "Node": ["status.addresses[0].address"],
    "Secret": [], "ConfigMap": [],
}
CILIUM = {k for k, v in BASE.items() if v["apiVersion"].startswith("cilium.io")}


def _leaves(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            if "." in k:          # a label key such as kubernetes.io/service-name
                continue
            yield from _leaves(v, f"{path}.{k}" if path else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, node


def _mappings(node: Any, path: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        yield path
        for k, v in node.items():
            yield from _mappings(v, f"{path}.{k}" if path else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _mappings(v, f"{path}[{i}]")


def _split(path: str) -> list:
    out: list = []
    for part in path.replace("[", ".[").split("."):
        if part.startswith("["):
            out.append(int(part[1:-1]))
        elif part:
            out.append(part)
    return out


def _set(doc: dict, path: str, value: Any, *, delete: bool = False) -> dict:
    doc = copy.deepcopy(doc)
    keys = _split(path)
    target = doc
    for k in keys[:-1]:
        target = target[k]
    if delete:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return doc


def dump(doc: dict) -> bytes:
    return yaml.safe_dump(doc, sort_keys=False).encode()


def _doc_case(kind: str, cid: str, doc: dict, path: str) -> Case:
    return Case(f"{kind}:{cid}:{path}", {FILE: dump(doc)},
                names=(FILE, f"{kind}/", path.removeprefix(".")))


def mutations() -> Iterator[Case]:
    for kind, base in BASE.items():
        for path, value in _leaves(base):
            if path in ("apiVersion", "kind") or path in NOT_TYPED.get(kind, ()):
                continue
            object_name = path == "metadata.name"
            swaps: list[tuple[str, Any]]
            if isinstance(value, bool):
                swaps = [("int", 1), ("str", "true"), ("list", [True])]
            elif isinstance(value, int):
                swaps = [("bool", True), ("str", str(value)), ("float", value + 0.5),
                         ("neg", -1), ("u32+1", 4294967296), ("u64+1", 2**64),
                         ("map", {"v": value})]
            else:
                swaps = [("int", 5), ("bool", False), ("float", 1.5), ("list", [value]),
                         ("map", {"v": value})]
                if path.endswith(ADDRESS_FIELDS):
                    swaps += [("ip-311", "10.233.2.311"), ("ip-word", "not-an-address")]
            for cid, bad in swaps:
                case = _doc_case(kind, cid, _set(base, path, bad), path)
                if object_name:
                    case.names = (FILE, "metadata.name")
                yield case
        for path in REQUIRED[kind] + ["metadata.name"]:
            case = _doc_case(kind, "missing", _set(base, path, None, delete=True), path)
            if path == "metadata.name":
                case.names = (FILE, "metadata.name")
            yield case
        if kind in CILIUM:
            for path in _mappings(base):
                if path.startswith("metadata") or path.endswith("matchLabels"):
                    continue
                bad = _set(base, f"{path}.bogusField" if path else "bogusField", 1)
                yield _doc_case(kind, "unknown-field", bad,
                                f"{path}.bogusField" if path else "bogusField")
        # every key written twice, in the text (a mapping holds each key once)
        lines = dump(base).decode().splitlines()
        for i, line in enumerate(lines):
            stripped = line.lstrip(" -")
            if ":" not in stripped or stripped.startswith("#"):
                continue
            key, _, rest = stripped.partition(":")
            if rest.strip() and re.fullmatch(r"[A-Za-z][\w./-]*", key):
                indent = len(line) - len(line.lstrip(" "))
                if line.lstrip(" ").startswith("- "):
                    indent = len(line) - len(stripped)
                dup = " " * indent + f"{key}:{rest}"
                text = "\n".join(lines[:i + 1] + [dup] + lines[i + 1:]) + "\n"
                yield Case(f"{kind}:duplicate:{i}", {FILE: text.encode()},
                           names=(FILE, f"duplicate key '{key}'"))
        # cut short at k bytes (a partial write); may be valid, must never crash
        data = dump(base)
        for k in sorted({0, 1, 5, 17, len(data) // 3, len(data) // 2, len(data) - 7,
                         len(data) - 1}):
            yield Case(f"{kind}:truncated:{k}", {FILE: data[:k]}, must_fail=k == 0,
                       names=(FILE,))
        # a byte that is not UTF-8
        for k in (0, len(data) // 2, len(data) - 1):
            yield Case(f"{kind}:not-utf8:{k}", {FILE: data[:k] + b"\xff\xfe" + data[k:]},
                       names=(FILE, "not UTF-8"))
        # a typo in the kind, an unknown version
        typo = base["kind"][:-2] + base["kind"][-1:].lower() + base["kind"][-2:-1]
        yield Case(f"{kind}:kind-typo", {FILE: dump({**base, "kind": typo})},
                   names=(FILE, "kind", f"did you mean {kind}?"))
        group = base["apiVersion"].rpartition("/")[0]
        yield Case(f"{kind}:bad-version", {FILE: dump({**base, "apiVersion": f"{group}/v9"
                                                      if group else "v9"})},
                   names=(FILE, "apiVersion"))
        # the same object twice in one List, and a List with junk items
        yield Case(f"{kind}:list-bad-item", {FILE: dump({"apiVersion": "v1", "kind": "List",
                                                         "items": [base, 5]})},
                   names=(FILE, "items[1]"))


def _bomb(levels: int, width: int) -> bytes:
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return ("\n".join(lines) + "\n").encode()


def _many_files(n: int) -> Callable:
    def write(directory):
        for i in range(n):
            (directory / f"n{i:05d}.yaml").write_bytes(
                f"apiVersion: v1\nkind: Node\nmetadata: {{name: n{i}}}\n".encode())
    return write


def hostile() -> Iterator[Case]:
    node = dump(BASE["Node"])
    yield Case("bomb:9x9", {FILE: _bomb(9, 9)}, names=(FILE, "alias"))
    yield Case("bomb:billion-laughs-in-object", {FILE: node + b"---\n" + _bomb(10, 10)},
               names=(FILE, "alias"))
    yield Case("bomb:recursive", {FILE: b"a: &a [*a]\n"}, names=(FILE, "recursive alias"))
    for depth in (101, 1_000, 100_000, 700_000):
        yield Case(f"deep:flow:{depth}", {FILE: b"a: " + b"[" * depth + b"]" * depth + b"\n"},
                   names=(FILE, "nested deeper"))
    yield Case("deep:block:1000", {FILE: "".join(" " * i + f"k{i}:\n" for i in range(1000))
                                   .encode() + b" " * 1000 + b"x: 1\n"},
               names=(FILE, "nested deeper"))
    yield Case("deep:dashes", {FILE: b"- " * 300_000 + b"x\n"}, names=(FILE, "nested deeper"))
    yield Case("huge:11MiB", {FILE: node + b"# " + b"x" * (11 * 2**20) + b"\n"},
               names=(FILE, "limit"))
    yield Case("huge:50MB", {FILE: (node + b"---\n") * (50_000_000 // (len(node) + 4))},
               names=(FILE, "limit"))
    yield Case("huge:9MB-name", {FILE: b"apiVersion: v1\nkind: Node\nmetadata:\n  name: "
                                 + b"n" * (9 * 2**20) + b"\n"},
               names=(FILE, "limit"))
    yield Case("huge:flow-list-1MB", {FILE: b"a: [" + b"1," * 500_000 + b"1]\n"},
               names=(FILE, "values"))
    yield Case("many-documents", {FILE: b"---\n{}\n" * 100_001}, names=(FILE, "documents"))
    yield Case("many-errors", {FILE: b"---\napiVersion: v1\nkind: Node\nmetadata: {name: 5}\n"
                               * 5_000}, names=(FILE, "more errors"))
    yield Case("many-files:10001", {}, names=("manifest files", "limit"), write=_many_files(10_001))
    yield Case("empty", {FILE: b""}, names=(FILE, "empty"))
    yield Case("whitespace", {FILE: b"\n\n   \n"}, names=(FILE, "empty"))
    yield Case("nul-bytes", {FILE: node[:20] + b"\x00\x00" + node[20:]}, names=(FILE,))
    yield Case("tabs", {FILE: b"apiVersion: v1\nkind: Node\nmetadata:\n\tname: n\n"},
               names=(FILE, "invalid YAML"))
    yield Case("scalar-document", {FILE: b"just a string\n"}, names=(FILE, "mapping"))
    yield Case("list-document", {FILE: b"- 1\n- 2\n"}, names=(FILE, "mapping"))
    yield Case("list-items-5", {FILE: b"apiVersion: v1\nkind: List\nitems: 5\n"},
               names=(FILE, "items"))
    yield Case("list-items-str", {FILE: b"apiVersion: v1\nkind: List\nitems: nope\n"},
               names=(FILE, "items"))
    yield Case("binary-tag", {FILE: b"apiVersion: v1\nkind: Node\nmetadata: {name: !!binary aGk=}\n"},
               names=(FILE, "metadata.name"))
    yield Case("python-tag", {FILE: b"apiVersion: !!python/object:os.system v1\nkind: Node\n"},
               names=(FILE,))
    yield Case("kind-int", {FILE: b"apiVersion: v1\nkind: 5\nmetadata: {name: n}\n"},
               names=(FILE, "kind"))
    yield Case("long-key", {FILE: node + b"---\n" + b"k" * 2_000_000 + b": 1\n"},
               names=(FILE,))
    for kind in ("BGPPeeringPolicy", "CiliumBGPPeerconfig", "CiliumLoadBalancerIpPool",
                 "CiliumBgpClusterConfig", "CiliumBGPAdvertisment"):
        yield Case(f"seed-typo:{kind}", {FILE: dump({"apiVersion": "cilium.io/v2alpha1",
                                                     "kind": kind,
                                                     "metadata": {"name": "x"}, "spec": {}})},
                   names=(FILE, "did you mean"))


def all_cases() -> list[Case]:
    return [*mutations(), *hostile()]
