"""Where the time to first token went, from the two daemons' JSON logs (``--log-level info``).

    python3 bench/serve.py --gpu --backend local --concurrency 64 --log-level info --log-dir L
    python3 bench/ttft_phases.py L          # L/decode.log and L/prefill.log

Per phase, over every request: mean, p10, p50, p90 and max in ms.

- The decode daemon's ``first token`` record: arrival to blocks held, the Prefill call, the
  pull, the checksum (verified requests only), then the first message.
- Its ``kv pulled`` record: the pull's post, engine wait and finish.
- The prefill daemon's ``prefill done`` record: allocation, the batcher, the whole handler.
- Both logs together (same host, same clock; timestamps in ms): the Prefill request's
  way to the handler and the answer's way back.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path


def records(path: Path, msg: str) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if isinstance(d, dict) and d.get("msg") == msg:  # native libraries write lines too
            out.append(d)
    return out


def _ts(d: dict) -> float:
    return datetime.fromisoformat(d["ts"].replace("Z", "+00:00")).timestamp()


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def show(title: str, series: dict[str, list[float]]) -> None:
    print(title)
    for name, xs in series.items():
        if xs:
            ms = [1e3 * x for x in xs]
            print(f"  {name:22s} n {len(ms):5d}  mean {sum(ms) / len(ms):8.2f}  "
                  f"p10 {_pct(ms, .1):8.2f}  p50 {_pct(ms, .5):8.2f}  "
                  f"p90 {_pct(ms, .9):8.2f}  max {max(ms):8.2f} ms")  # fmt: skip


def main(log_dir: Path) -> None:
    first = records(log_dir / "decode.log", "first token")
    keys = ("to_admitted_s", "to_prefilled_s", "to_pulled_s", "to_verified_s", "to_first_token_s")
    show("decode: first token", {k: [r[k] for r in first if k in r] for k in keys})
    pulls = records(log_dir / "decode.log", "kv pulled")
    show("decode: kv pulled", {k: [r[k] for r in pulls] for k in ("seconds", "post_s", "wait_s",
                                                                  "finish_s")})  # fmt: skip
    done = records(log_dir / "prefill.log", "prefill done")
    show("prefill: prefill done", {k: [r[k] for r in done] for k in ("allocate_s", "seconds",
                                                                     "handler_s")})  # fmt: skip
    handler = {d["request_id"].split("/", 1)[-1]: (_ts(d) - d["handler_s"], _ts(d)) for d in done}
    there, back = [], []
    for r in first:  # the Prefill call ended when the pull began
        got = _ts(r) - r["to_first_token_s"] - r.get("to_verified_s", 0.0) - r["to_pulled_s"]
        h = handler.get(r["request_id"])
        if h is not None:
            there.append(h[0] - (got - r["to_prefilled_s"]))
            back.append(got - h[1])
    show(
        "Prefill call outside the handler",
        {"request's way there": there, "answer's way back": back},
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
