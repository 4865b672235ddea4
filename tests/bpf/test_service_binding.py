"""Conntrack entries are bound to their service, and replies of local backends are reversed
whether or not their flow has a REPLY entry of its own.

* A backend removed from one service but still used by another: the first service's flows
  on it re-balance (svc_backends membership, checked when the service's backend generation
  moved), the second service's flows stay.
* A local backend's designated service (revnat_v1) gets no REPLY conntrack entry; tc derives
  the rewrite from the backend's revnat entry and the flow's SERVICE entry. Other services of
  the same backend get REPLY entries. Both reverse correctly, and an older REPLY entry of the
  same client port through another frontend never wins over the current flow.
"""

from __future__ import annotations

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from agent.datapath.abi import TcAction, XdpAction
from agent.datapath.flowhash import flow_hash
from agent.datapath.model import Backend, Proto, Service, ServiceKey
from agent.lb.maglev import build_table
from tests.bpf.conftest import assert_frame, expected, run_tc, run_xdp

CLIENT = "192.0.2.10"
VIP_A, VIP_B = "10.96.0.10", "10.96.0.11"
SHARED, OTHER = "10.1.0.1", "10.1.0.2"


def svc(vip, backends, port=80):
    return Service(ServiceKey(vip, port, Proto.TCP), tuple(Backend(b, 8080, local=True) for b in backends),
                   maglev_m=251)


def pkt(src, dst, sport, dport, flags="A"):
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst=dst) / \
        TCP(sport=sport, dport=dport, flags=flags)


def backend_of(out: bytes) -> str:
    return Ether(out)[IP].dst


def port_on(backends, want, start=1000):
    """A client port whose flow Maglev places on backend ``want`` (service port 80)."""
    table = build_table([(f"{b}:8080", 1) for b in backends], 251)
    return next(s for s in range(start, start + 5000)
                if backends[table[flow_hash(CLIENT, s, 80, 6) % 251]] == want)


def test_backend_removed_from_one_service_but_used_by_another_rebalances_that_service_only(dp):
    dp.upsert_service(svc(VIP_A, [SHARED, OTHER]))
    dp.upsert_service(svc(VIP_B, [SHARED]))
    sa = port_on([SHARED, OTHER], SHARED)
    assert backend_of(run_xdp(dp, pkt(CLIENT, VIP_A, sa, 80, "S")).data) == SHARED
    assert backend_of(run_xdp(dp, pkt(CLIENT, VIP_B, sa, 80, "S")).data) == SHARED

    # a table change that keeps SHARED in A: the flow stays (conntrack), no re-balance
    dp.upsert_service(Service(svc(VIP_A, []).key, (Backend(SHARED, 8080, local=True),
                                                    Backend(OTHER, 8080, local=True, weight=5)),
                              maglev_m=251))
    assert backend_of(run_xdp(dp, pkt(CLIENT, VIP_A, sa, 80)).data) == SHARED

    # SHARED leaves A but stays active (B still uses it)
    dp.upsert_service(svc(VIP_A, [OTHER]))
    assert dp.backend_id(SHARED, 8080) is not None
    out = run_xdp(dp, pkt(CLIENT, VIP_A, sa, 80))
    assert out.retval == XdpAction.PASS and backend_of(out.data) == OTHER     # re-balanced
    assert backend_of(run_xdp(dp, pkt(CLIENT, VIP_A, sa, 80)).data) == OTHER  # and stays there
    assert backend_of(run_xdp(dp, pkt(CLIENT, VIP_B, sa, 80)).data) == SHARED  # B's flow is kept
    ent = [e for e in dp.conntrack() if e.direction == "service" and str(e.daddr) == VIP_A]
    assert [e.backend_id for e in ent] == [dp.backend_id(OTHER, 8080)]

    # SHARED comes back to A: A's re-balanced flow stays on OTHER (conntrack), not moved again
    dp.upsert_service(svc(VIP_A, [SHARED, OTHER]))
    assert backend_of(run_xdp(dp, pkt(CLIENT, VIP_A, sa, 80)).data) == OTHER


def test_session_affinity_entry_naming_a_backend_removed_from_the_service_is_not_used(dp):
    def aff(backends):
        return Service(ServiceKey(VIP_A, 80, Proto.TCP), tuple(Backend(b, 8080, local=True) for b in backends),
                       maglev_m=251, affinity_timeout=600)
    dp.upsert_service(aff([SHARED, OTHER]))
    dp.upsert_service(svc(VIP_B, [SHARED]))
    # with affinity the source port is not hashed: find the client whose slot is SHARED
    table = build_table([(f"{b}:8080", 1) for b in (SHARED, OTHER)], 251)
    client = next(f"192.0.2.{i}" for i in range(1, 255)
                  if (SHARED, OTHER)[table[flow_hash(f"192.0.2.{i}", 0, 80, 6) % 251]] == SHARED)
    assert backend_of(run_xdp(dp, pkt(client, VIP_A, 5000, 80, "S")).data) == SHARED
    dp.upsert_service(aff([OTHER]))
    assert backend_of(run_xdp(dp, pkt(client, VIP_A, 5001, 80, "S")).data) == OTHER


