"""The parser's first load (``urgent``) parses the later half of the files in a forked helper
(agent/config/worker.py ``_Helper``): the daemon must receive exactly what one process would
have sent, in the same order; a helper that dies costs time, never a file; the parse cache
gets the helper's files too."""

from __future__ import annotations

import os
import pickle

import pytest

from agent.config import worker
from agent.config.safeyaml import parse_limits
from agent.lab.scale import bgp_yaml, write_services


def _messages(blobs) -> list:
    out = []
    for m in blobs:
        if not isinstance(m, bytes):
            out.append(m)
            continue
        at = 0
        while at < len(m):
            n = worker.body_size(m[at:at + worker.header_size()])
            at += worker.header_size()
            out.append(pickle.loads(m[at:at + n]))
            at += n
    return out


def _load(directory, **request) -> list:
    sent: list = []
    worker.serve_one({"dir": str(directory), "limits": parse_limits([]), **request}, sent.append)
    return _messages(sent)


def _normal(messages) -> list:
    """Messages with each file's objects as one list (chunking is the same, but compare whole)."""
    out = []
    for m in messages:
        if m[0] == "file":
            fp = m[1]
            out.append(("file", fp.path, fp.digest, [str(e) for e in fp.errors], fp.ignored, fp.unusable))
        elif m[0] == "objects":
            out.append(("objects", m[1], [(o.model_dump(), i) for o, i in m[2]]))
        else:
            out.append(m)
    return out


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(worker, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    d = tmp_path / "config"
    d.mkdir()
    write_services(d, 300, ports=2, pods=["10.1.0.10", "10.1.1.10"], node_name="node1", per_file=60)
    (d / "bgp.yaml").write_text(bgp_yaml(node_name="node1", node_ip="10.0.0.2", peer_ip="10.0.0.1",
                                         local_asn=65001, peer_asn=65000))
    (d / "zz-bad.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: 3}\n")
    return d


def _spy(monkeypatch) -> list:
    started = []
    real = worker._Helper.start.__func__

    def start(cls, *args):
        helper = real(cls, *args)
        started.append(helper)
        return helper
    monkeypatch.setattr(worker._Helper, "start", classmethod(start))
    return started


def test_first_load_with_a_helper_sends_what_one_process_sends(config_dir, monkeypatch):
    alone = _normal(_load(config_dir))
    started = _spy(monkeypatch)
    parsed_here = []
    real = worker.parse_frames
    monkeypatch.setattr(worker, "parse_frames", lambda data, path, *a: parsed_here.append(path) or real(data, path, *a))
    together = _normal(_load(config_dir, urgent=True))
    assert started and started[0] is not None and len(started[0].mine) >= 3   # it did take files
    # the worker parsed only its own files: the helper's came from the helper
    assert len(parsed_here) == 7 - len(started[0].mine) and not {p for p, _ in started[0].mine} & set(parsed_here)
    assert together == alone
    files = [m for m in alone if m[0] == "file"]
    assert len(files) == 7 and files[-1][3], files[-1]   # the bad file's errors came through
    assert sum(len(m[2]) for m in alone if m[0] == "objects") == 600 + 5


def test_a_helper_that_dies_costs_no_file(config_dir, monkeypatch):
    alone = _normal(_load(config_dir))

    def dies(cls, fd, theirs, limits):
        os._exit(3)
    monkeypatch.setattr(worker._Helper, "_run", classmethod(dies))
    started = _spy(monkeypatch)
    parsed_here = []
    real = worker.parse_frames
    monkeypatch.setattr(worker, "parse_frames", lambda data, path, *a: parsed_here.append(path) or real(data, path, *a))
    assert _normal(_load(config_dir, urgent=True)) == alone
    assert started[0] is not None and len(parsed_here) == 7   # the worker parsed the helper's files


def test_later_loads_and_small_ones_parse_in_one_process(config_dir, monkeypatch):
    started = _spy(monkeypatch)
    _load(config_dir)                         # not urgent: a reload yields the CPU, no helper
    assert started == []
    _load(config_dir, urgent=True, parallel=False)   # the daemon's first start while a BPF compile runs
    assert started == []
    monkeypatch.setattr(worker, "PARALLEL_MIN_BYTES", 1 << 30)
    _load(config_dir, urgent=True)
    assert started == [None]


def test_the_helpers_files_reach_the_parse_cache(config_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = _normal(_load(config_dir, urgent=True, cache_dir=str(cache)))
    assert len(list(cache.glob("*.parse"))) == 7
    again = _load(config_dir, urgent=True, cache_dir=str(cache))
    assert [m[1] for m in again if m[0] == "cached"] == [str(p) for p in sorted(config_dir.glob("*.yaml"))]
    assert _normal([m for m in again if m[0] != "cached"]) == first
