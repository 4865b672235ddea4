"""vipctl's tables: Cilium's column sets and tabwriter layout, byte for byte."""

from agent.api import printers
from agent.api.model import community_str, peer_message, route_message, vipd_pb2

from types import SimpleNamespace as NS


def _peer(**kw):
    fams = kw.pop("families")
    p = vipd_pb2.Peer(**kw)
    for afi, rx, tx in fams:
        p.families.append(vipd_pb2.FamilyRouteCount(afi=afi, safi="unicast", received=rx, advertised=tx))
    return p


def test_peers_per_node_layout_matches_seed_002_exactly():
    # The `cilium bgp peers` output shown in seed 002 (agent layout, uptime 11m34s).
    peer = _peer(local_asn=65005, peer_asn=65005, peer_address="10.0.5.1", peer_port=179,
                 session_state="established", uptime_seconds=694.4,
                 families=[("ipv4", 6, 1), ("ipv6", 0, 0)])
    expected = (
        "Local AS   Peer AS   Peer Address   Session       Uptime   Family         Received   Advertised\n"
        "65005      65005     10.0.5.1:179   established   11m34s   ipv4/unicast   6          1\n"
        "                                                           ipv6/unicast   0          0\n")
    assert printers.peers_table([peer]) == expected


def test_peers_cluster_layout_matches_seed_004_exactly():
    peers = [
        _peer(node="bgpv2-cplane-dev-service-worker", local_asn=65001, peer_asn=65000,
              peer_address="fd00:10::1", peer_port=179, session_state="established",
              uptime_seconds=2005, families=[("ipv4", 2, 2), ("ipv6", 2, 2)]),
        _peer(node="bgpv2-cplane-dev-service-control-plane", local_asn=65001, peer_asn=65000,
              peer_address="fd00:10::1", peer_port=179, session_state="established",
              uptime_seconds=2006, families=[("ipv4", 2, 2), ("ipv6", 2, 2)]),
    ]
    expected = """\
Node                                     Local AS   Peer AS   Peer Address   Session State   Uptime   Family         Received   Advertised
bgpv2-cplane-dev-service-control-plane   65001      65000     fd00:10::1     established     33m26s   ipv4/unicast   2          2
                                                                                                      ipv6/unicast   2          2
bgpv2-cplane-dev-service-worker          65001      65000     fd00:10::1     established     33m25s   ipv4/unicast   2          2
                                                                                                      ipv6/unicast   2          2
"""
    assert printers.peers_table(peers, cluster=True) == expected


def test_peers_sorted_by_local_asn_then_address_and_ipv6_port_in_brackets():
    a = _peer(local_asn=65010, peer_asn=1, peer_address="10.0.0.9", peer_port=179,
              session_state="active", uptime_seconds=99, families=[("ipv4", 0, 0)])
    b = _peer(local_asn=65001, peer_asn=1, peer_address="fd00::1", peer_port=1790,
              session_state="idle", families=[("ipv6", 0, 0)])
    c = _peer(local_asn=65001, peer_asn=1, peer_address="10.0.0.10", peer_port=179,
              session_state="connect", families=[("ipv4", 0, 0)])
    lines = printers.peers_table([a, b, c]).splitlines()
    assert [l.split()[2] for l in lines[1:]] == ["10.0.0.10:179", "[fd00::1]:1790", "10.0.0.9:179"]
    # uptime is only meaningful while established
    assert lines[3].split()[4] == "0s"


def test_go_duration_matches_go_formatting():
    assert [printers.go_duration(s) for s in (0, 0.4, 5, 60, 694, 2820, 3600, 3725.6)] == [
        "0s", "0s", "5s", "1m0s", "11m34s", "47m0s", "1h0m0s", "1h2m6s"]


