"""Seed manifests load unchanged, and their derived node configs, advertisements, route policies
and conditions match golden files. Regenerate with ``VIPD_UPDATE_GOLDEN=1`` and review the diff.

tests/golden/seeds/<seed>/    manifests extracted verbatim (byte for byte) from the seed documents
tests/golden/fixtures/<seed>/ the cluster they act on (Nodes, Secrets, Services)
tests/golden/expected/<seed>/ golden output
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from agent.config import ObjectSet, load_dir, load_documents
from agent.controlplane import (cluster_config_conditions, derive_node_config, desired_paths,
                                lbipam, node_config_object, peer_config_conditions,
                                route_policies, to_data)
from agent.controlplane.migrate import migrate
from agent.controlplane.types import family_name

GOLDEN = Path(__file__).resolve().parents[2] / "golden"
UPDATE = os.environ.get("VIPD_UPDATE_GOLDEN") == "1"


def _community(c: int) -> str:
    return f"{c >> 16}:{c & 0xFFFF}"


def render(objects: ObjectSet, node_name: str) -> dict:
    nc = derive_node_config(objects, node_name)
    lb = lbipam.allocate(objects)
    adverts = {}
    for inst in nc.instances:
        for p in inst.peers:
            paths = desired_paths(objects, node_name, inst, p, lb)
            adverts[f"{inst.name}/{p.name}"] = {
                family_name(f): {str(pfx): {
                    "origin": a.origin.name, "localPref": a.local_pref,
                    "communities": [_community(c) for c in a.communities],
                    "largeCommunities": [":".join(map(str, lc)) for lc in a.large_communities],
                    "nextHop": a.next_hop or "<session local address>"}
                    for pfx, a in prefixes.items()}
                for f, prefixes in paths.items()}
    policies = [{"vrouter": rp.vrouter, "name": rp.name, "type": rp.type, "statements": [
        {"matchPeers": list(s.match_peers), "matchFamilies": list(s.match_families),
         "matchPrefixes": [str(x) for x in s.match_prefixes], "ribAction": s.rib_action,
         "pathActions": list(s.path_actions)} for s in rp.statements]}
        for rp in route_policies(objects, nc, lb)]
    return {"nodeConfig": node_config_object(nc),
            "derived": to_data(nc),
            "advertisements": adverts,
            "routePolicies": policies}


def conditions(objects: ObjectSet) -> dict:
    lb = lbipam.allocate(objects)
    return {
        "clusterConfigs": {k: [c.to_dict() for c in v]
                           for k, v in cluster_config_conditions(objects).items()},
        "peerConfigs": {k: [c.to_dict() for c in v]
                        for k, v in peer_config_conditions(objects).items()},
        "lbipam": {"allocations": {k: list(v) for k, v in lb.allocations.items()},
                   "services": {k: c.to_dict() for k, c in lb.service_conditions.items()},
                   "pools": {k: [c.to_dict() for c in v] for k, v in lb.pool_conditions.items()}},
    }


def check(path: Path, data) -> None:
    text = yaml.safe_dump(data, sort_keys=True, default_flow_style=False, allow_unicode=True)
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if not path.exists():
        raise AssertionError(f"golden file {path} missing; run with VIPD_UPDATE_GOLDEN=1")
    assert text == path.read_text(), f"{path} differs; review, then VIPD_UPDATE_GOLDEN=1"


def load_seed(seed: str) -> ObjectSet:
    seeds = load_dir(GOLDEN / "seeds" / seed)
    assert not seeds.errors, [str(e) for e in seeds.errors]
    fixtures = load_dir(GOLDEN / "fixtures" / seed)
    assert not fixtures.errors, [str(e) for e in fixtures.errors]
    return ObjectSet.from_objects(seeds.objects.all() + fixtures.objects.all())


@pytest.mark.parametrize("seed", ["000", "002", "003"])
def test_seed_manifests_load_and_validate(seed):
    r = load_dir(GOLDEN / "seeds" / seed)
    assert not r.errors, [str(e) for e in r.errors]
    assert r.objects.all(), "no objects"
    # only kinds vipd does not use are ignored (seed 002's test DaemonSet)
    assert all("kind not used by vipd" in i for i in r.ignored)
    assert load_dir(GOLDEN / "seeds" / seed).objects == r.objects


@pytest.mark.parametrize("seed,node", [
    ("000", "bgpv2-cplane-dev-multi-homing-worker"),
    ("000", "bgpv2-cplane-dev-multi-homing-control-plane"),
    ("000", "bgpv2-cplane-dev-multi-homing-worker2"),
    ("002", "cilium-bgp-control-plane"),
    ("002", "cilium-bgp-worker"),
    ("002", "cilium-bgp-worker2"),
    ("002", "cilium-bgp-worker3"),
])
def test_golden_node_config_and_advertisements(seed, node):
    objects = load_seed(seed)
    data = render(objects, node)
    assert render(objects, node) == data          # idempotent
    check(GOLDEN / "expected" / seed / f"{node}.yaml", data)


@pytest.mark.parametrize("seed", ["000", "002"])
def test_golden_conditions(seed):
    check(GOLDEN / "expected" / seed / "conditions.yaml", conditions(load_seed(seed)))


def test_golden_seed_003_migration_and_result():
    docs = list(yaml.safe_load_all((GOLDEN / "seeds" / "003" / "bgp-config.yaml").read_text()))
    result = migrate(docs)
    check(GOLDEN / "expected" / "003" / "migrated.yaml",
          {"warnings": result.warnings, "documents": result.documents})
    migrated = load_documents(result.to_yaml(), "migrated.yaml")
    assert not migrated.errors, [str(e) for e in migrated.errors]
    fixtures = load_dir(GOLDEN / "fixtures" / "003")
    objects = ObjectSet.from_objects(migrated.objects.all() + fixtures.objects.all())
    for node in ("node-94-10", "node-83-10"):
        check(GOLDEN / "expected" / "003" / f"{node}.yaml", render(objects, node))
    check(GOLDEN / "expected" / "003" / "conditions.yaml", conditions(objects))
