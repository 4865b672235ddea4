"""The vipd.io/bfd annotation on a CiliumBGPPeerConfig reaches the speaker's NeighborConfig;
bad values are a config issue naming the object, the annotation and the field; no annotation,
no BFD (a Cilium manifest behaves exactly as before)."""

from __future__ import annotations

import pytest

from agent.bfd.session import BfdTimers
from agent.config.bfd import parse_bfd_annotation
from agent.config.loader import load_documents
from agent.controlplane.nodeconfig import derive_node_config

BASE = """\
apiVersion: v1
kind: Node
metadata: {name: n1, labels: {bgp: "yes"}}
status:
  addresses: [{type: InternalIP, address: 10.0.0.2}]
---
apiVersion: cilium.io/v2
kind: CiliumBGPClusterConfig
metadata: {name: cc}
spec:
  nodeSelector: {matchLabels: {bgp: "yes"}}
  bgpInstances:
  - name: i
    localASN: 65001
    peers:
    - {name: r1, peerASN: 65000, peerAddress: 10.0.0.1, peerConfigRef: {name: pc}}
---
apiVersion: cilium.io/v2
kind: CiliumBGPPeerConfig
metadata:
  name: pc
"""


def neighbor(annotation: str | None):
    text = BASE + (f"  annotations:\n    vipd.io/bfd: \"{annotation}\"\n" if annotation is not None else "")
    loaded = load_documents(text)
    assert loaded.ok, loaded.errors
    objects = loaded.objects
    nc = derive_node_config(objects, "n1")
    (peer,) = nc.instances[0].peers
    return peer.neighbor_config(), nc.issues


def test_annotation_reaches_the_neighbor_config():
    cfg, issues = neighbor("receiveInterval=50,transmitInterval=60,detectMultiplier=4,passiveMode=true")
    assert cfg.bfd == BfdTimers(desired_min_tx=60_000, required_min_rx=50_000, detect_mult=4, passive=True)
    assert not issues


def test_enabled_means_metallb_defaults():
    assert neighbor("enabled")[0].bfd == BfdTimers(300_000, 300_000, 3)


def test_no_annotation_no_bfd():
    cfg, issues = neighbor(None)
    assert cfg.bfd is None and not issues


@pytest.mark.parametrize("value,words", [
    ("receiveinterval=50", "did you mean receiveInterval"),
    ("receiveInterval=fast", "expected a whole number of milliseconds"),
    ("transmitInterval=5", "transmitInterval 5 ms: must be 10..60000 ms"),
    ("echoMode=true", "echo function"),
    ("minimumTtl=250", "single-hop"),
    ("detectMultiplier", "expected key=value"),
])
def test_bad_values_are_issues_and_bfd_stays_off(value, words):
    cfg, issues = neighbor(value)
    assert cfg.bfd is None
    (issue,) = issues
    assert issue.severity == "error" and issue.object == "CiliumBGPPeerConfig/pc"
    assert "metadata.annotations[vipd.io/bfd]" in issue.message and words in issue.message
    assert "BFD is off for peer r1" in issue.message


def test_parse_is_strict_about_booleans():
    with pytest.raises(ValueError, match="passiveMode='yes'"):
        parse_bfd_annotation("passiveMode=yes")


def test_vipctl_config_validate_reports_a_bad_annotation(tmp_path, capsys):
    from agent.api.cli import main

    (tmp_path / "bgp.yaml").write_text(BASE + '  annotations:\n    vipd.io/bfd: "detectMultiplier=1"\n')
    assert main(["config", "validate", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "CiliumBGPPeerConfig/pc: metadata.annotations[vipd.io/bfd]: detectMultiplier 1: must be 2..255" in out
    (tmp_path / "bgp.yaml").write_text(BASE + '  annotations:\n    vipd.io/bfd: "detectMultiplier=5"\n')
    assert main(["config", "validate", str(tmp_path)]) == 0
