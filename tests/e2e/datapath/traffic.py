"""The client side of the datapath e2e tests, run inside the client namespace.

Commands (JSON on stdout):

``burst VIP PORT PROTO SPORT_FIRST COUNT``
    one connection (TCP) or one request (UDP) per source port; reports for each source port
    who served, the address the answer came from, or the error.
``stream VIP[,VIP...] PORT SECONDS [UNTIL_OK [MAX_PER_S]]``
    back-to-back TCP connections (kernel-chosen ports, VIPs in turn) until SECONDS elapse
    (SECONDS "stdin": until stdin is closed; with UNTIL_OK, until that many completed;
    at most MAX_PER_S started per second);
    reports the number that completed and every failure (with its time and source port).
``udp VIP PORT COUNT SIZE``
    COUNT datagrams of SIZE bytes (each numbered) to an echo server, at most 32 in flight;
    reports how many came back intact, from which addresses, and how many were lost.
``sized VIP PORT N``
    asks matrix_server.py's sized server for N bytes; reports the bytes' count, whether they
    are the expected ones, and the error if any.
``hold VIP PORT SPORT_FIRST COUNT``
    opens COUNT long-lived TCP connections, prints who served each, then for every line on
    stdin ("probe") sends one line on every connection and prints who answered (or the error).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

TIMEOUT = 2.0


def family(addr: str):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def any_addr(addr: str) -> str:
    return "::" if ":" in addr else "0.0.0.0"


def tcp_once(vip: str, port: int, sport: int | None) -> dict:
    s = socket.socket(family(vip), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(TIMEOUT)
    try:
        s.bind((any_addr(vip), sport or 0))
        sport = s.getsockname()[1]
        t0 = time.monotonic()
        s.connect((vip, port))
        peer = s.getpeername()[0]
        name = s.makefile("rb").readline().strip().decode()
        if not name:
            return {"sport": sport, "error": "closed without a name"}
        return {"sport": sport, "served_by": name, "from": peer, "seconds": round(time.monotonic() - t0, 4)}
    except OSError as exc:
        return {"sport": sport, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        s.close()


def udp_once(vip: str, port: int, sport: int) -> dict:
    s = socket.socket(family(vip), socket.SOCK_DGRAM)
    s.settimeout(TIMEOUT)
    try:
        s.bind((any_addr(vip), sport))
        for _ in range(3):  # UDP: retry a lost datagram twice
            s.sendto(b"who", (vip, port))
            try:
                data, peer = s.recvfrom(2048)
                return {"sport": sport, "served_by": data.decode(), "from": peer[0]}
            except socket.timeout:
                continue
        return {"sport": sport, "error": "timeout"}
    finally:
        s.close()


def burst(vip, port, proto, first, count):
    once = tcp_once if proto == "tcp" else udp_once
    out = []
    for i in range(int(count)):
        out.append(once(vip, int(port), int(first) + i))
        if len(out) >= 3 and all("error" in r for r in out[-3:]):
            break  # clearly broken: report now instead of timing out on every flow
    return out


def stream(vips, port, seconds, until_ok=0, max_per_s=0):
    vips = vips.split(",")
    start = time.monotonic()
    stop = threading.Event()
    if seconds == "stdin":  # the test says when: it closes our stdin
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
        seconds = 600
    end = start + float(seconds)
    until_ok, max_per_s = int(until_ok), float(max_per_s)
    ok, failures = 0, []
    while time.monotonic() < end and not stop.is_set() and not (until_ok and ok >= until_ok):
        t = time.monotonic()
        if max_per_s and ok + len(failures) > (t - start) * max_per_s:
            time.sleep(1 / max_per_s)
            continue
        vip = vips[(ok + len(failures)) % len(vips)]
        r = tcp_once(vip, int(port), None)
        if "served_by" in r:
            ok += 1
        else:
            failures.append(f"t={t - start:.2f}s {vip} sport={r['sport']}: {r['error']}")
    return {"ok": ok, "failures": failures, "start": time.time() - (time.monotonic() - start)}


def udp(vip, port, count, size, window=32):
    count, size = int(count), int(size)
    s = socket.socket(family(vip), socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.settimeout(1.0)
    s.connect((vip, int(port)))       # replies from any other address are not delivered to us
    pad = bytes(i % 256 for i in range(size))
    sent = ok = bad = lost = 0
    srcs = set()
    while ok + bad + lost < count:
        while sent < count and sent - ok - bad - lost < window:
            s.send(sent.to_bytes(4, "big") + pad[4:])
            sent += 1
        try:
            data, peer = s.recvfrom(65535)
        except socket.timeout:
            lost += sent - ok - bad - lost    # a second without an answer: the window is lost
            continue
        srcs.add(peer[0])
        if len(data) == size and data[4:] == pad[4:]:
            ok += 1
        else:
            bad += 1
    return {"sent": sent, "ok": ok, "bad": bad, "lost": lost, "from": sorted(srcs)}


def sized(vip, port, n):
    s = socket.socket(family(vip), socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect((vip, int(port)))
        s.sendall(f"{n}\n".encode())
        data = bytearray()
        while chunk := s.recv(65536):
            data += chunk
        want = bytes(i % 251 for i in range(int(n)))
        return {"bytes": len(data), "intact": bytes(data) == want, "from": s.getpeername()[0]}
    except OSError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        s.close()


def hold(vip, port, first, count):
    conns = []
    for i in range(int(count)):
        s = socket.socket(family(vip), socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.settimeout(TIMEOUT)
        s.bind((any_addr(vip), int(first) + i))
        s.connect((vip, int(port)))
        f = s.makefile("rb")
        conns.append((int(first) + i, s, f, f.readline().strip().decode()))
    print(json.dumps([{"sport": sp, "served_by": name} for sp, _, _, name in conns]), flush=True)
    for _ in sys.stdin:
        out = []
        for sp, s, f, _ in conns:
            try:
                s.sendall(b"probe\n")
                name = f.readline().strip().decode()
                out.append({"sport": sp, "served_by": name} if name else {"sport": sp, "error": "closed"})
            except OSError as exc:
                out.append({"sport": sp, "error": f"{type(exc).__name__}: {exc}"})
        print(json.dumps(out), flush=True)


def main() -> None:
    cmd, *args = sys.argv[1:]
    if cmd == "hold":
        hold(*args)
        return
    print(json.dumps({"burst": burst, "stream": stream, "udp": udp, "sized": sized}[cmd](*args)))


if __name__ == "__main__":
    main()
