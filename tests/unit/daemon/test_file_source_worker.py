"""The daemon's way of reading the config directory (FileSource.reload / run): parsing in the
worker process, a file that kills or stalls the worker is reported and skipped while the rest
applies, a file being written is read once complete, and a bad file keeps its last good
objects."""

import asyncio
import os
import time

from agent.config.safeyaml import Limits
from agent.sources.files import FileSource
from agent.store import Store

NODE = "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\n"


def _big_valid(n: int) -> str:
    return "".join(f"---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c{i}, namespace: d}}\n"
                   f"data: {{k: v{i}}}\n" for i in range(n))


def test_a_file_that_stalls_the_parser_is_reported_and_the_others_apply(tmp_path):
    (tmp_path / "a.yaml").write_text(NODE.format(name="n1"))

    async def scenario():
        store = Store()
        # a parser that may be silent for 0.3 s only: a 20,000-document file takes longer
        src = FileSource(tmp_path, store, limits=Limits(worker_timeout_s=0.3))
        assert await src.reload()
        (tmp_path / "b.yaml").write_text(_big_valid(20_000))
        (tmp_path / "c.yaml").write_text(NODE.format(name="n3"))
        t0 = time.monotonic()
        assert await src.reload()
        took = time.monotonic() - t0
        errors = [str(e) for e in store.current.errors]
        assert len(errors) == 1 and "b.yaml" in errors[0] and "parser process died" in errors[0]
        assert sorted(n.name for n in store.current.objects.nodes) == ["n1", "n3"]
        # the next reload does not parse it again (same content): no second timeout
        (tmp_path / "c.yaml").write_text(NODE.format(name="n4"))
        t1 = time.monotonic()
        await src.reload()
        assert time.monotonic() - t1 < took
        assert sorted(n.name for n in store.current.objects.nodes) == ["n1", "n4"]
        await src.close()

    asyncio.run(scenario())


def test_a_file_beyond_the_parsers_memory_keeps_its_previous_objects(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text(NODE.format(name="n1"))

    async def scenario():
        store = Store()
        src = FileSource(tmp_path, store, limits=Limits(worker_memory_bytes=80 * 2**20))
        await src.reload()
        # within the size limits, beyond an 80 MiB parser (~50 MiB of it is the interpreter and
        # yaml_rs); the anchor sends it through libyaml, one document's node graph ~50 MB
        f.write_text(NODE.format(name="n1") + ("---\na: &x [" + "1," * 99_000 + "1]\n") * 5)
        await src.reload()
        (err,) = store.current.errors
        assert "a.yaml" in str(err) and ("memory" in str(err) or "died" in str(err)), str(err)
        assert [n.name for n in store.current.objects.nodes] == ["n1"]
        assert store.current.kept == ("Node/n1",)
        await src.close()

    asyncio.run(scenario())


def test_a_file_written_in_two_chunks_is_applied_once_complete(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text(NODE.format(name="n1") + "---\n" + NODE.format(name="n2"))
    two = NODE.format(name="n1") + "---\n" + NODE.format(name="n2") + "---\n" + NODE.format(name="n3")

    async def scenario():
        store = Store()
        src = FileSource(tmp_path, store, debounce_ms=50, settle_ms=600)
        await src.reload()
        seen: list[list[str]] = []
        stop = asyncio.Event()
        task = asyncio.create_task(src.run(stop))
        await asyncio.sleep(0.3)

        async def watch():
            gen = store.current.generation
            while True:
                snap = await store.wait_for_change(gen)
                gen = snap.generation
                seen.append(sorted(n.name for n in snap.objects.nodes))
        watcher = asyncio.create_task(watch())
        with open(f, "w") as fh:               # truncate, a prefix that is valid YAML, pause
            fh.write(two[:len(NODE.format(name="n1"))])
            fh.flush()
            await asyncio.sleep(0.15)
            fh.write(two[len(NODE.format(name="n1")):])
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        stop.set()
        watcher.cancel()
        await asyncio.wait_for(task, 10)
        assert seen == [["n1", "n2", "n3"]]    # never the half-written ["n1"]

    asyncio.run(scenario())


def test_empty_file_keeps_its_objects_and_deleting_it_removes_them(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text(NODE.format(name="n1"))
    (tmp_path / "b.yaml").write_text(NODE.format(name="n2"))

    async def scenario():
        store = Store()
        src = FileSource(tmp_path, store)
        await src.reload()
        f.write_bytes(b"")
        await src.reload()
        assert sorted(n.name for n in store.current.objects.nodes) == ["n1", "n2"]
        assert "empty" in str(store.current.errors[0])
        os.unlink(f)
        await src.reload()
        assert [n.name for n in store.current.objects.nodes] == ["n2"]
        assert store.current.errors == ()
        await src.close()

    asyncio.run(scenario())


def test_a_directory_beyond_the_file_limit_keeps_the_whole_previous_configuration(tmp_path):
    (tmp_path / "a.yaml").write_text(NODE.format(name="n1"))

    async def scenario():
        store = Store()
        src = FileSource(tmp_path, store, limits=Limits(max_files=3))
        await src.reload()
        for i in range(4):
            (tmp_path / f"x{i}.yaml").write_text(NODE.format(name=f"x{i}"))
        await src.reload()
        assert [n.name for n in store.current.objects.nodes] == ["n1"]
        assert "limit is 3" in str(store.current.errors[0])
        await src.close()

    asyncio.run(scenario())
