"""The gRPC server: vipd's API on a unix socket, plus the standard health and reflection services.

The servicer only translates: every answer comes from a *provider* (the daemon) that returns
API messages already built (see :mod:`agent.api.model`), so the server holds no state.

Security: a filesystem socket with mode 0600 in a directory created with mode 0700 (an
abstract socket would have no permissions at all, see grpc doc/naming.md).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from pathlib import Path
from typing import Protocol

import grpc
from grpc_health.v1 import _async as health_async  # the asyncio HealthServicer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agent.api.gen import ensure_generated

ensure_generated()
from agent.api import vipd_pb2, vipd_pb2_grpc  # noqa: E402

from agent.log import get_logger  # noqa: E402

log = get_logger("api")

DEFAULT_SOCKET = "/run/vipd/vipd.sock"
SERVICE_NAME = vipd_pb2.DESCRIPTOR.services_by_name["Vipd"].full_name  # "vipd.v1.Vipd"


class Provider(Protocol):
    def list_peers(self) -> vipd_pb2.ListPeersResponse: ...
    def list_routes(self, request: vipd_pb2.ListRoutesRequest) -> vipd_pb2.ListRoutesResponse: ...
    def list_route_policies(self, request: vipd_pb2.ListRoutePoliciesRequest) -> vipd_pb2.ListRoutePoliciesResponse: ...
    def get_status(self) -> vipd_pb2.GetStatusResponse: ...
    def list_bfd_peers(self) -> vipd_pb2.ListBfdPeersResponse: ...
    async def reset_peers(self, request: vipd_pb2.ResetPeersRequest) -> vipd_pb2.ResetPeersResponse: ...


class VipdServicer(vipd_pb2_grpc.VipdServicer):
    def __init__(self, provider: Provider):
        self.provider = provider

    async def ListPeers(self, request, context):
        return self.provider.list_peers()

    async def ListRoutes(self, request, context):
        if request.table == vipd_pb2.TABLE_TYPE_UNSPECIFIED:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "table must be available or advertised")
        if request.afi not in ("ipv4", "ipv6") or request.safi not in ("unicast",):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"unsupported family {request.afi}/{request.safi}; use ipv4|ipv6 unicast")
        try:
            return self.provider.list_routes(request)
        except LookupError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))

    async def ListRoutePolicies(self, request, context):
        return self.provider.list_route_policies(request)

    async def GetStatus(self, request, context):
        return self.provider.get_status()

    # The load balancer's views read BPF maps (syscalls, up to seconds at 20,000 services):
    # in a worker thread, never on the event loop that keeps the BGP sessions alive.
    async def _datapath(self, context, method: str, *args):
        from agent.api.provider import AnswerTooLarge, DatapathOff

        try:
            return await asyncio.to_thread(getattr(self.provider.lb, method), *args)
        except DatapathOff as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except LookupError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except AnswerTooLarge as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except OSError as exc:   # e.g. a map replaced by a growth reload while it was read
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"reading the datapath maps failed: {exc}; retry")

    async def ListLbServices(self, request, context):
        return await self._datapath(context, "list_lb_services")

    async def ListMaglev(self, request, context):
        return await self._datapath(context, "list_maglev", request)

    async def ListConntrack(self, request, context):
        return await self._datapath(context, "list_conntrack", request)

    async def GetDatapathCounters(self, request, context):
        return await self._datapath(context, "get_datapath_counters")

    async def ListBfdPeers(self, request, context):
        return self.provider.list_bfd_peers()

    async def ResetPeers(self, request, context):
        try:
            return await self.provider.reset_peers(request)
        except LookupError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc).strip("'\""))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))


class SocketInUse(RuntimeError):
    """Another live process serves the API socket."""


def socket_owner(path: Path) -> int | None:
    """The PID of the live process that accepts connections on the unix socket ``path``, or
    None if nothing does (no file, or a stale socket left by an agent that died)."""
    if not (path.exists() or path.is_symlink()):
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:  # ECONNREFUSED: stale; ENOTSOCK etc.: not a socket anyone serves
            return None
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[0]


def _prepare_socket(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pid = socket_owner(path)
    if pid is not None:
        raise SocketInUse(f"another vipd (pid {pid}) serves {path}; stop it first, or give this "
                          "one its own --api-socket and --state-dir")
    if path.exists() or path.is_symlink():
        path.unlink()  # stale: left by an agent that crashed


class ApiServer:
    """``await start()`` binds ``unix://<socket>`` (mode 0600); ``await stop()`` removes it."""

    def __init__(self, provider: Provider, socket_path: str | os.PathLike = DEFAULT_SOCKET):
        self.socket_path = Path(socket_path)
        self.provider = provider
        self.server: grpc.aio.Server | None = None
        self.health: health_async.HealthServicer | None = None

    async def start(self) -> None:
        _prepare_socket(self.socket_path)
        self.server = grpc.aio.server()
        vipd_pb2_grpc.add_VipdServicer_to_server(VipdServicer(self.provider), self.server)
        self.health = health_async.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], self.server)
        # umask covers the window between bind() and chmod(): the socket is never world-usable.
        old = os.umask(0o177)
        try:
            self.server.add_insecure_port(f"unix://{self.socket_path}")
            await self.server.start()
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info("api listening", socket=str(self.socket_path))

    async def stop(self, grace: float = 1.0) -> None:
        if self.server is None:
            return
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        self.server = None
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass
