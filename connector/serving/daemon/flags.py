"""Every daemon flag, declared once: name, parser, help, roles (``config.py`` merges them).

Its default is the ``DaemonConfig`` field of the same key (``config.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvbridge.connector.serving.daemon.targets import parse_target
from kvbridge.connector.serving.model.config import ModelConfig
from kvbridge.connector.transfer.transport.registry import BACKENDS, LOCAL_MODES
from kvbridge.kernels import BACKENDS as KERNEL_BACKENDS
from kvbridge.topology.layouts import GQA_LAYOUTS

ENV_PREFIX = "KVBRIDGE_"
ROLES = ("prefill", "decode")
LOG_LEVELS = ("debug", "info", "warning", "error")
_MODEL = ModelConfig()


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
        "engine-process",
        str,
        "run the decode engine in its own process, apart from the gRPC/HTTP threads' GIL "
        "(as vLLM's EngineCore): on, off, or auto (on for CPU devices; CUDA: off until "
        "measured on a GPU)",
        choices=("auto", "on", "off"),
        roles=("decode",),
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
