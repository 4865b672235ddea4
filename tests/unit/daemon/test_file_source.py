"""The file source: every *.yaml/*.yml (multi-document) in the directory, validated, one bad
document never blocking the others, and edits applied from the watcher without a restart."""

import asyncio
import os
import time

from agent.sources.files import FileSource, validate_dir
from agent.store import Store

NODE = """\
apiVersion: v1
kind: Node
metadata:
  name: {name}
  labels: {{rack: {rack}}}
spec:
  podCIDRs: ["{cidr}"]
"""


def node_names(store):
    return sorted(n.name for n in store.current.objects.nodes)


def test_loads_every_yaml_and_yml_multi_document_and_ignores_other_files(tmp_path):
    (tmp_path / "a.yaml").write_text(NODE.format(name="n1", rack="rack0", cidr="10.1.0.0/24") + "---\n" +
                                     NODE.format(name="n2", rack="rack0", cidr="10.1.3.0/24"))
    (tmp_path / "b.yml").write_text(NODE.format(name="n3", rack="rack1", cidr="10.1.2.0/24"))
    (tmp_path / "notes.txt").write_text(NODE.format(name="x", rack="r", cidr="10.9.0.0/24"))
    (tmp_path / ".editor-swap.yaml").write_text(NODE.format(name="y", rack="r", cidr="10.9.1.0/24"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text(NODE.format(name="z", rack="r", cidr="10.9.2.0/24"))
    store = Store()
    assert FileSource(tmp_path, store).load() is True
    assert node_names(store) == ["n1", "n2", "n3"]
    assert store.current.generation == 1 and store.current.errors == ()


def test_bad_document_is_reported_with_file_object_and_field_and_others_apply(tmp_path):
    (tmp_path / "nodes.yaml").write_text(
        NODE.format(name="good", rack="rack0", cidr="10.1.0.0/24") + "---\n" +
        NODE.format(name="bad", rack="rack0", cidr="10.1.0.0/99"))
    store = Store()
    FileSource(tmp_path, store).load()
    assert node_names(store) == ["good"]
    (err,) = store.current.errors
    text = str(err)
    assert "nodes.yaml" in text and "Node/bad" in text and "podCIDRs" in text


def test_unchanged_content_does_not_make_a_new_generation(tmp_path):
    f = tmp_path / "n.yaml"
    f.write_text(NODE.format(name="n1", rack="rack0", cidr="10.1.0.0/24"))
    store = Store()
    src = FileSource(tmp_path, store)
    assert src.load() is True
    os.utime(f, (time.time() + 5, time.time() + 5))
    assert src.load() is False and store.current.generation == 1


def test_watcher_applies_edit_new_file_and_delete_without_restart(tmp_path):
    f = tmp_path / "n.yaml"
    f.write_text(NODE.format(name="n1", rack="rack0", cidr="10.1.0.0/24"))

    async def scenario():
        store = Store()
        src = FileSource(tmp_path, store, debounce_ms=50)
        src.load()
        stop = asyncio.Event()
        task = asyncio.create_task(src.run(stop))
        await asyncio.sleep(0.3)  # watcher armed

        async def change(action, expect):
            gen = store.current.generation
            action()
            snap = await asyncio.wait_for(store.wait_for_change(gen), 10)
            assert sorted(n.name for n in snap.objects.nodes) == expect

        # an atomic replace (write temp + rename), as editors and config management do
        def replace():
            tmp = tmp_path / ".n.yaml.tmp"
            tmp.write_text(NODE.format(name="n1-renamed", rack="rack0", cidr="10.1.0.0/24"))
            os.replace(tmp, f)
        await change(replace, ["n1-renamed"])
        await change(lambda: (tmp_path / "m.yml").write_text(NODE.format(name="n2", rack="r", cidr="10.1.1.0/24")),
                     ["n1-renamed", "n2"])
        await change(f.unlink, ["n2"])
        stop.set()
        await asyncio.wait_for(task, 10)

    asyncio.run(scenario())


def test_validate_dir_reports_errors_offline(tmp_path):
    (tmp_path / "n.yaml").write_text(NODE.format(name="bad", rack="rack0", cidr="not-a-cidr"))
    report = validate_dir(tmp_path)
    assert not report.ok and "n.yaml" in report.errors[0] and "INVALID" in report.text()
    (tmp_path / "n.yaml").write_text(NODE.format(name="good", rack="rack0", cidr="10.1.0.0/24"))
    report = validate_dir(tmp_path)
    assert report.ok and report.objects == ["Node/good"]


PEER = """\
apiVersion: cilium.io/v2
kind: CiliumBGPPeerConfig
metadata: {{name: rr}}
spec:
  timers: {{holdTimeSeconds: {hold}}}
"""


def test_invalid_edit_keeps_the_previous_version_like_the_api_server_would(tmp_path):
    f = tmp_path / "peer.yaml"
    other = tmp_path / "nodes.yaml"
    other.write_text(NODE.format(name="n1", rack="rack0", cidr="10.1.0.0/24"))
    f.write_text(PEER.format(hold=30) + "---\n" + NODE.format(name="n2", rack="r", cidr="10.1.1.0/24"))
    store = Store()
    src = FileSource(tmp_path, store)
    src.load()

    def hold():
        (pc,) = store.current.objects.peer_configs
        return pc.spec.timers.hold_time_seconds
    assert hold() == 30
    # an invalid value: rejected, the old PeerConfig stays, the other document still updates
    f.write_text(PEER.format(hold=1) + "---\n" + NODE.format(name="n2", rack="r2", cidr="10.1.1.0/24"))
    src.load()
    assert hold() == 30 and store.current.kept == ("CiliumBGPPeerConfig/rr",)
    assert "holdTimeSeconds" in str(store.current.errors[0])
    assert store.current.objects.node("n2").metadata.labels == {"rack": "r2"}
    # a file that no longer parses keeps all of its objects
    f.write_text("apiVersion: v1\nkind: [unclosed\n")
    src.load()
    assert hold() == 30 and node_names(store) == ["n1", "n2"]
    assert "invalid YAML" in str(store.current.errors[0])
    # a valid edit applies; a deletion applies
    f.write_text(PEER.format(hold=60))
    src.load()
    assert hold() == 60 and store.current.kept == () and node_names(store) == ["n1"]
    f.unlink()
    src.load()
    assert store.current.objects.peer_configs == ()


def test_validate_dir_without_manifests_is_an_error_naming_the_likely_cause(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.yaml").write_text("apiVersion: v1\nkind: Node\nmetadata: {name: n}\n")
    report = validate_dir(tmp_path)
    assert not report.ok
    assert "no *.yaml or *.yml files" in report.errors[0] and "subdirectories" in report.errors[0]