def test_routes_available_layout_and_attrs_match_seed_004():
    route = route_message(node="bgpv2-cplane-dev-service-control-plane", instance="65001",
                          vrouter=65001, prefix="10.1.0.0/24", next_hop="0.0.0.0", afi="ipv4",
                          attrs=NS(origin=0, communities=(), large_communities=(), local_pref=None, med=None),
                          age_seconds=2805)
    expected = (
        "Node                                     VRouter   Prefix        NextHop   Age      Attrs\n"
        "bgpv2-cplane-dev-service-control-plane   65001     10.1.0.0/24   0.0.0.0   46m45s   [{Origin: i} {Nexthop: 0.0.0.0}]\n")
    assert printers.routes_table([route], advertised=False, cluster=True) == expected
    assert printers.routes_table([route], advertised=False).splitlines()[0].split() == [
        "VRouter", "Prefix", "NextHop", "Age", "Attrs"]


def test_routes_advertised_attrs_with_as_path_communities_and_mp_reach():
    route = route_message(node="n1", instance="65001", vrouter=65001, peer="fd00:10::1",
                          prefix="10.1.0.0/24", next_hop="fd00:10:0:1::2", afi="ipv4",
                          as_path=[65001], age_seconds=2820,
                          attrs=NS(origin=0, communities=(65000 << 16 | 99,), large_communities=(),
                                   local_pref=None, med=None))
    assert route.attrs == ("[{Origin: i} {AsPath: 65001} {Communities: 65000:99} "
                           "{MpReach(ipv4-unicast): {Nexthop: fd00:10:0:1::2, NLRIs: [10.1.0.0/24]}}]")
    table = printers.routes_table([route], advertised=True)
    assert table.splitlines()[0].split()[:6] == ["VRouter", "Peer", "Prefix", "NextHop", "Age", "Attrs"]
    assert table.splitlines()[1].startswith("65001     fd00:10::1   10.1.0.0/24   fd00:10:0:1::2   47m0s   [{Origin: i}")


def test_route_local_pref_hidden_for_ebgp_and_large_communities_shown():
    attrs = NS(origin=0, communities=(0xFFFFFF01,), large_communities=((65000, 1, 2),), local_pref=200, med=None)
    ibgp = route_message(node="n", instance="i", vrouter=65005, peer="10.0.5.1", prefix="10.1.0.0/24",
                         next_hop="10.0.5.11", afi="ipv4", attrs=attrs)
    ebgp = route_message(node="n", instance="i", vrouter=65005, peer="10.0.5.1", prefix="10.1.0.0/24",
                         next_hop="10.0.5.11", afi="ipv4", attrs=attrs, as_path=[65005],
                         send_local_pref=False)
    assert "{LocalPref: 200}" in ibgp.attrs and ibgp.has_local_pref and ibgp.local_pref == 200
    assert "LocalPref" not in ebgp.attrs and not ebgp.has_local_pref
    assert "{Communities: no-export}" in ibgp.attrs
    assert "{LargeCommunity: [ 65000:1:2]}" in ibgp.attrs
    assert community_str(65000 << 16 | 99) == "65000:99"


def test_route_policies_layout_matches_seed_004():
    def pol(name, typ, peers, prefixes, action, path):
        return vipd_pb2.RoutePolicy(vrouter=65001, name=name, type=typ, statements=[
            vipd_pb2.RoutePolicyStatement(match_peers=peers, match_prefixes=prefixes, rib_action=action,
                                          path_actions=path)])
    policies = [
        pol("allow-local", "import", [], [], "accept", []),
        pol("65000-ipv6-PodCIDR", "export", ["fd00:10::1/128"], ["fd00:10:1::/64 (64..64)"], "accept",
            ["AddCommunities: [65000:99]"]),
        pol("65000-ipv4-PodCIDR", "export", ["fd00:10::1/128"], ["10.1.0.0/24 (24..24)"], "accept",
            ["AddCommunities: [65000:99]"]),
    ]
    expected = """\
VRouter   Policy Name          Type     Match Peers      Match Prefixes (Min..Max Len)   RIB Action   Path Actions
65001     65000-ipv4-PodCIDR   export   fd00:10::1/128   10.1.0.0/24 (24..24)            accept       AddCommunities: [65000:99]
65001     65000-ipv6-PodCIDR   export   fd00:10::1/128   fd00:10:1::/64 (64..64)         accept       AddCommunities: [65000:99]
65001     allow-local          import                                                    accept
"""
    assert printers.route_policies_table(policies) == expected


