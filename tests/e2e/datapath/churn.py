"""The client side of the backend-churn e2e test, run inside the client namespace.

``churn.py VIP PORT LONG_PORTS POOL RATE``

* LONG_PORTS ``first-last``: the source ports of the long-lived connections. POOL
  ``first-last``: the source ports new connections cycle through (reused every
  ``len(POOL) / RATE`` seconds, as a busy client or a NAT in front of many clients reuses
  them). RATE: new connections per second.
* Every connection checks content both ways: the pod greets with its name, and every
  ``E <token>`` / ``Q <token>`` line is echoed as ``<name> <token>`` (pod_server.py); a new
  connection ends with ``Q``, so the pod closes first and the client port is free at once.

Commands on stdin, one JSON line of output each:

``warm``  one short connection from each long-lived port: ``{"warm": {sport: pod}}``
``open N``  opens the next N long-lived connections (from LONG_PORTS, in order) and starts
    probing them: ``{"opened": {sport: pod}}``. Even-numbered ones are chatty (a probe every
    0.5 s), odd ones quiet (every 12 s: longer than the SNAT close timeout, 10 s).
``start``  starts the new connections (RATE per second, each in a worker thread).
end of input: stops, probes every long-lived connection still up once more, prints the report
    ``{"long": [{sport, pod, probes, error, t_error}], "new": {"ok", "by_pod", "failures":
    [{t, sport, pod, error}], "busy"}}`` (``pod``: who greeted, ``null`` if nobody did;
    ``busy``: pool ports skipped because still in use locally).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

TIMEOUT = 3.0          # per answer
CONNECT_TIMEOUT = 7.5  # a SYN dropped for want of a SNAT port is retransmitted after 1 s, 3 s, 7 s
T0 = time.monotonic()


def now() -> float:
    return round(time.monotonic() - T0, 3)


def family(addr: str):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def connect(vip: str, port: int, sport: int) -> tuple[socket.socket, object, str]:
    s = socket.socket(family(vip), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(CONNECT_TIMEOUT)
    try:
        s.bind(("::" if ":" in vip else "0.0.0.0", sport))
        s.connect((vip, port))
        s.settimeout(TIMEOUT)
        f = s.makefile("rb")
        name = f.readline().strip().decode()
        if not name:
            raise ConnectionError("closed before the greeting")
        return s, f, name
    except BaseException:
        s.close()
        raise


def exchange(s: socket.socket, f, name: str, cmd: str = "E") -> None:
    token = os.urandom(8).hex()
    s.sendall(f"{cmd} {token}\n".encode())
    got = f.readline().strip().decode()
    if got != f"{name} {token}":
        raise ConnectionError(f"bad answer {got!r}, want {name!r} + token" if got else "closed")


class Long:
    def __init__(self, vip, port, sport, quiet):
        self.sport, self.quiet = sport, quiet
        self.s, self.f, self.pod = connect(vip, port, sport)
        self.probes, self.error, self.t_error = 0, None, None
        self.lock = threading.Lock()

    def probe(self) -> None:
        with self.lock:
            if self.error:
                return
            try:
                exchange(self.s, self.f, self.pod)
                self.probes += 1
            except (OSError, ConnectionError) as exc:
                self.error, self.t_error = f"{type(exc).__name__}: {exc}", now()

    def run(self, stop: threading.Event) -> None:
        period = 12.0 if self.quiet else 0.5
        while not stop.wait(period):
            self.probe()

    def report(self) -> dict:
        return {"sport": self.sport, "pod": self.pod, "quiet": self.quiet, "probes": self.probes,
                "error": self.error, "t_error": self.t_error}


def short(vip, port, sport) -> dict:
    pod = None
    try:
        s, f, pod = connect(vip, port, sport)
    except OSError as exc:
        if exc.errno == 98:   # EADDRINUSE: the previous connection on this port is not gone yet
            return {"busy": True}
        return {"t": now(), "sport": sport, "pod": None, "error": f"{type(exc).__name__}: {exc}"}
    except ConnectionError as exc:
        return {"t": now(), "sport": sport, "pod": None, "error": f"{type(exc).__name__}: {exc}"}
    try:
        exchange(s, f, pod, "Q")
        if f.read(1) != b"":
            raise ConnectionError("data after the last answer")
        return {"pod": pod}
    except (OSError, ConnectionError) as exc:
        return {"t": now(), "sport": sport, "pod": pod, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        f.close()
        s.close()


def main() -> None:
    vip, port = sys.argv[1], int(sys.argv[2])
    lfirst, llast = map(int, sys.argv[3].split("-"))
    pfirst, plast = map(int, sys.argv[4].split("-"))
    rate = float(sys.argv[5])
    long_ports = list(range(lfirst, llast + 1))
    longs: list[Long] = []
    stop = threading.Event()
    new = {"ok": 0, "by_pod": {}, "failures": [], "busy": 0}
    new_lock = threading.Lock()
    pool = ThreadPoolExecutor(max_workers=32)

    def record(fut) -> None:
        r = fut.result()
        with new_lock:
            if r.get("busy"):
                new["busy"] += 1
            elif "error" in r:
                new["failures"].append(r)
            else:
                new["ok"] += 1
                new["by_pod"][r["pod"]] = new["by_pod"].get(r["pod"], 0) + 1

    def generate() -> None:
        ports = range(pfirst, plast + 1)
        start, i = time.monotonic(), 0
        while not stop.is_set():
            due = start + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool.submit(short, vip, port, ports[i % len(ports)]).add_done_callback(record)
            i += 1

    threads = []
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "warm":
            out = {}
            for sp in long_ports:
                r = short(vip, port, sp)
                out[sp] = r.get("pod") or r.get("error")
            print(json.dumps({"warm": out}), flush=True)
        elif cmd == "open":
            opened = {}
            for _ in range(int(args[0])):
                sp = long_ports[len(longs)]
                c = Long(vip, port, sp, quiet=len(longs) % 2 == 1)
                longs.append(c)
                opened[sp] = c.pod
                t = threading.Thread(target=c.run, args=(stop,), daemon=True)
                t.start()
                threads.append(t)
            print(json.dumps({"opened": opened}), flush=True)
        elif cmd == "start":
            t = threading.Thread(target=generate, daemon=True)
            t.start()
            threads.append(t)
            print(json.dumps({"started": now()}), flush=True)
    stop.set()
    for t in threads:
        t.join(timeout=15)
    pool.shutdown(wait=True)
    for c in longs:
        c.probe()
    print(json.dumps({"long": [c.report() for c in longs], "new": new, "t_end": now()}), flush=True)


if __name__ == "__main__":
    main()
