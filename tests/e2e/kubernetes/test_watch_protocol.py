"""The Kubernetes source against the API server fake on loopback, in-process: what the watch
protocol gives a user — changes made with kubectl reach the store, bookmarks keep an idle
kind's resume point recent (no re-list storm when the server compacts its history), and a
resume point older than the history means a re-list that drops what was deleted meanwhile."""

import asyncio
import os
import shutil
import subprocess

import pytest

from agent import demo
from agent.lab.kubeapi import FakeApiServer, kubeconfig
from agent.sources.kubernetes import ClusterAccess, KubernetesSource
from agent.store import Store

KUBECTL = os.environ.get("VIPD_KUBECTL", "kubectl")


@pytest.fixture
def api(tmp_path):
    if shutil.which(KUBECTL) is None:
        raise RuntimeError(f"{KUBECTL} not found: apt-get install kubernetes-client")
    with FakeApiServer("127.0.0.1", 0, bookmark_interval=0.2) as server:
        (tmp_path / "kubeconfig").write_text(kubeconfig(server.url))
        yield server, tmp_path / "kubeconfig"


def kubectl(kc, *args, manifest=None):
    out = subprocess.run([KUBECTL, "--kubeconfig", str(kc), *args, *(["-f", "-"] if manifest else [])],
                         input=manifest, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


async def until(predicate, timeout=10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.05)


def nodes(store):
    return sorted(n.name for n in store.objects().nodes)


def test_bookmarks_spare_a_relist_and_an_expired_resume_point_relists(api):
    server, kc = api

    async def main():
        kubectl(kc, "apply", "--validate=false", manifest=demo.nodes_yaml())
        store = Store()
        source = KubernetesSource(ClusterAccess.from_kubeconfig(kc), store)
        await source.reload()
        assert len(nodes(store)) == 4
        task = asyncio.create_task(source.run())
        try:
            await asyncio.sleep(1.0)    # every watch open, bookmarks received
            await asyncio.to_thread(kubectl, kc, "delete", "node", "cilium-bgp-worker3")
            await until(lambda: len(nodes(store)) == 3)
            await asyncio.sleep(0.6)    # a bookmark after the delete, on every kind
            # the server forgets its history and drops every watch: resume points from bookmarks
            # are still valid, so no kind (not even the idle ones) has to list again
            server.storage.compact()
            server.storage.close_watches()
            await asyncio.to_thread(kubectl, kc, "delete", "node", "cilium-bgp-worker2")
            await until(lambda: len(nodes(store)) == 2)
            assert source.relists == 0
            # cut off (no bookmarks either) while a Node is deleted and the history compacted:
            # the resumed watch gets 410 Gone, the kind is listed again, the Node is gone
            server.storage.outage_agent, server.storage.outage_until = "vipd", float("inf")
            server.storage.close_watches()
            await asyncio.sleep(0.3)
            await asyncio.to_thread(kubectl, kc, "delete", "node", "cilium-bgp-worker")
            server.storage.compact_after_outage, server.storage.outage_until = True, 0.0
            await until(lambda: nodes(store) == ["cilium-bgp-control-plane"], timeout=20)
            assert source.relists >= 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


def _self_signed(tmp_path):
    """A CA-less self-signed server certificate for 127.0.0.1 (the kubeconfig trusts it)."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
                   check=True, capture_output=True, timeout=60)
    return tmp_path / "cert.pem", tmp_path / "key.pem"


def test_https_with_a_bearer_token_from_the_kubeconfig(tmp_path, caplog):
    if shutil.which(KUBECTL) is None:
        raise RuntimeError(f"{KUBECTL} not found: apt-get install kubernetes-client")
    cert, key = _self_signed(tmp_path)
    with FakeApiServer("127.0.0.1", 0, tls=(str(cert), str(key)), token="s3cret") as server:
        kc = tmp_path / "kubeconfig"
        kc.write_text(kubeconfig(server.url, ca_pem=cert.read_bytes(), token="s3cret"))
        kubectl(kc, "apply", "--validate=false", manifest=demo.nodes_yaml())
        store = Store()
        asyncio.run(KubernetesSource(ClusterAccess.from_kubeconfig(kc), store).reload())
        assert len(nodes(store)) == 4
        # a wrong token is refused, and vipd says so (it keeps retrying: the first list times out)
        kc.write_text(kubeconfig(server.url, ca_pem=cert.read_bytes(), token="wrong"))
        source = KubernetesSource(ClusterAccess.from_kubeconfig(kc), Store())

        async def first_list():
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(source.reload(), 1.5)
        asyncio.run(first_list())
        assert "cannot list from the Kubernetes API server; retrying" in caplog.text
        assert "HTTP 401: Unauthorized" in caplog.text
