"""Every rendered daemon container's arguments, env and config file go through the daemons' own
CLI (`kvbridge.connector.serving.cli.build_parser`) and configuration resolver, and every file they
name is mounted from a rendered (or declared existing) Secret or ConfigMap."""

from __future__ import annotations

import argparse
from pathlib import Path, PurePosixPath

import pytest
import yaml
from deploy_chart import VALUE_SETS, Rendered, arg_values, container, fullname, render

ROLES = ("prefill", "decode")
SETS = list(VALUE_SETS)
POD_IP = "10.1.2.3"
FILE_FLAGS = (
    "--config",
    "--tls-cert",
    "--tls-key",
    "--tls-ca",
    "--auth-token-file",
    "--side-secret-file",
)


def _sts(r: Rendered, role: str) -> dict:
    return r.get("StatefulSet", f"{fullname()}-{role}")


def _environ(c: dict) -> dict[str, str]:
    """The container's KVBRIDGE_* env as the kubelet would set it (downward API: a pod IP)."""
    out = {}
    for e in c["env"]:
        if not e["name"].startswith("KVBRIDGE_"):
            continue
        if "value" in e:
            out[e["name"]] = e["value"]
        else:
            assert e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", e
            out[e["name"]] = POD_IP
    return out


def _resolve(r: Rendered, role: str, tmp_path: Path):
    from kvbridge.connector.serving.cli import build_parser
    from kvbridge.connector.serving.daemon.config import resolve_config

    c = container(_sts(r, role))
    parser = build_parser()
    args = parser.parse_args(c["args"])  # SystemExit on any flag the CLI does not know
    assert args.command == role
    # and no flag is an abbreviation that argparse happens to expand
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    exact = set(sub.choices[role]._option_string_actions)
    for a in c["args"]:
        if a.startswith("--"):
            assert a.split("=", 1)[0] in exact, f"{role}: {a} is not an exact flag"
    cm = r.get("ConfigMap", f"{fullname()}-config")
    config_file = tmp_path / f"{role}.yaml"
    config_file.write_text(cm["data"][f"{role}.yaml"])
    assert args.config == f"/etc/kvbridge/config/{role}.yaml"
    given = {k: v for k, v in vars(args).items() if k != "command"}
    given["config"] = str(config_file)
    return resolve_config(role, given, environ=_environ(c))


@pytest.mark.parametrize("value_set", SETS)
@pytest.mark.parametrize("role", ROLES)
def test_daemon_args_parse_and_resolve(value_set: str, role: str, tmp_path: Path) -> None:
    r = render(value_set)
    v = r.values
    cfg = _resolve(r, role, tmp_path)
    c = container(_sts(r, role))
    # flags > env > config file: keys set again by extraEnv / extraArgs are checked elsewhere
    overridden = {n.removeprefix("KVBRIDGE_").lower() for n in _environ(c)}
    overridden |= {a[2:].split("=")[0].replace("-", "_") for a in v[role]["extraArgs"]}
    want = r.role_config(role)
    assert want.keys() - overridden, "nothing left to check"
    for key, value in want.items():
        if key not in overridden:
            assert getattr(cfg, key) == value, key
    assert cfg.role == role
    assert cfg.host == v["bindHost"]
    assert (cfg.grpc_port, cfg.side_port, cfg.metrics_port) == (
        v["ports"]["grpc"], v["ports"]["side"], v["ports"]["metrics"],
    )  # fmt: skip
    assert cfg.advertise_host == POD_IP
    assert cfg.insecure == v["auth"]["insecure"]
    secured = (cfg.tls_cert, cfg.tls_key, cfg.tls_ca, cfg.auth_token_file, cfg.side_secret_file)
    assert all(secured) != v["auth"]["insecure"]
    if role == "decode":
        assert cfg.http_port == v["ports"]["http"]
        assert cfg.prefill == arg_values(container(_sts(r, role))["args"], "--prefill")
        assert cfg.prefill_policy == v["decode"]["prefillPolicy"]
    cfg.model_config()  # the model sizes are consistent (heads divisible, even head_dim)


def test_extra_args_and_env_reach_the_daemon(tmp_path: Path) -> None:
    cfg = _resolve(render("rdma-mooncake"), "decode", tmp_path)
    assert cfg.max_new_tokens == 2048  # decode.extraArgs
    cfg = _resolve(render("existing-secrets"), "decode", tmp_path)
    assert cfg.request_timeout == 120  # decode.extraEnv KVBRIDGE_REQUEST_TIMEOUT
    assert cfg.model_path == "/models/llama"


def test_unknown_extra_arg_is_caught() -> None:
    """The parse check can fail: a flag the CLI does not know is rejected."""
    from kvbridge.connector.serving.cli import build_parser

    r = render("default", ("decode.extraArgs[0]=--no-such-flag",))
    with pytest.raises(SystemExit):
        build_parser().parse_args(container(_sts(r, "decode"))["args"])


