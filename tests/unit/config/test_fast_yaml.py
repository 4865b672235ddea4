"""The fast YAML path (yaml_rs, agent.config.safeyaml._fast_documents) gives exactly what the
libyaml path gives, or declines: same documents, same types (1 is not True), same values.

Compared on every file of the bad-input corpus, on the scale lab's manifests, on hand-picked
scalars where YAML 1.1 and 1.2 differ, and on generated documents mixing such tokens plain,
quoted, as keys and in flow collections.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import safeyaml
from agent.lab.scale import bgp_yaml, service_docs
from tests.corpus import all_cases


def typed(value):
    """A value with every scalar's type spelled out (True == 1 in Python, not in a manifest)."""
    if isinstance(value, dict):
        return ("map", [(typed(k), typed(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [typed(v) for v in value])
    return (type(value).__name__, repr(value))


def libyaml_documents(text: str, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(safeyaml, "yaml_rs", None)
        try:
            return [(d.index, typed(d.value), d.error) for d in safeyaml.load_documents(text)]
        except safeyaml.YamlError as exc:
            return f"YamlError: {exc}"


def fast_documents(text: str):
    docs = safeyaml._fast_documents(text)
    return None if docs is None else [(d.index, typed(d.value), d.error) for d in docs]


def assert_same(text: str, monkeypatch) -> bool:
    """-> whether the fast path took ``text``; fails when it took it and differs."""
    fast = fast_documents(text)
    if fast is not None:
        assert fast == libyaml_documents(text, monkeypatch), text[:2000]
    return fast is not None


KUBECTL = """apiVersion: v1
items:
- apiVersion: v1
  kind: Service
  metadata:
    creationTimestamp: "2024-05-01T10:00:00Z"
    labels: {app: web}
    name: web
    namespace: default
    resourceVersion: "123456"
    uid: 3c5e8f12-9a7b-4c1d-8e2f-0123456789ab
  spec:
    clusterIP: 10.96.12.34
    clusterIPs:
    - 10.96.12.34
    externalTrafficPolicy: Cluster
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    ipFamilyPolicy: SingleStack
    ports:
    - nodePort: 31234
      port: 80
      protocol: TCP
      targetPort: 8080
    selector: {app: web}
    sessionAffinity: None
    type: LoadBalancer
  status:
    loadBalancer: {}
kind: List
metadata:
  resourceVersion: ""
"""


def test_kubectl_output_takes_the_fast_path(monkeypatch):
    assert assert_same(KUBECTL, monkeypatch)


def test_fast_path_is_installed_and_reads_the_scale_manifests(monkeypatch):
    # the start-up budget at 20,000 Services depends on it (benchmarks/config_parse.py)
    assert safeyaml.yaml_rs is not None, "yaml_rs is missing: run scripts/install-deps"
    pods = ["10.1.0.10", "10.1.0.11"]
    text = "".join(service_docs(i, ports=p, pods=pods, node_name="node1", backends=b)
                   for i, (p, b) in enumerate([(1, 1), (2, 3), (1, 2)] * 20))
    assert assert_same(text, monkeypatch)
    assert assert_same(bgp_yaml(node_name="n1", node_ip="10.0.0.2", peer_ip="10.0.0.1",
                                local_asn=65001, peer_asn=65000), monkeypatch)
    assert len(safeyaml.load_documents(text)) == 120


def test_every_corpus_file_reads_the_same(monkeypatch):
    taken = declined = 0
    for case in all_cases():
        for data in case.files.values():
            try:
                text = safeyaml.decode(data)
            except safeyaml.YamlError:
                continue
            if len(text) > 200_000:
                continue            # huge files are refused before any parser runs
            if assert_same(text, monkeypatch):
                taken += 1
            else:
                declined += 1
    # most corpus files are plain YAML (yaml.safe_dump): the comparison is not vacuous
    assert taken > 500 and declined > 50, (taken, declined)


DIFFERENT = ["yes", "No", "ON", "off", "0777", "09", "0o17", "1e3", "1.0e3", "1e+3", "_1", "1_000",
             "-.5", "+.5", ".5", "12:30", "-1:30", "1:2.5", "0x1F", "-0x1f", "0b11", "=", "<<",
             "1.7976931348623157e309", "2001-12-14", ".inf", "-.Inf", ".NaN", "~", "null",
             "12345678901234567890123", "0.", "00", "+0", "-0", "0", "1", "1.5", "10.1.0.10",
             "10.0.0.0/8", "2001:db8::1", "fd00::10:20", "::1", "1:2a", "true", "False", "TRUE",
             "a: b", "[1, 2]", "{a: 1}", "- x", "x # c", "'q'", '"q"', "", "a b", "1 2", "v1.2.3",
             "3c5e8f12-9a7b-4c1d-8e2f-0123456789ab", "3c5e8f12", "1e5a-x", "0x1g", "1.5e-3",
             "2001-12-14T21:59:43.10-05:00", "1-2", "+1-2", "1.inf", ".inf-x"]


@pytest.mark.parametrize("token", DIFFERENT)
def test_scalars_where_yaml_versions_differ(token, monkeypatch):
    for text in (f"a: {token}\n", f"a: [{token}]\n", f"{{a: {token}, b: 1}}\n", f"- {token}\n",
                 f"{token}: x\n", f"---\nk:\n  - {token}\n  - '{token}'\n", f'x: "{token}"\n'):
        assert_same(text, monkeypatch)


# structures libyaml refuses or reads differently (found by fuzzing: collections as keys)
STRUCTURES = ["a: {x: 1, [7]}\n", "a: {[7]}\n", "a: {{b: 1}}\n", "a: [[x]: 1]\n",
              "a: {x: 1,\n  [7]}\n", "a: [[7]]\n", "a: [{x: 1}, {y: 2}]\n", "a: {x, y}\n",
              "a: [x: 1]\n", ": x\n", "a: [::1]\n", "a: [a:b]\n", "a: [-, b]\n", "a: [-]\n",
              "[a, b]: c\n", "{a: 1}: b\n", "a: b: c\n", "a: 'x\n---\n  y'\n", "- - - a\n",
              "a: 1\n...\n", "a: x\n---x\n", "--- {a: 1}\n--- [b]\n", "a:\n- b\n-  c\n"]


@pytest.mark.parametrize("text", STRUCTURES)
def test_structures_where_parsers_differ(text, monkeypatch):
    assert_same(text, monkeypatch)


_token = st.one_of(st.sampled_from(DIFFERENT),
                   st.text(alphabet="0123456789abeoxEOX.+-_:", min_size=1, max_size=6),
                   st.text(alphabet=" abc019:-.,[]{}#'\"\n", max_size=8))


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(parts=st.lists(st.tuples(_token, _token, st.sampled_from(["block", "flow", "seq", "quoted",
                                                                 "key", "doc"])),
                min_size=1, max_size=6))
def test_generated_documents_read_the_same(parts, monkeypatch):
    lines = []
    for i, (key, value, form) in enumerate(parts):
        if form == "block":
            lines.append(f"k{i}: {value}")
        elif form == "flow":
            lines.append(f"k{i}: {{x: {value}, y: [{key}, {value}]}}")
        elif form == "seq":
            lines.append(f"k{i}:\n  - {value}\n  - {key}")
        elif form == "quoted":
            lines.append(f"k{i}: '{value}'")
        elif form == "key":
            lines.append(f"{key}: {value}")
        else:
            lines.append(f"---\n{value}")
    assert_same("\n".join(lines) + "\n", monkeypatch)
