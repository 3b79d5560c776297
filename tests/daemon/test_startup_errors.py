"""Start-up errors: one line naming the flag or port, exit code 2, before the model is built.

Every daemon here gets ``--model-path`` of a missing checkpoint: had it built the model
before checking its configuration and binding its ports, it would fail on that path
instead of the error expected.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from kvbridge.connector.serving.cli import build_parser, version

CLI = [sys.executable, "-m", "kvbridge.connector.serving.cli"]
RUNNER = Path(__file__).with_name("startup_runner.py")


@pytest.fixture(scope="module")
def taken_port():
    """A port some other process listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _cases(port: int, tmp: str) -> dict[str, tuple[list[str], str]]:
    base = ["--host", "127.0.0.1", "--model-path", f"{tmp}/no-model", "--insecure"]
    free = ["--grpc-port", "0", "--metrics-port", "0", "--side-port", "0"]
    auth = [
        "--tls-cert", f"{tmp}/missing.crt", "--tls-key", f"{tmp}/missing.key",
        "--auth-token-file", f"{tmp}/t", "--side-secret-file", f"{tmp}/s",
    ]  # fmt: skip
    return {
        "grpc taken": (
            ["prefill", *base, *free, "--grpc-port", str(port)],
            f"--grpc-port {port}: cannot bind 127.0.0.1:{port}: Address already in use",
        ),
        "side taken": (
            ["prefill", *base, *free, "--side-port", str(port)],
            f"--side-port {port}: cannot bind 127.0.0.1:{port}: Address already in use",
        ),
        "metrics taken": (
            ["decode", *base, *free, "--prefill", "127.0.0.1:1", "--metrics-port", str(port)],
            f"--metrics-port {port}: cannot bind 127.0.0.1:{port}: Address already in use",
        ),
        "port range": (
            ["prefill", *base, "--grpc-port", "70000"],
            "argument --grpc-port: '70000': port 70000 is outside 0..65535",
        ),
        "same port": (
            ["prefill", *base, "--grpc-port", "7001", "--metrics-port", "7001"],
            "--metrics-port 7001: the same port as --grpc-port",
        ),
        "no prefill": (["decode", *base, *free], "a decode daemon needs --prefill"),
        "bad prefill": (
            ["decode", *base, *free, "--prefill", "unix:/tmp/x"],
            "argument --prefill: 'unix:/tmp/x'",
        ),
        "unreadable cert": (
            ["prefill", *base[:-1], *free, *auth],
            f"--tls-cert {tmp}/missing.crt: cannot read: No such file or directory",
        ),
    }


def test_startup_errors_are_one_line_with_exit_code_2(taken_port, tmp_path):
    cases = _cases(taken_port, str(tmp_path))
    (tmp_path / "cases.json").write_text(json.dumps({k: argv for k, (argv, _) in cases.items()}))
    subprocess.run(
        [sys.executable, str(RUNNER), str(tmp_path / "cases.json"), str(tmp_path / "out.json")],
        check=True,
        timeout=300,
    )
    results = json.loads((tmp_path / "out.json").read_text())
    for name, (argv, expected) in cases.items():
        r = results[name]
        lines = r["stderr"].strip().splitlines()
        assert r["rc"] == 2, (name, r)
        assert len(lines) == 1 and not r["stdout"], (name, r)
        assert lines[0].startswith(f"kvbridge {argv[0]}: error: "), (name, lines[0])
        assert expected in lines[0], (name, lines[0])


def test_entry_point_as_a_process(taken_port, tmp_path):
    """The real ``python -m`` start (the other cases fork from one imported CLI)."""
    argv, expected = _cases(taken_port, str(tmp_path))["side taken"]
    run = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr.strip() == f"kvbridge prefill: error: {expected}"
    run = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stdout.strip()) == (0, f"kvbridge {version()}")


def test_grouped_help():
    assert version() != "unknown"
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for role in ("prefill", "decode"):
        groups = {g.title: {o for a in g._group_actions for o in a.option_strings}
                  for g in sub[role]._action_groups}  # fmt: skip
        assert {"--grpc-port", "--side-port", "--metrics-port", "--host"} <= groups["network"]
        assert {"--tls-cert", "--insecure"} <= groups["security"]
        assert "--engine-log-level" in groups["lifecycle and logging"]
        assert not groups.get("other"), groups.get("other")  # every flag has its section
        assert ("--prefill" in groups["prefill peers (decode)"]) == (role == "decode")
        help_text = sub[role].format_help()
        assert "network:" in help_text and "model and compute:" in help_text


def test_bench_gets_its_flags_verbatim(monkeypatch):
    from kvbridge.connector.serving import cli

    seen = []
    monkeypatch.setattr(cli, "_run_bench", lambda name, argv: seen.append((name, argv)) or 0)
    assert cli.main(["bench", "transfer", "--layers", "4", "--quick"]) == 0
    assert seen == [("transfer", ["--layers", "4", "--quick"])]
