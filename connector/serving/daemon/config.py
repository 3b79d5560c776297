"""Daemon configuration: flags > environment (``KVBRIDGE_<FLAG>``) > config file > defaults.

Every daemon flag is declared once in ``FLAGS``, its default once as the field
of the same name in ``DaemonConfig``; ``config_args.add_daemon_arguments`` puts
them on an argparse parser (with ``SUPPRESS`` defaults, so only flags given on
the command line appear in the namespace) and ``resolve_config`` merges the
four sources into a ``DaemonConfig``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kvbridge.connector.serving.daemon.flags import (  # noqa: F401  (re-exported)
    _MODEL,
    ENV_PREFIX,
    FLAG_BY_KEY,
    FLAGS,
    LOG_LEVELS,
    ROLES,
    Flag,
    _bool,
)
from kvbridge.connector.serving.model.config import ModelConfig
from kvbridge.connector.transfer.transport.registry import DEFAULT_BACKEND

#: the listening ports, bound in this order before the model is built (server.py)
PORT_FLAGS = ("grpc-port", "side-port", "metrics-port", "http-port")
# part of the default engine name: a restarted daemon is a new peer even where the
# host name and the PID repeat (PID 1 in a container)
_START_TAG = secrets.token_hex(3)


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid (the message names it)."""


@dataclass(frozen=True)
class DaemonConfig:
    """Resolved configuration of one daemon (field names are the flag keys)."""

    role: str
    host: str = "0.0.0.0"
    advertise_host: str | None = None
    grpc_port: int = 50051
    side_port: int = 5610  # not 5600: vLLM's NIXL side channel default
    metrics_port: int = 9400
    http_port: int = 8000
    served_model_name: str | None = None
    backend: str = DEFAULT_BACKEND
    kv_layout: str = "nhd"
    num_blocks: int = 512
    block_size: int = 16
    device: str = "cpu"
    dtype: str = "float32"
    attention_backend: str = "auto"
    lease_seconds: float = 30.0
    transfer_timeout: float = 10.0
    request_timeout: float = 60.0
    drain_timeout: float = 30.0
    max_requests: int = 256
    torch_threads: int = 1
    max_new_tokens: int = 4096
    engine_name: str | None = None
    ready_file: str | None = None
    pull_retries: int = 1
    engine_drain_seconds: float = 930.0
    guard_bytes: int = 0
    local_transport: str = "auto"
    probe_bytes: int | None = None
    path_warn_fraction: float = 0.25
    expected_bandwidth_gbps: float = 0.0
    transfer_direction: str = "auto"
    degrade: str = ""
    num_layers: int = _MODEL.num_layers
    hidden_size: int = _MODEL.hidden_size
    num_heads: int = _MODEL.num_heads
    num_kv_heads: int = _MODEL.num_kv_heads
    head_dim: int = _MODEL.head_dim
    intermediate_size: int = _MODEL.intermediate_size
    vocab_size: int = _MODEL.vocab_size
    seed: int = _MODEL.seed
    model_path: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    auth_token_file: str | None = None
    side_secret_file: str | None = None
    insecure: bool = False
    log_level: str = "info"
    engine_log_level: str = "warning"
    prefill: list[str] = field(default_factory=list)
    prefill_policy: str = "least-loaded"
    max_batch: int = 64
    max_waiting: int = 256
    cuda_graphs: bool = True
    engine_process: str = "auto"
    stream_interval: int = 1
    prefill_chunk_tokens: int = 0

    @property
    def use_engine_process(self) -> bool:
        """``--engine-process`` resolved: ``auto`` is on for CPU devices."""
        if self.engine_process == "auto":
            return self.role == "decode" and not self.device.startswith("cuda")
        return self.role == "decode" and self.engine_process == "on"

    def model_config(self) -> ModelConfig:
        """The model of these sizes (fields ``ModelConfig`` shares; its own defaults else)."""
        shared = (f.name for f in fields(ModelConfig) if hasattr(self, f.name))
        return ModelConfig(**{name: getattr(self, name) for name in shared})

    @property
    def public_host(self) -> str:
        """Host peers dial: ``advertise_host``, else ``host`` unless it is a wildcard."""
        if self.advertise_host:
            return self.advertise_host
        if self.host in ("0.0.0.0", "::", ""):
            try:
                return socket.gethostbyname(socket.gethostname())
            except OSError:
                return "127.0.0.1"
        return self.host

    @property
    def name(self) -> str:
        return self.engine_name or (
            f"{self.role}-{socket.gethostname()}-{os.getpid()}-{_START_TAG}"
        )


