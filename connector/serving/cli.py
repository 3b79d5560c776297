"""The ``kvbridge`` command: daemons, client, demo and benchmarks.

``build_parser()`` is the single source of the command-line interface (the Helm
chart's container arguments are checked against it).
"""

from __future__ import annotations

import argparse
import logging
import os
import runpy
import sys
from importlib import metadata
from pathlib import Path

from kvbridge.connector.serving.daemon.config import ConfigError
from kvbridge.connector.serving.daemon.config_args import add_daemon_arguments
from kvbridge.connector.transfer.transport.registry import BACKENDS, DEFAULT_BACKEND


def _add_client_auth(p: argparse.ArgumentParser) -> None:
    """How a client dials an authenticated daemon (none of them: plaintext)."""
    g = p.add_argument_group("authentication (daemons run without --insecure)")
    g.add_argument("--tls-ca", help="PEM CA bundle to verify the daemon (enables TLS)")
    g.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    g.add_argument("--tls-key", help="PEM private key of --tls-cert")
    g.add_argument("--tls-server-name", default="", help="name expected in the daemon's cert")
    g.add_argument("--auth-token-file", help="file holding the bearer token")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="client: generate through a decode daemon")
    p.add_argument("--target", required=True, help="decode daemon HOST:PORT")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompt-tokens", default=None, help="prompt as comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument(
        "--stop-token-ids",
        default=None,
        help="comma-separated token ids that end generation (besides the model's EOS)",
    )
    p.add_argument("--request-id", default="")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--json", action="store_true", help="print one JSON object per request")
    p.add_argument(
        "--verify-kv", action="store_true", help="check the pulled KV by checksum (costs a copy)"
    )
    _add_client_auth(p)


def _add_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="client: print a daemon's Stats")
    p.add_argument("--target", required=True, help="daemon HOST:PORT")
    p.add_argument("--include-finished", action="store_true")
    p.add_argument("--timeout", type=float, default=10.0)
    _add_client_auth(p)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="local P/D demo on loopback (two daemon processes)")
    p.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND)
    p.add_argument("--prefill-layout", default="packed", help="KV layout of the prefill daemon")
    p.add_argument("--decode-layout", default="nhd", help="KV layout of the decode daemon")
    p.add_argument("--prompt", action="append", default=None, help="prompt text (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument(
        "--stop-token-ids",
        default=None,
        help="comma-separated token ids that end generation (besides the model's EOS)",
    )
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--startup-timeout", type=float, default=60.0)
    p.add_argument("--log-dir", default=None, help="keep the daemons' logs here")


#: ``kvbridge bench NAME`` runs ``bench/NAME.py`` of the source checkout.
BENCHMARKS = {
    "transfer": "KV transfer benchmark (NIXL / Mooncake): coalesced vs per-block vs memcpy",
    "serve": "serving throughput: closed-loop clients vs a prefill + decode daemon pair",
    "open_streams": "health/Stats/Release latency with hundreds of open Generate streams",
    "http_api": "HTTP API overhead: streamed requests over gRPC Generate vs the OpenAI HTTP API",
}


def _bench_script(name: str) -> Path:
    """``bench/NAME.py`` of the checkout this package runs from (benchmarks are not
    part of the installed library; they ship with the source tree)."""
    script = Path(__file__).resolve().parents[2] / "bench" / f"{name}.py"
    if not script.is_file():
        raise FileNotFoundError(
            f"{script} not found: benchmarks ship with the source checkout (pip install -e .)"
        )
    return script


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (bench/*.py of the source checkout)")
    bench = p.add_subparsers(dest="bench", required=True)
    for name, text in BENCHMARKS.items():
        b = bench.add_parser(name, help=text, add_help=False)
        b.add_argument("bench_args", nargs=argparse.REMAINDER, help="the benchmark's own flags")


def _run_bench(name: str, argv: list[str]) -> int:
    """Run ``bench/NAME.py`` as ``__main__`` with ``argv``; its exit code."""
    script = _bench_script(name)
    saved = sys.argv
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line naming the flag (``kvbridge decode: error: ...``), exit 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def version() -> str:
    """The installed kvbridge version."""
    try:
        return metadata.version("kvbridge")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The parser of every ``kvbridge`` subcommand."""
    parser = OneLineParser(prog="kvbridge", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"kvbridge {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for role, text in (("prefill", "prefill daemon"), ("decode", "decode daemon")):
        add_daemon_arguments(sub.add_parser(role, help=text), role)
    _add_generate(sub)
    _add_stats(sub)
    _add_demo(sub)
    _add_bench(sub)
    return parser


def _run_daemon(role: str, args: argparse.Namespace) -> int:
    """Run a daemon and leave the process with its exit code (never returns)."""
    from kvbridge.connector.serving.daemon.config import resolve_config
    from kvbridge.connector.serving.daemon.server import run_daemon

    rc = 1
    try:
        rc = run_daemon(resolve_config(role, args))
    except (ConfigError, FileNotFoundError) as exc:  # config, credentials, ports: one line
        print(f"kvbridge {role}: error: {exc}", file=sys.stderr)
        rc = 2
    except OSError as exc:  # e.g. an address the engine cannot use
        print(f"kvbridge {role}: error: {exc}", file=sys.stderr)
    except Exception:  # a bug or an engine failure: the traceback, once, in the JSON log
        logging.getLogger(f"kvbridge.{role}").exception("daemon failed")
    finally:
        # Everything is drained and closed; skip interpreter teardown, where the
        # NIXL/UCX library (nixl-cu12 1.5.1) segfaults while unloading.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHMARKS:
        try:  # every further argument (--help too) is the benchmark's own
            return _run_bench(argv[1], argv[2:])
        except FileNotFoundError as exc:
            print(f"kvbridge bench: error: {exc}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.__dict__.pop("command")
    try:
        if command in ("prefill", "decode"):
            return _run_daemon(command, args)
        if command == "generate":
            from kvbridge.connector.serving.client import generate_main

            return generate_main(args)
        if command == "stats":
            from kvbridge.connector.serving.client import stats_main

            return stats_main(args)
        if command == "demo":
            from kvbridge.connector.serving.demo import run_demo

            return run_demo(args)
        if command == "bench":
            return _run_bench(args.bench, args.bench_args)
    except (ConfigError, FileNotFoundError) as exc:  # bad configuration: one clear line
        print(f"kvbridge {command}: error: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