def test_route_policies_multiple_values_and_continuation_rows():
    p = vipd_pb2.RoutePolicy(vrouter=65001, name="p", type="export", statements=[
        vipd_pb2.RoutePolicyStatement(match_peers=["10.0.0.1/32"], match_families=["ipv4-unicast"],
                                      match_prefixes=["10.0.0.0/24 (24..24)", "10.0.1.0/24 (24..24)"],
                                      rib_action="accept"),
        vipd_pb2.RoutePolicyStatement(match_peers=["10.0.0.2/32"], rib_action="reject")])
    lines = printers.route_policies_table([p], families=True).splitlines()
    assert "Match Families" in lines[0]
    assert "(any) {10.0.0.0/24 (24..24)} {10.0.1.0/24 (24..24)}" in lines[1]
    assert lines[2].startswith(" " * 10) and "10.0.0.2/32" in lines[2] and lines[2].endswith("reject")


def test_peer_message_from_speaker_state_uses_cilium_strings_and_zero_counts():
    import enum

    class Family(enum.Enum):  # the speaker's Family shape: value = (afi, safi)
        IPV4_UNICAST = (1, 1)
        IPV6_UNICAST = (2, 1)
    fam4, fam6 = Family.IPV4_UNICAST, Family.IPV6_UNICAST
    state = NS(address="10.0.5.1", port=179, local_address="10.0.5.11", local_asn=65005, peer_asn=65005,
               state="established", uptime_seconds=12.3, established_at=1_700_000_000.0,
               hold_time=90, keepalive=30, local_capabilities=("mp-bgp",), remote_capabilities=(),
               families={fam4: NS(received=6, accepted=6, advertised=1)}, last_error=None)
    msg = peer_message(state, node="worker", instance="65005", families=[fam4, fam6])
    assert msg.session_state == "established"
    assert msg.established_time == "2023-11-14T22:13:20Z"
    assert [(f.afi, f.received, f.advertised) for f in msg.families] == [("ipv4", 6, 1), ("ipv6", 0, 0)]
    assert msg.timers.applied_hold_time_seconds == 90
    idle = peer_message(NS(**{**state.__dict__, "state": "weird", "uptime_seconds": 5.0}), node="w")
    assert idle.session_state == "unknown" and idle.uptime_seconds == 0


def test_status_text_lists_conditions_and_reconcile_errors():
    st = vipd_pb2.GetStatusResponse(node="w1", config_dir="/etc/vipd", config_generation=3)
    st.resources.append(vipd_pb2.ResourceStatus(kind="CiliumBGPClusterConfig", name="c", conditions=[
        vipd_pb2.Condition(type="cilium.io/NoMatchingNode", status="True", reason="NoMatchingNode",
                           message="No node matches spec.nodeSelector")]))
    st.reconcile_errors.append(vipd_pb2.ReconcileError(reconciler="advertisements", instance="65005",
                                                       error="boom", attempts=3))
    st.config_errors.append(vipd_pb2.ConfigError(file="a.yaml", object="CiliumBGPPeerConfig/p",
                                                 message="spec.families[0].afi: must be ipv4 or ipv6"))
    text = printers.status_text(st)
    assert "cilium.io/NoMatchingNode   True" in text
    assert "a.yaml, CiliumBGPPeerConfig/p: spec.families[0].afi" in text
    assert "advertisements   65005      3" in text


def test_capabilities_text_marks_advertised_received_and_both():
    p = vipd_pb2.Peer(peer_address="10.0.5.1", peer_asn=65005, local_asn=65005,
                      local_capabilities=["multiprotocol(ipv4-unicast)", "multiprotocol(ipv6-unicast)",
                                          "4-octet-as(65005)", "graceful-restart(R,N,time=120)"],
                      remote_capabilities=["multiprotocol(ipv4-unicast)", "4-octet-as(65005)",
                                           "route-refresh"])
    assert printers.capabilities_text([p]).splitlines() == [
        "BGP neighbor is 10.0.5.1, remote AS 65005",
        "Neighbor capabilities:",
        "\tmultiprotocol(ipv4-unicast): advertised and received",
        "\tmultiprotocol(ipv6-unicast): advertised",
        "\t4-octet-as(65005): advertised and received",
        "\tgraceful-restart(R,N,time=120): advertised",
        "\troute-refresh: received",
    ]


