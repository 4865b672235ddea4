"""The version ``vipd --version``, ``vipctl --version`` and the API report."""

from __future__ import annotations

from pathlib import Path


def version() -> str:
    """The installed distribution's version; "dev" when running from a source checkout."""
    if (Path(__file__).resolve().parents[1] / ".git").exists():
        return "dev"
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        return dist_version("vipd")
    except PackageNotFoundError:
        return "dev"
