"""The pure layers (BGP core, BFD core, control plane, load-balancer and routing logic, config
models) import no asyncio, no speaker or transport, no netlink, gRPC or bcc: they are data in,
data out, testable without a loop or root, and reusable by tools (DESIGN.md "sans-IO core").
Each module is imported in a fresh interpreter, so nothing imported by another test hides a
violation."""

import subprocess
import sys

import pytest

PURE = ["agent.bgp.messages", "agent.bgp.codec", "agent.bgp.fsm", "agent.bgp.session", "agent.bgp.rib",
        "agent.bgp.errors", "agent.bgp.communities", "agent.bgp.api", "agent.bfd.codec", "agent.bfd.session",
        "agent.controlplane", "agent.controlplane.nodeconfig", "agent.controlplane.advertisements",
        "agent.controlplane.lbipam", "agent.controlplane.conditions", "agent.controlplane.migrate",
        "agent.lb.maglev", "agent.routing.model", "agent.routing.desired", "agent.config.cilium",
        "agent.config.core", "agent.config.loader", "agent.datapath.capacity", "agent.controlplane.plan", "agent.controlplane.frontends",
        "agent.datapath.changes", "agent.datapath.planner", "agent.addresses"]
EFFECTS = ("asyncio", "agent.bgp.speaker", "agent.bgp.aio", "agent.bfd.transport", "pyroute2", "grpc", "bcc")


@pytest.mark.unit
@pytest.mark.parametrize("module", PURE)
def test_pure_module_loads_no_effects(module):
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            f"print(','.join(m for m in {EFFECTS!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing {module} loads {out.stdout.strip()}"


@pytest.mark.unit
def test_the_speaker_is_still_where_the_daemon_finds_it():
    from agent.bgp import BgpSpeaker
    from agent.bgp.api import BgpSpeaker as FromApi
    from agent.bgp.speaker import BgpSpeaker as Impl

    assert BgpSpeaker is FromApi is Impl


@pytest.mark.unit
def test_one_table_of_well_known_communities_shared_by_validation_rendering_and_the_cli():
    from agent.api.model import community_str
    from agent.bgp.communities import WELL_KNOWN_COMMUNITIES, community_value
    from agent.config.cilium import WellKnown

    assert set(WellKnown.__args__) == set(WELL_KNOWN_COMMUNITIES)
    for name, value in WELL_KNOWN_COMMUNITIES.items():
        assert community_value(name) == value
        if name != "internet":
            assert community_str(value) == name          # what vipctl prints, validation accepts
    assert community_str(0xFFFF0000) == "planned-shut"   # GoBGP's / Cilium's name, not RFC 8326's
    assert community_value("graceful-shutdown") == 0xFFFF0000 and community_str(65000 << 16 | 7) == "65000:7"