def _lb_frontends():
    v4 = vipd_pb2.LbFrontend(id=3, address="192.0.2.10", port=443, protocol="TCP", service="prod/web",
                             type="LoadBalancer", flags=["DSR", "Local"], maglev_size=251)
    v4.backends.append(vipd_pb2.LbBackend(id=7, address="10.1.0.5", port=8443, state="active", slot=1,
                                          maglev_slots=126))
    v4.backends.append(vipd_pb2.LbBackend(id=9, address="10.1.0.6", port=8443, state="terminating", slot=2,
                                          maglev_slots=125))
    v6 = vipd_pb2.LbFrontend(id=4, address="2001:db8::10", port=53, protocol="UDP", service="", type="",
                             flags=["SNAT"], maglev_size=0)
    wildcard = vipd_pb2.LbFrontend(id=3, address="192.0.2.10", protocol="ANY", wildcard=True)
    return [v4, v6, wildcard]


def test_service_list_one_line_per_backend_ipv6_bracketed_no_backends_said():
    assert printers.services_table(_lb_frontends()) == (
        "ID   Frontend                Service Type   Service    Mode        Backend\n"
        "3    192.0.2.10:443/TCP      LoadBalancer   prod/web   DSR,Local   1 => 10.1.0.5:8443/TCP (active)\n"
        "                                                                   2 => 10.1.0.6:8443/TCP (terminating)\n"
        "4    [2001:db8::10]:53/UDP   -              -          SNAT        (no backends)\n")


def test_bpf_lb_list_is_ciliums_two_columns_with_slots_and_the_wildcard():
    text = printers.lb_list_table(_lb_frontends())
    assert text.splitlines() == [
        "SERVICE ADDRESS         BACKEND ADDRESS (REVNAT_ID) (SLOT)",
        "192.0.2.10:443/TCP      0.0.0.0:0 (3) (0) [LoadBalancer, DSR, Local] maglev=251",
        "                        10.1.0.5:8443/TCP (3) (1) slots=126",
        "                        10.1.0.6:8443/TCP (3) (2) [terminating] slots=125",
        "[2001:db8::10]:53/UDP   0.0.0.0:0 (4) (0) [Frontend, SNAT] maglev=0",
        "192.0.2.10:0/ANY        0.0.0.0:0 (3) (0) [wildcard: packets to other ports are dropped]",
    ]


def test_maglev_ct_and_drops_layouts():
    t = vipd_pb2.MaglevTable(id=3, family="v4", frontend="192.0.2.10:443/TCP", table=[7, 9, 7])
    assert printers.maglev_table([t]) == "SVC ID   LOOKUP TABLE\n[3]/v4   [7 9 7]\n"
    ct = vipd_pb2.ListConntrackResponse(total=5)
    ct.entries.append(vipd_pb2.CtEntry(direction="reply", protocol="TCP", source="10.1.0.5:8443",
                                       destination="198.51.100.7:40000", service_id=3, backend_id=7,
                                       flags=["snat"], rewrite_source="192.0.2.10:443"))
    assert printers.conntrack_text(ct) == (
        "TCP REPLY 10.1.0.5:8443 -> 198.51.100.7:40000 service=3 backend=7 flags=snat "
        "rewrite-source=192.0.2.10:443\n(1 of 5 entries shown; raise --limit to see more)\n")
    drops = vipd_pb2.GetDatapathCountersResponse()
    drops.drops.append(vipd_pb2.DropCounter(reason="NO_BACKEND", code=1, packets=12))
    drops.drops.append(vipd_pb2.DropCounter(reason="FRAGMENT", code=4, packets=0))
    drops.counters.append(vipd_pb2.DatapathCounter(hook="xdp", outcome="tx", packets=99))
    assert printers.drops_table(drops) == "REASON       CODE   PACKETS\nNO_BACKEND   1      12\n"
    assert "FRAGMENT     4      0" in printers.drops_table(drops, all_counters=True)
    assert printers.drops_table(drops, all_counters=True).endswith("HOOK   OUTCOME   PACKETS\nxdp    tx        99\n")
