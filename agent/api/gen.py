"""Compile ``agent/api/vipd.proto`` into ``agent/api/vipd_pb2.py`` and ``vipd_pb2_grpc.py``.

Run as ``python -m agent.api.gen`` (``scripts/install-deps`` does). The generated modules are
git-ignored; :func:`ensure_generated` regenerates them on import when the .proto is newer, so
a fresh checkout works without a manual step. A wheel ships them pre-generated (hatch_build.py
calls :func:`generate` with grpcio-tools as a build requirement), so an installed vipd never
needs grpcio-tools.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

API_DIR = Path(__file__).resolve().parent
PROTO = API_DIR / "vipd.proto"
OUTPUTS = (API_DIR / "vipd_pb2.py", API_DIR / "vipd_pb2_grpc.py")


def generate(out_dir: Path = API_DIR) -> list[Path]:
    """Run protoc (grpc_tools) into ``out_dir`` and make the generated import package-relative."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["grpc_tools.protoc", f"-I{API_DIR}", f"-I{include}", f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}", str(PROTO)]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed ({rc}) for {PROTO}")
    outputs = [Path(out_dir) / p.name for p in OUTPUTS]
    # protoc emits `import vipd_pb2`, which only works with agent/api on sys.path.
    grpc_mod = outputs[1]
    text = grpc_mod.read_text()
    grpc_mod.write_text(re.sub(r"^import vipd_pb2 as", "from agent.api import vipd_pb2 as", text,
                               flags=re.M))
    return outputs


def ensure_generated() -> None:
    if all(p.exists() for p in OUTPUTS):
        mtime = PROTO.stat().st_mtime
        if all(p.stat().st_mtime >= mtime for p in OUTPUTS):
            return
        # An installed wheel ships the stubs and no grpcio-tools: its file times say nothing.
        if importlib.util.find_spec("grpc_tools") is None:
            return
    elif importlib.util.find_spec("grpc_tools") is None:
        raise RuntimeError(f"{OUTPUTS[0]} is missing and grpcio-tools is not installed to generate it: "
                           "install vipd from its wheel (which ships the stubs), or run "
                           "scripts/install-deps in a checkout")
    generate()


def main() -> int:
    for path in generate():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
