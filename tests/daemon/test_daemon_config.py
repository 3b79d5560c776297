"""Configuration precedence (flags > env > file > defaults) and the CLI surface."""

from __future__ import annotations

import json

import pytest
from kvbridge.connector.serving.cli import build_parser
from kvbridge.connector.serving.daemon.config import ConfigError, DaemonConfig, resolve_config


def _args(argv: list[str]):
    ns = build_parser().parse_args(argv)
    del ns.command
    return ns


def test_defaults_without_any_source():
    cfg = resolve_config("decode", _args(["decode"]), environ={})
    assert cfg == DaemonConfig(role="decode")
    assert (cfg.grpc_port, cfg.backend, cfg.kv_layout, cfg.prefill) == (50051, "nixl", "nhd", [])


def test_flag_beats_env_beats_file_beats_default(tmp_path):
    f = tmp_path / "kv.yaml"
    f.write_text(
        "grpc_port: 7001\nside-port: 7002\nmetrics_port: 7003\nkv_layout: packed\n"
        "prefill: [a:1, b:2]\ninsecure: true\n"
    )
    env = {
        "KVBRIDGE_SIDE_PORT": "8002",
        "KVBRIDGE_METRICS_PORT": "8003",
        "KVBRIDGE_CONFIG": str(f),
        "KVBRIDGE_PREFILL_POLICY": "round-robin",
    }
    cfg = resolve_config(
        "decode", _args(["decode", "--metrics-port", "9003", "--prefill", "c:3"]), env
    )
    assert (cfg.grpc_port, cfg.side_port, cfg.metrics_port) == (7001, 8002, 9003)
    assert cfg.kv_layout == "packed" and cfg.insecure is True
    assert cfg.prefill == ["c:3"] and cfg.prefill_policy == "round-robin"
    cfg = resolve_config("decode", _args(["decode"]), {**env, "KVBRIDGE_PREFILL": "x:1, y:2"})
    assert cfg.prefill == ["x:1", "y:2"]


