"""Follow-ups to docs/internal/bgp-findings.md against real FRR: the TTL hint (F3) and our own
routes reflected back by FRR (F4: counted as received, never accepted, gone when withdrawn)."""

from __future__ import annotations

import json

from agent.lab import wait_until
from agent.lab.peers import Announce, Neighbor

from bgp_helpers import FAR_ADDR, PEER_ADDRS, PEER_ASNS, SPEAKER_ASN, SPEAKER_V4, neighbor, wait_established


def connect_failures(spk) -> list[dict]:
    return [json.loads(line) for line in spk.log().splitlines()
            if line.startswith("{") and '"connect failed"' in line]


def test_ttl_one_to_a_peer_behind_a_router_says_to_set_ebgp_multihop(bgp):
    """FRR two IP hops away; our eBGP SYN leaves with TTL 1 and dies at the router in between.
    The log must name the cause (TTL / ebgp_multihop_ttl and the router), not "no route"."""
    bgp.peer("frr", [Neighbor(SPEAKER_V4, SPEAKER_ASN, passive=True, ebgp_multihop=2)],
             host=bgp.topo.far, router_id=FAR_ADDR)
    spk = bgp.speaker([neighbor(FAR_ADDR, PEER_ASNS["frr"])])
    try:
        wait_until(lambda: connect_failures(spk), timeout=15, what="a connect failure logged")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\nspeaker log:\n{spk.log()[-3000:]}") from exc
    ev = connect_failures(spk)[0]
    assert "ebgp_multihop_ttl" in ev["hint"], ev
    assert "reached via 10.0.0.4" in ev["hint"], ev  # the intermediate router of the lab
    assert "no route to the peer" not in ev["hint"], ev
    assert not spk.established(FAR_ADDR)


def test_our_routes_reflected_by_frr_are_received_not_accepted_and_leave_with_the_withdraw(bgp):
    n = 300
    peer = PEER_ADDRS["frr"][0]
    daemon = bgp.peer("frr", [Neighbor(SPEAKER_V4, SPEAKER_ASN, passive=True)],
                      announce=[Announce("10.77.0.0/24")])
    ours = [f"10.{40 + i // 256}.{i % 256}.0/24" for i in range(n)]
    spk = bgp.speaker([neighbor(peer, PEER_ASNS["frr"])],
                      [{"neighbor": peer, "prefix": p, "attrs": {}} for p in ours])
    wait_established(spk, daemon, SPEAKER_V4, peer)

    def counts():
        return spk.peer(peer)["families"]["IPV4_UNICAST"]

    # FRR sends our n prefixes back (AS_PATH 65002 65001) plus its own one.
    try:
        wait_until(lambda: counts()["received"] == n + 1, timeout=20, what="reflected routes counted")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {counts()}") from exc
    assert counts() == {"received": n + 1, "accepted": 1, "advertised": n}
    for p in ours:
        spk.withdraw(peer, p)
    wait_until(lambda: counts()["received"] == 1, timeout=20, what="reflected routes withdrawn by FRR")
    assert counts() == {"received": 1, "accepted": 1, "advertised": 0}
    assert spk.established(peer)
