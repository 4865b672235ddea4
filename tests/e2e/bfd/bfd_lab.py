"""A router namespace running FRR (zebra + bgpd + bfdd) and a node namespace running
`vipd run` with a CiliumBGPPeerConfig carrying the vipd.io/bfd annotation; one veth between
them with IPv4 and IPv6 addresses. BGP over both families, BFD on both sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


from agent.lab import Lab, wait_until  # noqa: F401 (Lab: used by the fixture)
from agent.lab.peers import Announce, FrrPeer, Neighbor

ROOT = Path(__file__).resolve().parents[3]
R4, N4, R6, N6 = "10.77.0.1", "10.77.0.2", "fd77::1", "fd77::2"
POD_CIDR = "10.244.77.0/24"
NODE = "bfd-node"

NODE_YAML = f"""\
apiVersion: v1
kind: Node
metadata:
  name: {NODE}
  labels: {{bgp: "yes"}}
spec:
  podCIDR: {POD_CIDR}
  podCIDRs: [{POD_CIDR}]
status:
  addresses: [{{type: InternalIP, address: {N4}}}]
---
apiVersion: cilium.io/v2
kind: CiliumBGPClusterConfig
metadata: {{name: bfd-lab}}
spec:
  nodeSelector: {{matchLabels: {{bgp: "yes"}}}}
  bgpInstances:
  - name: "65001"
    localASN: 65001
    peers:
    - {{name: router-v4, peerASN: 65000, peerAddress: {R4}, peerConfigRef: {{name: with-bfd}}}}
    - {{name: router-v6, peerASN: 65000, peerAddress: "{R6}", peerConfigRef: {{name: with-bfd}}}}
---
apiVersion: cilium.io/v2
kind: CiliumBGPAdvertisement
metadata: {{name: pod-cidr, labels: {{advertise: bgp}}}}
spec:
  advertisements: [{{advertisementType: PodCIDR}}]
"""


def peer_config_yaml(bfd: str | None, *, connect_retry: int = 3, graceful_restart: bool = False) -> str:
    annotations = f'\n  annotations:\n    vipd.io/bfd: "{bfd}"' if bfd is not None else ""
    gr = "\n  gracefulRestart: {enabled: true, restartTimeSeconds: 120}" if graceful_restart else ""
    return f"""\
apiVersion: cilium.io/v2
kind: CiliumBGPPeerConfig
metadata:
  name: with-bfd{annotations}
spec:{gr}
  timers: {{connectRetryTimeSeconds: {connect_retry}, holdTimeSeconds: 90, keepAliveTimeSeconds: 30}}
  families:
  - {{afi: ipv4, safi: unicast, advertisements: {{matchLabels: {{advertise: bgp}}}}}}
