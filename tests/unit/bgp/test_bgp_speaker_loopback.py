"""BgpSpeaker over real TCP on loopback (no root: 127.0.0.x addresses and ephemeral ports).

Two speakers peer with each other (both active, so connection collision resolution runs), and
the runner ``python -m agent.bgp`` is driven with signals."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from ipaddress import ip_network
from pathlib import Path

from agent.bgp.api import BgpSpeaker, Family, NeighborConfig, PathAttributes, SpeakerConfig

V4 = Family.IPV4_UNICAST
REPO = Path(__file__).resolve().parents[3]


class Recorder:
    """A logger that keeps what it was told (the speaker takes any structlog-like object)."""

    def __init__(self):
        self.records = []

    def __getattr__(self, level):
        return lambda event, **kw: self.records.append((level, event, kw))

    def events(self, name):
        return [kw for _, e, kw in self.records if e == name]


async def wait_for(pred, timeout=10.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def speaker(asn, rid, addr, log=None):
    s = BgpSpeaker(SpeakerConfig(asn, rid, listen_port=0, listen_addresses=(addr,)), logger=log)
    await s.start()
    return s


def state(s, addr):
    return next(p for p in s.peers() if p.address == addr)


async def pair(**kw):
    la, lb = Recorder(), Recorder()
    a = await speaker(65001, "1.1.1.1", "127.0.0.1", la)
    b = await speaker(65002, "2.2.2.2", "127.0.0.2", lb)
    await a.add_neighbor(NeighborConfig("127.0.0.2", 65002, port=b.listening_port(), local_address="127.0.0.1",
                                        connect_retry=1, families=(V4,), **kw))
    await b.add_neighbor(NeighborConfig("127.0.0.1", 65001, port=a.listening_port(), local_address="127.0.0.2",
                                        connect_retry=1, families=(V4,), **kw))
    # 25 s: covers one retry (5-10 s) should both sides close a connection in a collision race.
    await wait_for(lambda: state(a, "127.0.0.2").state == state(b, "127.0.0.1").state == "established",
                   timeout=25, what="both sessions established")
    return a, b, la, lb


def test_simultaneous_connections_resolve_to_the_same_tcp_connection_on_both_sides():
    async def main():
        for _ in range(3):
            a, b, la, lb = await pair()
            ta = a._peers["127.0.0.2"].driver.transport
            tb = b._peers["127.0.0.1"].driver.transport
            assert ta.get_extra_info("sockname") == tb.get_extra_info("peername")
            # Both sides connect at once, so there usually is a collision (RFC 4271 §6.8: the
            # connection of the higher router ID wins, an Established one wins over a new one, as
            # FRR does); whatever happened, both ended on the same TCP connection.
            await asyncio.sleep(0.3)
            assert state(a, "127.0.0.2").state == "established"  # and it stays up
            await a.stop()
            await b.stop()

    asyncio.run(main())


def test_two_speakers_exchange_a_prefix_and_cease_on_removal():
    async def main():
        a, b, la, lb = await pair()
        net = ip_network("10.9.0.0/24")
        attrs = PathAttributes(med=7, communities=(0xFDE80001,), large_communities=((65000, 1, 1),))
        a.advertise("127.0.0.2", V4, net, attrs)
        await wait_for(lambda: net in b.adj_rib_in("127.0.0.1", V4), what="prefix at b")
        got = b.adj_rib_in("127.0.0.1", V4)[net]
        assert (got.med, got.communities, got.large_communities, got.next_hop) == \
               (7, (0xFDE80001,), ((65000, 1, 1),), "127.0.0.1")
        pa = state(a, "127.0.0.2")
        assert pa.families[V4].advertised == 1 and pa.hold_time == 90 and pa.keepalive == 30
        assert "4-octet-as(65002)" in pa.remote_capabilities and pa.uptime_seconds is not None
        assert state(b, "127.0.0.1").families[V4].accepted == 1
        # Changing paths never resets the session.
        up_since = pa.established_at
        for i in range(50):
            a.advertise("127.0.0.2", V4, ip_network(f"10.50.{i}.0/24"), attrs)
            a.withdraw("127.0.0.2", V4, ip_network(f"10.50.{i}.0/24"))
        a.withdraw("127.0.0.2", V4, net)
        await wait_for(lambda: not b.adj_rib_in("127.0.0.1", V4), what="withdrawal at b")
        assert state(a, "127.0.0.2").established_at == up_since
        await a.remove_neighbor("127.0.0.2")
        await wait_for(lambda: "6/3 Peer De-configured" in (state(b, "127.0.0.1").last_error or ""),
                       what="Cease 6/3 at b")
        await a.stop()
        await b.stop()

    asyncio.run(main())


def test_stop_sends_administrative_shutdown_with_the_message():
    async def main():
        a, b, la, lb = await pair()
        await a.stop(message="planned maintenance")
        await wait_for(lambda: "6/2 Administrative Shutdown: planned maintenance" in
                       (state(b, "127.0.0.1").last_error or ""), what="shutdown message at b")
        await b.stop()

    asyncio.run(main())


def test_graceful_stop_returns_only_after_the_peer_has_closed_its_side():
    """A graceful stop (no NOTIFICATION) sends FIN and waits for the peer's: when stop() returns,
    the peer has seen the close, so what comes next (BFD AdminDown) cannot overtake it."""
    async def main():
        a, b, la, lb = await pair()
        await a.stop(notify=False)
        assert state(b, "127.0.0.1").state != "established"
        assert any(e.get("peer") == "127.0.0.1" for e in lb.events("session down"))
        await b.stop()

    asyncio.run(main())


def test_update_neighbor_resets_only_for_open_fields():
    async def main():
        a, b, la, lb = await pair()
        up = state(a, "127.0.0.2").established_at
        cfg = NeighborConfig("127.0.0.2", 65002, port=b.listening_port(), local_address="127.0.0.1",
                             connect_retry=5, families=(V4,), name="renamed")
        await a.update_neighbor(cfg)
        await asyncio.sleep(0.2)
        assert state(a, "127.0.0.2").established_at == up
        await a.update_neighbor(NeighborConfig(**{**cfg.__dict__, "hold_time": 30, "keepalive": 10}))
        await wait_for(lambda: state(a, "127.0.0.2").state == "established" and
                       state(a, "127.0.0.2").hold_time == 30, what="re-established with hold 30")
        assert "6/6 Other Configuration Change" in (state(b, "127.0.0.1").last_error or "")
        await a.stop()
        await b.stop()

    asyncio.run(main())


def test_listener_refuses_unconfigured_peers():
    async def main():
        la, lc = Recorder(), Recorder()
        a = await speaker(65001, "1.1.1.1", "127.0.0.1", la)
        c = BgpSpeaker(SpeakerConfig(65003, "3.3.3.3"), logger=lc)
        await c.start()
        await c.add_neighbor(NeighborConfig("127.0.0.1", 65001, port=a.listening_port(), local_address="127.0.0.3",
                                            connect_retry=30, families=(V4,)))
        await wait_for(lambda: la.events("refused BGP connection from an unconfigured peer"), what="refusal")
        await wait_for(lambda: "6/5 Connection Rejected" in (state(c, "127.0.0.1").last_error or ""),
                       what="Cease 6/5 at the intruder")
        await a.stop()
        await c.stop()

    asyncio.run(main())


def test_connection_refused_is_explained():
    async def main():
        log = Recorder()
        a = BgpSpeaker(SpeakerConfig(65001, "1.1.1.1"), logger=log)
        await a.start()
        await a.add_neighbor(NeighborConfig("127.0.0.9", 65002, port=1, connect_retry=30, families=(V4,)))
        await wait_for(lambda: log.events("connect failed"), what="connect failure log")
        ev = log.events("connect failed")[0]
        assert ev["reason"] == "connection refused" and "nothing accepts connections on port 1" in ev["hint"]
        assert state(a, "127.0.0.9").last_error == "connect failed: connection refused"
        await a.stop()

    asyncio.run(main())


def test_runner_announces_reloads_and_shuts_down(tmp_path):
    async def main():
        log = Recorder()
        me = await speaker(65002, "2.2.2.2", "127.0.0.2", log)
        cfg = {"speaker": {"asn": 65001, "router_id": "1.1.1.1", "listen_port": None},
               "neighbors": [{"address": "127.0.0.2", "peer_asn": 65002, "port": me.listening_port(),
                              "local_address": "127.0.0.3", "families": ["ipv4"], "connect_retry": 1}],
               "paths": [{"prefix": "10.9.0.0/24", "attrs": {"communities": ["65000:1", "no-export"]}}],
               "generate": [{"neighbor": "127.0.0.2", "start": "11.0.0.0", "count": 1000, "attribute_sets": 4}],
               "status_file": str(tmp_path / "status.json"), "log_level": "warning"}
        path = tmp_path / "speaker.json"
        path.write_text(json.dumps(cfg))
        await me.add_neighbor(NeighborConfig("127.0.0.3", 65001, passive=True, families=(V4,)))
        proc = subprocess.Popen([sys.executable, "-m", "agent.bgp", str(path)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            await wait_for(lambda: len(me.adj_rib_in("127.0.0.3", V4)) == 1001, timeout=20, what="1001 prefixes")
            got = me.adj_rib_in("127.0.0.3", V4)
            assert got[ip_network("10.9.0.0/24")].communities == (0xFDE80001, 0xFFFFFF01)
            assert len({a.communities for a in got.values()}) == 5
            up = state(me, "127.0.0.3").established_at
            def status():
                f = tmp_path / "status.json"
                return json.loads(f.read_text())["peers"][0] if f.exists() else {}

            await wait_for(lambda: status().get("state") == "established", what="status file")
            assert status()["families"]["ipv4-unicast"]["advertised"] == 1001
            cfg["paths"] = [{"prefix": "10.8.0.0/24"}]
            cfg["generate"] = []
            path.write_text(json.dumps(cfg))
            proc.send_signal(signal.SIGHUP)
            await wait_for(lambda: list(me.adj_rib_in("127.0.0.3", V4)) == [ip_network("10.8.0.0/24")],
                           what="reloaded paths")
            assert state(me, "127.0.0.3").established_at == up  # no session reset
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
            await wait_for(lambda: "6/2 Administrative Shutdown: vipd speaker shutting down" in
                           (state(me, "127.0.0.3").last_error or ""), what="Cease at the peer")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        await me.stop()

    asyncio.run(main())


def test_runner_sigusr1_closes_without_notification(tmp_path):
    async def main():
        me = await speaker(65002, "2.2.2.2", "127.0.0.2")
        cfg = {"speaker": {"asn": 65001, "router_id": "1.1.1.1"},
               "neighbors": [{"address": "127.0.0.2", "peer_asn": 65002, "port": me.listening_port(),
                              "local_address": "127.0.0.4", "families": ["ipv4"], "graceful_restart": True}],
               "paths": [{"prefix": "10.9.0.0/24"}], "log_level": "warning"}
        (tmp_path / "s.json").write_text(json.dumps(cfg))
        await me.add_neighbor(NeighborConfig("127.0.0.4", 65001, passive=True, families=(V4,), graceful_restart=True))
        proc = subprocess.Popen([sys.executable, "-m", "agent.bgp", str(tmp_path / "s.json")], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            await wait_for(lambda: me.adj_rib_in("127.0.0.4", V4), timeout=20, what="prefix")
            assert "graceful-restart(R,N," in " ".join(state(me, "127.0.0.4").remote_capabilities)
            proc.send_signal(signal.SIGUSR1)
            assert proc.wait(10) == 0
            await wait_for(lambda: state(me, "127.0.0.4").state != "established", what="session down")
            assert "NOTIFICATION" not in (state(me, "127.0.0.4").last_error or "")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        await me.stop()

    asyncio.run(main())


def test_md5_matching_keys_establish_and_a_mismatch_is_explained():
    async def main():
        la, lb = Recorder(), Recorder()
        a = await speaker(65001, "1.1.1.1", "127.0.0.1", la)
        b = await speaker(65002, "2.2.2.2", "127.0.0.2", lb)
        await b.add_neighbor(NeighborConfig("127.0.0.1", 65001, passive=True, password="s3cret", families=(V4,)))
        await a.add_neighbor(NeighborConfig("127.0.0.2", 65002, port=b.listening_port(), local_address="127.0.0.1",
                                            password="s3cret", connect_retry=1, families=(V4,)))
        await wait_for(lambda: state(a, "127.0.0.2").state == "established", what="MD5 session")
        await a.remove_neighbor("127.0.0.2")
        await a.add_neighbor(NeighborConfig("127.0.0.2", 65002, port=b.listening_port(), local_address="127.0.0.1",
                                            password="wrong", connect_retry=1, families=(V4,)))
        await wait_for(lambda: la.events("connect failed"), timeout=15, what="connect timeout")
        ev = la.events("connect failed")[0]
        assert ev["reason"] == "timed out" and "TCP MD5 key mismatch is a likely cause" in ev["hint"]
        assert state(a, "127.0.0.2").state != "established"
        await a.stop()
        await b.stop()

    asyncio.run(main())


def test_ttl_is_one_for_ebgp_unless_multihop_is_configured():
    import socket

    async def main():
        a, b, la, lb = await pair()
        sock = a._peers["127.0.0.2"].driver.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_IP, socket.IP_TTL) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 90_000
        await a.update_neighbor(NeighborConfig("127.0.0.2", 65002, port=b.listening_port(), local_address="127.0.0.1",
                                               connect_retry=1, families=(V4,), ebgp_multihop_ttl=7))
        sock = a._peers["127.0.0.2"].driver.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_IP, socket.IP_TTL) == 7  # applied without a reset
        assert state(a, "127.0.0.2").state == "established"
        await a.stop()
        await b.stop()

    asyncio.run(main())


def test_link_local_next_hop_only_for_directly_connected_peers(tmp_path):
    from agent.bgp.aio import link_local_for

    proc = tmp_path / "if_inet6"
    proc.write_text(
        "fd000000000000000000000000000001 02 40 00 80 eth-b\n"
        "fe800000000000000000000000000001 02 40 20 80 eth-b\n"
        "fd010000000000000000000000000001 03 40 00 80 eth-c\n")
    assert link_local_for("fd00::1", "fd00::2", str(proc)) == "fe80::1"        # same /64: connected
    assert link_local_for("fd00::1", "fd99::2", str(proc)) is None             # multihop
    assert link_local_for("fd01::1", "fd01::2", str(proc)) is None             # no link-local there
    assert link_local_for("10.0.0.1", "10.0.0.2", str(proc)) is None           # IPv4 session


def test_adj_rib_out_follows_advertise_and_withdraw():
    async def main():
        s = BgpSpeaker(SpeakerConfig(65001, "1.1.1.1"))
        await s.add_neighbor(NeighborConfig("10.0.0.2", 65002, passive=True))
        a1, a2 = PathAttributes(med=1), PathAttributes(communities=(5, 3, 5))
        s.advertise("10.0.0.2", V4, ip_network("10.9.0.0/24"), a1)
        s.advertise("10.0.0.2", Family.IPV6_UNICAST, ip_network("fd99::/64"), a2)
        assert s.adj_rib_out("10.0.0.2", V4) == {ip_network("10.9.0.0/24"): a1}
        s.advertise("10.0.0.2", V4, ip_network("10.9.0.0/24"), a2)  # replaces the attributes
        s.advertise("10.0.0.2", V4, ip_network("10.8.0.0/24"), a1)
        assert s.adj_rib_out("10.0.0.2", V4) == {ip_network("10.9.0.0/24"): a2, ip_network("10.8.0.0/24"): a1}
        assert a2.communities == (3, 5)  # normalised: sorted, deduplicated
        s.withdraw("10.0.0.2", V4, ip_network("10.9.0.0/24"))
        assert s.adj_rib_out("10.0.0.2", V4) == {ip_network("10.8.0.0/24"): a1}
        assert s.adj_rib_out("10.0.0.2", Family.IPV6_UNICAST) == {ip_network("fd99::/64"): a2}
        try:
            s.advertise("10.0.0.2", V4, ip_network("fd98::/64"), a1)
        except ValueError as exc:
            assert "does not belong" in str(exc)
        else:
            raise AssertionError("an IPv6 prefix was accepted for IPv4")

    asyncio.run(main())


def test_ttl_security_gtsm_both_sides_establish_and_a_ttl_1_peer_is_dropped():
    import socket

    async def main():
        a, b, la, lb = await pair(ttl_security_hops=1)
        sock = a._peers["127.0.0.2"].driver.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_IP, socket.IP_TTL) == 255
        assert sock.getsockopt(socket.IPPROTO_IP, 21) == 255  # IP_MINTTL
        await a.stop()
        await b.stop()
        # A GTSM speaker towards a peer that answers with an ordinary TTL: the SYN-ACK is dropped.
        log = Recorder()
        c = await speaker(65003, "3.3.3.3", "127.0.0.3", log)
        d = await speaker(65004, "4.4.4.4", "127.0.0.4")
        await d.add_neighbor(NeighborConfig("127.0.0.3", 65003, passive=True, families=(V4,)))
        await c.add_neighbor(NeighborConfig("127.0.0.4", 65004, port=d.listening_port(), local_address="127.0.0.3",
                                            connect_retry=1, families=(V4,), ttl_security_hops=1))
        await wait_for(lambda: log.events("connect failed"), timeout=15, what="GTSM drop")
        assert "GTSM" in log.events("connect failed")[0]["hint"]
        await c.stop()
        await d.stop()

    asyncio.run(main())


def test_a_busy_loop_past_the_connect_timeout_does_not_throw_away_a_connection_that_came_up():
    """At startup the first reconcile pass can keep the loop busy for seconds right after the
    connect started; the TCP handshake completes meanwhile and must be used, not timed out."""
    async def main():
        b = await speaker(65002, "2.2.2.2", "127.0.0.2")
        await b.add_neighbor(NeighborConfig("127.0.0.1", 65001, local_address="127.0.0.2", passive=True,
                                            families=(V4,)))
        log = Recorder()
        a = BgpSpeaker(SpeakerConfig(65001, "1.1.1.1"), logger=log)
        await a.start()
        await a.add_neighbor(NeighborConfig("127.0.0.2", 65002, port=b.listening_port(),
                                            local_address="127.0.0.1", connect_retry=1, families=(V4,)))
        await asyncio.sleep(0)  # the connect task sends its SYN
        time.sleep(1.5)  # a pass that blocks the loop past the 1 s connect timeout
        t0 = time.monotonic()
        await wait_for(lambda: state(a, "127.0.0.2").state == "established", timeout=5, what="established")
        assert time.monotonic() - t0 < 0.5
        assert not log.events("connect failed"), log.events("connect failed")
        await a.stop()
        await b.stop()

    asyncio.run(main())


def test_operator_reset_hard_sends_administrative_reset_and_reconnects_soft_resends_the_table():
    async def main():
        a, b, la, lb = await pair()
        net = ip_network("10.9.0.0/24")
        a.advertise("127.0.0.2", V4, net, PathAttributes())
        await wait_for(lambda: net in b.adj_rib_in("127.0.0.1", V4), what="prefix at b")
        up_since = state(a, "127.0.0.2").established_at
        assert "soft" in await a.reset_neighbor("127.0.0.2", soft=True)
        await wait_for(lambda: any(e["family"] == "ipv4-unicast" for e in lb.events("route refresh received")),
                       what="b asked to refresh")  # b got our ROUTE-REFRESH request ...
        await wait_for(lambda: len(la.events("route refresh received")) >= 1, what="b answered it")
        assert state(a, "127.0.0.2").established_at == up_since  # ... and the session stayed up
        assert net in b.adj_rib_in("127.0.0.1", V4)
        t0 = time.monotonic()
        assert "hard" in await a.reset_neighbor("127.0.0.2")
        await wait_for(lambda: "6/4 Administrative Reset" in (state(b, "127.0.0.1").last_error or ""),
                       what="Cease 6/4 at b")
        await wait_for(lambda: state(a, "127.0.0.2").state == state(b, "127.0.0.1").state == "established",
                       timeout=10, what="re-established")
        assert time.monotonic() - t0 < 5, "reconnects at once, not after a retry timer"
        await wait_for(lambda: net in b.adj_rib_in("127.0.0.1", V4), what="prefix back at b")
        await a.stop()
        await b.stop()

    asyncio.run(main())
