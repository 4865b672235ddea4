"""Compile ``agent/api/vipd.proto`` into ``agent/api/vipd_pb2.py`` and ``vipd_pb2_grpc.py``.

Run as ``python -m agent.api.gen`` (``scripts/install-deps`` does). The generated modules are
git-ignored; :func:`ensure_generated` regenerates them on import when the .proto is newer, so
a fresh checkout works without a manual step.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

API_DIR = Path(__file__).resolve().parent
PROTO = API_DIR / "vipd.proto"
OUTPUTS = (API_DIR / "vipd_pb2.py", API_DIR / "vipd_pb2_grpc.py")


def generate() -> list[Path]:
    """Run protoc (grpc_tools) and fix the generated import to be package-relative."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["grpc_tools.protoc", f"-I{API_DIR}", f"-I{include}", f"--python_out={API_DIR}",
            f"--grpc_python_out={API_DIR}", str(PROTO)]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed ({rc}) for {PROTO}")
    # protoc emits `import vipd_pb2`, which only works with agent/api on sys.path.
    grpc_mod = OUTPUTS[1]
    text = grpc_mod.read_text()
    grpc_mod.write_text(re.sub(r"^import vipd_pb2 as", "from agent.api import vipd_pb2 as", text,
                               flags=re.M))
    return list(OUTPUTS)


def ensure_generated() -> None:
    mtime = PROTO.stat().st_mtime
    if all(p.exists() and p.stat().st_mtime >= mtime for p in OUTPUTS):
        return
    generate()


def main() -> int:
    for path in generate():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