"""


def frr_bfdd_config(tx: int, rx: int, mult: int) -> str:
    return (f"bfd\n profile vipd\n  transmit-interval {tx}\n  receive-interval {rx}\n"
            f"  detect-multiplier {mult}\n !\n!")


class BfdLab:
    def __init__(self, lab: Lab, ms: int, mult: int, *, graceful_restart: bool = False):
        self.lab = lab
        self.graceful_restart = graceful_restart
        self.router = lab.host("router")
        self.node = lab.host("node")
        lab.link(self.router, self.node, (f"{R4}/24", f"{R6}/64"), (f"{N4}/24", f"{N6}/64"),
                 a_if="eth-node", b_if="eth-router")
        nbrs = [Neighbor(a, 65001, families=("ipv4",), bfd="vipd", connect_retry=1,
                         graceful_restart=graceful_restart) for a in (N4, N6)]
        self.frr = lab.frr(self.router, FrrPeer(65000, "10.77.0.1", nbrs, announce=[Announce("10.99.0.0/24")],
                                                 graceful_restart=graceful_restart,
                                                 bfdd_config=frr_bfdd_config(ms, ms, mult)))
        self.config_dir = lab.workdir / "config"
        self.config_dir.mkdir()
        (self.config_dir / "node.yaml").write_text(NODE_YAML)
        self.set_peer_config(f"receiveInterval={ms},transmitInterval={ms},detectMultiplier={mult}")
        self.socket = lab.workdir / "vipd.sock"
        self.log_path = lab.workdir / "vipd.log"
        self.start_vipd()

    def start_vipd(self) -> None:
        self.socket.unlink(missing_ok=True)
        self.proc = self.node.spawn(
            [sys.executable, "-m", "agent.daemon", "run", "--config", str(self.config_dir), "--node-name", NODE,
             "--api-socket", str(self.socket), "--state-dir", str(self.lab.workdir / "state"),
             "--log-format", "json", "--metrics-addr", "127.0.0.1:9477"],
            log_path=self.log_path, env={"PYTHONPATH": str(ROOT)})
        wait_until(lambda: self.socket.exists() or self.proc.poll() is not None, timeout=30, what="vipd API socket")
        if self.proc.poll() is not None:
            raise RuntimeError(f"vipd exited:\n{self.log()[-3000:]}")

    def set_peer_config(self, bfd: str | None) -> None:
        tmp = self.config_dir / ".peer.yaml.tmp"
        tmp.write_text(peer_config_yaml(bfd, graceful_restart=self.graceful_restart))
        os.replace(tmp, self.config_dir / "peer.yaml")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_events(self, event: str) -> list[dict]:
        out = []
        for line in self.log().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == event:
                out.append(rec)
        return out

    def vipctl(self, *args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "agent.api.cli", "--socket", str(self.socket), *args],
                              capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if proc.returncode != 0:
            raise RuntimeError(f"vipctl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout

    def frr_bfd_peers(self) -> dict[str, dict]:
        return {p["peer"]: p for p in json.loads(self.frr.vtysh("show bfd peers json") or "[]")}

    def frr_bgp_state(self, addr: str) -> str | None:
        s = self.frr.sessions().get(addr)
        return s.state if s else None

    def our_bfd(self) -> dict[str, dict]:
        return {p["peerAddress"]: p for p in json.loads(self.vipctl("bfd", "peers", "-o", "json"))["peers"]}

    def all_up(self) -> bool:
        frr = self.frr_bfd_peers()
        ours = self.our_bfd()
        return (all(frr.get(a, {}).get("status") == "up" for a in (N4, N6))
                and all(ours.get(a, {}).get("state") == "up" for a in (R4, R6))
                and all(self.frr_bgp_state(a) == "established" for a in (N4, N6)))

    def wait_settled(self, timeout: float = 40) -> dict[str, dict]:
        """Wait until BFD is up both ways and FRR has had BGP Established for a second; return
        our BFD sessions at that point, for tests to count transitions from.

        FRR 8.4's bgpd registers the BFD session before it knows the connection's local address
        and interface, and re-registers it when BGP reaches Established
        (bgp_peer_bfd_update_source); bfdd then replaces the session, so when BFD came up first
        both sides see one Down a few ms after Established, and BGP restarts once (2 of 8 lab
        starts here). One second into Established that has happened or will not."""
        def settled() -> bool:
            if not self.all_up():
                return False
            sessions = self.frr.sessions()
            return all((sessions[a].uptime or 0) >= 1.0 for a in (N4, N6))
        wait_until(settled, timeout=timeout, what="BFD up and BGP established for 1 s on both families")
        return self.our_bfd()

    def pod_cidr_at_router(self) -> bool:
        return any(r.prefix == POD_CIDR for r in self.frr.routes("ipv4"))

    def cut(self) -> dict[str, float]:
        """Drop everything in and out of the router's link (nftables, through iptables-nft).
        Returns, per family, the time just *before* its rules went in (so a measured delay
        includes the rule insertion: an upper bound)."""
        started = {}
        for family, tool in ((4, "iptables-restore"), (6, "ip6tables-restore")):
            started[family] = time.time()
            self.router.run(tool, "--noflush", input="*filter\n-I INPUT -i eth-node -j DROP\n"
                            "-I OUTPUT -o eth-node -j DROP\nCOMMIT\n")
        return started

    def heal(self) -> None:
        for tool in ("iptables", "ip6tables"):
            self.router.run(tool, "-D", "INPUT", "-i", "eth-node", "-j", "DROP")
            self.router.run(tool, "-D", "OUTPUT", "-o", "eth-node", "-j", "DROP")
