"""The reconcilers' rules, each case run twice to prove idempotency:
neighbors before advertisements, withdraw before advertise, failures isolated and retried
with backoff, advertisement-only changes never touch sessions, GR stop on shutdown."""

import asyncio
import ipaddress

from recording_speaker import RecordingSpeaker

from agent.controlplane.types import BgpInstance, Family, FamilySpec, PathAttributes, PeerSpec, NodeConfigResult
from agent.reconcilers.advertisements import AdvertisementReconciler
from agent.reconcilers.errors import ErrorBook, backoff_delay
from agent.reconcilers.neighbors import NeighborReconciler

V4 = Family.IPV4_UNICAST
V6 = Family.IPV6_UNICAST
N = ipaddress.ip_network


def peer(address="10.0.5.1", asn=65005, hold=90, **kw):
    return PeerSpec(name=f"p-{address}", address=address, peer_asn=asn, hold_time=hold,
                    families=(FamilySpec("ipv4", "unicast"), FamilySpec("ipv6", "unicast")), **kw)


def instance(name="65005", asn=65005, router_id="10.0.5.11", peers=None, local_port=None):
    return BgpInstance(name=name, local_asn=asn, router_id=router_id, local_port=local_port,
                       peers=tuple(peers if peers is not None else [peer()]))


def node(*instances):
    return NodeConfigResult(node_name="worker", instances=tuple(instances))


class Harness:
    def __init__(self, fail_on=None):
        self.calls: list = []
        self.fail_on = fail_on if fail_on is not None else {}
        self.speakers: list[RecordingSpeaker] = []
        self.errors = ErrorBook()
        self.neighbors = NeighborReconciler(self._factory, settle_seconds=0)
        self.adverts = AdvertisementReconciler(self.neighbors, None, (V4, V6), clock=lambda: 1000.0)
        self.paths: dict = {}   # (instance, peer address) -> desired paths
        self.now = 0.0

    def _factory(self, inst):
        sp = RecordingSpeaker(inst, self.calls, fail_on=self.fail_on.setdefault(inst.name, set()))
        self.speakers.append(sp)
        return sp

    def desired(self, inst, p):
        return self.paths.get((inst.name, p.address), {V4: {}, V6: {}})

    def reconcile(self, nc):
        async def go():
            await self.neighbors.reconcile(nc, self.errors, self.now)
            await self.adverts.reconcile(nc, self.errors, self.now, desired_paths=self.desired)
        start = len(self.calls)
        asyncio.run(go())
        return self.calls[start:]

    def twice(self, nc):
        first = self.reconcile(nc)
        second = self.reconcile(nc)
        assert second == [], f"second pass with the same inputs changed things: {second}"
        return first


A = PathAttributes()
B = PathAttributes(communities=(65000 << 16 | 99,), local_pref=200)


def test_neighbors_are_configured_before_any_path_and_second_pass_is_a_noop():
    h = Harness()
    h.paths[("65005", "10.0.5.1")] = {V4: {N("10.1.0.0/24"): A}, V6: {}}
    calls = h.twice(node(instance()))
    assert [c[1] for c in calls] == ["start", "add_neighbor", "advertise"]
    assert calls[2] == ("65005", "advertise", "10.0.5.1", V4, "10.1.0.0/24")


def test_withdraw_comes_before_advertise_and_unchanged_paths_are_untouched():
    h = Harness()
    h.paths[("65005", "10.0.5.1")] = {V4: {N("10.1.0.0/24"): A, N("10.9.0.1/32"): A}, V6: {}}
    h.twice(node(instance()))
    h.paths[("65005", "10.0.5.1")] = {V4: {N("10.1.0.0/24"): A, N("10.9.0.0/24"): B}, V6: {}}
    calls = h.twice(node(instance()))
    assert calls == [("65005", "withdraw", "10.0.5.1", V4, "10.9.0.1/32"),
                     ("65005", "advertise", "10.0.5.1", V4, "10.9.0.0/24")]


def test_changed_attributes_are_re_advertised_in_place():
    h = Harness()
    h.paths[("65005", "10.0.5.1")] = {V4: {N("10.1.0.0/24"): A}, V6: {}}
    h.twice(node(instance()))
    h.paths[("65005", "10.0.5.1")] = {V4: {N("10.1.0.0/24"): B}, V6: {}}
    assert h.twice(node(instance())) == [("65005", "advertise", "10.0.5.1", V4, "10.1.0.0/24")]
    assert h.speakers[0].adj_rib_out("10.0.5.1", V4) == {N("10.1.0.0/24"): B}


def test_advertisement_only_changes_never_touch_neighbors_or_speakers():
    h = Harness()
    h.twice(node(instance()))
    for paths in ({V4: {N("10.1.0.0/24"): A}, V6: {}}, {V4: {}, V6: {N("fd00:1::/64"): B}}, {V4: {}, V6: {}}):
        h.paths[("65005", "10.0.5.1")] = paths
        calls = h.twice(node(instance()))
        assert {c[1] for c in calls} <= {"advertise", "withdraw"}, calls
    assert len(h.speakers) == 1 and h.speakers[0].stopped_with is None


