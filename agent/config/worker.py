"""The parser process: the daemon reads its configuration directory through it, so hostile input
(an alias bomb, a 10 MiB file, 10,000 files) costs this process CPU and memory, never the event
loop that keeps the BGP sessions alive.

    parent --request--> worker: {"dir", "known": {path: digest}, "poison": {path: digest}, "limits",
                                 "urgent": the daemon's first load (not niced),
                                 "parallel": an urgent load may fork a helper (default true)}
    worker --messages--> parent, one per line of work, each a length-prefixed pickle:
        ("begin", path)                   about to parse path (names the culprit of a crash)
        ("same", path, digest)            content unchanged since the parent's last load
        ("file", FileParse)               a file's errors/ignored (objects follow in chunks)
        ("objects", path, [(obj, index)])  at most CHUNK objects, so unpickling one message
                                          never holds the parent's event loop for long
        ("cached", path)                  the "file" and "objects" messages that follow come
                                          from the parse cache (see ParseCacheDir)
        ("done", dir_error, [paths])      the load is complete
    (and once, when it has started: ("ready",))

With ``"cache_dir"`` in the request (the daemon: STATE_DIR/config-cache), each file's messages
are also written there, keyed by the file's path and content and by the parser's own code, and
a restart sends them again instead of parsing the file (see ParseCacheDir).

The worker lives under RLIMIT_AS (``Limits.worker_memory_bytes``); the parent kills it when it is
silent for ``Limits.worker_timeout_s``. Either way the parent reports the file it was reading and
retries the load without that file (see ``agent.sources.files``).
"""

from __future__ import annotations

import gc
import hashlib
import os
import pickle
import resource
import struct
import sys
from pathlib import Path

CHUNK = 256
STARTUP_TIMEOUT_S = 60.0
_HEADER = struct.Struct(">I")


def encode(message) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


def header_size() -> int:
    return _HEADER.size


def body_size(header: bytes) -> int:
    return _HEADER.unpack(header)[0]


class ParseCacheDir:
    """Parsed files on disk, for restarts: the encoded messages of one file's parse, under a key
    of the file's path and content digest, the limits and this parser's code (its source files
    and the versions of the libraries that read YAML and check types), so an entry is exactly
    what parsing the file again would send. Entries of files not in the last load are removed.

    The entries are pickles: the directory must be writable only by vipd (the state dir is)."""

    SUFFIX = ".parse"

    def __init__(self, directory: str | Path, limits) -> None:
        import pydantic
        import yaml

        from agent.config import safeyaml

        self.directory = Path(directory)
        code = hashlib.sha256(repr((limits, sys.version, pydantic.VERSION, yaml.__version__,
                                    getattr(safeyaml.yaml_rs, "__version__", None))).encode())
        for source in sorted(Path(__file__).parent.glob("*.py")):
            code.update(source.read_bytes())
        self._code = code.hexdigest()
        self.used: set[str] = set()

    def _entry(self, path: str, digest: str) -> Path:
        key = hashlib.sha256(f"{self._code}\0{path}\0{digest}".encode()).hexdigest()
        self.used.add(key + self.SUFFIX)
        return self.directory / (key + self.SUFFIX)

    def keep(self, path: str, digest: str) -> None:
        """The file is unchanged since the parent's last load: its entry stays."""
        self._entry(path, digest)

    def has(self, path: str, digest: str) -> bool:
        return self._entry(path, digest).is_file()

    def get(self, path: str, digest: str) -> bytes | None:
        try:
            blob = self._entry(path, digest).read_bytes()
        except OSError:
            return None
        return blob if _whole_frames(blob) else None     # a torn write is a miss

    def put(self, path: str, digest: str, frames: bytes) -> None:
        entry = self._entry(path, digest)
        tmp = entry.with_suffix(".tmp")
        try:
            # the entries hold the objects, Secrets included: readable by vipd only
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(frames)
            os.replace(tmp, entry)
        except OSError:
            pass          # a cache that cannot be written costs the next restart time, no more

    def prune(self) -> None:
        try:
            stale = [e for e in self.directory.iterdir() if e.name not in self.used]
        except OSError:
            return
        for entry in stale:
            try:
                entry.unlink()
            except OSError:
                pass


