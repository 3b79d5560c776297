"""One side of the multi-host test, run inside a network namespace (``ip netns exec``).

``holder``: serves a cache on ``--host``, waits for the reader's notice, prints a
JSON line. ``reader``: handshakes with the holder's side channel, pulls blocks,
checks every byte against torch truth, prints a JSON line. Exit code 0 on success.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from xfer_harness import CacheCfg, check_storages, expected_after

HOLDER = CacheCfg("packed", 901)
READER = CacheCfg("nhd", 902, poison=903)
SRC, DST = [1, 2, 3, 10], [12, 4, 5, 6]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["holder", "reader"])
    p.add_argument("--backend", required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--device", default="", help="UCX device for NIXL (the veth)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--peer", default="")
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args()

    from kvbridge.connector import KVTransferAgent

    opts = {"ucx_devices": args.device} if args.backend == "nixl" and args.device else {}
    cfg = HOLDER if args.role == "holder" else READER
    cache = cfg.build()
    agent = KVTransferAgent(
        f"{args.role}-{args.host}", cache, args.backend, host=args.host,
        side_channel_port=args.port, timeout=args.timeout, transport_options=opts,
    )  # fmt: skip
    out: dict = {"role": args.role, "address": agent.side_channel_address}
    try:
        if args.role == "holder":
            print(json.dumps({"ready": agent.side_channel_address}), flush=True)
            n = agent.wait_notice("netns-1", args.timeout)
            out.update(status=n.status, sender=n.sender, unchanged=check_storages(
                cache.layers, expected_after(HOLDER, [])) == "")  # fmt: skip
        else:
            peer = agent.connect_to(args.peer, args.timeout)
            t0 = time.perf_counter()
            res = agent.read_blocks(peer, SRC, DST, request_id="netns-1")
            out.update(seconds=time.perf_counter() - t0, bytes=res.bytes, peer=peer.name)
            out["problem"] = check_storages(
                cache.layers, expected_after(READER, [(HOLDER, SRC, DST, {})])
            )
    finally:
        print(json.dumps(out), flush=True)
        agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
