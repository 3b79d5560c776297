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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kvbridge.connector.serving.daemon.targets import parse_target
from kvbridge.connector.serving.model.config import ModelConfig
from kvbridge.connector.transfer.transport.registry import BACKENDS, DEFAULT_BACKEND, LOCAL_MODES
from kvbridge.kernels import BACKENDS as KERNEL_BACKENDS
from kvbridge.topology.layouts import GQA_LAYOUTS

ENV_PREFIX = "KVBRIDGE_"
ROLES = ("prefill", "decode")
LOG_LEVELS = ("debug", "info", "warning", "error")
#: the listening ports, bound in this order before the model is built (server.py)
PORT_FLAGS = ("grpc-port", "side-port", "metrics-port", "http-port")
_MODEL = ModelConfig()
# part of the default engine name: a restarted daemon is a new peer even where the
# host name and the PID repeat (PID 1 in a container)
_START_TAG = secrets.token_hex(3)


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid (the message names it)."""


@dataclass(frozen=True)
class Flag:
    """One daemon flag; its default is the ``DaemonConfig`` field of the same key."""

    name: str  # flag without dashes, e.g. "grpc-port"
    type: Callable[[str], Any]
    help: str
    choices: tuple | None = None
    roles: tuple[str, ...] = ROLES
    repeat: bool = False  # list value, flag repeatable
    switch: bool = False  # boolean store_true flag
    negatable: bool = False  # boolean --NAME / --no-NAME flag

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"port {value} is outside 0..65535")
    return value


def _http_port(text: str) -> int:
    value = int(text)
    if not -1 <= value <= 65535:
        raise ValueError(f"port {value} is outside -1..65535 (-1: no HTTP API)")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"{value} is not a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"{value} is not a positive number")
    return value


def _target(text: str) -> str:
    parse_target(text)  # HOST:PORT, dns:///HOST:PORT, ipv4:/ipv6: lists
    return text.strip()


def _bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{text!r} is not a boolean")


FLAGS: tuple[Flag, ...] = (
    Flag("host", str, "address the gRPC, side-channel and metrics servers bind"),
    Flag("advertise-host", str, "address peers use to reach this daemon (default: host)"),
    Flag("grpc-port", _port, "gRPC control API port (0: pick a free one)"),
    Flag("side-port", _port, "zmq side-channel (handshake) port"),
    Flag("metrics-port", _port, "Prometheus /metrics port (0: pick a free one)"),
    Flag(
        "http-port",
        _http_port,
        "OpenAI-compatible HTTP API port (0: pick a free one, -1: no HTTP API)",
        roles=("decode",),
    ),
    Flag(
        "served-model-name",
        str,
        "model name of the HTTP API (default: basename of --model-path, else kvbridge-embedded)",
        roles=("decode",),
    ),
    Flag("backend", str, "transfer engine", choices=BACKENDS),
    Flag("kv-layout", str, "paged KV cache layout", choices=GQA_LAYOUTS),
    Flag("num-blocks", _positive_int, "KV cache blocks"),
    Flag("block-size", _positive_int, "tokens per KV block"),
    Flag("device", str, "torch device of the model and the cache"),
    Flag("dtype", str, "model and cache dtype", choices=("float32", "float16", "bfloat16")),
    Flag("attention-backend", str, "paged_decode backend", choices=KERNEL_BACKENDS),
    Flag("lease-seconds", _positive_float, "how long prefill blocks stay leased to a peer"),
    Flag("transfer-timeout", _positive_float, "seconds a KV transfer may take"),
    Flag("request-timeout", _positive_float, "seconds a gRPC call to a peer daemon may take"),
    Flag("drain-timeout", _positive_float, "seconds SIGTERM waits for in-flight requests"),
    Flag(
        "max-requests",
        _positive_int,
        "Generate (decode) or Prefill (prefill) calls served at once; more are answered "
        "RESOURCE_EXHAUSTED (health, Stats and Release keep workers of their own)",
    ),
    Flag("torch-threads", int, "torch intra-op threads (0: torch's default)"),
    Flag("max-new-tokens", _positive_int, "largest max_new_tokens a request may ask"),
    Flag(
        "engine-name",
        str,
        "transfer-engine name (default: ROLE-HOST-PID-RANDOM, new at every start)",
    ),
    Flag("ready-file", str, "write bound ports as JSON to this file when serving"),
    Flag(
        "pull-retries",
        int,
        "retries of a failed KV pull while the prefill lease lasts (decode)",
        roles=("decode",),
    ),
    Flag(
        "engine-drain-seconds",
        _positive_float,
        "Mooncake: seconds the blocks of a failed transfer stay quarantined (in-flight "
        "slices may still land; Linux TCP abandons a stalled connection after ~15 min)",
    ),
    Flag(
        "guard-bytes",
        int,
        "debug: poison bands of this many bytes around each cache allocation (Stats checks them)",
    ),
    Flag(
        "local-transport",
        str,
        "same-host peers: 'auto' moves KV with them through the local transport (CUDA IPC, "
        "cma) when both offer it; 'off' uses --backend only (--backend local forces it)",
        choices=LOCAL_MODES,
    ),
    Flag(
        "probe-bytes",
        int,
        "bytes of the path probe at handshake (0: no probe; "
        "default 4 MiB on a GPU, 1 MiB on the host)",
    ),
    Flag(
        "path-warn-fraction",
        _positive_float,
        "warn (and push instead of pulling) when a "
        "direction runs below this fraction of the expected rate",
    ),
    Flag(
        "expected-bandwidth-gbps",
        float,
        "expected GB/s of a peer path (0: the better direction the probe measured)",
    ),
    Flag(
        "transfer-direction",
        str,
        "how the KV moves: 'auto' pulls unless the probe found reads degraded (then the "
        "prefill daemon pushes), 'pull' or 'push' force one",
        choices=("auto", "pull", "push"),
        roles=("decode",),
    ),
    Flag(
        "degrade",
        str,
        "test hook: OP=BYTES_PER_S[,OP=...] throttles this daemon's READ or "
        "WRITE posts (0: they fail), e.g. READ=0",
    ),
    Flag("num-layers", _positive_int, "model layers"),
    Flag("hidden-size", _positive_int, "model hidden size"),
    Flag("num-heads", _positive_int, "attention query heads"),
    Flag("num-kv-heads", _positive_int, "attention KV heads (GQA)"),
    Flag("head-dim", _positive_int, "attention head dim"),
    Flag("intermediate-size", _positive_int, "SwiGLU hidden size"),
    Flag("vocab-size", _positive_int, "vocabulary size (> 256)"),
    Flag("seed", int, "seed of the random model weights"),
    Flag(
        "model-path",
        str,
        "local Hugging Face checkpoint: Llama, Mistral, Qwen2, Qwen3 (config.json, "
        "safetensors, tokenizer.json)",
    ),
    Flag("tls-cert", str, "PEM server certificate"),
    Flag("tls-key", str, "PEM private key of --tls-cert"),
    Flag("tls-ca", str, "PEM CA bundle to verify peers"),
    Flag("auth-token-file", str, "file holding the bearer token of the gRPC API"),
    Flag("side-secret-file", str, "file holding the side-channel HMAC secret"),
    Flag("insecure", _bool, "run without TLS and authentication", switch=True),
    Flag("log-level", str, "log level", choices=LOG_LEVELS),
    Flag(
        "engine-log-level",
        str,
        "log level of the transfer engines and gRPC core (UCX/NIXL, Mooncake glog, "
        "GRPC_VERBOSITY; variables already set in the environment win)",
        choices=LOG_LEVELS,
    ),
    Flag(
        "max-batch",
        _positive_int,
        "most sequences one batched decode step runs (decode); the most prompts one "
        "prefill forward packs (prefill)",
    ),
    Flag(
        "max-waiting",
        int,
        "requests that may wait for free blocks; past it Generate answers RESOURCE_EXHAUSTED",
        roles=("decode",),
    ),
    Flag(
        "cuda-graphs",
        _bool,
        "capture the batched decode step in CUDA graphs per batch-size bucket (CUDA only)",
        roles=("decode",),
        negatable=True,
    ),
    Flag(
        "stream-interval",
        _positive_int,
        "send a stream's tokens every N decode steps (and at its end), as vLLM's and "
        "SGLang's --stream-interval: fewer messages, less Python per token at high "
        "concurrency (decode)",
        roles=("decode",),
    ),
    Flag(
        "prefill-chunk-tokens",
        int,
        "tokens of all prompts together in one prefill forward, as vLLM's "
        "--max-num-batched-tokens (0: 4096 on CUDA, 512 on CPU)",
        roles=("prefill",),
    ),
    Flag(
        "prefill",
        _target,
        "prefill daemons: HOST:PORT, dns:///NAME:PORT (every address it resolves to, "
        "re-resolved) or ipv4:A:PORT,B:PORT (repeatable)",
        roles=("decode",),
        repeat=True,
    ),
    Flag(
        "prefill-policy",
        str,
        "how to pick a prefill daemon",
        choices=("least-loaded", "round-robin"),
        roles=("decode",),
    ),
)
FLAG_BY_KEY = {f.key: f for f in FLAGS}


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
    stream_interval: int = 1
    prefill_chunk_tokens: int = 0

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
