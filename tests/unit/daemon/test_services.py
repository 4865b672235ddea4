"""Services + EndpointSlices -> datapath services (pure), and the reconciler's diff against what
the maps program (a recording datapath here; the real one runs in the e2e lab)."""

import asyncio

from agent.config import load_documents
from agent.datapath.capacity import Capacity
from agent.datapath.model import Backend, Mode, Proto, Service, ServiceKey
from agent.reconcilers.errors import ErrorBook
from agent.reconcilers.services import ServiceReconciler, desired_services
from tests.unit.daemon.fake_datapath import upsert_each

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
    # M: auto, the smallest allowed prime >= 100 x 3 backends
    assert got[ServiceKey("10.96.0.10", 80, Proto.TCP)] == Service(
        ServiceKey("10.96.0.10", 80, Proto.TCP), tuple(http), traffic_policy_local=False,   # iTP=Cluster
        maglev_m=509)
    for vip in ("192.0.2.7", "172.20.0.1"):                                              # eTP=Local
        assert got[ServiceKey(vip, 80, Proto.TCP)] == Service(ServiceKey(vip, 80, Proto.TCP), tuple(http),
                                                             traffic_policy_local=True, maglev_m=509)
    dns = got[ServiceKey("172.20.0.1", 53, Proto.UDP)]
    assert [b.port for b in dns.backends] == [5353, 5353, 5353]
    assert len(got) == 6, "SCTP has no datapath service, ExternalName has no frontend"
    assert all(s.mode == Mode.SNAT for s in got.values())
    assert desired_services(objects(), "me", mode="dsr")[ServiceKey("172.20.0.1", 80)].mode == Mode.DSR


class RecordingDatapath:
    capacity = Capacity(1 << 20, 1 << 20, 1 << 22, 1 << 30)   # never full: no growth here
    reloads = 0

    def __init__(self):
        self.programmed: dict = {}
        self.calls: list = []

    def services(self):
        return dict(self.programmed)

    def upsert_service(self, svc):
        self.calls.append(("upsert", str(svc.key)))
        self.programmed[svc.key] = svc

    upsert_services = upsert_each   # as Datapath.upsert_services: failures per service

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


SECOND = """\
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.11
  ports: [{port: 5432, protocol: TCP}]
status:
  loadBalancer:
    ingress: [{ip: 172.20.0.2}]
"""


class Logs:
    def __init__(self):
        self.lines = []

    def __getattr__(self, level):
        return lambda event, **kw: self.lines.append((level, event, kw))


def test_a_datapath_failure_for_one_service_spares_the_others_and_is_reported_once():
    class Broken(RecordingDatapath):
        broken = True

        def upsert_service(self, svc):
            if self.broken and str(svc.key.vip) in ("172.20.0.1", "10.96.0.10", "192.0.2.7"):
                raise OSError("map full")
            super().upsert_service(svc)
    dp, errors, logs = Broken(), ErrorBook(), Logs()
    rec = ServiceReconciler(dp, "me", log=logs)
    both = objects(SVC + SECOND)
    asyncio.run(rec.reconcile(both, errors, 0.0))
    # db is programmed although web failed first; web's frontends are reported, its VIPs blocked
    assert set(dp.programmed) == {ServiceKey("172.20.0.2", 5432), ServiceKey("10.96.0.11", 5432)}
    (err,) = errors.records()
    assert (err.reconciler, err.instance) == ("services", "Service/default/web")
    assert "172.20.0.1:80/TCP: DatapathError: map full" in err.error
    assert rec.blocked == {"172.20.0.1", "10.96.0.10", "192.0.2.7"}
    assert not rec.vip_ready("172.20.0.1") and rec.vip_ready("172.20.0.2")
    assert list(rec.unprogrammed_services()) == ["default/web"]
    assert rec.failure_counts == {"DatapathError": 6}
    failures = [l for l in logs.lines if l[1].startswith("service not programmed")]
    assert len(failures) == 6
    asyncio.run(rec.reconcile(both, errors, 1.0))           # the same failure: no new log line
    assert len([l for l in logs.lines if l[1].startswith("service not programmed")]) == 6
    assert rec.failure_counts == {"DatapathError": 6}
    dp.broken = False                                       # fixed: programmed, reported, cleared
    asyncio.run(rec.reconcile(both, errors, 2.0))
    assert not errors and rec.blocked == frozenset() and rec.failed == {}
    assert len([l for l in logs.lines if l[1].startswith("service programmed again")]) == 6


def test_more_backends_than_the_maglev_table_has_slots_is_refused_before_the_maps():
    from agent.datapath.capacity import parse_maglev_table_size
    eps = "\n".join(f"- {{addresses: [10.2.{i // 250}.{i % 250 + 1}], conditions: {{ready: true}}, nodeName: x}}"
                    for i in range(252))
    big = SECOND + f"""---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-a
  namespace: default
  labels: {{kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{{port: 5432, protocol: TCP}}]
endpoints:
{eps}
"""
    dp, errors = RecordingDatapath(), ErrorBook()
    rec = ServiceReconciler(dp, "me", maglev_size=parse_maglev_table_size("251"))
    asyncio.run(rec.reconcile(objects(SVC + big), errors, 0.0))
    assert not any(k.port == 5432 for k in dp.programmed) and len(dp.programmed) == 6
    assert {f.reason for f in rec.failed.values()} == {"MaglevTableTooSmall"}
    assert rec.blocked == {"172.20.0.2", "10.96.0.11"}
    assert "252 backends exceed the Maglev table size 251" in errors.records()[0].error
    rec = ServiceReconciler(RecordingDatapath(), "me")        # auto: M = 32749 for 252 backends
    asyncio.run(rec.reconcile(objects(SVC + big), ErrorBook(), 0.0))
    assert rec.failed == {} and rec.last[ServiceKey("172.20.0.2", 5432)].maglev_m == 32749


def test_when_the_desired_services_cannot_be_computed_only_programmed_vips_are_ready():
    dp, errors = RecordingDatapath(), ErrorBook()
    rec = ServiceReconciler(dp, "me")
    asyncio.run(rec.reconcile(objects(), errors, 0.0))
    assert rec.vip_ready("172.20.0.1")

    class Boom:
        services = None   # not iterable: desired_services raises
    asyncio.run(rec.reconcile(Boom(), errors, 1.0))
    assert errors.records()[0].reconciler == "services"
    assert rec.vip_ready("172.20.0.1")                 # programmed before: still ready
    assert not rec.vip_ready("172.20.0.99")            # anything else is not


def test_a_frontend_that_cannot_be_removed_is_a_reconcile_error_until_it_is_gone():
    class Stuck(RecordingDatapath):
        stuck = True

        def delete_service(self, key):
            if self.stuck:
                raise OSError("bpf map delete: Operation not permitted")
            super().delete_service(key)
    dp, errors = Stuck(), ErrorBook()
    rec = ServiceReconciler(dp, "me")
    asyncio.run(rec.reconcile(objects(SVC + SECOND), errors, 0.0))
    asyncio.run(rec.reconcile(objects(SVC), errors, 1.0))  # db removed, its frontends stay
    (err,) = errors.records()
    assert (err.reconciler, err.instance) == ("services", "delete")
    assert "172.20.0.2:5432/TCP: bpf map delete: Operation not permitted" in err.error
    assert errors.totals == {"services": 1}
    dp.stuck = False
    asyncio.run(rec.reconcile(objects(SVC), errors, 2.0))
    assert not errors and ServiceKey("172.20.0.2", 5432) not in dp.programmed
