"""Generate the Python stubs of the control API from ``kvbridge/v1/*.proto``.

Run ``python proto/generate.py`` after editing a ``.proto``; the stubs are
committed next to it. ``protoc`` writes absolute imports rooted at the proto
include path (``from kvbridge.v1 import ...``); they are rewritten to the
installed package name ``kvbridge.proto.kvbridge.v1``.
``tests/test_proto_stubs.py`` fails when the committed stubs are stale.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = Path("kvbridge") / "v1"
PYTHON_PACKAGE = "kvbridge.proto.kvbridge.v1"
_IMPORT = re.compile(r"^from kvbridge\.v1 import ", re.MULTILINE)


def proto_files() -> list[Path]:
    """The ``.proto`` files of the API, relative to the proto root."""
    return sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Compile every ``.proto`` into ``out_root/kvbridge/v1`` and fix the imports.

    Returns the generated files.
    """
    import importlib.util

    spec = importlib.util.find_spec("grpc_tools")  # dev dependency (grpcio-tools)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("grpcio-tools is not installed: pip install grpcio-tools")
    include = Path(next(iter(spec.submodule_search_locations))) / "_proto"  # well-known types
    out_root.mkdir(parents=True, exist_ok=True)
    files = [str(p) for p in proto_files()]
    args = [
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *files,
    ]
    # A child process: protoc's extension module carries its own protobuf C++ symbols,
    # which clash with engines (Mooncake) loaded in the same process.
    res = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", *args],
        cwd=PROTO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if res.returncode != 0:
        raise RuntimeError(f"protoc failed ({res.returncode}): {res.stderr.strip()}")
    generated = sorted((out_root / PACKAGE_DIR).glob("*_pb2*.py*"))
    for path in generated:
        text = path.read_text()
        fixed = _IMPORT.sub(f"from {PYTHON_PACKAGE} import ", text)
        if fixed != text:
            path.write_text(fixed)
    return generated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=PROTO_ROOT, help="output root (default: next to the .proto)"
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
