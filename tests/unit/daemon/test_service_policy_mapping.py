"""sessionAffinity and loadBalancerSourceRanges reach the datapath model: affinity on every
frontend, source ranges on the LoadBalancer ingress frontends only, per address family."""

import asyncio
import ipaddress

from agent.config import load_documents
from agent.datapath.capacity import Capacity
from agent.datapath.model import Proto, ServiceKey
from agent.reconcilers.errors import ErrorBook
from agent.reconcilers.services import ServiceReconciler, desired_services
from tests.unit.daemon.fake_datapath import upsert_each

SVC = """\
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
  annotations: {ANNOTATIONS}
spec:
  type: LoadBalancer
  clusterIPs: [10.96.0.10, "fd96::10"]
  externalIPs: [192.0.2.7]
  sessionAffinity: {AFFINITY}
  {AFFINITY_CONFIG}
  {RANGES}
  ports:
  - {name: http, port: 80, protocol: TCP}
  - {name: dns, port: 53, protocol: UDP}
status:
  loadBalancer:
    ingress: [{ip: 172.20.0.1}, {ip: "fd20::1"}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-4, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- {addresses: [10.1.0.5], nodeName: me}
- {addresses: [10.1.3.5], nodeName: other}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-6, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- {addresses: ["fd01::5"], nodeName: me}
"""

LB_V4 = ("172.20.0.1",)
LB_V6 = ("fd20::1",)
UNFILTERED = ("10.96.0.10", "fd96::10", "192.0.2.7")   # ClusterIPs and the externalIP


def manifest(affinity="None", affinity_config="", ranges="", annotations="{}"):
    return (SVC.replace("{ANNOTATIONS}", annotations).replace("{AFFINITY}", affinity)
            .replace("{AFFINITY_CONFIG}", affinity_config).replace("{RANGES}", ranges))


def desired(text):
    result = load_documents(text, "svc.yaml")
    assert result.errors == [], [str(e) for e in result.errors]
    return desired_services(result.objects, "me")


def keys(vips):
    return [ServiceKey(v, p, proto) for v in vips for p, proto in ((80, Proto.TCP), (53, Proto.UDP))]


def nets(*cidrs):
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def test_without_the_fields_nothing_changes():
    got = desired(manifest())
    assert len(got) == 10
    assert all(s.affinity_timeout == 0 and s.source_ranges == () for s in got.values())


def test_clientip_affinity_applies_to_every_frontend_with_its_timeout():
    got = desired(manifest(affinity="ClientIP"))
    assert {s.affinity_timeout for s in got.values()} == {10800}
    got = desired(manifest(affinity="ClientIP", affinity_config="sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}"))
    assert len(got) == 10 and {s.affinity_timeout for s in got.values()} == {30}


def test_source_ranges_only_on_loadbalancer_ingress_each_family_its_own():
    got = desired(manifest(ranges='loadBalancerSourceRanges: [10.10.0.0/24, "fd10::/64", 198.51.100.0/24]'))
    for key in keys(LB_V4):
        assert got[key].source_ranges == nets("10.10.0.0/24", "198.51.100.0/24"), key
    for key in keys(LB_V6):
        assert got[key].source_ranges == nets("fd10::/64"), key
    for key in keys(UNFILTERED):
        assert got[key].source_ranges == (), f"{key}: ClusterIP/externalIP must stay open"
    assert got[ServiceKey("172.20.0.1", 80)].backends == got[ServiceKey("10.96.0.10", 80)].backends


def test_a_family_without_ranges_admits_nobody_rather_than_everybody():
    got = desired(manifest(ranges="loadBalancerSourceRanges: [10.10.0.0/24]"))
    for key in keys(LB_V6):
        (only,) = got[key].source_ranges
        assert only == ipaddress.ip_network("::/128"), "no client can send from ::"
    assert all(got[k].source_ranges == nets("10.10.0.0/24") for k in keys(LB_V4))


def test_legacy_annotation_reaches_the_datapath_and_the_field_wins():
    annotated = '{"service.beta.kubernetes.io/load-balancer-source-ranges": "203.0.113.0/24,fd10::/64"}'
    got = desired(manifest(annotations=annotated))
    assert got[ServiceKey("172.20.0.1", 80)].source_ranges == nets("203.0.113.0/24")
    assert got[ServiceKey("fd20::1", 53, Proto.UDP)].source_ranges == nets("fd10::/64")
    got = desired(manifest(annotations=annotated, ranges="loadBalancerSourceRanges: [10.10.0.0/24]"))
    assert got[ServiceKey("172.20.0.1", 80)].source_ranges == nets("10.10.0.0/24")


def test_an_ingress_ip_that_is_also_an_external_ip_keeps_its_ranges():
    text = manifest(ranges="loadBalancerSourceRanges: [10.10.0.0/24]").replace(
        "externalIPs: [192.0.2.7]", "externalIPs: [172.20.0.1]")
    got = desired(text)
    assert got[ServiceKey("172.20.0.1", 80)].source_ranges == nets("10.10.0.0/24")


class RecordingDatapath:
    capacity = Capacity(1 << 20, 1 << 20, 1 << 22, 1 << 30)   # never full: no growth here
    reloads = 0

    def __init__(self):
        self.programmed: dict = {}
        self.upserts: list = []

    def services(self):
        return dict(self.programmed)

    def upsert_service(self, svc):
        self.upserts.append(svc.key)
        self.programmed[svc.key] = svc

    upsert_services = upsert_each   # as Datapath.upsert_services: failures per service

    def delete_service(self, key):
        return self.programmed.pop(key, None) is not None


def test_changing_ranges_or_affinity_reprograms_exactly_the_affected_frontends():
    dp, errors = RecordingDatapath(), ErrorBook()
    rec = ServiceReconciler(dp, "me")

    def run(text):
        result = load_documents(text, "svc.yaml")
        assert result.errors == []
        start = len(dp.upserts)
        asyncio.run(rec.reconcile(result.objects, errors, 0.0))
        return sorted(map(str, dp.upserts[start:]))

    assert len(run(manifest())) == 10
    assert run(manifest()) == []
    assert run(manifest(ranges="loadBalancerSourceRanges: [10.10.0.0/24]")) == sorted(map(str, keys(LB_V4 + LB_V6)))
    assert run(manifest(ranges="loadBalancerSourceRanges: [10.10.0.0/24]")) == []
    assert len(run(manifest(affinity="ClientIP", ranges="loadBalancerSourceRanges: [10.10.0.0/24]"))) == 10
    assert dp.programmed[ServiceKey("10.96.0.10", 80)].affinity_timeout == 10800
    assert not errors
