"""A pod's servers for the traffic matrix (stdlib only), dual-stack, run in the pod's namespace:
``python matrix_server.py UDP_PORT SIZED_PORT``.

UDP_PORT: echoes every datagram back unchanged. SIZED_PORT (TCP): reads one line "N", answers
with exactly N bytes (byte i = i % 251) and closes.
"""

from __future__ import annotations

import socket
import sys
import threading


def dual(kind: int, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET6, kind)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("::", port))
    return s


def udp_echo(port: int) -> None:
    s = dual(socket.SOCK_DGRAM, port)
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(data, peer)


def sized_conn(conn: socket.socket) -> None:
    with conn:
        try:
            n = int(conn.makefile("rb").readline())
            conn.sendall(bytes(i % 251 for i in range(n)))
        except (OSError, ValueError):
            pass


def sized(port: int) -> None:
    s = dual(socket.SOCK_STREAM, port)
    s.listen(512)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=sized_conn, args=(conn,), daemon=True).start()


def main() -> None:
    threading.Thread(target=udp_echo, args=(int(sys.argv[1]),), daemon=True).start()
    sized(int(sys.argv[2]))


if __name__ == "__main__":
    main()