@pytest.mark.parametrize("value_set", SETS)
def test_kvbridge_env_names_are_flags(value_set: str) -> None:
    from kvbridge.connector.serving.daemon.config import FLAGS

    r = render(value_set)
    for role in ROLES:
        known = {f.env for f in FLAGS if role in f.roles}
        for name in _environ(container(_sts(r, role))):
            assert name in known, f"{role}: {name} is not a daemon flag"


def test_schema_enums_match_the_cli() -> None:
    """values.schema.json offers exactly the CLI's choices, and only keys the daemons accept."""
    import json

    from deploy_chart import CHART
    from kvbridge.connector.serving.daemon.config import FLAG_BY_KEY

    schema = json.loads((CHART / "values.schema.json").read_text())
    props = schema["definitions"]["daemonConfig"]["properties"]
    for key, prop in props.items():
        flag = FLAG_BY_KEY[key]
        assert flag.roles == ROLES, f"config.{key} must apply to both roles"
        if flag.choices:
            assert set(prop["enum"]) == set(flag.choices), key
    decode = schema["properties"]["decode"]["properties"]
    assert set(decode["prefillPolicy"]["enum"]) == set(FLAG_BY_KEY["prefill_policy"].choices)


def _mounted_source(pod: dict, c: dict, path: str) -> list[tuple[str, str, str]]:
    """(kind, object name, key) behind a file path in the container, from mounts and volumes."""
    p = PurePosixPath(path)
    mounts = [m for m in c["volumeMounts"] if p.is_relative_to(m["mountPath"])]
    assert len(mounts) == 1, f"{path}: not under exactly one volumeMount"
    rel = str(p.relative_to(mounts[0]["mountPath"]))
    vol = next(v for v in pod["volumes"] if v["name"] == mounts[0]["name"])
    sources = []
    if "configMap" in vol:
        sources = [("ConfigMap", vol["configMap"]["name"], vol["configMap"].get("items"))]
    elif "secret" in vol:
        sources = [("Secret", vol["secret"]["secretName"], vol["secret"].get("items"))]
    elif "projected" in vol:
        for s in vol["projected"]["sources"]:
            kind = "Secret" if "secret" in s else "ConfigMap"
            src = s["secret"] if "secret" in s else s["configMap"]
            sources.append((kind, src["name"], src.get("items")))
    found = []
    for kind, name, items in sources:
        if items is None:
            found.append((kind, name, rel))
        found += [(kind, name, it["key"]) for it in items or [] if it["path"] == rel]
    assert found, f"{path}: no volume item provides it"
    return found


@pytest.mark.parametrize("value_set", SETS)
def test_files_named_in_args_are_mounted(value_set: str) -> None:
    r = render(value_set)
    v = r.values
    existing = {
        v["auth"]["tls"]["existingSecret"]: ("tls.crt", "tls.key", "ca.crt"),
        v["auth"]["token"]["existingSecret"]: (v["auth"]["token"]["key"],),
        v["auth"]["sideSecret"]["existingSecret"]: (v["auth"]["sideSecret"]["key"],),
    }
    existing.pop("", None)
    for role in ROLES:
        sts = _sts(r, role)
        pod, c = sts["spec"]["template"]["spec"], container(sts)
        probe = c["livenessProbe"].get("exec", {}).get("command", [])
        flags = [
            (f, p) for f in FILE_FLAGS for p in arg_values(c["args"], f) + arg_values(probe, f)
        ]
        assert len(flags) == (1 if v["auth"]["insecure"] else 10)
        for flag, path in flags:
            ((kind, name, key),) = _mounted_source(pod, c, path)
            obj = r.find(kind, name)
            if obj is not None:
                data = obj.get("data") or {}
                assert key in data, f"{flag}={path}: {kind}/{name} has no key {key!r}"
            else:
                assert kind == "Secret" and key in existing.get(name, ()), (
                    f"{flag}={path}: {kind}/{name} is neither rendered nor a declared existing"
                )
        # secrets are read-only and not world-readable
        for vol in pod["volumes"]:
            if "secret" in vol or "projected" in vol:
                mode = (vol.get("secret") or vol.get("projected"))["defaultMode"]
                assert mode & 0o007 == 0, f"{vol['name']}: mode {oct(mode)}"
        for m in c["volumeMounts"]:
            if m["mountPath"].startswith("/etc/kvbridge"):
                assert m["readOnly"] is True
    if v["auth"]["insecure"]:
        assert not r.of_kind("Secret")


def test_config_file_is_yaml_of_flag_keys() -> None:
    cm = render("rdma-mooncake").get("ConfigMap", f"{fullname()}-config")
    prefill = yaml.safe_load(cm["data"]["prefill.yaml"])
    decode = yaml.safe_load(cm["data"]["decode.yaml"])
    assert prefill["kv_layout"] == "hnd" and decode["kv_layout"] == "interleaved"
    assert prefill["backend"] == decode["backend"] == "mooncake"
    assert "prefill_policy" not in prefill and decode["prefill_policy"] == "least-loaded"