def _convert(flag: Flag, value: Any, source: str) -> Any:
    try:
        if flag.repeat:
            items = value.split(",") if isinstance(value, str) else list(value)
            out = [flag.type(str(v).strip()) for v in items if str(v).strip()]
        elif flag.switch or flag.negatable:
            out = _bool(value)
        elif value is None:
            out = None
        else:
            out = flag.type(value if isinstance(value, str) else str(value))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: invalid value {value!r} for --{flag.name}: {exc}") from None
    if flag.choices and out not in flag.choices:
        raise ConfigError(
            f"{source}: --{flag.name} must be one of {', '.join(flag.choices)}, got {out!r}"
        )
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping of flag keys (``-`` or ``_``) to values."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from None
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml  # PyYAML

            data = yaml.safe_load(text)
    except Exception as exc:  # parser errors differ per format
        raise ConfigError(f"config file {p} is not valid {p.suffix or 'YAML'}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of flag names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve_config(
    role: str,
    args: argparse.Namespace | Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
) -> DaemonConfig:
    """Merge flags > environment > config file > defaults for ``role``."""
    if role not in ROLES:
        raise ConfigError(f"unknown daemon role {role!r}")
    env = os.environ if environ is None else environ
    given = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    values: dict[str, Any] = {}
    config_path = given.pop("config", None) or env.get(ENV_PREFIX + "CONFIG")
    if config_path:
        for key, value in load_config_file(config_path).items():
            flag = FLAG_BY_KEY.get(key)
            if flag is None or role not in flag.roles:
                raise ConfigError(f"config file {config_path}: unknown key {key!r} for {role}")
            values[key] = _convert(flag, value, f"config file {config_path}")
    for flag in FLAGS:
        if role in flag.roles and flag.env in env:
            values[flag.key] = _convert(flag, env[flag.env], f"environment {flag.env}")
    for key, value in given.items():
        flag = FLAG_BY_KEY.get(key)
        if flag is not None and role in flag.roles:
            values[key] = value
    known = {f.name for f in fields(DaemonConfig)}
    cfg = DaemonConfig(role=role, **{k: v for k, v in values.items() if k in known})
    if cfg.vocab_size <= 256 and not cfg.model_path:
        raise ConfigError(f"--vocab-size must exceed 256 (byte tokenizer), got {cfg.vocab_size}")
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ConfigError("--tls-cert and --tls-key must be given together")
    if not 0 <= cfg.pull_retries <= 10:
        raise ConfigError(f"--pull-retries must lie in [0, 10], got {cfg.pull_retries}")
    if cfg.stream_interval > 1024:
        raise ConfigError(f"--stream-interval must be at most 1024, got {cfg.stream_interval}")
    for name in ("max_waiting", "prefill_chunk_tokens"):
        if not 0 <= getattr(cfg, name) <= 1 << 20:
            flag = name.replace("_", "-")
            raise ConfigError(f"--{flag} must lie in [0, 2**20], got {getattr(cfg, name)}")
    if cfg.max_batch > 4096:
        raise ConfigError(f"--max-batch must be at most 4096, got {cfg.max_batch}")
    if not 0 <= cfg.guard_bytes <= 1 << 30:
        raise ConfigError(f"--guard-bytes must lie in [0, 2**30], got {cfg.guard_bytes}")
    if cfg.probe_bytes is not None and not 0 <= cfg.probe_bytes <= 1 << 30:
        raise ConfigError(f"--probe-bytes must lie in [0, 2**30], got {cfg.probe_bytes}")
    if not 0 < cfg.path_warn_fraction <= 1:
        raise ConfigError(f"--path-warn-fraction must lie in (0, 1], got {cfg.path_warn_fraction}")
    if not cfg.expected_bandwidth_gbps >= 0:
        raise ConfigError("--expected-bandwidth-gbps must be >= 0")
    parse_degrade(cfg.degrade)
    return cfg


def check_startup(cfg: DaemonConfig) -> None:
    """What a daemon needs before it binds a port or builds anything (``ConfigError``):
    a decode daemon's ``--prefill``, distinct fixed ports."""
    if cfg.role == "decode" and not cfg.prefill:
        raise ConfigError(
            "a decode daemon needs --prefill (HOST:PORT, dns:///NAME:PORT or ipv4:A:P,B:P)"
        )
    seen: dict[int, str] = {}
    for name in PORT_FLAGS:
        port = getattr(cfg, name.replace("-", "_"))
        if name == "http-port" and (cfg.role != "decode" or port < 0):
            continue  # only a decode daemon serves HTTP
        if port and port in seen:
            raise ConfigError(f"--{name} {port}: the same port as --{seen[port]}")
        seen[port] = name


def parse_degrade(text: str) -> dict[str, float]:
    """``--degrade`` as ``{op: bytes per second}`` (``ConfigError`` naming what is wrong)."""
    out: dict[str, float] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        op, _, rate = item.partition("=")
        try:
            value = float(rate)
        except ValueError:
            value = -1.0
        if op.upper() not in ("READ", "WRITE") or not value >= 0:
            raise ConfigError(f"--degrade: {item!r} is not READ=RATE or WRITE=RATE (RATE >= 0)")
        out[op.upper()] = value
    return out
