"""The one protocol error type of the BGP core.

Everything a peer can send us is either accepted or turned into :class:`BgpProtocolError`,
which carries the RFC 4271 §4.5 NOTIFICATION error code, subcode and data. Any other
exception escaping the sans-IO core is a bug in the core, never the peer's fault.

Everything in ``__all__`` is re-exported by :mod:`agent.bgp`.
"""

from __future__ import annotations

__all__ = ["BgpProtocolError", "ErrorCode", "describe_notification"]


class ErrorCode:
    """NOTIFICATION error codes and subcodes (RFC 4271 §4.5, RFC 4486, RFC 6608, RFC 7313, RFC 8538)."""

    MESSAGE_HEADER = 1
    CONNECTION_NOT_SYNCHRONIZED = 1
    BAD_MESSAGE_LENGTH = 2
    BAD_MESSAGE_TYPE = 3

    OPEN_MESSAGE = 2
    UNSUPPORTED_VERSION = 1
    BAD_PEER_AS = 2
    BAD_BGP_IDENTIFIER = 3
    UNSUPPORTED_OPTIONAL_PARAMETER = 4
    UNACCEPTABLE_HOLD_TIME = 6
    UNSUPPORTED_CAPABILITY = 7

    UPDATE_MESSAGE = 3
    MALFORMED_ATTRIBUTE_LIST = 1
    UNRECOGNIZED_WELL_KNOWN_ATTRIBUTE = 2
    MISSING_WELL_KNOWN_ATTRIBUTE = 3
    ATTRIBUTE_FLAGS_ERROR = 4
    ATTRIBUTE_LENGTH_ERROR = 5
    INVALID_ORIGIN = 6
    INVALID_NEXT_HOP = 8
    OPTIONAL_ATTRIBUTE_ERROR = 9
    INVALID_NETWORK_FIELD = 10
    MALFORMED_AS_PATH = 11

    HOLD_TIMER_EXPIRED = 4

    FSM = 5  # subcodes (RFC 6608): 1 OpenSent, 2 OpenConfirm, 3 Established

    CEASE = 6
    MAX_PREFIXES = 1
    ADMINISTRATIVE_SHUTDOWN = 2
    PEER_DECONFIGURED = 3
    ADMINISTRATIVE_RESET = 4
    CONNECTION_REJECTED = 5
    OTHER_CONFIGURATION_CHANGE = 6
    CONNECTION_COLLISION_RESOLUTION = 7
    OUT_OF_RESOURCES = 8
    HARD_RESET = 9
    BFD_DOWN = 10  # RFC 9384

    ROUTE_REFRESH = 7  # RFC 7313: subcode 1 Invalid Message Length


_NAMES = {
    (1, 0): "Message Header Error", (1, 1): "Connection Not Synchronized",
    (1, 2): "Bad Message Length", (1, 3): "Bad Message Type",
    (2, 0): "OPEN Message Error", (2, 1): "Unsupported Version Number", (2, 2): "Bad Peer AS",
    (2, 3): "Bad BGP Identifier", (2, 4): "Unsupported Optional Parameter",
    (2, 6): "Unacceptable Hold Time", (2, 7): "Unsupported Capability",
    (3, 0): "UPDATE Message Error", (3, 1): "Malformed Attribute List",
    (3, 2): "Unrecognized Well-known Attribute", (3, 3): "Missing Well-known Attribute",
    (3, 4): "Attribute Flags Error", (3, 5): "Attribute Length Error", (3, 6): "Invalid ORIGIN",
    (3, 8): "Invalid NEXT_HOP", (3, 9): "Optional Attribute Error", (3, 10): "Invalid Network Field",
    (3, 11): "Malformed AS_PATH", (4, 0): "Hold Timer Expired",
    (5, 0): "Finite State Machine Error", (5, 1): "Unexpected Message in OpenSent",
    (5, 2): "Unexpected Message in OpenConfirm", (5, 3): "Unexpected Message in Established",
    (6, 0): "Cease", (6, 1): "Maximum Number of Prefixes Reached", (6, 2): "Administrative Shutdown",
    (6, 3): "Peer De-configured", (6, 4): "Administrative Reset", (6, 5): "Connection Rejected",
    (6, 6): "Other Configuration Change", (6, 7): "Connection Collision Resolution",
    (6, 8): "Out of Resources", (6, 9): "Hard Reset", (6, 10): "BFD Down", (7, 1): "Invalid ROUTE-REFRESH Length",
}


def describe_notification(code: int, subcode: int, data: bytes = b"") -> str:
    """A human string such as ``"6/2 Administrative Shutdown: maintenance"``."""
    name = _NAMES.get((code, subcode)) or _NAMES.get((code, 0)) or "Unknown error"
    text = f"{code}/{subcode} {name}"
    if code == 6 and subcode == 9 and len(data) >= 2:  # RFC 8538: the encapsulated cause
        text += f" ({describe_notification(data[0], data[1], data[2:])})"
    elif code == 6 and subcode in (2, 4) and data:  # RFC 8203 / RFC 9003 shutdown message
        n = data[0]
        msg = data[1:1 + n].decode("utf-8", "replace")
        if msg:
            text += f": {msg}"
    return text


class BgpProtocolError(Exception):
    """A protocol violation, mapped to the NOTIFICATION we send (or sent) for it.

    ``events``: session events produced before the error (set by the session, so an adapter
    that catches the error still sees the state change and SessionDown)."""

    def __init__(self, code: int, subcode: int = 0, data: bytes = b"", reason: str = ""):
        self.code = code
        self.subcode = subcode
        self.data = bytes(data)
        self.reason = reason
        self.events: list = []
        super().__init__(f"{describe_notification(code, subcode)}" + (f": {reason}" if reason else ""))
