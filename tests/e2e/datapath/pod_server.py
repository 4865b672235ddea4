"""A "pod": TCP and UDP servers on one port that say who served.

TCP: on accept, send ``<name>\\n``; then answer every line received with ``<name>\\n`` until
the client closes (so a long-lived connection can be probed later). A line ``E <token>`` is
answered with ``<name> <token>\\n`` (an echo, so the client can check the content); ``Q <token>``
likewise, and then the server closes the connection first (so the client's source port is
free again at once: no TIME_WAIT on the client). UDP: answer every
datagram with ``<name>``. Run inside the pod's namespace:
``python pod_server.py NAME PORT``.
"""

from __future__ import annotations

import socket
import sys
import threading


def serve_tcp_conn(conn: socket.socket, name: bytes) -> None:
    with conn:
        try:
            conn.sendall(name + b"\n")
            with conn.makefile("rb") as f:   # closed before conn: else close() keeps the fd
                for line in f:
                    cmd, _, token = line.strip().partition(b" ")
                    if cmd in (b"E", b"Q"):
                        conn.sendall(name + b" " + token + b"\n")
                        if cmd == b"Q":
                            return
                    else:
                        conn.sendall(name + b"\n")
        except OSError:
            pass


def tcp(port: int, name: bytes) -> None:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    s.listen(4096)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=serve_tcp_conn, args=(conn, name), daemon=True).start()


def udp(port: int, name: bytes) -> None:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    while True:
        _, peer = s.recvfrom(2048)
        s.sendto(name, peer)


def main() -> None:
    name, port = sys.argv[1].encode(), int(sys.argv[2])
    threading.Thread(target=udp, args=(port, name), daemon=True).start()
    print("ready", flush=True)
    tcp(port, name)


if __name__ == "__main__":
    main()
