"""LB-IPAM write-back in Kubernetes mode: each Service's allocated addresses go to its
``status.loadBalancer.ingress`` (the status subresource), as Cilium's LB-IPAM does.

The status is also where allocations survive: the allocator restores a Service's addresses from
its status first (agent.controlplane.lbipam), so an agent with an empty state directory — a new
node, a replaced leader — keeps every address a Service already has.

Pure part: :func:`status_patches` (objects + allocations -> the patches that are due). Effect:
:class:`ServiceStatusWriter`, the only writer of Service status.

One node writes at a time: the holder of the ``vipd-lbipam`` Lease (:class:`LeaseElector`).
Every node still allocates for itself (each announces what it allocated); they agree because
every node restores from the same status before allocating anything new.
"""

from __future__ import annotations

import asyncio
import time

from agent.log import get_logger

__all__ = ["LeaseElector", "ServiceStatusWriter", "status_patches"]

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
    def __init__(self, client, store, controller, *, elector=None, interval_s: float = 0.5):
        self.client = client
        self.elector = elector          # LeaseElector: write only while holding the Lease
        self.store = store
        self.controller = controller
        self.interval_s = interval_s
        self._sent: dict[str, tuple[str, float]] = {}   # key -> (patch, when)
        self.written = 0

    async def write_once(self) -> None:
        if self.elector is not None and not self.elector.is_leader:
            self._sent.clear()
            return
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


# ------------------------------------------------------------------------------ Lease election

LEASE_NAME = "vipd-lbipam"
LEASE_DURATION_S = 15
RENEW_S = 2.0


def _micro_time(t: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    """One writer of Service status at a time: a coordination.k8s.io/v1 Lease, as client-go's
    leader election does it. Expiry is judged by *our* clock from when we last saw the Lease
    change (never by comparing our clock with the holder's timestamps), and every write carries
    the resourceVersion read, so two candidates cannot both take it. A leader that cannot renew
    within the lease duration steps down; a stopping leader releases the Lease at once."""

    def __init__(self, client, identity: str, namespace: str = "kube-system", *,
                 name: str = LEASE_NAME, duration_s: int = LEASE_DURATION_S,
                 renew_s: float = RENEW_S, clock=time.monotonic, wall=time.time):
        self.client = client
        self.identity = identity
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"
        self.collection = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        self.name, self.namespace = name, namespace
        self.duration_s, self.renew_s = duration_s, renew_s
        self.clock, self.wall = clock, wall
        self._observed: tuple[str, float] | None = None   # (resourceVersion, when we saw it)
        self._renewed_at = -1e18
        self._leader = False

    @property
    def is_leader(self) -> bool:
        return self._leader and self.clock() - self._renewed_at < self.duration_s

    def _spec(self, acquire: bool, previous: dict | None = None) -> dict:
        now = _micro_time(self.wall())
        spec = dict(previous or {})
        spec.update({"holderIdentity": self.identity, "leaseDurationSeconds": self.duration_s,
                     "renewTime": now})
        if acquire:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if previous else 0)
        return spec

    async def try_acquire_or_renew(self) -> bool:
        from agent.sources.kubernetes import ApiStatusError

        try:
            lease = await self.client.request_json("GET", self.path)
        except ApiStatusError as exc:
            if exc.code != 404:
                raise
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._spec(True)}
            await self.client.request_json("POST", self.collection, body)
            return True
        meta, spec = lease.get("metadata") or {}, lease.get("spec") or {}
        rv = str(meta.get("resourceVersion", ""))
        if self._observed is None or self._observed[0] != rv:
            self._observed = (rv, self.clock())
        holder = spec.get("holderIdentity") or ""
        mine = holder == self.identity
        expired = self.clock() - self._observed[1] > float(spec.get("leaseDurationSeconds")
                                                           or self.duration_s)
        if not mine and holder and not expired:
            return False
        lease["spec"] = self._spec(not mine, spec)
        await self.client.request_json("PUT", self.path, lease)   # 409 when someone was faster
        return True

    async def run(self, stop: asyncio.Event | None = None) -> None:
        from agent.sources.kubernetes import ApiStatusError

        try:
            while stop is None or not stop.is_set():
                was = self._leader
                try:
                    held = await self.try_acquire_or_renew()
                except ApiStatusError as exc:
                    held = False if exc.code == 409 else None   # 409: another node was faster
                    if held is None:
                        log.warning("Lease election: request failed", lease=self.path,
                                    error=str(exc))
                except (OSError, asyncio.TimeoutError, ValueError) as exc:
                    held = None
                    log.warning("Lease election: request failed", lease=self.path,
                                error=str(exc) or repr(exc))
                if held:
                    self._renewed_at = self.clock()
                # unreachable API server: still the leader until our last renewal expires
                self._leader = bool(held) if held is not None else self.is_leader
                if self._leader != was:
                    log.info("Lease election: this node now writes Service status" if self._leader
                             else "Lease election: lost the Lease; no longer writing Service status",
                             lease=self.path, identity=self.identity)
                await asyncio.sleep(self.renew_s)
        finally:
            await self.release()

    async def release(self) -> None:
        """A stopping leader hands the Lease over at once (holder cleared), as client-go's
        ReleaseOnCancel does, instead of making the others wait out the duration."""
        if not self._leader:
            return
        self._leader = False
        try:
            lease = await self.client.request_json("GET", self.path)
            if (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = ""
                await self.client.request_json("PUT", self.path, lease)
                log.info("Lease election: released the Lease", lease=self.path)
        except Exception as exc:  # noqa: BLE001 - stopping anyway; the Lease expires by itself
            log.warning("Lease election: could not release the Lease", lease=self.path,
                        error=str(exc) or repr(exc))