def _whole_frames(blob: bytes) -> bool:
    """True when ``blob`` is a sequence of complete length-prefixed messages."""
    at = 0
    while at < len(blob):
        if at + _HEADER.size > len(blob):
            return False
        at += _HEADER.size + _HEADER.unpack_from(blob, at)[0]
    return at == len(blob) and at > 0


def serve_one(request: dict, send) -> None:
    """Answer one load request through ``send(message)``, or ``send(bytes)`` for messages
    already encoded (pure apart from reading the files and the parse cache)."""
    from agent.config.loader import (check_dir, digest_of, file_error, manifest_files, parse_bytes,
                                     read_file)

    directory = Path(request["dir"])
    limits = request["limits"]
    cache = ParseCacheDir(request["cache_dir"], limits) if request.get("cache_dir") else None
    known: dict[str, str] = request.get("known", {})
    poison: dict[str, str] = request.get("poison", {})
    try:
        files = manifest_files(directory)
    except OSError as exc:
        send(("done", f"{directory}: cannot list the directory: {exc.strerror or exc}", []))
        return
    refused = check_dir(directory, files, limits)
    if refused is not None:
        send(("done", str(refused), [str(f) for f in files]))
        return
    from agent.config.compact import Compactor

    compactor = Compactor()
    helper = (_Helper.start(files, request, limits, known, poison, cache)
              if request.get("urgent") and request.get("parallel", True) else None)
    for f in files:
        path = str(f)
        error, data = read_file(f, limits)
        if error is not None:
            send(("file", error))
            continue
        digest = digest_of(data)
        if known.get(path) == digest:
            send(("same", path, digest))
            if cache is not None:
                cache.keep(path, digest)
            continue
        if poison.get(path) == digest:
            fp = file_error(path, "the parser process died reading this file (memory limit "
                                  f"{limits.worker_memory_bytes // 2**20} MiB or "
                                  f"{limits.worker_timeout_s:g} s time limit); its previous "
                                  "objects stay applied")
            fp.digest = digest
            send(("file", fp))
            continue
        send(("begin", path, digest))
        hit = cache.get(path, digest) if cache is not None else None
        if hit is None and helper is not None:
            hit = helper.frames(path, digest)
            if hit is not None and cache is not None:
                cache.put(path, digest, hit)
        elif hit is not None:
            send(("cached", path))
        if hit is not None:
            send(hit)
            continue
        frames = parse_frames(data, path, limits, digest, compactor)
        for frame in frames:
            send(frame)
        if cache is not None:
            cache.put(path, digest, b"".join(frames))
        del data, frames
    if cache is not None:
        cache.prune()
    send(("done", None, [str(f) for f in files]))


def parse_frames(data: bytes, path: str, limits, digest: str, compactor) -> list[bytes]:
    """One file's messages: ("file", FileParse) and its ("objects", ...) chunks, encoded."""
    from agent.config.loader import file_error, parse_bytes

    try:
        fp = parse_bytes(data, path, limits, digest)
    except MemoryError:
        fp = file_error(path, "parsing needs more memory than the parser's limit "
                              f"({limits.worker_memory_bytes // 2**20} MiB)")
        fp.digest = digest
    except RecursionError:
        fp = file_error(path, "nested too deeply to parse")
        fp.digest = digest
    objects, fp.parsed = fp.parsed, []
    for obj, _index in objects:      # repeated strings, sets and labels: one object each
        compactor.compact(obj)
    frames = [encode(("file", fp))]
    frames += [encode(("objects", path, objects[start:start + CHUNK]))
               for start in range(0, len(objects), CHUNK)]
    return frames


PARALLEL_MIN_BYTES = 2 << 20   # a first load parsing less than this stays in one process


