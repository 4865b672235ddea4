"""The API server fake does server-side apply and CRDs the way kubectl expects a real server
to (the write-back tests rely on it to catch a wrong client): driven by the real kubectl on
loopback, no agent."""

import json
import os
import shutil
import subprocess
import urllib.request

import pytest

from agent.lab.kubeapi import FakeApiServer, kubeconfig

KUBECTL = os.environ.get("VIPD_KUBECTL", "kubectl")
CLUSTER_CONFIG = """\
apiVersion: cilium.io/v2
kind: CiliumBGPClusterConfig
metadata: {{name: d-apply}}
spec:
  bgpInstances:
  - name: "65005"
    localASN: {asn}
    peers:{peers}
"""
PEER = "\n    - {name: leaf01, peerASN: 65005, peerAddress: 10.0.5.1}"


@pytest.fixture
def kc(tmp_path):
    if shutil.which(KUBECTL) is None:
        raise RuntimeError(f"{KUBECTL} not found: apt-get install kubernetes-client")
    with FakeApiServer("127.0.0.1", 0) as server:
        (tmp_path / "kubeconfig").write_text(kubeconfig(server.url))
        yield server, tmp_path / "kubeconfig"


def run(kc, *args, manifest=None):
    return subprocess.run([KUBECTL, "--kubeconfig", str(kc), *args, *(["-f", "-"] if manifest else [])],
                          input=manifest, capture_output=True, text=True, timeout=60)


def get(kc, *args):
    out = run(kc, "get", *args, "-o", "json", "--show-managed-fields")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_apply_ownership_conflicts_force_and_removal(kc):
    server, kc = kc
    apply = ("apply", "--server-side", "--validate=false")
    assert run(kc, *apply, manifest=CLUSTER_CONFIG.format(asn=65005, peers=PEER)).returncode == 0
    obj = get(kc, "ciliumbgpclusterconfig", "d-apply")
    [entry] = obj["metadata"]["managedFields"]
    assert (entry["manager"], entry["operation"]) == ("kubectl", "Apply")
    assert 'k:{"name":"65005"}' in entry["fieldsV1"]["f:spec"]["f:bgpInstances"]
    # another manager changes localASN (a merge patch: an Update that owns what it changed)
    assert run(kc, "patch", "ciliumbgpclusterconfig", "d-apply", "--type=merge", "-p",
               json.dumps({"spec": {"bgpInstances": [{"name": "65005", "localASN": 65006,
                                                      "peers": [{"name": "leaf01", "peerASN": 65005,
                                                                 "peerAddress": "10.0.5.1"}]}]}})
               ).returncode == 0
    # re-applying the same value is shared ownership; a different one is a conflict
    refused = run(kc, *apply, manifest=CLUSTER_CONFIG.format(asn=65007, peers=PEER))
    assert refused.returncode != 0
    assert 'conflict with "kubectl-patch"' in refused.stderr
    assert '.spec.bgpInstances[name="65005"].localASN' in refused.stderr
    # forced, and without the peer: localASN is kubectl's again, the peer it no longer applies is gone
    forced = run(kc, *apply, "--force-conflicts", manifest=CLUSTER_CONFIG.format(asn=65007, peers=" []"))
    assert forced.returncode == 0, forced.stderr
    obj = get(kc, "ciliumbgpclusterconfig", "d-apply")
    assert obj["spec"]["bgpInstances"] == [{"name": "65005", "localASN": 65007, "peers": []}]
    managers = {m["manager"] for m in obj["metadata"]["managedFields"]}
    assert "kubectl" in managers
    # the status subresource is apart: applying spec never changes status, and vice versa
    # (an apply of the status subresource by another manager; kubectl 1.20 has no --subresource)
    request = urllib.request.Request(
        f"{server.url}/apis/cilium.io/v2/ciliumbgpclusterconfigs/d-apply/status?fieldManager=other",
        method="PATCH", headers={"Content-Type": "application/apply-patch+yaml"},
        data=json.dumps({"apiVersion": "cilium.io/v2", "kind": "CiliumBGPClusterConfig",
                         "metadata": {"name": "d-apply"}, "spec": {"ignored": True},
                         "status": {"conditions": [{"type": "x", "status": "True"}]}}).encode())
    assert urllib.request.urlopen(request, timeout=10).status == 200
    assert "ignored" not in get(kc, "ciliumbgpclusterconfig", "d-apply")["spec"]
    assert run(kc, *apply, manifest=CLUSTER_CONFIG.format(asn=65008, peers=" []")).returncode == 0
    obj = get(kc, "ciliumbgpclusterconfig", "d-apply")
    assert obj["status"]["conditions"] == [{"type": "x", "status": "True"}]
    assert obj["spec"]["bgpInstances"][0]["localASN"] == 65008


def test_crds_are_checked_and_prune_what_their_schema_does_not_name(kc):
    server, kc = kc
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": "ciliumbgpadvertisements.cilium.io"},
           "spec": {"group": "cilium.io", "scope": "Cluster",
                    "names": {"kind": "CiliumBGPAdvertisement", "plural": "ciliumbgpadvertisements"},
                    "versions": [{"name": "v2", "served": True, "storage": True, "schema": {
                        "openAPIV3Schema": {"type": "object", "properties": {
                            "spec": {"type": "object", "properties": {
                                "advertisements": {"type": "array", "items": {
                                    "type": "object", "properties": {
                                        "advertisementType": {"type": "string"}}}}}}}}}}]}}
    untyped = json.loads(json.dumps(crd))
    del untyped["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["type"]
    refused = run(kc, "apply", "--validate=false", manifest=json.dumps(untyped))
    assert refused.returncode != 0 and "not a structural schema" in refused.stderr
    assert run(kc, "apply", "--validate=false", manifest=json.dumps(crd)).returncode == 0
    assert "ciliumbgpadvertisements.cilium.io" in run(kc, "get", "crd", "-o", "name").stdout
    advert = ("apiVersion: cilium.io/v2\nkind: CiliumBGPAdvertisement\nmetadata: {name: a}\n"
              "spec:\n  advertisements:\n  - {advertisementType: PodCIDR, typo: 1}\n")
    assert run(kc, "apply", "--validate=false", manifest=advert).returncode == 0
    assert get(kc, "ciliumbgpadvertisement", "a")["spec"] == {
        "advertisements": [{"advertisementType": "PodCIDR"}]}
