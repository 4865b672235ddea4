"""The Python mirror of the C constants (agent/datapath/abi.py) agrees with bpf/include/*.h,
and the map layouts bcc derives from structs.h are the ones the docs describe."""

import re

from agent.datapath import abi
from agent.datapath.loader import INCLUDE_DIR

_DEFINE = re.compile(r"^#define\s+([A-Z0-9_]+)\s+(\(1 << \d+\)|0x[0-9a-fA-F]+|\d+)(?=\s|$)", re.M)


def c_defines() -> dict[str, int]:
    out = {}
    for h in ("consts.h", "drop_reasons.h"):
        for name, value in _DEFINE.findall((INCLUDE_DIR / h).read_text()):
            m = re.match(r"\(1 << (\d+)\)", value)
            out[name] = 1 << int(m.group(1)) if m else int(value, 0)
    return out


def _group(defs, prefix, exclude=()):
    return {k[len(prefix):]: v for k, v in defs.items() if k.startswith(prefix) and k not in exclude}


def test_enums_match_c_headers():
    d = c_defines()
    pairs = [
        (abi.SvcFlag, _group(d, "SVC_F_")),
        (abi.BackendFlag, _group(d, "BE_F_")),
        (abi.CtDir, _group(d, "CT_DIR_")),
        (abi.CtFlag, _group(d, "CT_F_")),
        (abi.Hook, {k: v for k, v in _group(d, "HOOK_").items()}),
        (abi.Stat, _group(d, "STAT_")),
        (abi.DropReason, _group(d, "DROP_", exclude=("DROP_MAX",))),
    ]
    for enum_cls, c_side in pairs:
        py_side = {m.name: int(m.value) for m in enum_cls}
        assert py_side == c_side, f"{enum_cls.__name__} differs from the C headers"
    assert abi.NUM_STATS == d["NUM_STATS"] == len(abi.Stat)
    assert abi.DROP_MAX == d["DROP_MAX"]
    assert len(abi.Hook) == d["NUM_HOOKS"]
    for name in ("DSR_IPV4_OPT_TYPE", "DSR_IPV4_OPT_LEN", "DSR_IPV6_OPT_TYPE", "DSR_IPV6_OPT_LEN",
                 "DSR_IPV6_EXT_LEN"):
        assert getattr(abi, name) == d[name], name


def test_map_names_and_layouts_from_bcc(module_dp):
    import ctypes
    sizes = {}
    for name in abi.MapName:
        t = module_dp.table(name)
        sizes[name.value] = (ctypes.sizeof(t.Key), ctypes.sizeof(t.Leaf))
        assert (module_dp.pin_dir / name.value).exists(), f"{name.value} is not pinned"
    # the documented layouts (docs/datapath.md "Maps")
    assert sizes["services_v2"] == (20, 28)
    assert sizes["backends_v2"] == (4, 24)
    assert sizes["svc_backends_v1"] == (8, 4)
    assert sizes["revnat_v1"] == (20, 28)
    assert sizes["maglev_v1"] == (4, 4)
    assert sizes["ct_v2"] == (40, 56)
    assert sizes["src_ranges_v1"] == (24, 1)
    ct = module_dp.table(abi.MapName.CT)
    offsets = {f: getattr(ct.Key, f).offset for f, *_ in ct.Key._fields_}
    assert offsets == {"saddr": 0, "daddr": 16, "sport": 32, "dport": 34, "proto": 36, "family": 37,
                       "dir": 38, "pad": 39}
    # what an established packet reads sits in the value's first 16 bytes (one cache line
    # with the key's tail); the addresses, read on SNAT/reply paths only, come last
    leaf = {f: getattr(ct.Leaf, f).offset for f, *_ in ct.Leaf._fields_}
    assert leaf == {"backend_id": 0, "svc_id": 4, "svc_gen": 8, "flags": 12, "nat_port": 14, "rport": 16,
                    "rdport": 18, "last_seen": 20, "raddr": 24, "rdaddr": 40}
