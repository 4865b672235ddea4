"""Prometheus metrics (``vipd run --metrics-addr HOST:PORT``), read from live state at scrape time.

Names and labels copy Cilium's BGP control plane metrics with the ``vipd`` prefix, so Cilium
dashboards port with a prefix swap:

    vipd_bgp_control_plane_session_state{vrouter, neighbor, neighbor_asn}   1 = established
    vipd_bgp_control_plane_advertised_routes{vrouter, neighbor, afi, safi}  only while established
    vipd_bgp_control_plane_received_routes{vrouter, neighbor, afi, safi}    only while established
    vipd_bgp_control_plane_reconcile_errors{reconciler, instance}           current failure streaks
    vipd_config_generation                                                  store generation applied
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

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
        yield from (state, adv, rcv, errs, gen)


def serve_metrics(addr: str, controller, loop: asyncio.AbstractEventLoop | None = None):
    """Start the HTTP exporter in a thread; returns the server (``.shutdown()`` to stop)."""
    from prometheus_client import start_http_server

    host, _, port = addr.rpartition(":")
    registry = CollectorRegistry()
    registry.register(ControllerCollector(controller, loop))
    server, _thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=registry)
    return server
