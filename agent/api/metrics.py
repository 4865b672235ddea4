"""Prometheus metrics (``vipd run --metrics-addr HOST:PORT``), read from live state at scrape time.

Names and labels copy Cilium's BGP control plane metrics with the ``vipd`` prefix, so Cilium
dashboards port with a prefix swap:

    vipd_bgp_control_plane_session_state{vrouter, neighbor, neighbor_asn}   1 = established
    vipd_bgp_control_plane_advertised_routes{vrouter, neighbor, afi, safi}  only while established
    vipd_bgp_control_plane_received_routes{vrouter, neighbor, afi, safi}    only while established
    vipd_bgp_control_plane_reconcile_errors{reconciler, instance}           current failure streaks
    vipd_reconcile_errors_total{reconciler}                                 failures ever (any reconciler)
    vipd_reconcile_failures                                                 reconcilers failing now
    vipd_config_generation                                                  store generation applied
    vipd_config_errors                                                      config problems now (vipctl status)
    vipd_event_loop_lag_seconds_max                                         longest event-loop stall since start
    vipd_event_loop_busy_lag_seconds_max                                    ... of it, the loop running vipd's code
    vipd_kernel_routes{table}     routes vipd owns (--auto-direct-node-routes, --bgp-import-table)

With BFD (the ``vipd.io/bfd`` annotation on a CiliumBGPPeerConfig):

    vipd_bfd_session_state{neighbor, local}                      1 = up, 0 otherwise
    vipd_bfd_session_up_transitions_total{neighbor}              transitions to Up
    vipd_bfd_session_down_transitions_total{neighbor, diagnostic} Up -> Down (last diagnostic)
    vipd_bfd_packets_in_total{neighbor} / _out_total{neighbor}   Control packets
    vipd_bfd_packets_dropped_total{neighbor, reason}             discarded (ttl, bad_length, ...);
                                                                 neighbor="" when no session matched

With the datapath (``--lb-interface``):

    vipd_services_unprogrammed                                   Services with a frontend not programmed
                                                                 (their VIPs are withdrawn)
    vipd_service_frontends_unprogrammed{reason}                  such frontends now, by reason
    vipd_service_program_failures_total{reason}                  frontends that entered that failure
    vipd_datapath_capacity{map}                                  entries the sized maps hold
    vipd_datapath_reloads_total                                  growths (reloads keeping flows)
    vipd_datapath_map_writes_total                               map entries + Maglev slots written by
                                                                 this process (0: a restart wrote nothing)
    vipd_datapath_drops_total{reason}                            packets dropped, by drop reason
    vipd_datapath_packets_total{hook, outcome}                   per-hook outcomes (xdp tx, tc revnat, ...)
    vipd_datapath_conntrack_entries{direction}                   service / reply entries in the CT map
    vipd_service_packets_total{service, frontend}                packets clients sent to a frontend
    vipd_service_bytes_total{service, frontend}                  their bytes (replies are not counted)
      (per-frontend series: 2 per VIP:port; --metrics-per-service=false turns them off on
      nodes with tens of thousands of Services)

The datapath counters are read from the BPF maps in the exporter's thread, not on the event
loop: at 20,000 Services a scrape costs ~20k map lookups.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from agent.api.model import family_names

__all__ = ["ControllerCollector", "DatapathCollector", "serve_metrics"]

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
        for p in self.c.peer_states():
            st, vrouter = p.state, str(p.local_asn)
            neighbor = f"{st.address}:{st.port}"
            established = st.state == "established"
            state.add_metric([vrouter, neighbor, str(st.peer_asn)], 1.0 if established else 0.0)
            if not established:
                continue  # Cilium emits route counts only while established
            for fam, counts in (st.families or {}).items():
                afi, safi = family_names(fam)
                adv.add_metric([vrouter, neighbor, afi, safi], counts.advertised)
                rcv.add_metric([vrouter, neighbor, afi, safi], counts.received)
        errs = GaugeMetricFamily("vipd_bgp_control_plane_reconcile_errors",
                                 "Consecutive failures of a reconciler (0 = healthy)",
                                 labels=["reconciler", "instance"])
        for rec in self.c.errors.records():
            errs.add_metric([rec.reconciler, rec.instance], rec.attempts)
        total = CounterMetricFamily("vipd_reconcile_errors", "Reconcile failures recorded, by reconciler",
                                    labels=["reconciler"])
        for name, n in sorted(self.c.errors.totals.items()):
            total.add_metric([name], n)
        failing = GaugeMetricFamily("vipd_reconcile_failures",
                                    "Reconcile failures now (what vipctl status lists; 0 = healthy)")
        failing.add_metric([], len(self.c.errors.records()))
        gen = GaugeMetricFamily("vipd_config_generation", "Configuration generation last applied")
        gen.add_metric([], self.c.applied_generation)
        cfg = GaugeMetricFamily("vipd_config_errors",
                                "Configuration problems now (invalid documents or files, edits "
                                "rejected with the previous version kept)")
        snap = self.c.store.current
        cfg.add_metric([], len(snap.errors) + len(snap.kept))
        yield from (state, adv, rcv, errs, total, failing, gen, cfg)
        durations = getattr(self.c, "durations", None)
        if durations is not None:
            h = HistogramMetricFamily("vipd_reconcile_duration_seconds",
                                      "Seconds per reconcile pass step: the pure plan and each reconciler",
                                      labels=["reconciler"])
            for name, buckets, total_s in durations.samples():
                h.add_metric([name], buckets, total_s)
            yield h
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
            yield from _datapath_families(svc.view())
        from agent.bfd.transport import existing_manager

        manager = existing_manager()
        if manager is not None:
            yield from _bfd_families(manager)
        routes = getattr(self.c, "routes", None)
        if routes is not None:
            yield _kernel_route_family(routes)


def _bfd_families(manager):
    state = GaugeMetricFamily("vipd_bfd_session_state", "BFD session state (1 = up, 0 otherwise)",
                              labels=["neighbor", "local"])
    ups = CounterMetricFamily("vipd_bfd_session_up_transitions", "BFD transitions to Up", labels=["neighbor"])
    downs = CounterMetricFamily("vipd_bfd_session_down_transitions", "BFD transitions from Up to Down",
                                labels=["neighbor", "diagnostic"])
    pin = CounterMetricFamily("vipd_bfd_packets_in", "BFD Control packets accepted", labels=["neighbor"])
    pout = CounterMetricFamily("vipd_bfd_packets_out", "BFD Control packets sent", labels=["neighbor"])
    drop = CounterMetricFamily("vipd_bfd_packets_dropped", "BFD packets discarded, by reason",
                               labels=["neighbor", "reason"])
    for v in manager.peers():
        state.add_metric([v.peer, v.local], 1.0 if v.state == "up" else 0.0)
        ups.add_metric([v.peer], v.up_transitions)
        downs.add_metric([v.peer, v.last_down_diagnostic], v.down_transitions)
        pin.add_metric([v.peer], v.packets_in)
        pout.add_metric([v.peer], v.packets_out)
        for reason, n in sorted(v.dropped.items()):
            drop.add_metric([v.peer, reason], n)
    for reason, n in sorted(manager.dropped.items()):
        drop.add_metric(["", reason], n)
    yield from (state, ups, downs, pin, pout, drop)


def _kernel_route_family(routes):
    """The RouteReconciler's view: vipd's kernel routes (protocol 241) per table."""
    fam = GaugeMetricFamily("vipd_kernel_routes", "Kernel routes vipd owns (protocol vipd), by table",
                            labels=["table"])
    per_table: dict[int, int] = {}
    for r in routes.installed:
        per_table[r.table] = per_table.get(r.table, 0) + 1
    for table, count in sorted(per_table.items()):
        fam.add_metric([str(table)], count)
    return fam


REASONS = ("CapacityExceeded", "MaglevTableTooSmall", "DatapathError")


def _datapath_families(svc):
    """The services reconciler's view: what is not programmed (and so not announced), and why."""
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
    for name, value in zip(("services", "backends", "memberships", "maglev_slots"), svc.capacity.astuple()):
        cap.add_metric([name], value)
    reloads = CounterMetricFamily("vipd_datapath_reloads", "Datapath growths (reloads that keep flows)")
    reloads.add_metric([], svc.reloads)
    builds = CounterMetricFamily("vipd_maglev_builds", "Maglev lookup tables computed (a table shared by "
                                 "Services with the same backends and size is built once)")
    builds.add_metric([], svc.maglev_builds)
    writes = CounterMetricFamily("vipd_datapath_map_writes", "Map entries and Maglev slots written or deleted "
                                 "by this agent process (0 after a restart that found the maps as configured)")
    writes.add_metric([], getattr(svc, "map_writes", 0))
    yield from (unprog, fronts, total, cap, reloads, builds, writes)


