"""Services + EndpointSlices -> datapath services (pure), and the reconciler's diff against what
the maps program (a recording datapath here; the real one runs in the e2e lab)."""

import asyncio

from agent.config import load_documents
from agent.datapath.model import Backend, Mode, Proto, Service, ServiceKey
from agent.reconcilers.errors import ErrorBook
from agent.reconcilers.services import ServiceReconciler, desired_services

SVC = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalIPs: [192.0.2.7]
  externalTrafficPolicy: Local
  ports:
  - {name: http, port: 80, protocol: TCP, targetPort: web}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
  - {name: sctp, port: 9, protocol: SCTP}
status:
  loadBalancer:
    ingress: [{ip: 172.20.0.1}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-a
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- {addresses: [10.1.0.5], conditions: {ready: true}, nodeName: me}
- {addresses: [10.1.3.5], conditions: {ready: true}, nodeName: other}
- {addresses: [10.1.3.6], conditions: {ready: false, serving: true, terminating: true}, nodeName: other}
- {addresses: [10.1.3.7], conditions: {ready: false}, nodeName: other}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec: {type: ExternalName, ports: [{port: 80}]}
"""


def objects(text=SVC):
    result = load_documents(text, "svc.yaml")
    assert result.errors == []
    return result.objects


def test_frontends_ports_backends_and_traffic_policies():
    got = desired_services(objects(), "me")
    http = [Backend("10.1.0.5", 8080, local=True), Backend("10.1.3.5", 8080),
            Backend("10.1.3.6", 8080, terminating=True)]
    assert got[ServiceKey("10.96.0.10", 80, Proto.TCP)] == Service(
        ServiceKey("10.96.0.10", 80, Proto.TCP), tuple(http), traffic_policy_local=False)   # iTP=Cluster
    for vip in ("192.0.2.7", "172.20.0.1"):                                              # eTP=Local
        assert got[ServiceKey(vip, 80, Proto.TCP)] == Service(ServiceKey(vip, 80, Proto.TCP), tuple(http),
                                                             traffic_policy_local=True)
    dns = got[ServiceKey("172.20.0.1", 53, Proto.UDP)]
    assert [b.port for b in dns.backends] == [5353, 5353, 5353]
    assert len(got) == 6, "SCTP has no datapath service, ExternalName has no frontend"
    assert all(s.mode == Mode.SNAT for s in got.values())
    assert desired_services(objects(), "me", mode="dsr")[ServiceKey("172.20.0.1", 80)].mode == Mode.DSR


class RecordingDatapath:
    def __init__(self):
        self.programmed: dict = {}
        self.calls: list = []

    def services(self):
        return dict(self.programmed)

    def upsert_service(self, svc):
        self.calls.append(("upsert", str(svc.key)))
        self.programmed[svc.key] = svc

    def delete_service(self, key):
        self.calls.append(("delete", str(key)))
        return self.programmed.pop(key, None) is not None


def test_reconciler_upserts_before_and_deletes_after_bgp_and_is_idempotent():
    dp, errors = RecordingDatapath(), ErrorBook()
    rec = ServiceReconciler(dp, "me")

    def run(objs, phase):
        start = len(dp.calls)
        asyncio.run(rec.reconcile(objs, errors, 0.0, phase=phase))
        return dp.calls[start:]

    assert len(run(objects(), "upsert")) == 6 and run(objects(), "delete") == []
    assert run(objects(), "upsert") == [] and run(objects(), "all") == []
    no_lb = SVC.replace("type: LoadBalancer", "type: ClusterIP")
    assert run(objects(no_lb), "upsert") == []                   # nothing new to program
    assert sorted(run(objects(no_lb), "delete")) == [("delete", "172.20.0.1:53/UDP"), ("delete", "172.20.0.1:80/TCP")]
    assert not errors


def test_datapath_failure_is_recorded_and_cleared():
    class Broken(RecordingDatapath):
        def upsert_service(self, svc):
            raise OSError("map full")
    errors = ErrorBook()
    asyncio.run(ServiceReconciler(Broken(), "me").reconcile(objects(), errors, 0.0))
    (rec,) = errors.records()
    assert (rec.reconciler, rec.error) == ("services", "map full")