class _Helper:
    """A forked second parser for the daemon's first load (``urgent``: nothing else runs yet,
    and a first start without a parse cache waits ~2.5 s for 20,000 Services' parse): it
    parses the later half (by bytes) of the files to parse while the worker parses the first
    half, and hands each file's encoded messages over through a memfd when it exits. The
    worker sends them in the files' order, as if it had parsed them itself; a file the helper
    did not deliver (it died: memory limit, a bug) the worker parses itself, so a file that
    kills a parser still kills the worker with its "begin" sent (the parent's poison rule)."""

    _REC = struct.Struct(">II")

    def __init__(self, pid: int, fd: int, mine: set[tuple[str, str]]):
        self.pid, self.fd, self.mine = pid, fd, mine
        self.results: dict[tuple[str, str], bytes] | None = None

    @classmethod
    def start(cls, files, request, limits, known, poison, cache) -> "_Helper | None":
        from agent.config.loader import digest_of, read_file

        todo = []   # (path, digest, size) of the files this load will parse
        for f in files:
            error, data = read_file(f, limits)
            if error is not None:
                continue
            path, digest = str(f), digest_of(data)
            if known.get(path) == digest or poison.get(path) == digest:
                continue
            if cache is not None and cache.has(path, digest):
                continue
            todo.append((path, digest, len(data)))
        total = sum(size for *_, size in todo)
        if len(todo) < 2 or total < PARALLEL_MIN_BYTES or (os.cpu_count() or 1) < 2:
            return None
        at = half = 0
        while at < len(todo) - 1 and half + todo[at][2] <= total / 2:
            half += todo[at][2]
            at += 1
        theirs = todo[max(at, 1):]
        fd = os.memfd_create("vipd-parse-helper")
        pid = os.fork()
        if pid == 0:   # the helper: parse, write, exit; never returns into the worker's loop
            code = 0
            try:
                _die_with_parent()
                cls._run(fd, theirs, limits)
            except BaseException:  # noqa: BLE001 - the worker parses what is missing
                code = 3
            os._exit(code)
        return cls(pid, fd, {(p, d) for p, d, _ in theirs})

    @classmethod
    def _run(cls, fd: int, theirs, limits) -> None:
        from agent.config.compact import Compactor
        from agent.config.loader import read_file

        compactor = Compactor()
        with os.fdopen(os.dup(fd), "wb") as out:
            for path, digest, _ in theirs:
                error, data = read_file(path, limits)
                if error is not None or hashlib.sha256(data).hexdigest() != digest:
                    continue   # changed meanwhile: the worker reads it again
                blob = b"".join(parse_frames(data, path, limits, digest, compactor))
                p = path.encode()
                out.write(cls._REC.pack(len(p), len(blob)) + p + blob)
                out.flush()

    def frames(self, path: str, digest: str) -> bytes | None:
        """The helper's messages for this file (None: not the helper's, or not delivered)."""
        if (path, digest) not in self.mine:
            return None
        if self.results is None:
            self.results = {}
            os.waitpid(self.pid, 0)    # whatever it wrote before it exited is whole or cut
            with os.fdopen(self.fd, "rb") as f:
                f.seek(0)
                data = f.read()
            at = 0
            while at + self._REC.size <= len(data):
                plen, blen = self._REC.unpack_from(data, at)
                end = at + self._REC.size + plen + blen
                if end > len(data):
                    break
                p = data[at + self._REC.size:at + self._REC.size + plen].decode()
                self.results[p] = data[end - blen:end]
                at = end
        blob = self.results.pop(path, None)
        return blob if blob and _whole_frames(blob) else None


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: the helper goes when the worker does (killed on a timeout)."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    if os.getppid() == 1:
        os._exit(3)


def main() -> None:
    limits_set = niced = False
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer

    def send(message) -> None:
        stdout.write(message if isinstance(message, bytes) else encode(message))
        stdout.flush()

    import agent.config.loader  # noqa: F401 - the models load before "ready" (its own timeout)

    send(("ready",))
    while True:
        header = stdin.read(header_size())
        if len(header) < header_size():
            return                                    # the parent closed the pipe
        request = pickle.loads(stdin.read(body_size(header)))
        if not limits_set:
            cap = request["limits"].worker_memory_bytes
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
            limits_set = True
        if not niced and not request.get("urgent"):
            # parsing yields the CPU to the daemon, whose loop runs the BGP timers (the first
            # load, before any session exists, runs at full priority: it gates the start)
            os.nice(10)
            niced = True
        # A load allocates millions of containers and frees them by refcount; the cyclic GC's
        # scans of them cost ~20 % of a load at 20,000 Services. Cycles (an exception's
        # traceback) are collected once per load instead, within the same memory limit.
        gc.disable()
        try:
            serve_one(request, send)
        except MemoryError:
            # out of memory outside a file's parse (sending its result): the parent reports
            # the file it was reading and starts a new worker
            os._exit(3)
        except Exception as exc:  # noqa: BLE001 - one line for the daemon's log, not a traceback
            sys.stderr.write(f"vipd config parser: {type(exc).__name__}: {str(exc)[:300]}\n")
            os._exit(4)
        gc.collect()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()