def test_json_config_file_via_flag(tmp_path):
    f = tmp_path / "kv.json"
    f.write_text(json.dumps({"backend": "mooncake", "num_blocks": 64, "lease_seconds": 2.5}))
    cfg = resolve_config("prefill", _args(["prefill", "--config", str(f)]), environ={})
    assert (cfg.backend, cfg.num_blocks, cfg.lease_seconds) == ("mooncake", 64, 2.5)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KVBRIDGE_GRPC_PORT": "70000"}, "KVBRIDGE_GRPC_PORT.*--grpc-port.*outside"),
        ({"KVBRIDGE_BACKEND": "tcp"}, "--backend must be one of nixl, mooncake"),
        ({"KVBRIDGE_NUM_BLOCKS": "-3"}, "--num-blocks"),
        ({"KVBRIDGE_PREFILL": "nohostport"}, "--prefill.*HOST:PORT"),
        ({"KVBRIDGE_INSECURE": "maybe"}, "--insecure"),
        ({"KVBRIDGE_VOCAB_SIZE": "100"}, "--vocab-size must exceed 256"),
    ],
)
def test_bad_env_values_name_the_flag(env, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config("decode", _args(["decode"]), env)


def test_bad_config_files(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("grpc_port: 1\nprefill: [a:1]\n")
    with pytest.raises(ConfigError, match="unknown key 'prefill' for prefill"):
        resolve_config("prefill", _args(["prefill", "--config", str(f)]), {})
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        resolve_config("prefill", _args(["prefill", "--config", str(f)]), {})
    with pytest.raises(ConfigError, match="cannot read"):
        resolve_config("prefill", _args(["prefill", "--config", str(tmp_path / "nope.yaml")]), {})


def test_parser_has_the_documented_flags():
    parser = build_parser()
    flags = [
        "--host",
        "--advertise-host",
        "--grpc-port",
        "--side-port",
        "--metrics-port",
        "--backend",
        "--kv-layout",
        "--num-blocks",
        "--block-size",
        "--device",
        "--lease-seconds",
        "--transfer-timeout",
        "--num-layers",
        "--hidden-size",
        "--num-heads",
        "--num-kv-heads",
        "--head-dim",
        "--intermediate-size",
        "--vocab-size",
        "--seed",
        "--model-path",
        "--tls-cert",
        "--tls-key",
        "--tls-ca",
        "--auth-token-file",
        "--side-secret-file",
        "--log-level",
        "--config",
    ]
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for role in ("prefill", "decode"):
        opts = {o for a in sub[role]._actions for o in a.option_strings}
        assert set(flags) <= opts, set(flags) - opts
        assert "--insecure" in opts
    decode_opts = {o for a in sub["decode"]._actions for o in a.option_strings}
    prefill_opts = {o for a in sub["prefill"]._actions for o in a.option_strings}
    assert {"--prefill", "--prefill-policy"} <= decode_opts - prefill_opts
    assert {"generate", "demo", "bench", "stats"} <= set(sub)
    with pytest.raises(SystemExit):
        parser.parse_args(["decode", "--kv-layout", "mla"])  # not a GQA layout


def test_auth_flags_are_checked_before_anything_starts(tmp_path):
    """Auth is on unless --insecure: partial or contradictory flags are refused up front
    (the full auth behaviour is tested in tests/faults/test_auth.py)."""
    from kvbridge.connector.serving.daemon.server import Daemon

    cert = tmp_path / "c.pem"
    cert.write_text("x")
    args = _args(["prefill", "--tls-cert", str(cert), "--tls-key", str(cert)])
    cfg = resolve_config("prefill", args, environ={})
    with pytest.raises(ConfigError, match="missing --auth-token-file, --side-secret-file"):
        Daemon(cfg)  # refused before anything starts
    args = _args(["prefill", "--insecure", "--auth-token-file", str(cert)])
    with pytest.raises(ConfigError, match="--insecure contradicts --auth-token-file"):
        Daemon(resolve_config("prefill", args, environ={}))
    with pytest.raises(ConfigError, match="together"):
        resolve_config("prefill", _args(["prefill", "--tls-cert", str(cert)]), environ={})


def test_path_flags_parse_and_refuse_bad_values():
    from kvbridge.connector.serving.daemon.config import parse_degrade

    cfg = resolve_config("decode", {}, {"KVBRIDGE_DEGRADE": "read=0, WRITE=1e6",
                                        "KVBRIDGE_TRANSFER_DIRECTION": "push"})  # fmt: skip
    assert parse_degrade(cfg.degrade) == {"READ": 0.0, "WRITE": 1e6}
    assert cfg.transfer_direction == "push" and cfg.local_transport == "auto"
    assert cfg.probe_bytes is None and cfg.path_warn_fraction == 0.25
    for env, message in (
        ({"KVBRIDGE_DEGRADE": "READ=fast"}, "--degrade"),
        ({"KVBRIDGE_DEGRADE": "COPY=1"}, "--degrade"),
        ({"KVBRIDGE_PROBE_BYTES": "-1"}, "--probe-bytes"),
        ({"KVBRIDGE_PATH_WARN_FRACTION": "2"}, "--path-warn-fraction"),
        ({"KVBRIDGE_LOCAL_TRANSPORT": "always"}, "--local-transport"),
    ):
        with pytest.raises(ConfigError, match=message):
            resolve_config("decode", {}, env)
    with pytest.raises(ConfigError, match="--transfer-direction"):
        resolve_config("decode", {}, {"KVBRIDGE_TRANSFER_DIRECTION": "sideways"})


def test_every_daemon_flag_sits_in_a_help_group_once():
    from kvbridge.connector.serving.daemon.config import FLAGS
    from kvbridge.connector.serving.daemon.config_args import FLAG_GROUPS

    grouped = [name for _, names in FLAG_GROUPS for name in names]
    assert len(grouped) == len(set(grouped))
    assert sorted(grouped) == sorted(f.name for f in FLAGS)


def test_stream_interval_flag():
    assert resolve_config("decode", _args(["decode"]), environ={}).stream_interval == 1
    cfg = resolve_config("decode", _args(["decode", "--stream-interval", "4"]), environ={})
    assert cfg.stream_interval == 4
    for bad in ("0", "2000"):
        with pytest.raises(ConfigError, match="--stream-interval"):
            resolve_config("decode", {}, {"KVBRIDGE_STREAM_INTERVAL": bad})
    with pytest.raises(SystemExit):  # a decode-only flag
        _args(["prefill", "--stream-interval", "2"])


def test_prefill_chunk_tokens_flag():
    assert resolve_config("prefill", _args(["prefill"]), environ={}).prefill_chunk_tokens == 0
    cfg = resolve_config("prefill", _args(["prefill", "--prefill-chunk-tokens", "1024"]), {})
    assert cfg.prefill_chunk_tokens == 1024
    with pytest.raises(ConfigError, match="--prefill-chunk-tokens"):
        resolve_config("prefill", {}, {"KVBRIDGE_PREFILL_CHUNK_TOKENS": "-1"})
    with pytest.raises(SystemExit):  # a prefill-only flag
        _args(["decode", "--prefill-chunk-tokens", "2"])
