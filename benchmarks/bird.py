"""BIRD 2 inside a lab host, for the benchmark's reference sender.

``agent.lab`` drives FRR and GoBGP; BIRD is only needed here, so its small driver lives with the
benchmark. BIRD runs in the foreground (``-f``) with its own control socket; ``birdc`` talks to it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from agent.lab import Host, LabError, wait_until


class BirdDaemon:
    def __init__(self, host: Host, config: str, name: str = "bird"):
        self.host = host
        self.dir = host.workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "bird.conf"
        self.sock = self.dir / "bird.ctl"
        self.conf.write_text(config)
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> "BirdDaemon":
        self.proc = self.host.spawn(["bird", "-f", "-c", str(self.conf), "-s", str(self.sock),
                                     "-P", str(self.dir / "bird.pid")], log_path=self.dir / "bird.log")
        wait_until(lambda: self.proc.poll() is not None or self._ready(), timeout=60,
                   what=f"bird control socket in {self.host.name}")
        if self.proc.poll() is not None:
            raise LabError(f"bird exited: {self.log()[-2000:]}")
        return self

    def _ready(self) -> bool:
        return self.sock.exists() and "ready" in self.birdc("show", "status", check=False)

    def birdc(self, *args: str, check: bool = True) -> str:
        return self.host.run("birdc", "-s", str(self.sock), *args, check=check)

    def log(self) -> str:
        path = self.dir / "bird.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def static_export_config(*, router_id: str, local: str, local_asn: int, neighbor: str, neighbor_asn: int,
                         prefix_sets: list[list[str]], community_asn: int) -> str:
    """BIRD config exporting each prefix set as static routes with community (community_asn, set index)."""
    lines = [f"router id {router_id};", "protocol device {}", ""]
    for i, prefixes in enumerate(prefix_sets):
        lines.append(f"protocol static set{i} {{ ipv4;")
        lines += [f"  route {p} blackhole;" for p in prefixes]
        lines.append("}")
    tags = " ".join(f'if proto = "set{i}" then bgp_community.add(({community_asn}, {i}));'
                    for i in range(len(prefix_sets)))
    lines.append(f"filter community_per_set {{ {tags} accept; }}")
    lines.append(f"""protocol bgp to_router {{
  local {local} as {local_asn};
  neighbor {neighbor} as {neighbor_asn};
  connect delay time 1; connect retry time 1; start delay time 1;
  ipv4 {{ import none; export filter community_per_set; }};
}}""")
    return "\n".join(lines) + "\n"


def pid_vm_hwm_kib(pid: int) -> int:
    """Peak resident set size of a process (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for pid {pid}")
