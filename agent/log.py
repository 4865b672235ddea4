"""Logging: structlog configured once for the whole agent.

Every logger carries a ``subsys`` field naming the part of vipd that speaks, so operators
can filter one concern (the same convention as Cilium's ``subsys=bgp-control-plane``):

    bgp-control-plane, datapath, lb, routes, config, api

Output is JSON lines when stdout is not a TTY (journald, kubectl logs, CI) and a coloured
console rendering otherwise. Stdlib loggers (grpc, pyroute2, asyncio) are routed through the
same processors so there is one format.
"""

from __future__ import annotations

import logging
import sys
import tracemalloc

import structlog

SUBSYSTEMS = ("bgp-control-plane", "datapath", "lb", "routes", "config", "host", "api", "daemon", "lab")

_configured = False

# Start-up milestones (and each pass): their log lines carry the process's memory, so a slow or
# fat start can be read from the log (benchmarks/agent_scale.py prints them).
MEMORY_EVENTS = frozenset({"configuration loaded", "datapath loaded", "datapath attached",
                           "services programmed", "session established", "vipd running",
                           "reconcile pass", "heap trimmed", "api listening"})


def add_memory(_logger, _method, event_dict):
    """``rss_mb`` / ``peak_rss_mb`` (VmRSS / VmHWM) on the lines of MEMORY_EVENTS; with
    Python's own ``PYTHONTRACEMALLOC=1`` also where the memory is (see :func:`_traced`)."""
    if event_dict.get("event") in MEMORY_EVENTS:
        if tracemalloc.is_tracing():
            _traced(event_dict)
        try:
            with open("/proc/self/status", "rb") as fh:
                for line in fh:
                    if line.startswith((b"VmRSS:", b"VmHWM:")):
                        key = "rss_mb" if line.startswith(b"VmRSS:") else "peak_rss_mb"
                        event_dict[key] = round(int(line.split()[1]) / 1024, 1)
        except OSError:
            pass
    return event_dict


def _traced(event_dict) -> None:
    """A diagnosis aid (docs/operations.md, "Where the memory goes"): Python-heap MB now
    (``traced_mb``), the peak since the previous milestone (``traced_peak_mb``), and the
    source lines holding most now (``top_allocations``). Slow at scale: not for production."""
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    stats = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]).statistics("lineno")
    event_dict["traced_mb"] = round(current / 2**20, 1)
    event_dict["traced_peak_mb"] = round(peak / 2**20, 1)
    event_dict["top_allocations"] = [f"{'/'.join(s.traceback[0].filename.rsplit('/', 2)[-2:])}:{s.traceback[0].lineno} "
                                     f"{s.size / 2**20:.1f} MB ({s.count})" for s in stats[:12]]


def configure(level: str | int = "INFO", *, json: bool | None = None) -> None:
    """Configure structlog and the stdlib root logger. Idempotent; later calls only change level."""
    global _configured
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    if json is None:
        json = not sys.stdout.isatty()
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_memory,
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    if not _configured:
        root.handlers[:] = [handler]
    root.setLevel(level)
    _configured = True


def get_logger(subsys: str, **bound):
    """A structlog logger bound to ``subsys`` (one of SUBSYSTEMS)."""
    if subsys not in SUBSYSTEMS:
        raise ValueError(f"unknown subsys {subsys!r}; use one of {SUBSYSTEMS}")
    if not _configured:
        configure()
    return structlog.get_logger(f"vipd.{subsys}").bind(subsys=subsys, **bound)
