"""LB-IPAM write-back in Kubernetes mode: each Service's allocated addresses go to its
``status.loadBalancer.ingress`` (the status subresource), as Cilium's LB-IPAM does.

The status is also where allocations survive: the allocator restores a Service's addresses from
its status first (agent.controlplane.lbipam), so an agent with an empty state directory — a new
node, a replaced leader — keeps every address a Service already has.

Pure part: :func:`status_patches` (objects + allocations -> the patches that are due). Effect:
:class:`ServiceStatusWriter`, the only writer of Service status.

Without Lease election (not built yet, docs/kubernetes.md) every node writes; they agree, since
every node restores from the same status before allocating anything new, and an unchanged
status is a no-op on the server.
"""

from __future__ import annotations

import asyncio
import time

from agent.log import get_logger

__all__ = ["ServiceStatusWriter", "status_patches"]

log = get_logger("config")

RETRY_S = 5.0          # the same patch again only after this long (the watch had not caught up)


def status_patches(services, allocations: dict[str, tuple[str, ...]]) -> dict[str, dict]:
    """namespace/name -> merge patch of the status subresource, for every Service whose
    ``status.loadBalancer.ingress`` differs from its LB-IPAM allocation."""
    out = {}
    for svc in services:
        key = f"{svc.namespace}/{svc.name}"
        if svc.spec.type != "LoadBalancer" or key not in allocations:
            continue
        want = list(allocations[key])
        if sorted(svc.ingress_ips) != sorted(want):
            out[key] = {"status": {"loadBalancer": {"ingress": [{"ip": ip} for ip in want]}}}
    return out


class ServiceStatusWriter:
    def __init__(self, client, store, controller, *, interval_s: float = 0.5):
        self.client = client
        self.store = store
        self.controller = controller
        self.interval_s = interval_s
        self._sent: dict[str, tuple[str, float]] = {}   # key -> (patch, when)
        self.written = 0

    async def write_once(self) -> None:
        patches = status_patches(self.store.objects().services, self.controller.allocations)
        now = time.monotonic()
        for key, patch in patches.items():
            text = repr(patch)
            sent = self._sent.get(key)
            if sent and sent[0] == text and now - sent[1] < RETRY_S:
                continue
            namespace, name = key.split("/", 1)
            path = f"/api/v1/namespaces/{namespace}/services/{name}/status"
            self._sent[key] = (text, now)
            try:
                await self.client.request_json("PATCH", path, patch,
                                               "application/merge-patch+json")
                self.written += 1
                log.info("Service status written", service=key,
                         ingress=[i["ip"] for i in patch["status"]["loadBalancer"]["ingress"]])
            except Exception as exc:  # noqa: BLE001 - retried after RETRY_S; the agent stays up
                log.warning("could not write the Service status; retrying", service=key,
                            error=str(exc) or repr(exc), retry_s=RETRY_S)
        for key in set(self._sent) - set(patches):
            del self._sent[key]

    async def run(self, stop: asyncio.Event | None = None) -> None:
        while stop is None or not stop.is_set():
            await self.write_once()
            await asyncio.sleep(self.interval_s)
