"""NOTES.txt (from an offline `helm install --dry-run=client`) says how to send a first request,
with commands the CLIs accept and object names the chart renders."""

from __future__ import annotations

import shlex

import pytest
from deploy_chart import DEPLOY, VALUE_SETS, fullname, load_module, note_commands, notes, render

AUTH_FLAGS = ("--tls-ca", "--tls-cert", "--tls-key", "--auth-token-file")


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_notes_name_rendered_objects(value_set: str) -> None:
    text = notes(value_set)
    r = render(value_set)
    for role in ("prefill", "decode"):
        assert f"statefulset/{fullname()}-{role}" in text
        r.get("StatefulSet", f"{fullname()}-{role}")
    assert f"Service {fullname()} (port {r.values['ports']['grpc']})" in text
    r.get("Service", fullname())
    for line in text.splitlines():
        if "get secret" in line:
            name = shlex.split(line)[shlex.split(line).index("secret") + 1]
            assert r.find("Secret", name) is not None or name in (
                r.values["auth"]["tls"]["existingSecret"],
                r.values["auth"]["token"]["existingSecret"],
            )
    assert ("authentication OFF" in text) == r.values["auth"]["insecure"]


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_notes_healthcheck_command_parses(value_set: str) -> None:
    health = load_module(DEPLOY / "healthcheck.py", "kvbridge_healthcheck")
    commands = note_commands(notes(value_set), "kvbridge-healthcheck")
    assert len(commands) == 1
    args = health.build_parser().parse_args(commands[0])
    assert args.target.endswith(f":{render(value_set).values['ports']['grpc']}")


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_notes_generate_command_parses(value_set: str) -> None:
    """The first-request command is accepted by `kvbridge generate`."""
    from kvbridge.connector.serving.cli import build_parser

    commands = note_commands(notes(value_set), "kvbridge")
    assert len(commands) == 1 and commands[0][0] == "generate"
    args = build_parser().parse_args(commands[0])
    secured = not render(value_set).values["auth"]["insecure"]
    for flag in AUTH_FLAGS:  # the client dials authenticated daemons with the pod's files
        dest = flag[2:].replace("-", "_")
        assert (getattr(args, dest) is not None) == secured, flag
    assert args.prompt and args.target.rsplit(":", 1)[1] == str(
        render(value_set).values["ports"]["grpc"]
    )