def test_failing_instance_is_recorded_retried_with_backoff_and_does_not_disturb_others():
    h = Harness(fail_on={"bad": {"advertise"}})
    good, bad = instance("good", router_id="1.1.1.1"), instance("bad", asn=65010, router_id="1.1.1.2",
                                                                peers=[peer("10.0.10.1", 65010)])
    h.paths[("good", "10.0.5.1")] = {V4: {N("10.1.0.0/24"): A}, V6: {}}
    h.paths[("bad", "10.0.10.1")] = {V4: {N("10.1.1.0/24"): A}, V6: {}}
    h.reconcile(node(good, bad))
    rec = {(r.reconciler, r.instance): r for r in h.errors.records()}
    assert set(rec) == {("advertisements", "bad")}
    assert "injected failure in advertise" in rec[("advertisements", "bad")].error
    assert h.errors.next_retry() == 1.0                     # first retry after 1 s
    assert h.speakers[0].adj_rib_out("10.0.5.1", V4) == {N("10.1.0.0/24"): A}
    assert h.errors.by_instance() == {"bad": ["advertisements: injected failure in advertise"]}
    # still failing: attempts and backoff grow; the good instance sees no calls at all
    h.now = 1.0
    calls = h.reconcile(node(good, bad))
    assert all(c[0] == "bad" for c in calls)
    assert h.errors.records()[0].attempts == 2 and h.errors.next_retry() == 1.0 + 2.0
    # fixed: the retry applies the rest and clears the error
    h.fail_on["bad"].clear()
    h.now = 3.0
    calls = h.reconcile(node(good, bad))
    assert calls == [("bad", "advertise", "10.0.10.1", V4, "10.1.1.0/24")]
    assert not h.errors and h.errors.next_retry() is None
    assert h.reconcile(node(good, bad)) == []


def test_neighbor_failure_keeps_partial_progress():
    h = Harness(fail_on={"65005": set()})
    two = instance(peers=[peer("10.0.5.1"), peer("10.0.5.2")])
    h.fail_on["65005"].add("add_neighbor")
    h.reconcile(node(two))
    assert h.errors.records()[0].reconciler == "neighbors"
    h.fail_on["65005"].clear()
    calls = h.reconcile(node(two))
    assert [c[1:] for c in calls] == [("add_neighbor", "10.0.5.1"), ("add_neighbor", "10.0.5.2")]
    assert not h.errors
    assert h.reconcile(node(two)) == []


def test_timer_change_updates_asn_change_recreates_identity_change_restarts_speaker():
    h = Harness()
    h.twice(node(instance()))
    assert h.twice(node(instance(peers=[peer(hold=30)]))) == [("65005", "update_neighbor", "10.0.5.1")]
    assert h.twice(node(instance(peers=[peer(asn=65006)]))) == [
        ("65005", "remove_neighbor", "10.0.5.1"), ("65005", "add_neighbor", "10.0.5.1")]
    calls = h.twice(node(instance(router_id="9.9.9.9", peers=[peer(asn=65006)])))
    assert [c[1:] for c in calls] == [("stop", True), ("start",), ("add_neighbor", "10.0.5.1")]
    assert h.speakers[0].stopped_with["notify"] is True


def test_unselected_instance_is_stopped_with_cease_and_peers_removed():
    h = Harness()
    h.twice(node(instance(peers=[peer("10.0.5.1"), peer("10.0.5.2")])))
    assert h.twice(node(instance(peers=[peer("10.0.5.2")]))) == [("65005", "remove_neighbor", "10.0.5.1")]
    assert h.twice(node()) == [("65005", "stop", True)]
    assert h.neighbors.running == {}


def test_graceful_shutdown_stops_every_speaker_without_notification():
    h = Harness()
    h.twice(node(instance("a", router_id="1.1.1.1"), instance("b", asn=65010, router_id="1.1.1.2")))
    asyncio.run(h.neighbors.stop_all(graceful=True))
    assert [sp.stopped_with["notify"] for sp in h.speakers] == [False, False]
    h2 = Harness()
    h2.twice(node(instance()))
    asyncio.run(h2.neighbors.stop_all(graceful=False))
    assert h2.speakers[0].stopped_with["notify"] is True


def test_loc_rib_view_keeps_first_seen_time():
    h = Harness()
    h.paths[("65005", "10.0.5.1")] = {V4: {N("10.1.0.0/24"): A}, V6: {}}
    h.twice(node(instance()))
    assert h.adverts.available["65005"] == {(V4, N("10.1.0.0/24")): (A, 1000.0)}
    assert h.adverts.advertised_at[("65005", "10.0.5.1", V4, N("10.1.0.0/24"))] == 1000.0


def test_backoff_doubles_up_to_thirty_seconds():
    assert [backoff_delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_renamed_instance_with_same_identity_keeps_its_speaker_and_sessions():
    # e.g. a CiliumBGPPeeringPolicy replaced by the equivalent ClusterConfig with another name
    h = Harness()
    h.paths[("65005", "10.0.5.1")] = {V4: {N("10.1.0.0/24"): A}, V6: {}}
    h.twice(node(instance("65005")))
    h.paths[("instance-65005", "10.0.5.1")] = {V4: {N("10.1.0.0/24"): A}, V6: {}}
    assert h.twice(node(instance("instance-65005"))) == []
    assert list(h.neighbors.running) == ["instance-65005"] and len(h.speakers) == 1
    # a different identity under the new name is a new speaker
    calls = h.twice(node(instance("other", router_id="9.9.9.9")))
    assert [c[1] for c in calls] == ["stop", "start", "add_neighbor"]


def test_ipv6_peer_written_in_upper_case_is_one_stable_neighbor():
    h = Harness()
    h.paths[("65005", "FD00:10::1")] = {V4: {}, V6: {N("fd00:1::/64"): A}}
    calls = h.twice(node(instance(peers=[peer("FD00:10::1")])))
    assert calls == [("65005", "start"), ("65005", "add_neighbor", "fd00:10::1"),
                     ("65005", "advertise", "fd00:10::1", V6, "fd00:1::/64")]
