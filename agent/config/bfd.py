"""vipd's BFD extension for Cilium's BGP Control Plane: the ``vipd.io/bfd`` annotation.

Cilium has no BFD (cilium/cilium#22394). vipd reads it from an annotation on the
CiliumBGPPeerConfig, so the same manifest still applies unchanged to a Cilium cluster (which
ignores it). Field names and defaults follow MetalLB's BFDProfile (intervals in ms)::

    metadata:
      annotations:
        vipd.io/bfd: "receiveInterval=300,transmitInterval=300,detectMultiplier=3"

The value ``enabled`` (or an empty string) means all defaults. Every peer referencing the
PeerConfig gets a single-hop BFD session bound to its BGP session (RFC 5882).
"""

from __future__ import annotations

from agent.bfd.session import BfdTimers

__all__ = ["BFD_ANNOTATION", "parse_bfd_annotation", "bfd_annotation_errors"]

BFD_ANNOTATION = "vipd.io/bfd"

_INT_FIELDS = {"receiveInterval": "required_min_rx", "transmitInterval": "desired_min_tx",
               "detectMultiplier": "detect_mult"}
_DEFAULTS = {"receiveInterval": 300, "transmitInterval": 300, "detectMultiplier": 3}
_KNOWN = (*_INT_FIELDS, "passiveMode", "echoMode", "minimumTtl")


def _bool(key: str, text: str) -> bool:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    raise ValueError(f"{key}={text!r}: expected true or false")


def parse_bfd_annotation(value: str) -> BfdTimers:
    """``"receiveInterval=50,transmitInterval=50,detectMultiplier=3"`` -> BfdTimers.
    Raises ValueError with a message that names the field and says what is accepted."""
    text = value.strip()
    fields: dict[str, str] = {}
    if text and text.lower() != "enabled":
        for part in text.split(","):
            key, sep, val = (x.strip() for x in part.partition("="))
            if not sep or not key:
                raise ValueError(f"{part.strip()!r}: expected key=value (keys: {', '.join(_KNOWN)})")
            if key not in _KNOWN:
                close = [k for k in _KNOWN if k.lower() == key.lower()]
                hint = f"; did you mean {close[0]}?" if close else f" (keys: {', '.join(_KNOWN)})"
                raise ValueError(f"unknown key {key!r}{hint}")
            fields[key] = val
    if _bool("echoMode", fields.get("echoMode", "false")):
        raise ValueError("echoMode=true: vipd does not implement the BFD echo function; remove it")
    if fields.get("minimumTtl", "255") != "255":
        raise ValueError(f"minimumTtl={fields['minimumTtl']}: vipd runs single-hop BFD only "
                         "(RFC 5881), which requires TTL 255; remove it or set 255")
    nums = {}
    for key, attr in _INT_FIELDS.items():
        raw = fields.get(key, str(_DEFAULTS[key]))
        try:
            nums[attr] = int(raw)
        except ValueError:
            raise ValueError(f"{key}={raw!r}: expected a whole number"
                             f"{' of milliseconds' if key != 'detectMultiplier' else ''}") from None
    return BfdTimers(desired_min_tx=nums["desired_min_tx"] * 1000, required_min_rx=nums["required_min_rx"] * 1000,
                     detect_mult=nums["detect_mult"], passive=_bool("passiveMode", fields.get("passiveMode", "false")))


def bfd_annotation_errors(objects) -> list[str]:
    """For ``vipctl config validate``: every CiliumBGPPeerConfig whose annotation is invalid."""
    errors = []
    for obj in objects.all():
        value = obj.metadata.annotations.get(BFD_ANNOTATION) if obj.KIND == "CiliumBGPPeerConfig" else None
        if value is None:
            continue
        try:
            parse_bfd_annotation(value)
        except ValueError as exc:
            errors.append(f"{obj.key}: metadata.annotations[{BFD_ANNOTATION}]: {exc}")
    return errors
