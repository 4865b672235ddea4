"""BFD Control packets (RFC 5880 §4.1): encode, decode, and the stateless reception checks.

Only the checks of §6.8.6 that need no session live here (version, length, detect multiplier,
multipoint bit, discriminators, authentication presence); the session applies the rest. A
packet that fails a check raises :class:`BfdPacketError` with the reason used as the
``reason`` label of the dropped-packets metric.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

__all__ = ["BfdState", "Diag", "ControlPacket", "BfdPacketError", "decode", "encode", "HEADER_LEN"]

HEADER_LEN = 24
VERSION = 1
_FMT = struct.Struct("!BBBBIIIII")


class BfdState(enum.IntEnum):
    ADMIN_DOWN = 0
    DOWN = 1
    INIT = 2
    UP = 3

    @property
    def label(self) -> str:
        return {0: "admin_down", 1: "down", 2: "init", 3: "up"}[self.value]


class Diag(enum.IntEnum):
    """RFC 5880 §4.1 diagnostic codes."""
    NONE = 0
    CONTROL_DETECTION_TIME_EXPIRED = 1
    ECHO_FUNCTION_FAILED = 2
    NEIGHBOR_SIGNALED_DOWN = 3
    FORWARDING_PLANE_RESET = 4
    PATH_DOWN = 5
    CONCATENATED_PATH_DOWN = 6
    ADMINISTRATIVELY_DOWN = 7
    REVERSE_CONCATENATED_PATH_DOWN = 8

    @property
    def text(self) -> str:
        return self.name.lower().replace("_", " ")


class BfdPacketError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class ControlPacket:
    state: BfdState
    my_discriminator: int
    your_discriminator: int = 0
    desired_min_tx: int = 1_000_000      # microseconds
    required_min_rx: int = 1_000_000     # microseconds
    required_min_echo_rx: int = 0        # microseconds; 0: we do not take echo packets
    detect_mult: int = 3
    diag: int = Diag.NONE
    poll: bool = False
    final: bool = False
    control_plane_independent: bool = False
    auth_present: bool = False
    demand: bool = False
    multipoint: bool = False
    version: int = VERSION


def encode(p: ControlPacket) -> bytes:
    flags = ((int(p.state) & 3) << 6 | p.poll << 5 | p.final << 4 | p.control_plane_independent << 3
             | p.auth_present << 2 | p.demand << 1 | p.multipoint)
    return _FMT.pack((p.version & 7) << 5 | (int(p.diag) & 31), flags, p.detect_mult, HEADER_LEN,
                     p.my_discriminator, p.your_discriminator, p.desired_min_tx, p.required_min_rx,
                     p.required_min_echo_rx)


def decode(data: bytes) -> ControlPacket:
    """Parse and apply the stateless checks of RFC 5880 §6.8.6 (in its order)."""
    if len(data) < HEADER_LEN:
        raise BfdPacketError("truncated", f"{len(data)} bytes, a Control packet has at least {HEADER_LEN}")
    b0, flags, mult, length, my, your, tx, rx, echo = _FMT.unpack_from(data)
    version = b0 >> 5
    if version != VERSION:
        raise BfdPacketError("bad_version", f"version {version}, expected {VERSION}")
    auth = bool(flags & 0x04)
    if length < (HEADER_LEN + 2 if auth else HEADER_LEN):
        raise BfdPacketError("bad_length", f"Length field {length} is below the minimum")
    if length > len(data):
        raise BfdPacketError("bad_length", f"Length field {length} exceeds the {len(data)}-byte payload")
    if mult == 0:
        raise BfdPacketError("bad_detect_mult", "Detect Mult is zero")
    if flags & 0x01:
        raise BfdPacketError("multipoint", "M bit set")
    if my == 0:
        raise BfdPacketError("zero_my_discriminator", "My Discriminator is zero")
    state = BfdState(flags >> 6)
    if your == 0 and state not in (BfdState.DOWN, BfdState.ADMIN_DOWN):
        raise BfdPacketError("zero_your_discriminator",
                             f"Your Discriminator is zero in state {state.label}")
    if auth:
        # §6.8.6: A bit set and no authentication in use -> discard (vipd has none).
        raise BfdPacketError("authentication", "A bit set; vipd does not use BFD authentication")
    return ControlPacket(state=state, my_discriminator=my, your_discriminator=your, desired_min_tx=tx,
                         required_min_rx=rx, required_min_echo_rx=echo, detect_mult=mult,
                         diag=b0 & 31, poll=bool(flags & 0x20), final=bool(flags & 0x10),
                         control_plane_independent=bool(flags & 0x08), auth_present=auth,
                         demand=bool(flags & 0x02), multipoint=False, version=version)
