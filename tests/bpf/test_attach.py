"""The datapath attached for real: XDP + tc on a veth inside a lab namespace, loaded by a
process that then exits. Real pings show up in the counters, a real UDP exchange through a VIP
is DNATed to a local server and its reply leaves as VIP:port, and a new process adopts the
pinned maps and reads those counters."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from agent.datapath.api import Datapath
from agent.datapath.model import Proto, ServiceKey
from agent.lab import Lab, wait_until
from tests.bpf.conftest import PIN_ROOT, TEST_FEATURES

ROOT = Path(__file__).resolve().parents[2]
VIP = "10.96.0.10"

UDP_ECHO = textwrap.dedent("""
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("10.0.0.1", 8080))
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(b"served:" + data, peer)
""")

UDP_CLIENT = textwrap.dedent(f"""
    import json, socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    for _ in range(10):
        s.sendto(b"hi", ("{VIP}", 80))
        try:
            data, src = s.recvfrom(2048)
            print(json.dumps({{"data": data.decode(), "src": src}}))
            break
        except socket.timeout:
            continue
""")


def test_attached_xdp_and_tc_survive_the_loader_and_translate_real_traffic():
    import os
    instance = f"attach-{os.getpid()}"
    with Lab("dpatt") as lab:
        node = lab.host("node")
        client = lab.host("client")
        n_if, _ = lab.link(node, client, ["10.0.0.1/24"], ["10.0.0.2/24"])
        client.run("ip", "route", "add", f"{VIP}/32", "via", "10.0.0.1")
        loader = textwrap.dedent(f"""
            from agent.datapath.api import Datapath
            from agent.datapath.model import Backend, Proto, Service, ServiceKey
            from tests.bpf.conftest import TEST_FEATURES
            dp = Datapath({instance!r}, pin_root={PIN_ROOT!r}, features=TEST_FEATURES)
            dp.load()
            dp.attach_xdp({n_if!r}, netns={node.ns!r})
            dp.attach_tc({n_if!r}, "egress", netns={node.ns!r})
            dp.attach_tc({n_if!r}, "ingress", netns={node.ns!r})
            dp.upsert_service(Service(ServiceKey({VIP!r}, 80, Proto.UDP),
                                      (Backend("10.0.0.1", 8080, local=True),), maglev_m=251))
            dp.close()
        """)
        proc = subprocess.run([sys.executable, "-c", loader], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        dp = Datapath(instance, pin_root=PIN_ROOT, features=TEST_FEATURES)
        try:
            # the loader process is gone; its programs are still attached
            link = json.loads(node.run("ip", "-j", "-d", "link", "show", n_if))[0]
            assert "xdp" in link, f"no XDP program on {n_if}: {link}"
            assert "bpf" in node.run("tc", "filter", "show", "dev", n_if, "egress")
            assert "bpf" in node.run("tc", "filter", "show", "dev", n_if, "ingress")

            client.run("ping", "-c", "3", "-i", "0.2", "-W", "2", "10.0.0.1")
            node.spawn([sys.executable, "-c", UDP_ECHO])
            out = wait_until(lambda: client.run(sys.executable, "-c", UDP_CLIENT).strip(), timeout=20,
                             what="UDP answer through the VIP")
            answer = json.loads(out)
            assert answer["data"] == "served:hi"
            assert answer["src"] == [VIP, 80], "the reply must come from the VIP, not the backend"

            dp.load()     # adopt the pinned maps in this process and read the counters
            c = dp.counters()
            assert c.stat("xdp", "non_service") >= 3          # the echo requests (and ARP-free IP)
            assert c.stat("tc_egress", "non_service") >= 3    # the echo replies
            assert c.services[ServiceKey(VIP, 80, Proto.UDP)][0] >= 1
            assert c.stat("xdp", "ct_new") >= 1
            assert c.stat("tc_egress", "revnat") >= 1
            assert ServiceKey(VIP, 80, Proto.UDP) in dp.services()

            # a restarted agent re-attaches its freshly loaded programs: replaced in place,
            # not stacked, and the VIP keeps working
            xdp_id = link["xdp"]["prog"]["id"]
            dp.attach_xdp(n_if, netns=node.ns)
            dp.attach_tc(n_if, "egress", netns=node.ns)
            link = json.loads(node.run("ip", "-j", "-d", "link", "show", n_if))[0]
            assert link["xdp"]["prog"]["id"] != xdp_id
            filters = json.loads(node.run("tc", "-j", "filter", "show", "dev", n_if, "egress"))
            # tc lists a head line per (pref, kind) plus one line per filter (with options)
            assert len([f for f in filters if f.get("kind") == "bpf" and "options" in f]) == 1, filters
            answer = json.loads(wait_until(lambda: client.run(sys.executable, "-c", UDP_CLIENT).strip(),
                                           timeout=20, what="UDP answer after re-attach"))
            assert answer["src"] == [VIP, 80]
        finally:
            dp.destroy()
