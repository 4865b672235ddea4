"""The parser process shares repeated parts of the objects it sends (agent/config/compact.py):
what the daemon receives must equal what it would have parsed itself, field for field, and
stay equal after the control plane's copies (LB-IPAM's effective Services)."""

from __future__ import annotations

import pickle

from agent.config.compact import Compactor
from agent.config.loader import parse_bytes
from agent.controlplane.advertisements import _with_ingress
from agent.lab.scale import service_docs

PODS = ["10.1.0.10", "10.1.1.10"]


def _parse(text: str):
    fp = parse_bytes(text.encode(), "services.yaml")
    assert fp.errors == [], fp.errors
    return [obj for obj, _ in fp.parsed]


def test_compacted_objects_equal_the_parsed_ones_after_the_trip_to_the_daemon():
    text = "".join(service_docs(i, ports=2, pods=PODS, node_name="node1", backends=2) for i in range(50))
    plain = _parse(text)
    compactor = Compactor()
    sent = pickle.loads(pickle.dumps([compactor.compact(o) for o in _parse(text)]))
    assert len(sent) == len(plain) == 100
    for a, b in zip(sent, plain):
        assert type(a) is type(b) and a.key == b.key
        assert a.model_dump(by_alias=True) == b.model_dump(by_alias=True)
        assert a.model_fields_set == b.model_fields_set
    # repeated parts arrive as one object: every Service's ports are the same two ports
    assert sent[0].spec.ports[0] is sent[2].spec.ports[0]
    assert sent[0].metadata is not sent[2].metadata          # names differ: never merged


def test_effective_copy_of_a_compacted_service_leaves_the_others_alone():
    text = "".join(service_docs(i, ports=1, pods=PODS, node_name="node1") for i in range(3))
    compactor = Compactor()
    services = [o for o in (compactor.compact(o) for o in _parse(text)) if o.KIND == "Service"]
    assert services[0].status is services[1].status         # the same empty status, shared
    first = _with_ingress(services[0], ("172.16.0.0",))
    assert [i.ip for i in first.status.load_balancer.ingress] == ["172.16.0.0"]
    assert services[1].status.load_balancer is None and services[0].status.load_balancer is None
    assert "status" in first.model_fields_set and "status" not in services[1].model_fields_set
