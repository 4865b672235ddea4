"""The version ``vipd --version``, ``vipctl --version`` and the API report."""

from __future__ import annotations

from pathlib import Path


def version() -> str:
    """The installed distribution's version; "dev" when running from a source checkout."""
    # A checkout (also an editable install) runs code that may differ from any release.
    if (Path(__file__).resolve().parents[1] / "pyproject.toml").exists():
        return "dev"
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        return dist_version("vipd")
    except PackageNotFoundError:
        return "dev"
