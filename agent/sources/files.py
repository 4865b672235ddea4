"""The file source (vipd's embedded default): a directory of Kubernetes-style YAML manifests.

Every ``*.yaml`` / ``*.yml`` directly in the directory is read (multi-document; other files
and subdirectories are ignored), parsed and validated by :mod:`agent.config`, and installed
into the :class:`~agent.store.Store` as one snapshot. The directory is watched with
``watchfiles``: an edit, a new file or a deleted file produces a new snapshot within the
debounce interval, no restart needed. A document that fails validation is reported (file,
object, field path) and rejected like the API server rejects an invalid ``kubectl apply``: the
object's previous valid version stays in effect (a file that no longer parses keeps all of its
previous objects); every other document still applies.

Editors and config-management tools often write a temp file and rename it over the target;
that is one change here. A content fingerprint suppresses no-op reloads (touch, chmod).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from agent.log import get_logger

__all__ = ["FileSource", "yaml_files", "fingerprint", "validate_dir", "ValidationReport",
           "migrate_files"]

log = get_logger("config")

SUFFIXES = (".yaml", ".yml")


def yaml_files(directory: Path) -> list[Path]:
    # Dot files are editors' temp files (and what agent.config.load_dir skips too).
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and p.suffix in SUFFIXES and not p.name.startswith("."))


def fingerprint(files: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        try:
            data = p.read_bytes()
        except FileNotFoundError:  # deleted between listing and reading: the watcher fires again
            continue
        h.update(p.name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


class FileSource:
    """Load ``directory`` into ``store`` now (:meth:`load`) and on every change (:meth:`run`)."""

    def __init__(self, directory: str | Path, store, *, debounce_ms: int = 150):
        self.directory = Path(directory)
        self.store = store
        self.debounce_ms = debounce_ms
        self._last_good: dict[str, dict[str, object]] = {}   # file -> object key -> object
        from agent.config.loader import ParseCache
        self._cache = ParseCache()   # unchanged files are not parsed again

    def load(self) -> bool:
        """Read and validate the directory; True when the store got a new snapshot."""
        from agent.config import load_dir

        if not self.directory.is_dir():
            raise FileNotFoundError(f"config directory {self.directory} does not exist")
        t0 = time.monotonic()
        fp = fingerprint(yaml_files(self.directory))
        if fp == self.store.current.fingerprint:
            return False
        result = load_dir(self.directory, self._cache)
        objects, kept = self._keep_last_good(result)
        changed = self.store.replace(objects, errors=result.errors, ignored=result.ignored,
                                     fingerprint=fp, source=str(self.directory), kept=kept)
        if changed:
            snap = self.store.current
            log.info("configuration loaded", dir=str(self.directory), generation=snap.generation,
                     objects=sum(1 for _ in objects.all()), errors=len(result.errors),
                     load_s=round(time.monotonic() - t0, 3))
            for err in result.errors:
                log.warning("invalid object rejected", error=str(err))
            for key in kept:
                log.warning("invalid edit rejected; the previous version stays applied", object=key)
        return changed

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

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Watch the directory until ``stop`` is set; reload on every change."""
        import watchfiles

        def yaml_only(change, path: str) -> bool:
            p = Path(path)
            return p.suffix in SUFFIXES and not p.name.startswith(".") and p.parent == self.directory

        self.directory = self.directory.resolve()
        # yield_on_timeout: also re-check every 2 s, so a change made before the watcher was
        # armed (or lost by the OS) is picked up; unchanged content is a cheap no-op.
        async for _changes in watchfiles.awatch(self.directory, watch_filter=yaml_only,
                                                debounce=self.debounce_ms, step=50,
                                                stop_event=stop, recursive=False,
                                                rust_timeout=2000, yield_on_timeout=True):
            try:
                self.load()
            except Exception as exc:  # noqa: BLE001 - a bad edit must never kill the watcher
                log.error("configuration reload failed", dir=str(self.directory), error=str(exc))


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


def validate_dir(directory: str | Path) -> ValidationReport:
    """Everything the daemon would reject or flag, without a daemon: schema errors per document
    and the status conditions that are True (a missing PeerConfig, a selector matching nothing)."""
    from agent.config import load_dir

    d = Path(directory)
    report = ValidationReport(str(d))
    if not d.is_dir():
        report.errors.append(f"{d}: not a directory")
        return report
    report.files = [p.name for p in yaml_files(d)]
    if not report.files:
        # Most likely a wrong path: the daemon reads only this directory, not subdirectories.
        report.errors.append(f"{d}: no *.yaml or *.yml files (subdirectories are not read)")
        return report
    result = load_dir(d)
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

    documents: list[dict] = []
    for p in paths:
        with open(p) as fh:
            documents += [d for d in yaml.safe_load_all(fh) if d]
    result = migrate(documents)
    header = "".join(f"# warning: {w}\n" for w in result.warnings)
    body = yaml.safe_dump_all(json.loads(json.dumps(result.documents)), sort_keys=False,
                              explicit_start=True)
    return header + body
