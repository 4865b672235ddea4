"""RFC 5880 §4.1 packet format and the stateless §6.8.6 reception checks."""

from __future__ import annotations

import struct

import pytest

from agent.bfd.codec import BfdPacketError, BfdState, ControlPacket, Diag, decode, encode

# A Down packet as FRR bfdd sends it first (captured layout, RFC 5880 §4.1): version 1,
# diag 0, state Down, mult 3, length 24, my 0x11223344, your 0, 1 s / 1 s / 50 ms echo.
FRR_DOWN = bytes.fromhex("20 40 03 18 11223344 00000000 000f4240 000f4240 0000c350".replace(" ", ""))


def test_decode_frr_down_packet():
    p = decode(FRR_DOWN)
    assert p.state is BfdState.DOWN and p.detect_mult == 3
    assert p.my_discriminator == 0x11223344 and p.your_discriminator == 0
    assert (p.desired_min_tx, p.required_min_rx, p.required_min_echo_rx) == (1_000_000, 1_000_000, 50_000)


def test_every_field_round_trips():
    p = ControlPacket(state=BfdState.UP, my_discriminator=0xFFFFFFFF, your_discriminator=7,
                      desired_min_tx=50_000, required_min_rx=60_000, required_min_echo_rx=0,
                      detect_mult=255, diag=Diag.REVERSE_CONCATENATED_PATH_DOWN, poll=True, final=False,
                      control_plane_independent=True, demand=True)
    raw = encode(p)
    assert len(raw) == 24 and raw[0] == (1 << 5) | 8 and raw[1] == (3 << 6) | 0x20 | 0x08 | 0x02
    assert decode(raw) == p
    f = ControlPacket(state=BfdState.INIT, my_discriminator=1, your_discriminator=2, final=True)
    assert decode(encode(f)).final and encode(f)[1] == (2 << 6) | 0x10


def _mutate(**kw) -> bytes:
    b0, flags, mult, length, my, your, tx, rx, echo = struct.unpack("!BBBBIIIII", FRR_DOWN)
    vals = dict(b0=b0, flags=flags, mult=mult, length=length, my=my, your=your, tx=tx, rx=rx, echo=echo) | kw
    return struct.pack("!BBBBIIIII", *vals.values())


@pytest.mark.parametrize("raw,reason", [
    (_mutate(b0=0x40), "bad_version"),                  # version 2
    (_mutate(b0=0x00), "bad_version"),                  # version 0
    (_mutate(length=23), "bad_length"),
    (_mutate(length=25), "bad_length"),                 # longer than the datagram
    (_mutate(mult=0), "bad_detect_mult"),
    (_mutate(flags=0x41), "multipoint"),
    (_mutate(my=0), "zero_my_discriminator"),
    (_mutate(flags=0xC0), "zero_your_discriminator"),   # Up with Your Discriminator 0
    (_mutate(flags=0x80), "zero_your_discriminator"),   # Init with Your Discriminator 0
    (_mutate(flags=0x44, length=26) + b"\x01\x02", "authentication"),
    (_mutate(flags=0x44, length=24), "bad_length"),     # A bit: at least 26
])
def test_invalid_packets_are_discarded_with_a_reason(raw, reason):
    with pytest.raises(BfdPacketError) as exc:
        decode(raw)
    assert exc.value.reason == reason


@pytest.mark.parametrize("n", range(24))
def test_every_truncation_is_rejected(n):
    with pytest.raises(BfdPacketError) as exc:
        decode(FRR_DOWN[:n])
    assert exc.value.reason == "truncated"


def test_trailing_bytes_beyond_length_are_ignored():
    assert decode(FRR_DOWN + b"\x00" * 8).my_discriminator == 0x11223344


def test_admin_down_with_zero_your_discriminator_is_valid():
    assert decode(_mutate(flags=0x00)).state is BfdState.ADMIN_DOWN
