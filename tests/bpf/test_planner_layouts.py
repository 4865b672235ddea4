"""The map layouts the planner's unit tests use (tests/unit/datapath/layouts.json, recorded
bcc type descriptions) are the ones a real load reports: otherwise those tests would check
bytes the BPF programs never read."""

import ctypes
import json
from pathlib import Path

from agent.datapath.planner import PLANNED_MAPS, Layouts

FIXTURE = Path(__file__).parents[1] / "unit" / "datapath" / "layouts.json"


def _shape(typ):
    """Size and (name, offset, size) of every field, nested structs flattened."""
    if not hasattr(typ, "_fields_"):
        return ctypes.sizeof(typ), ()
    fields = tuple((f[0], getattr(typ, f[0]).offset, getattr(typ, f[0]).size) for f in typ._fields_)
    return ctypes.sizeof(typ), fields


def test_recorded_layouts_match_the_loaded_maps(module_dp):
    recorded = Layouts.from_descs({k: v for k, v in json.loads(FIXTURE.read_text()).items()
                                   if not k.startswith("_")})
    loaded = Layouts.from_tables(module_dp._loaded.tables)
    for m in PLANNED_MAPS:
        for i, what in enumerate(("key", "value")):
            assert _shape(recorded.types[m.value][i]) == _shape(loaded.types[m.value][i]), \
                f"{m.value} {what}: the recorded layout in {FIXTURE} differs from the loaded map; " \
                "re-record it from the loader child's map specs"
