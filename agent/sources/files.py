"""The file source (vipd's embedded default): a directory of Kubernetes-style YAML manifests.

Every ``*.yaml`` / ``*.yml`` directly in the directory is read (multi-document; other files
and subdirectories are ignored), parsed and validated by :mod:`agent.config`, and installed
into the :class:`~agent.store.Store` as one snapshot. The directory is watched with
``watchfiles``: an edit, a new file or a deleted file produces a new snapshot once the files
have stopped changing (``settle_ms``), no restart needed.

The daemon parses in a separate process (:mod:`agent.config.worker`) under size, depth, alias,
memory and time limits, and hands the results to the event loop in small pieces: no manifest,
however hostile, holds the loop that keeps the BGP sessions alive.

What applies when something is wrong (docs/operations.md, "Bad configuration"): a document that
fails validation is rejected like the API server rejects an invalid ``kubectl apply`` — the
object's previous valid version stays in effect; a file that cannot be read as a whole (syntax,
encoding, a limit, empty) keeps all of its previous objects; a directory beyond the directory
limits keeps the whole previous configuration. Everything else applies.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from agent.config.loader import manifest_files
from agent.config.safeyaml import DEFAULT_LIMITS, Limits
from agent.log import get_logger

__all__ = ["FileSource", "yaml_files", "fingerprint", "validate_dir", "ValidationReport",
           "migrate_files"]

log = get_logger("config")

SUFFIXES = (".yaml", ".yml")
yaml_files = manifest_files


def fingerprint(files: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        try:
            data = p.read_bytes()
        except FileNotFoundError:  # deleted between listing and reading: the watcher fires again
            continue
        h.update(p.name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def _stat_snapshot(directory: Path) -> tuple:
    """(name, size, mtime, inode) of every manifest: equal snapshots = nothing to reload."""
    out = []
    try:
        for p in manifest_files(directory):
            try:
                st = p.stat()
            except OSError:
                continue
            out.append((p.name, st.st_size, st.st_mtime_ns, st.st_ino))
    except OSError:
        return ()
    return tuple(out)


class FileSource:
    """Load ``directory`` into ``store`` (:meth:`reload` in the daemon, :meth:`load` in-process
    for tools and tests) and on every change (:meth:`run`)."""

    def __init__(self, directory: str | Path, store, *, debounce_ms: int = 150,
                 settle_ms: int = 200, limits: Limits = DEFAULT_LIMITS,
                 cache_dir: str | Path | None = None, parser=None):
        from agent.config.loader import ParseCache
        from agent.config.worker import ParserProcess

        self.directory = Path(directory)
        self.store = store
        self.debounce_ms = debounce_ms
        self.settle_ms = settle_ms
        self.limits = limits
        self._last_good: dict[str, dict[str, object]] = {}   # file -> object key -> object
        self._cache = ParseCache()   # unchanged files are not parsed again
        self._parser = parser if parser is not None else ParserProcess(log)   # maybe spawned early
        self._parser.log = log
        # parsed files kept on disk for restarts (agent.config.worker.ParseCacheDir)
        self._parser.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.last_load: dict[str, int] = {}     # files, parsed, cached, unchanged of the last load
        self._lock = asyncio.Lock()
        self._seen_stat: tuple | None = None
        self._logged: set[str] = set()
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ loading

    def load(self) -> bool:
        """Read and validate the directory in this process; True when the store got a new
        snapshot. (The daemon uses :meth:`reload`, which parses in the worker process.)"""
        from agent.config import load_dir

        if not self.directory.is_dir():
            raise FileNotFoundError(f"config directory {self.directory} does not exist")
        t0 = time.monotonic()
        self.last_load = {}
        fp = fingerprint(yaml_files(self.directory))
        if fp == self.store.current.fingerprint:
            return False
        result = load_dir(self.directory, self._cache, self.limits)
        decided = self._decide(result)
        changed = self._install(decided, fp, t0)
        if changed:
            self._log_problems(decided[1], decided[3])
        return changed

    async def reload(self, *, force: bool = False) -> bool:
        """Parse the directory in the worker process and install the result; True when the
        store got a new snapshot. Skipped when no file changed (size, mtime, inode) unless
        ``force``."""
        from agent.config.loader import ConfigError, LoadResult, assemble

        async with self._lock:
            t0 = time.monotonic()
            stat = await asyncio.to_thread(_stat_snapshot, self.directory)
            if not force and stat == self._seen_stat and self.store.current.generation:
                return False
            if not self.directory.is_dir():
                raise FileNotFoundError(f"config directory {self.directory} does not exist")
            known = dict(self._cache.files)
            files, dir_error = await self._parser.parse_dir(
                self.directory, known, self.limits, urgent=not self.store.current.generation)
            self._seen_stat = stat
            unchanged = sum(1 for f in files if known.get(f.path) is f)
            self.last_load = {"files": len(files), "cached": self._parser.cached,
                              "unchanged": unchanged,
                              "parsed": len(files) - unchanged - self._parser.cached}
            if dir_error is not None:
                result = LoadResult(errors=[ConfigError(str(self.directory), 0, None, None, None,
                                                        "", dir_error)], complete=False)
            else:
                # object de-duplication and sorting: Python-level work, so the loop keeps its
                # turns (a thread yields the GIL every few ms)
                result = await asyncio.to_thread(assemble, files, self._cache)
            h = hashlib.sha256()
            for f in files:
                h.update(f.path.encode() + b"\0" + f.digest.encode())
            for e in result.errors:
                h.update(str(e).encode())
            decided = await asyncio.to_thread(self._decide, result)
            changed = self._install(decided, h.hexdigest(), t0)
            if changed:
                await asyncio.to_thread(self._log_problems, decided[1], decided[3])
            return changed

    def request_reload(self) -> None:
        """Reload soon (SIGHUP): a task on the running loop, never a parse in the caller."""
        task = asyncio.get_running_loop().create_task(self._reload_logged(force=True))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload_logged(self, *, force: bool = False) -> None:
        try:
            await self.reload(force=force)
        except Exception as exc:  # noqa: BLE001 - a bad edit must never kill the watcher
            log.error("configuration reload failed; the previous configuration stays applied",
                      dir=str(self.directory), error=str(exc)[:500])

    def _decide(self, result):
        """-> (objects, errors, ignored, kept): what to install. A refused directory keeps the
        whole previous configuration."""
        if not result.complete:
            previous = self.store.current
            objects = previous.objects if previous.objects is not None else result.objects
            kept = tuple(sorted(o.key for o in objects.all()))
            return objects, result.errors, result.ignored, kept
        objects, kept = self._keep_last_good(result)
        return objects, result.errors, result.ignored, kept

    def _install(self, decided, fp: str, t0: float) -> bool:
        objects, errors, ignored, kept = decided
        changed = self.store.replace(objects, errors=errors, ignored=ignored, fingerprint=fp,
                                     source=str(self.directory), kept=kept)
        if changed:
            snap = self.store.current
            log.info("configuration loaded", dir=str(self.directory), generation=snap.generation,
                     objects=sum(1 for _ in objects.all()), errors=len(errors),
                     load_s=round(time.monotonic() - t0, 3), **self.last_load)
        return changed

    def _log_problems(self, errors, kept) -> None:
        """Each problem is logged once, when it appears (not again on every reload), and once
        when it is gone. Thousands of lines when a big file breaks or is fixed: the daemon runs
        this in a thread, never on the event loop."""
        now = {str(e) for e in errors} | {f"kept:{k}" for k in kept}
        for err in errors:
            if str(err) not in self._logged:
                log.warning("invalid configuration rejected", error=str(err))
        for key in kept:
            if f"kept:{key}" not in self._logged:
                log.warning("invalid edit rejected; the previous version stays applied",
                            object=key)
        for gone in sorted(self._logged - now):
            log.info("configuration problem resolved", error=gone.removeprefix("kept:"))
        self._logged = now

    def _keep_last_good(self, result):
        """An invalid edit is rejected the way the Kubernetes API server rejects it: the object's
        previous valid version stays in effect (a file that no longer parses keeps all of its
        previous objects). Deleting a file or an object is always applied."""
        from agent.config import ObjectSet

        current = {o.key: o for o in result.objects.all()}
        file_of = {key: src.rsplit("#", 1)[0] for key, src in result.sources.items()}
        kept: dict[str, object] = {}
        for err in result.errors:
            previous = self._last_good.get(err.file, {})
            if err.kind is None or err.name is None:      # the file (or a document) did not parse
                candidates = previous.items()
            elif err.field.endswith(("kind", "apiVersion")):   # a typo in the kind: same name
                candidates = [(k, o) for k, o in previous.items() if o.name == err.name
                              and (err.namespace is None or o.namespace == err.namespace)]
            else:
                candidates = [(k, o) for k, o in previous.items()
                              if o.KIND == err.kind and o.name == err.name
                              and (err.namespace is None or o.namespace == err.namespace)]
            for key, obj in candidates:
                if key not in current and key not in kept:
                    kept[key] = obj
                    file_of[key] = err.file
        last_good: dict[str, dict[str, object]] = {}
        for key, obj in {**current, **kept}.items():
            last_good.setdefault(file_of.get(key, ""), {})[key] = obj
        self._last_good = last_good
        if not kept:
            return result.objects, ()
        return ObjectSet.from_objects([*current.values(), *kept.values()]), tuple(sorted(kept))

    # ------------------------------------------------------------------ watching

    async def _settled(self) -> None:
        """Wait until no manifest changed for ``settle_ms`` (a file written in several chunks,
        or truncated and then written, is read once complete); at most 5 s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        before = await asyncio.to_thread(_stat_snapshot, self.directory)
        while loop.time() < deadline:
            await asyncio.sleep(self.settle_ms / 1000)
            now = await asyncio.to_thread(_stat_snapshot, self.directory)
            if now == before:
                return
            before = now

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Watch the directory until ``stop`` is set; reload on every change."""
        import watchfiles

        self.directory = self.directory.resolve()
        try:
            # yield_on_timeout: also re-check every 2 s, so a change made before the watcher was
            # armed (or lost by the OS) is picked up. No per-path filter: with 10,000 files
            # changing at once, a Python filter call per path held the loop for ~0.1 s; the stat
            # snapshot in reload() says whether a manifest changed at all.
            async for changes in watchfiles.awatch(self.directory, watch_filter=None,
                                                   debounce=self.debounce_ms, step=50,
                                                   stop_event=stop, recursive=False,
                                                   rust_timeout=2000, yield_on_timeout=True):
                if changes:
                    await self._settled()
                await self._reload_logged()
        finally:
            await self._parser.close()

    async def close(self) -> None:
        await self._parser.close()


# --------------------------------------------------------------------------------------------
# offline tools behind `vipctl config validate` and `vipctl migrate`
# --------------------------------------------------------------------------------------------

@dataclass
class ValidationReport:
    directory: str
    files: list[str] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    issues: list[str] = field(default_factory=list)   # cross-object problems (conditions)

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict:
        return {"directory": self.directory, "ok": self.ok, "files": self.files,
                "objects": self.objects, "errors": self.errors, "ignored": self.ignored,
                "issues": self.issues}

    def text(self) -> str:
        lines = [f"{self.directory}: {len(self.files)} file(s), {len(self.objects)} valid object(s), "
                 f"{len(self.errors)} error(s)"]
        lines += [f"  error: {e}" for e in self.errors]
        lines += [f"  warning: {w}" for w in self.issues]
        lines += [f"  ignored: {i}" for i in self.ignored]
        lines.append("OK" if self.ok else "INVALID")
        return "\n".join(lines) + "\n"


def validate_dir(directory: str | Path, limits: Limits = DEFAULT_LIMITS) -> ValidationReport:
    """Everything the daemon would reject or flag, without a daemon: schema errors per document
    and the status conditions that are True (a missing PeerConfig, a selector matching nothing)."""
    from agent.config.loader import check_dir, load_files

    d = Path(directory)
    report = ValidationReport(str(d))
    if not d.is_dir():
        report.errors.append(f"{d}: not a directory")
        return report
    files = yaml_files(d)
    report.files = [p.name for p in files]
    if not report.files:
        # Most likely a wrong path: the daemon reads only this directory, not subdirectories.
        report.errors.append(f"{d}: no *.yaml or *.yml files (subdirectories are not read)")
        return report
    refused = check_dir(d, files, limits)
    if refused is not None:
        report.errors.append(f"{refused}; vipd would keep its previous configuration")
        return report
    result = load_files(files, limits=limits)
    report.objects = [o.key for o in result.objects.all()]
    report.errors = [str(e) for e in result.errors]
    from agent.config.bfd import bfd_annotation_errors

    report.errors += bfd_annotation_errors(result.objects)
    report.ignored = list(result.ignored)
    from agent.controlplane import cluster_config_conditions, peer_config_conditions

    for getter in (cluster_config_conditions, peer_config_conditions):
        for name, conds in sorted(getter(result.objects).items()):
            report.issues += [f"{name}: {c.type}: {c.message}" for c in conds if c.status == "True"]
    return report


def migrate_files(paths: Iterable[str | Path]) -> str:
    """Legacy CiliumBGPPeeringPolicy / MetalLB ``bgp-config`` -> v2 resources, as YAML text
    (warnings as YAML comments at the top so the output stays applyable)."""
    import yaml

    from agent.controlplane.migrate import migrate

    from agent.config.loader import read_file
    from agent.config.safeyaml import YamlError, decode, load_documents

    documents: list[dict] = []
    for p in paths:
        refused, data = read_file(p)
        if refused is not None:
            raise ValueError(str(refused.errors[0]))
        try:
            docs = load_documents(decode(data))
        except YamlError as exc:
            raise ValueError(f"{p}: {exc}") from None
        for d in docs:
            if d.error is not None:
                raise ValueError(f"{p}: {d.error.field}: {d.error.message}")
            if d.value:
                documents.append(d.value)
    result = migrate(documents)
    header = "".join(f"# warning: {w}\n" for w in result.warnings)
    body = yaml.safe_dump_all(json.loads(json.dumps(result.documents)), sort_keys=False,
                              explicit_start=True)
    return header + body
