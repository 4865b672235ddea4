"""The start-up plan memo (agent/controlplane/startmemo.py): a restart with the same inputs
gets the previous agent's LB-IPAM result, frontends and VIP paths, equal to computing them;
a change of any input (configuration content, LB-IPAM allocations, ClusterConfig order,
agent flags, agent code) or a damaged file is never served from it."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from agent.config.loader import load_dir
from agent.controlplane import startmemo
from agent.lab.scale import NODE_ASN, NODE_IP, NODE_NAME, ROUTER_ASN, ROUTER_IP, bgp_yaml, write_services
from agent.reconcilers.controller import Controller
from agent.reconcilers.errors import ErrorBook
from agent.reconcilers.services import ServiceReconciler
from agent.sources.files import fingerprint, yaml_files
from agent.store import Store

pytestmark = pytest.mark.unit
PODS = [f"10.1.{k}.10" for k in range(4)]


def _config(d, n=30):
    d.mkdir(exist_ok=True)
    write_services(d, n, ports=2, pods=PODS, node_name=NODE_NAME, per_file=10)
    (d / "bgp.yaml").write_text(bgp_yaml(node_name=NODE_NAME, node_ip=NODE_IP, peer_ip=ROUTER_IP,
                                         local_asn=NODE_ASN, peer_asn=ROUTER_ASN))


def _store(d, cache=None) -> Store:
    store = Store()
    store.replace(load_dir(d, cache).objects, source=str(d), fingerprint=fingerprint(yaml_files(d)))
    return store


def _controller(store, state, mode="snat") -> Controller:
    return Controller(NODE_NAME, store, state_dir=state, speaker_factory=None,
                      services=ServiceReconciler(None, NODE_NAME, mode=mode))


def _plan(c: Controller):
    p = c.make_plan()
    p.anticipate_paths()
    return p


def _stopped_agent(store, state, mode="snat"):
    """An agent that planned, persisted its state and wrote the memo when it stopped; -> its plan."""
    c = _controller(store, state, mode)
    p = _plan(c)
    asyncio.run(c.state.apply(p, ErrorBook(), 0.0))
    c.plan = p
    assert c.save_start_memo()
    return p


def _same_outputs(a, b):
    assert a.lbipam == b.lbipam
    assert a.frontends == b.frontends and a.owners == b.owners
    assert a.next_paths.keys() == b.next_paths.keys()
    for key in a.next_paths:
        assert a.next_paths[key].result == b.next_paths[key].result


def test_a_restart_with_the_same_inputs_loads_what_computing_gives(tmp_path):
    cfg, state = tmp_path / "cfg", tmp_path / "state"
    _config(cfg)
    first = _stopped_agent(_store(cfg), state)   # a first start: nothing to load
    assert not first.from_memo

    restarted = _plan(_controller(_store(cfg), state))
    assert restarted.from_memo
    assert all(restarted.next_paths[k] is restarted.stored_paths[k] for k in restarted.next_paths)
    # equal to what the agent computes without the memo, from the same state dir
    startmemo.discard(state)
    without = _plan(_controller(_store(cfg), state))
    assert not without.from_memo
    _same_outputs(restarted, without)
    assert len(without.frontends) == 60


def test_a_change_of_any_input_is_not_served_from_the_memo(tmp_path, monkeypatch):
    cfg, state = tmp_path / "cfg", tmp_path / "state"
    _config(cfg)
    _stopped_agent(_store(cfg), state)
    assert _plan(_controller(_store(cfg), state)).from_memo

    # the configuration: one endpoint moved to another pod while the agent was stopped
    f = cfg / "services-000.yaml"
    text = f.read_text()
    f.write_text(text.replace(f"addresses: [{PODS[1]}]", f"addresses: [{PODS[3]}]", 1))
    moved = _plan(_controller(_store(cfg), state))
    assert not moved.from_memo
    backend = {str(b.addr) for k, s in moved.frontends.items() if moved.owners[k] == "scale/svc-00001"
               for b in s.backends}
    assert backend == {PODS[3]}
    f.write_text(text)
    assert _plan(_controller(_store(cfg), state)).from_memo   # the same content again: the same digest

    # the allocations the state dir holds (an operator edited the file)
    c = _controller(_store(cfg), state)
    allocs = dict(c.state.allocations)
    first = sorted(allocs)[0]
    c.state.allocations = {**allocs, first: ("172.16.200.1",)}
    p = _plan(c)
    assert not p.from_memo and p.allocations[first] == ("172.16.200.1",)

    # the first-seen order of ClusterConfigs
    c = _controller(_store(cfg), state)
    c.state.cluster_config_order = ("other", *c.state.cluster_config_order)
    assert not _plan(c).from_memo

    # the agent's flags (--lb-mode)
    dsr = _plan(_controller(_store(cfg), state, mode="dsr"))
    assert not dsr.from_memo
    assert {s.mode.name for s in dsr.frontends.values()} == {"DSR"}

    # objects kept from an earlier version (a refused edit): the files no longer describe them
    store = _store(cfg)
    snap = store.current
    store._snapshot = dataclasses.replace(snap, kept=("Service/scale/svc-00001",))
    assert not _plan(_controller(store, state)).from_memo

    # the agent's code or version
    with monkeypatch.context() as m:
        m.setattr(startmemo, "code_digest", lambda: "another build")
        assert not _plan(_controller(_store(cfg), state)).from_memo
    assert _plan(_controller(_store(cfg), state)).from_memo


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "other-format", "trailing"])
def test_a_damaged_memo_file_is_recomputed(tmp_path, damage):
    cfg, state = tmp_path / "cfg", tmp_path / "state"
    _config(cfg, n=10)
    _stopped_agent(_store(cfg), state)
    path = state / startmemo.FILE
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": data[:40] + b"\x00junk" * 50,
                      "empty": b"", "other-format": b"vipd-plan-memo 0\n" + data[len(startmemo.FORMAT):],
                      "trailing": data + b"\x80"}[damage])
    p = _plan(_controller(_store(cfg), state))
    assert not p.from_memo and len(p.frontends) == 20


def test_no_memo_is_written_for_a_plan_that_is_not_clean(tmp_path):
    cfg, state = tmp_path / "cfg", tmp_path / "state"
    _config(cfg, n=10)
    _stopped_agent(_store(cfg), state)
    c = _controller(_store(cfg), state)
    p = _plan(c)
    c.plan = dataclasses.replace(p, failures={"services": "boom"})
    assert not c.save_start_memo()
    assert not (state / startmemo.FILE).exists()   # the older memo is removed too


def test_the_pass_after_a_memo_start_stays_incremental(tmp_path, monkeypatch):
    """The plan after one loaded from the memo redoes only what changed (LB-IPAM's shortcut
    needs its own "satisfied" condition back, by identity) and gives what computing gives."""
    from agent.config.loader import ParseCache
    from agent.controlplane import lbipam
    from agent.lab.scale import service_docs

    cfg, state = tmp_path / "cfg", tmp_path / "state"
    _config(cfg)
    _stopped_agent(_store(cfg), state)
    cache = ParseCache()   # unchanged files give the same objects, as in the daemon
    store = _store(cfg, cache)
    c = _controller(store, state)
    c.plan = _plan(c)
    assert c.plan.from_memo
    (cfg / "extra.yaml").write_text(service_docs(99, ports=1, pods=PODS, node_name=NODE_NAME))
    new = _store(cfg, cache)
    store.replace(new.current.objects, source=str(cfg), fingerprint=new.current.fingerprint)
    full = []
    monkeypatch.setattr(lbipam, "allocate", lambda *a, **k: full.append(1) or pytest.fail("full LB-IPAM"))
    after = c.make_plan()
    assert full == [] and "scale/svc-00099" in after.allocations
    monkeypatch.undo()
    startmemo.discard(state)
    computed = _plan(_controller(store, state))
    assert after.allocations == computed.allocations and after.frontends == computed.frontends
