"""Real skbs through the attached tc programs: frames are sent through an AF_PACKET TX ring
(PACKET_TX_RING) on the node's veth, so tc egress sees an skb whose linear head holds only the
14-byte Ethernet header and whose every other byte sits in page fragments (like a TCP socket's
reply: headers in the head, payload in fragments; a plain send() would copy a frame under a page
into one linear buffer), or on the peer's veth (tc ingress on the node sees the same layout),
and captured on the other end.

With ``vnet`` the sender prepends a virtio_net_hdr (PACKET_VNET_HDR): the skb is
CHECKSUM_PARTIAL (the L4 checksum field holds only the pseudo-header sum) and, with a GSO type,
a GSO super-packet the kernel segments after tc egress. BPF_PROG_TEST_RUN cannot build such
skbs (it copies the frame into one linear buffer of at most a page), hence this harness.
"""

from __future__ import annotations

import mmap
import select
import socket
import struct
import time

from agent.datapath.netns import in_netns

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6 = 0, 1, 3, 4
PACKET_VERSION, PACKET_TX_RING, TPACKET_V2 = 10, 13, 1
TP_STATUS_AVAILABLE, TP_STATUS_SEND_REQUEST, TP_STATUS_WRONG_FORMAT = 0, 1, 4
RING_FRAME, RING_FRAMES = 1 << 14, 4
TPACKET2_DATA = 32          # TPACKET_ALIGN(sizeof(struct tpacket2_hdr)): where a TX frame's data starts


def vnet_hdr(*, csum_start: int, csum_offset: int, hdr_len: int, gso_type: int = GSO_NONE,
             gso_size: int = 0) -> bytes:
    """struct virtio_net_hdr (little-endian, as the host's)."""
    return struct.pack("<BBHHHH", VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, hdr_len, gso_size,
                       csum_start, csum_offset)


class Port:
    """An AF_PACKET socket bound to ``ifname`` inside ``netns`` (send and capture)."""

    def __init__(self, netns: str, ifname: str, *, vnet: bool = False, ring: bool = True):
        def make():
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)   # SO_RCVBUFFORCE: hold a burst of 9k frames
            if vnet:
                s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            if ring:
                s.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
                s.setsockopt(SOL_PACKET, PACKET_TX_RING,
                             struct.pack("IIII", RING_FRAME, RING_FRAMES, RING_FRAME, RING_FRAMES))
            s.bind((ifname, ETH_P_ALL))
            return s
        self.sock = in_netns(netns, make)
        self.vnet = vnet
        self.ring = mmap.mmap(self.sock.fileno(), RING_FRAME * RING_FRAMES) if ring else None
        self._slot = 0

    def send(self, frame: bytes, vnet: bytes = b"") -> None:
        """Send one frame (through the TX ring unless the port was made with ring=False)."""
        if self.vnet and not vnet:
            vnet = b"\0" * 10
        data = vnet + bytes(frame)
        if self.ring is None:
            self.sock.send(data)
            return
        off = self._slot * RING_FRAME
        self._slot = (self._slot + 1) % RING_FRAMES
        deadline = time.monotonic() + 2
        while struct.unpack_from("I", self.ring, off)[0] != TP_STATUS_AVAILABLE:
            if time.monotonic() > deadline:
                raise TimeoutError("TX ring slot not released by the kernel")
            time.sleep(0.001)
        self.ring[off + TPACKET2_DATA: off + TPACKET2_DATA + len(data)] = data
        struct.pack_into("II", self.ring, off + 4, len(data), len(data))     # tp_len, tp_snaplen
        struct.pack_into("I", self.ring, off, TP_STATUS_SEND_REQUEST)
        self.sock.send(b"")                                                   # flush the ring
        if struct.unpack_from("I", self.ring, off)[0] == TP_STATUS_WRONG_FORMAT:
            raise OSError("the kernel refused the TX ring frame")

    def drain(self) -> None:
        while select.select([self.sock], [], [], 0)[0]:
            self.sock.recv(65536)

    def recv_until(self, want, n: int, timeout: float = 5.0) -> list[bytes]:
        """Frames received (outgoing ones excluded) for which ``want(frame)`` is true, until
        ``n`` of them arrived or ``timeout`` passed."""
        got: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                break
            data, addr = self.sock.recvfrom(65536 + 10)
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            if self.vnet:
                data = data[10:]
            if want(data):
                got.append(data)
        return got

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
        self.sock.close()