def test_reply_of_designated_and_of_other_service_of_a_shared_local_backend(dp):
    dp.upsert_service(svc(VIP_A, [SHARED]))
    dp.upsert_service(svc(VIP_B, [SHARED], port=81))
    for vip, vport, sport in ((VIP_A, 80, 4000), (VIP_B, 81, 4001)):
        r = run_xdp(dp, pkt(CLIENT, vip, sport, vport, "S"))
        assert r.retval == XdpAction.PASS and backend_of(r.data) == SHARED
    ct = dp.conntrack()
    replies = [e for e in ct if e.direction == "reply"]
    # one of the two services is the backend's designated one: its flow has no REPLY entry
    assert len([e for e in ct if e.direction == "service"]) == 2 and len(replies) == 1
    for vip, vport, sport in ((VIP_A, 80, 4000), (VIP_B, 81, 4001)):
        reply = pkt(SHARED, CLIENT, 8080, sport, "SA")
        r = run_tc(dp, "egress", reply)
        assert r.retval == TcAction.OK
        assert_frame(r.data, expected(reply, IP_src=vip, TCP_sport=vport))

    # the designated service goes away: the other one takes over, its reply entry still works
    designated = VIP_A if str(replies[0].rewrite_saddr) == VIP_B else VIP_B
    dp.delete_service(ServiceKey(designated, 80 if designated == VIP_A else 81, Proto.TCP))
    kept_vip, kept_port, kept_sport = (VIP_B, 81, 4001) if designated == VIP_A else (VIP_A, 80, 4000)
    reply = pkt(SHARED, CLIENT, 8080, kept_sport)
    assert_frame(run_tc(dp, "egress", reply).data, expected(reply, IP_src=kept_vip, TCP_sport=kept_port))
    # a new flow of the now designated service creates no REPLY entry and is reversed too
    n_reply = len([e for e in dp.conntrack() if e.direction == "reply"])
    assert backend_of(run_xdp(dp, pkt(CLIENT, kept_vip, 4002, kept_port, "S")).data) == SHARED
    assert len([e for e in dp.conntrack() if e.direction == "reply"]) == n_reply
    reply = pkt(SHARED, CLIENT, 8080, 4002)
    assert_frame(run_tc(dp, "egress", reply).data, expected(reply, IP_src=kept_vip, TCP_sport=kept_port))


def test_stale_reply_entry_of_the_same_client_port_never_wins_over_the_current_flow(dp):
    dp.upsert_service(svc(VIP_A, [SHARED]))
    dp.upsert_service(svc(VIP_B, [SHARED], port=81))
    # VIP_A (listed first) is the designated service. A flow through VIP_B leaves a REPLY entry
    # {backend:8080 -> client:4000}; the client later reuses port 4000 towards VIP_A (the backend
    # sees the same 4-tuple): that flow's replies must come from VIP_A, not the old entry's VIP_B
    run_xdp(dp, pkt(CLIENT, VIP_B, 4000, 81, "S"))
    reply = pkt(SHARED, CLIENT, 8080, 4000)
    out = Ether(run_tc(dp, "egress", reply).data)
    assert (out[IP].src, out[TCP].sport) == (VIP_B, 81)
    run_xdp(dp, pkt(CLIENT, VIP_A, 4000, 80, "S"))
    out = Ether(run_tc(dp, "egress", reply).data)
    assert (out[IP].src, out[TCP].sport) == (VIP_A, 80)


def test_reply_from_a_backend_without_any_flow_passes_untouched(dp):
    dp.upsert_service(svc(VIP_A, [SHARED]))
    reply = pkt(SHARED, CLIENT, 8080, 4999)
    r = run_tc(dp, "egress", reply)
    assert r.retval == TcAction.OK and r.data == bytes(reply)


def test_without_derived_replies_every_local_flow_has_a_reply_entry():
    import dataclasses

    from tests.bpf.conftest import TEST_FEATURES, new_datapath
    dp = new_datapath("noderive", dataclasses.replace(TEST_FEATURES, derive_local_replies=False))
    try:
        dp.upsert_service(svc(VIP_A, [SHARED]))
        assert backend_of(run_xdp(dp, pkt(CLIENT, VIP_A, 4000, 80, "S")).data) == SHARED
        ct = dp.conntrack()
        assert sorted(e.direction for e in ct) == ["reply", "service"]
        reply = pkt(SHARED, CLIENT, 8080, 4000, "SA")
        assert_frame(run_tc(dp, "egress", reply).data, expected(reply, IP_src=VIP_A, TCP_sport=80))
        # a reply of no tracked flow is left alone
        dp.table("ct_v2").clear()
        assert run_tc(dp, "egress", reply).data == bytes(reply)
    finally:
        dp.destroy()
