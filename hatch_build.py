"""Wheel build hook: ship what a checkout makes at run time.

* the gRPC stubs (``agent/api/vipd_pb2*.py``, git-ignored) are generated here with grpcio-tools,
  a build requirement only, so an installed vipd never needs protoc;
* the BPF C sources in ``bpf/`` go into the wheel as ``agent/bpf/`` (the loader looks there
  first), because bcc compiles them on the node when the datapath starts.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

ROOT = Path(__file__).resolve().parent


def _load_gen():
    # By file path: importing the ``agent`` package would pull in its runtime dependencies.
    spec = importlib.util.spec_from_file_location("_vipd_api_gen", ROOT / "agent" / "api" / "gen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class VipdBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        # Editable installs run from the checkout, which generates stubs and finds bpf/ itself.
        if self.target_name != "wheel" or version == "editable":
            return
        self._tmp = tempfile.TemporaryDirectory(prefix="vipd-stubs-")
        for path in _load_gen().generate(Path(self._tmp.name)):
            build_data["force_include"][str(path)] = f"agent/api/{path.name}"
        build_data["force_include"][str(ROOT / "bpf")] = "agent/bpf"

    def finalize(self, version: str, build_data: dict, artifact_path: str) -> None:
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            tmp.cleanup()
