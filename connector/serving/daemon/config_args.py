"""The daemon flags as ``argparse`` arguments, in ``--help`` groups.

Every flag comes from ``config.FLAGS``; the defaults shown are ``DaemonConfig``'s.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from kvbridge.connector.serving.daemon.config import ENV_PREFIX, FLAGS, DaemonConfig

#: ``--help`` sections of the daemon flags (a flag not listed goes to "other").
FLAG_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("network", ("host", "advertise-host", "grpc-port", "side-port", "metrics-port")),
    ("HTTP API (decode)", ("http-port", "served-model-name")),
    (
        "batching and admission",
        (
            "max-batch",
            "max-waiting",
            "max-requests",
            "cuda-graphs",
            "engine-process",
            "stream-interval",
            "prefill-chunk-tokens",
        ),
    ),
    ("prefill peers (decode)", ("prefill", "prefill-policy", "pull-retries")),
    (
        "security",
        ("tls-cert", "tls-key", "tls-ca", "auth-token-file", "side-secret-file", "insecure"),
    ),
    (
        "transfer and KV cache",
        (
            "backend",
            "kv-layout",
            "num-blocks",
            "block-size",
            "lease-seconds",
            "transfer-timeout",
            "engine-name",
            "engine-drain-seconds",
            "guard-bytes",
        ),
    ),
    (
        "transfer path",
        (
            "local-transport",
            "transfer-direction",
            "probe-bytes",
            "path-warn-fraction",
            "expected-bandwidth-gbps",
            "degrade",
        ),
    ),
    (
        "model and compute",
        (
            "model-path",
            "device",
            "dtype",
            "attention-backend",
            "torch-threads",
            "num-layers",
            "hidden-size",
            "num-heads",
            "num-kv-heads",
            "head-dim",
            "intermediate-size",
            "vocab-size",
            "seed",
            "max-new-tokens",
        ),
    ),
    (
        "lifecycle and logging",
        ("request-timeout", "drain-timeout", "ready-file", "log-level", "engine-log-level"),
    ),
)


def _argparse_type(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """``convert`` whose ``ValueError`` text reaches the user (argparse would say only
    ``invalid _port value``)."""

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None

    parse.__name__ = convert.__name__.strip("_")
    return parse


def add_daemon_arguments(parser: argparse.ArgumentParser, role: str) -> None:
    """Add ``--config`` and every daemon flag of ``role`` to ``parser``, in help groups."""
    groups = {title: parser.add_argument_group(title) for title, _ in FLAG_GROUPS}
    group_of = {name: groups[title] for title, names in FLAG_GROUPS for name in names}
    other = parser.add_argument_group("other")
    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help=f"YAML or JSON file of flag values (keys with '_'); env {ENV_PREFIX}CONFIG",
    )
    defaults = asdict(DaemonConfig(role=role))
    for flag in FLAGS:
        if role not in flag.roles:
            continue
        target = group_of.get(flag.name, other)
        kw: dict[str, Any] = {
            "dest": flag.key,
            "default": argparse.SUPPRESS,
            "help": f"{flag.help} (env {flag.env}; default {defaults[flag.key]!r})",
        }
        if flag.switch:
            target.add_argument(f"--{flag.name}", action="store_true", **kw)
            continue
        if flag.negatable:
            target.add_argument(f"--{flag.name}", action=argparse.BooleanOptionalAction, **kw)
            continue
        kw["type"] = _argparse_type(flag.type)
        if flag.choices:
            kw["choices"] = flag.choices
        if flag.repeat:
            kw["action"] = "append"
        target.add_argument(f"--{flag.name}", **kw)
