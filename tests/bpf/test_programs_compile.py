"""Every program in bpf/ compiles and loads, and xdp_lb stays inside its verifier budget.

A header refactor once broke bpf/xdp_floor.c (the benchmark floors) and no test noticed,
because only xdp_lb.c and tc_lb.c were ever compiled by the suite. This module compiles
every bpf/*.c with the loader's bundling and default -D flags, loads every entry point it
defines (a non-static ``int name(struct xdp_md *ctx)`` or ``int name(struct __sk_buff *ctx)``),
and checks that every function any loader in the repository loads by name exists.

The verifier walks xdp_lb's paths within a 1M-instruction budget ("processed N insns",
bpf_prog_info.verified_insns). A restructuring brought it from 894,835 down to well under
half; XDP_LB_INSNS_CEILING keeps room for features and catches a state explosion early.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from agent.datapath.loader import BPF_DIR, bundle, compile_program, import_bcc, verified_insns
from tests.bpf.conftest import PIN_ROOT, TEST_FEATURES

REPO = Path(__file__).resolve().parents[2]
ENTRY = re.compile(r"^int\s+(\w+)\s*\(\s*struct\s+(xdp_md|__sk_buff)\s*\*", re.M)
LOADED_BY_NAME = re.compile(r'load_func\(\s*b"(\w+)"')

# xdp_lb: 894,835 processed insns before the restructuring (docs/datapath.md, "Verifier").
XDP_LB_INSNS_CEILING = 600_000
# Any program: the kernel's hard limit is 1,000,000; stay clearly below it.
ANY_INSNS_CEILING = 900_000

PROGRAMS = sorted(BPF_DIR.glob("*.c"))


def entry_points(path: Path) -> list[tuple[str, str]]:
    return ENTRY.findall(path.read_text())


def test_every_program_file_defines_entry_points():
    assert PROGRAMS, "no programs found in bpf/"
    for path in PROGRAMS:
        assert entry_points(path), f"{path.name}: no entry point found"


def test_every_function_a_loader_loads_exists():
    defined = {name for path in PROGRAMS for name, _ in entry_points(path)}
    users = [*sorted((REPO / "agent").rglob("*.py")), *sorted((REPO / "benchmarks").glob("*.py"))]
    loaded = {(name, p.relative_to(REPO)) for p in users for name in LOADED_BY_NAME.findall(p.read_text())}
    assert loaded, "found no load_func(b\"...\") call: has the loader changed?"
    missing = sorted(f"{name} (loaded in {where})" for name, where in loaded if name not in defined)
    assert not missing, f"loaded but defined in no bpf/*.c: {missing}"


@pytest.fixture
def pin_dir():
    d = Path(PIN_ROOT) / f"compile-{__import__('os').getpid()}"
    d.mkdir(parents=True, exist_ok=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("path", PROGRAMS, ids=lambda p: p.name)
def test_program_compiles_and_every_entry_point_loads(path, pin_dir):
    bcc = import_bcc()
    prog_type = {"xdp_md": bcc.BPF.XDP, "__sk_buff": bcc.BPF.SCHED_CLS}
    b = compile_program(bundle(path), TEST_FEATURES.defines(pin_dir))
    try:
        for name, ctx in entry_points(path):
            fn = b.load_func(name.encode(), prog_type[ctx])
            n = verified_insns(fn.fd)
            assert 0 < n < ANY_INSNS_CEILING, f"{path.name}:{name}: {n} processed insns"
            if name == "xdp_lb":
                assert n < XDP_LB_INSNS_CEILING, (
                    f"xdp_lb: verifier processed {n} insns, ceiling {XDP_LB_INSNS_CEILING}: a change "
                    "multiplied the verifier's states (see docs/datapath.md, 'Verifier budget')")
    finally:
        b.cleanup()
