"""Single-hop BFD (RFC 5880/5881) for BGP peers (RFC 5882): sans-IO core + asyncio transport."""

from agent.bfd.codec import BfdState, ControlPacket, Diag, decode, encode
from agent.bfd.session import BfdSession, BfdTimers, StateChange

__all__ = ["BfdState", "ControlPacket", "Diag", "decode", "encode", "BfdSession", "BfdTimers", "StateChange"]
