"""Structured logging: one JSON object per line on stderr."""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...extra fields}`` per record."""

    def __init__(self, static: dict | None = None) -> None:
        super().__init__()
        self.static = static or {}

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **self.static,
        }
        for key, value in vars(record).items():
            if key not in _STD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "info", **static: object) -> None:
    """Send the ``kvbridge`` loggers to stderr as JSON lines tagged with ``static`` fields."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(static))
    root = logging.getLogger("kvbridge")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


#: what ``--engine-log-level`` sets, per variable and level (a variable already in
#: the environment is left alone: the operator's explicit choice wins)
ENGINE_LOG_ENV: dict[str, dict[str, str]] = {
    "GRPC_VERBOSITY": {"debug": "DEBUG", "info": "INFO", "warning": "ERROR", "error": "ERROR"},
    "UCX_LOG_LEVEL": {"debug": "debug", "info": "info", "warning": "warn", "error": "error"},
    "NIXL_LOG_LEVEL": {"debug": "DEBUG", "info": "INFO", "warning": "WARN", "error": "ERROR"},
    "MC_LOG_LEVEL": {"debug": "TRACE", "info": "INFO", "warning": "WARNING", "error": "ERROR"},
    "GLOG_minloglevel": {"debug": "0", "info": "0", "warning": "1", "error": "2"},
}
#: Python loggers of the engines and gRPC, re-routed to the JSON handler
ENGINE_LOGGERS = ("nixl", "mooncake", "grpc", "zmq")
_NIXL_LOGGING = ("nixl.logging", "nixl_cu12.logging")


def engine_log_env(level: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables ``--engine-log-level`` adds to ``environ`` (those not set there)."""
    env = os.environ if environ is None else environ
    return {k: v[level] for k, v in ENGINE_LOG_ENV.items() if k not in env}


def setup_engine_logging(level: str = "warning") -> dict[str, str]:
    """Quiet or raise the engines' own logs before they start; returns the variables set.

    Native libraries (UCX, NIXL's core, Mooncake's glog, gRPC core) read their level
    from the environment when they initialise and write plain lines to stderr; their
    Python loggers (NIXL's ``nixl`` logger prints to stdout) go to the JSON handler.
    """
    added = engine_log_env(level)
    os.environ.update(added)
    for mod in _NIXL_LOGGING:  # NIXL configures its logger at import: do it now, then take it
        try:
            importlib.import_module(mod).setup_logging()
        except Exception:  # not installed, or another layout: nothing to take over
            continue
    handler = logging.getLogger("kvbridge").handlers or [logging.StreamHandler(sys.stderr)]
    for name in ENGINE_LOGGERS:
        lg = logging.getLogger(name)
        lg.handlers[:] = list(handler)
        lg.setLevel(level.upper())
        lg.propagate = False
    return added
