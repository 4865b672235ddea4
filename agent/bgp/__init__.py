"""vipd's BGP speaker: a sans-IO BGP-4 core (codec, FSM, session, RIBs) and a small asyncio layer.

The control plane uses :mod:`agent.bgp.api` only (re-exported here). The sans-IO pieces are
importable for tests and tools: :mod:`agent.bgp.messages`, :mod:`agent.bgp.codec`,
:mod:`agent.bgp.errors`, :mod:`agent.bgp.fsm`, :mod:`agent.bgp.session`, :mod:`agent.bgp.rib`.
Docs: docs/bgp-speaker.md; contract: docs/internal/speaker-api.md.
"""

from agent.bgp.api import (
    BgpSpeaker, FamilyCounts, Family, NeighborConfig, Origin, PathAttributes, PeerState, SpeakerConfig,
)
from agent.bgp.errors import BgpProtocolError

__all__ = ["BgpSpeaker", "SpeakerConfig", "NeighborConfig", "PathAttributes", "Family", "Origin",
           "PeerState", "FamilyCounts", "BgpProtocolError"]
