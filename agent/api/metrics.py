"""Prometheus metrics (``vipd run --metrics-addr HOST:PORT``), read from live state at scrape time.

Names and labels copy Cilium's BGP control plane metrics with the ``vipd`` prefix, so Cilium
dashboards port with a prefix swap:

    vipd_bgp_control_plane_session_state{vrouter, neighbor, neighbor_asn}   1 = established
    vipd_bgp_control_plane_advertised_routes{vrouter, neighbor, afi, safi}  only while established
    vipd_bgp_control_plane_received_routes{vrouter, neighbor, afi, safi}    only while established
    vipd_bgp_control_plane_reconcile_errors{reconciler, instance}           current failure streaks
    vipd_config_generation                                                  store generation applied
    vipd_config_errors                                                      config problems now (vipctl status)
    vipd_event_loop_lag_seconds_max                                         longest event-loop stall since start
    vipd_event_loop_busy_lag_seconds_max                                    ... of it, the loop running vipd's code

With the datapath (``--lb-interface``):

    vipd_services_unprogrammed                                   Services with a frontend not programmed
                                                                 (their VIPs are withdrawn)
    vipd_service_frontends_unprogrammed{reason}                  such frontends now, by reason
    vipd_service_program_failures_total{reason}                  frontends that entered that failure
    vipd_datapath_capacity{map}                                  entries the sized maps hold
    vipd_datapath_reloads_total                                  growths (reloads keeping flows)
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from agent.api.model import family_names

__all__ = ["ControllerCollector", "serve_metrics"]

SCRAPE_TIMEOUT = 5.0


class ControllerCollector:
    """Reads the controller at scrape time. The HTTP exporter runs in its own thread, so with
    ``loop`` the reading itself happens on the agent's event loop (no torn reads of state the
    reconcilers are changing)."""

    def __init__(self, controller, loop: asyncio.AbstractEventLoop | None = None):
        self.c = controller
        self.loop = loop

    def collect(self):
        if self.loop is not None and self.loop.is_running():
            async def on_loop():
                return list(self._families())
            yield from asyncio.run_coroutine_threadsafe(on_loop(), self.loop).result(SCRAPE_TIMEOUT)
        else:
            yield from self._families()

    def _families(self):
        state = GaugeMetricFamily("vipd_bgp_control_plane_session_state",
                                  "BGP session state (1 = established, 0 otherwise)",
                                  labels=["vrouter", "neighbor", "neighbor_asn"])
        adv = GaugeMetricFamily("vipd_bgp_control_plane_advertised_routes",
                                "Routes advertised to the neighbor", labels=["vrouter", "neighbor", "afi", "safi"])
        rcv = GaugeMetricFamily("vipd_bgp_control_plane_received_routes",
                                "Routes received from the neighbor", labels=["vrouter", "neighbor", "afi", "safi"])
        for run, st in self.c.peer_states():
            neighbor = f"{st.address}:{st.port}"
            established = st.state == "established"
            state.add_metric([str(run.local_asn), neighbor, str(st.peer_asn)], 1.0 if established else 0.0)
            if not established:
                continue  # Cilium emits route counts only while established
            for fam, counts in (st.families or {}).items():
                afi, safi = family_names(fam)
                adv.add_metric([str(run.local_asn), neighbor, afi, safi], counts.advertised)
                rcv.add_metric([str(run.local_asn), neighbor, afi, safi], counts.received)
        errs = GaugeMetricFamily("vipd_bgp_control_plane_reconcile_errors",
                                 "Consecutive failures of a reconciler (0 = healthy)",
                                 labels=["reconciler", "instance"])
        for rec in self.c.errors.records():
            errs.add_metric([rec.reconciler, rec.instance], rec.attempts)
        gen = GaugeMetricFamily("vipd_config_generation", "Configuration generation last applied")
        gen.add_metric([], self.c.applied_generation)
        cfg = GaugeMetricFamily("vipd_config_errors",
                                "Configuration problems now (invalid documents or files, edits "
                                "rejected with the previous version kept)")
        snap = self.c.store.current
        cfg.add_metric([], len(snap.errors) + len(snap.kept))
        yield from (state, adv, rcv, errs, gen, cfg)
        lag = getattr(self.c, "loop_lag", None)
        if lag is not None:
            g = GaugeMetricFamily("vipd_event_loop_lag_seconds_max",
                                  "Longest the event loop was late since start (BGP timers run on it)")
            g.add_metric([], lag.max_lag)
            b = GaugeMetricFamily("vipd_event_loop_busy_lag_seconds_max",
                                  "Longest event-loop lateness during which the loop's thread was "
                                  "running vipd's code (its own stall, not the machine's load)")
            b.add_metric([], lag.max_busy_lag)
            yield from (g, b)
        svc = getattr(self.c, "services", None)
        if svc is not None:
            yield from _datapath_families(svc)


REASONS = ("CapacityExceeded", "MaglevTableTooSmall", "DatapathError")


def _datapath_families(svc):
    """The ServiceReconciler's view: what is not programmed (and so not announced), and why."""
    unprog = GaugeMetricFamily("vipd_services_unprogrammed",
                               "Services with at least one frontend not programmed in the datapath "
                               "(their VIPs are not announced)")
    unprog.add_metric([], len(svc.unprogrammed_services()))
    now: dict[str, int] = dict.fromkeys(REASONS, 0)
    for f in svc.failed.values():
        now[f.reason] = now.get(f.reason, 0) + 1
    fronts = GaugeMetricFamily("vipd_service_frontends_unprogrammed",
                               "Service frontends (VIP:port/proto) not programmed, by reason", labels=["reason"])
    for reason, n in sorted(now.items()):
        fronts.add_metric([reason], n)
    total = CounterMetricFamily("vipd_service_program_failures",
                                "Frontends that entered a not-programmed state, by reason", labels=["reason"])
    counts = dict.fromkeys(REASONS, 0) | svc.failure_counts
    for reason, n in sorted(counts.items()):
        total.add_metric([reason], n)
    cap = GaugeMetricFamily("vipd_datapath_capacity", "Entries of the datapath's sized maps", labels=["map"])
    for name, value in zip(("services", "backends", "memberships", "maglev_slots"), svc.dp.capacity.astuple()):
        cap.add_metric([name], value)
    reloads = CounterMetricFamily("vipd_datapath_reloads", "Datapath growths (reloads that keep flows)")
    reloads.add_metric([], svc.dp.reloads)
    yield from (unprog, fronts, total, cap, reloads)


def serve_metrics(addr: str, controller, loop: asyncio.AbstractEventLoop | None = None):
    """Start the HTTP exporter in a thread; returns the server (``.shutdown()`` to stop)."""
    from prometheus_client import start_http_server

    host, _, port = addr.rpartition(":")
    registry = CollectorRegistry()
    registry.register(ControllerCollector(controller, loop))
    server, _thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=registry)
    return server
