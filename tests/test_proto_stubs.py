"""The committed gRPC stubs are in step with the .proto; the .proto passes buf lint."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "proto"
STUB_DIR = PROTO / "kvbridge" / "v1"
# Lines that only record the generator's version (differs between grpcio-tools releases).
_VERSION_LINES = re.compile(
    r"^(# Protobuf Python Version:.*|GRPC_GENERATED_VERSION = .*|\s+\d+,)$", re.MULTILINE
)


def _load_generate():
    spec = importlib.util.spec_from_file_location("kvbridge_proto_generate", PROTO / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _normalize(text: str) -> str:
    return _VERSION_LINES.sub("", text)


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    pytest.importorskip("grpc_tools")
    generated = _load_generate().generate(tmp_path)
    names = sorted(p.name for p in generated)
    assert names == ["kvbridge_pb2.py", "kvbridge_pb2.pyi", "kvbridge_pb2_grpc.py"]
    for path in generated:
        committed = STUB_DIR / path.name
        assert committed.exists(), f"{committed} missing: run python proto/generate.py"
        assert _normalize(committed.read_text()) == _normalize(path.read_text()), (
            f"{committed.name} is stale: run python proto/generate.py"
        )


def test_stubs_import_under_the_package_name_and_serve_every_rpc():
    from kvbridge.proto.kvbridge.v1 import kvbridge_pb2, kvbridge_pb2_grpc

    service = kvbridge_pb2.DESCRIPTOR.services_by_name["KVBridgeService"]
    assert service.full_name == "kvbridge.v1.KVBridgeService"
    assert [m.name for m in service.methods] == ["Prefill", "Generate", "Release", "Stats", "Push"]
    assert service.methods_by_name["Generate"].server_streaming
    assert hasattr(kvbridge_pb2_grpc, "KVBridgeServiceStub")


def test_buf_lint_is_clean():
    local = ROOT / ".tools" / "node_modules" / ".bin" / "buf"
    buf = str(local) if local.exists() else shutil.which("buf")
    if buf is None:
        pytest.skip("buf is not installed (npm install -g @bufbuild/buf)")
    res = subprocess.run([buf, "lint"], cwd=PROTO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
