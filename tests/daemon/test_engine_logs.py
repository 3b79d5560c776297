"""``--engine-log-level``: the engines' level variables, and their Python loggers in JSON."""

from __future__ import annotations

import io
import json
import logging

from kvbridge.connector.serving.daemon import logs


def test_engine_log_env_leaves_the_operators_choice_alone():
    env = logs.engine_log_env("error", {"UCX_LOG_LEVEL": "debug"})
    assert "UCX_LOG_LEVEL" not in env
    assert env["GRPC_VERBOSITY"] == "ERROR" and env["GLOG_minloglevel"] == "2"
    assert env["NIXL_LOG_LEVEL"] == "ERROR" and env["MC_LOG_LEVEL"] == "ERROR"
    assert logs.engine_log_env("debug", {})["GLOG_minloglevel"] == "0"
    assert set(logs.engine_log_env("info", {})) == set(logs.ENGINE_LOG_ENV)


def test_engine_python_loggers_go_through_the_json_handler(monkeypatch):
    env = {k: v for k, v in logs.os.environ.items() if k not in logs.ENGINE_LOG_ENV}
    monkeypatch.setattr(logs.os, "environ", env)  # restored after the test
    saved = {n: (lg.handlers[:], lg.level, lg.propagate) for n in ("kvbridge", *logs.ENGINE_LOGGERS)
             for lg in [logging.getLogger(n)]}  # fmt: skip
    try:
        logs.setup_logging("info", role="decode")
        stream = io.StringIO()
        logging.getLogger("kvbridge").handlers[0].setStream(stream)
        added = logs.setup_engine_logging("warning")
        assert added["UCX_LOG_LEVEL"] == "warn"
        logging.getLogger("nixl.api").info("quiet")  # below --engine-log-level
        logging.getLogger("nixl.api").warning("loud %d", 1)
        logging.getLogger("grpc._server").error("core")
        lines = [json.loads(x) for x in stream.getvalue().splitlines()]
        assert [(x["logger"], x["msg"], x["role"]) for x in lines] == [
            ("nixl.api", "loud 1", "decode"),
            ("grpc._server", "core", "decode"),
        ]
    finally:
        for n, (handlers, level, propagate) in saved.items():
            lg = logging.getLogger(n)
            lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate
