"""vipd's BGP speaker: a sans-IO BGP-4 core (codec, FSM, session, RIBs) and a small asyncio layer.

The control plane uses :mod:`agent.bgp.api` only (re-exported here). The sans-IO pieces are
importable for tests and tools: :mod:`agent.bgp.messages`, :mod:`agent.bgp.codec`,
:mod:`agent.bgp.errors`, :mod:`agent.bgp.fsm`, :mod:`agent.bgp.session`, :mod:`agent.bgp.rib`.
Docs: docs/bgp-speaker.md; contract: docs/internal/speaker-api.md.
"""

from importlib import import_module

# Lazy (PEP 562): importing a pure submodule (messages, codec, fsm, session, rib, communities)
# must not load the asyncio speaker; tests/unit/test_pure_imports.py holds that.
_EXPORTS = {"BgpSpeaker": "agent.bgp.api", "SpeakerConfig": "agent.bgp.api", "NeighborConfig": "agent.bgp.api",
            "PathAttributes": "agent.bgp.api", "Family": "agent.bgp.api", "Origin": "agent.bgp.api",
            "PeerState": "agent.bgp.api", "FamilyCounts": "agent.bgp.api",
            "BgpProtocolError": "agent.bgp.errors"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BgpSpeaker", "SpeakerConfig", "NeighborConfig", "PathAttributes", "Family", "Origin",
           "PeerState", "FamilyCounts", "BgpProtocolError"]