# ------------------------------------------------------------------------------ the parent side


class ParserProcess:
    """The daemon's handle on one worker process (started on first use, restarted after it
    dies). ``poison`` remembers files (by content) that killed a worker, so a bad file is
    reported once instead of crashing every reload."""

    def __init__(self, log=None) -> None:
        self._proc = None
        self._ready = False
        self.poison: dict[str, str] = {}
        self.log = log
        self.cache_dir: Path | None = None
        self.cached = 0               # files of the last parse_dir served by the parse cache
        # the first load may fork a helper (_Helper); off while a BPF compile competes for the CPUs
        self.parallel_first_load = True

    async def spawn(self) -> None:
        """Start the process without waiting for it: its imports (~0.5 s) overlap the caller's
        (`vipd run` calls this first thing). Importing this module costs no models."""
        import asyncio

        if self._proc is not None and self._proc.returncode is None:
            return
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        # yaml_rs's allocator (mimalloc) reserves 1 GiB of address space up front, half of the
        # parser's RLIMIT_AS: without the reserve it maps what it uses (~10 % slower parsing)
        env.setdefault("MIMALLOC_ARENA_RESERVE", "0")
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.config.worker", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=env)
        self._ready = False

    async def _start(self, limits):
        import asyncio

        await self.spawn()
        if self._ready:
            return self._proc
        # imports take a while on a busy machine; the per-message timeout starts after them
        try:
            ready = await self._receive(self._proc, STARTUP_TIMEOUT_S)
        except (asyncio.IncompleteReadError, TimeoutError):
            await self.close()
            raise RuntimeError("the configuration parser process did not start") from None
        assert ready == ("ready",), ready
        self._ready = True
        return self._proc

    async def _receive(self, proc, timeout: float):
        import asyncio

        header = await asyncio.wait_for(proc.stdout.readexactly(header_size()), timeout)
        body = await asyncio.wait_for(proc.stdout.readexactly(body_size(header)), timeout)
        return pickle.loads(body)

    async def parse_dir(self, directory: Path, known: dict[str, "FileParse"], limits, *,
                        urgent: bool = False) -> tuple[list[FileParse], str | None]:
        """-> (one FileParse per manifest, in name order; a directory-wide error or None).
        Unchanged files come back as the very objects in ``known`` (path -> last FileParse).
        ``urgent``: nothing runs yet that parsing could delay (the first load)."""
        import asyncio

        for _attempt in range(8):
            proc = await self._start(limits)
            self.cached = 0
            proc.stdin.write(encode({"dir": str(directory), "limits": limits, "poison": self.poison,
                                     "urgent": urgent, "parallel": self.parallel_first_load,
                                     "cache_dir": self.cache_dir and str(self.cache_dir),
                                     "known": {p: fp.digest for p, fp in known.items() if fp.digest}}))
            files: list[FileParse] = []
            current: tuple[str, str] | None = None
            try:
                await proc.stdin.drain()
                while True:
                    message = await self._receive(proc, limits.worker_timeout_s)
                    tag = message[0]
                    if tag == "begin":
                        current = (message[1], message[2])
                    elif tag == "same":
                        files.append(known[message[1]])
                    elif tag == "file":
                        files.append(message[1])
                        current = None
                    elif tag == "objects":
                        files[-1].parsed.extend(message[2])
                    elif tag == "cached":
                        self.cached += 1
                    elif tag == "done":
                        return files, message[1]
                    await asyncio.sleep(0)    # let the sessions' timers run between messages
            except (asyncio.IncompleteReadError, TimeoutError, BrokenPipeError,
                    ConnectionResetError) as exc:
                why = "timed out" if isinstance(exc, TimeoutError) else "died"
                await self.close()
                if current is None:
                    raise RuntimeError(f"the configuration parser process {why} between files") \
                        from None
                self.poison[current[0]] = current[1]
                if self.log is not None:
                    self.log.error("configuration parser process failed on a file; it is "
                                   "skipped and its previous objects stay applied",
                                   file=current[0], reason=why)
        raise RuntimeError("the configuration parser process failed 8 times in one load")

    async def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
