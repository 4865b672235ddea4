"""docs/configuration.md documents every field the models accept, under the right kind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.config.loader import KINDS
from agent.config.schema import field_docs

DOC = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"


def sections() -> dict[str, str]:
    text = DOC.read_text()
    parts = re.split(r"^## (\w+)\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_model_field_is_documented(kind):
    section = sections().get(kind)
    assert section is not None, f"docs/configuration.md has no '## {kind}' section"
    documented = set(re.findall(r"^\| `([^`]+)` \|", section, flags=re.M))
    missing = [f.path for f in field_docs(kind) if f.path not in documented
               and not f.path.startswith("status.conditions[].")]
    assert not missing, f"{kind}: undocumented fields {missing}"
    stale = documented - {f.path for f in field_docs(kind)}
    assert not stale, f"{kind}: documented fields the model does not have: {sorted(stale)}"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_documented_defaults_and_bounds_match_the_models(kind):
    rows = {m[0]: m for m in re.findall(
        r"^\| `([^`]+)` \| ([^|]*) \| ([^|]*) \| ((?:[^|\\]|\\\|)*) \|", sections()[kind],
        flags=re.M)}
    for f in field_docs(kind):
        if f.path not in rows:
            continue
        _, _type, default, allowed = rows[f.path]
        assert allowed.strip() == f.bounds, (kind, f.path, allowed, f.bounds)
        if f.default is not None:
            assert default.strip() == f"`{f.default}`", (kind, f.path, default)