class DatapathCollector:
    """Counters of the BPF maps (drops, hook outcomes, conntrack, per-service traffic)."""

    def __init__(self, controller, *, per_service: bool = True):
        self.c = controller
        self.per_service = per_service

    def collect(self):
        from agent.datapath import inspect

        rec = getattr(self.c, "services", None)
        if rec is None or getattr(rec, "dp", None) is None:
            return
        svc = rec.view()
        dp = svc.maps
        try:
            drops = inspect.read_drops(dp)
            stats = inspect.read_stats(dp)
            ct = inspect.count_conntrack(dp)
            fronts = inspect.read_frontends(dp) if self.per_service else []
            traffic = inspect.read_service_counters(dp, [f.svc_id for f in fronts if not f.wildcard])
        except OSError:   # maps being replaced by a growth reload: skip this scrape's datapath part
            return
        fam = CounterMetricFamily("vipd_datapath_drops", "Packets dropped by the datapath, by reason",
                                  labels=["reason"])
        for reason, n in drops.items():
            fam.add_metric([reason], n)
        yield fam
        fam = CounterMetricFamily("vipd_datapath_packets", "Packets by hook and outcome",
                                  labels=["hook", "outcome"])
        for (hook, outcome), n in stats.items():
            fam.add_metric([hook, outcome], n)
        yield fam
        fam = GaugeMetricFamily("vipd_datapath_conntrack_entries", "Conntrack entries by direction",
                                labels=["direction"])
        for direction, n in ct.items():
            fam.add_metric([direction], n)
        yield fam
        if not self.per_service:
            return
        owners = svc.owners
        pk = CounterMetricFamily("vipd_service_packets", "Packets clients sent to a service frontend",
                                 labels=["service", "frontend"])
        by = CounterMetricFamily("vipd_service_bytes", "Bytes clients sent to a service frontend",
                                 labels=["service", "frontend"])
        for f in fronts:
            if f.wildcard:
                continue
            packets, nbytes = traffic.get(f.svc_id, (0, 0))
            labels = [owners.get(f.key, ""), str(f.key)]
            pk.add_metric(labels, packets)
            by.add_metric(labels, nbytes)
        yield from (pk, by)


def serve_metrics(addr: str, controller, loop: asyncio.AbstractEventLoop | None = None, *,
                  per_service: bool = True):
    """Start the HTTP exporter in a thread; returns the server (``.shutdown()`` to stop)."""
    from prometheus_client import start_http_server

    host, _, port = addr.rpartition(":")
    registry = CollectorRegistry()
    registry.register(ControllerCollector(controller, loop))
    registry.register(DatapathCollector(controller, per_service=per_service))
    server, _thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=registry)
    return server
