"""Client side of the control API: ``kvbridge generate`` / ``kvbridge stats``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field

import grpc
from google.protobuf import json_format
from kvbridge.connector.serving.daemon.security import ClientAuth
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2_grpc as pb_grpc


@dataclass
class Generation:
    """The collected stream of one Generate call."""

    request_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    transfer: pb.TransferInfo | None = None
    finish_reason: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        transfer = (
            json_format.MessageToDict(self.transfer, preserving_proto_field_name=True)
            if self.transfer is not None
            else None
        )
        return {
            "request_id": self.request_id,
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "seconds": round(self.seconds, 6),
            "transfer": transfer,
        }


def generate(
    stub: pb_grpc.KVBridgeServiceStub,
    *,
    prompt: str = "",
    prompt_token_ids: list[int] | None = None,
    max_new_tokens: int = 16,
    request_id: str = "",
    timeout: float = 120.0,
    on_tokens=None,
    verify_kv: bool = False,
    stop_token_ids: list[int] | None = None,
) -> Generation:
    """Run one Generate call to the end (``on_tokens(ids, text)`` sees each message)."""
    out = Generation()
    t0 = time.perf_counter()
    stream = stub.Generate(
        pb.GenerateRequest(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=prompt_token_ids or [],
            max_new_tokens=max_new_tokens,
            verify_kv=verify_kv,
            stop_token_ids=stop_token_ids or [],
        ),
        timeout=timeout,
    )
    for msg in stream:
        out.request_id = msg.request_id
        out.token_ids.extend(msg.token_ids)
        out.text += msg.text
        if msg.HasField("transfer"):
            out.transfer = msg.transfer
        if msg.finish_reason:
            out.finish_reason = pb.FinishReason.Name(msg.finish_reason)
        if on_tokens is not None and (msg.token_ids or msg.text):
            on_tokens(list(msg.token_ids), msg.text)
    out.seconds = time.perf_counter() - t0
    return out


def describe_transfer(t: pb.TransferInfo | None) -> str:
    if t is None:
        return "no transfer"
    return (
        f"{t.bytes} B in {t.descriptors} descriptors, {t.transfer_seconds * 1e3:.2f} ms "
        f"({t.num_blocks} blocks, {t.src_layout} -> {t.dst_layout}, from {t.prefill_target})"
    )


def client_auth(args: argparse.Namespace) -> ClientAuth:
    """The ``--tls-*`` / ``--auth-token-file`` flags of a client subcommand."""
    return ClientAuth.from_files(
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        auth_token_file=args.auth_token_file,
        server_name=args.tls_server_name,
    )


def generate_main(args: argparse.Namespace) -> int:
    prompts: list[tuple[str, list[int] | None]] = [(p, None) for p in args.prompt]
    if args.prompt_tokens:
        try:
            ids = [int(x) for x in args.prompt_tokens.split(",") if x.strip()]
        except ValueError:
            print(
                "kvbridge generate: --prompt-tokens must be comma-separated integers",
                file=sys.stderr,
            )
            return 2
        prompts.append(("", ids))
    try:
        stop = [int(x) for x in (args.stop_token_ids or "").split(",") if x.strip()]
    except ValueError:
        print(
            "kvbridge generate: --stop-token-ids must be comma-separated integers", file=sys.stderr
        )
        return 2
    if not prompts:
        print("kvbridge generate: give --prompt TEXT or --prompt-tokens IDS", file=sys.stderr)
        return 2
    rc = 0
    with client_auth(args).channel(args.target) as channel:
        stub = pb_grpc.KVBridgeServiceStub(channel)
        for i, (text, ids) in enumerate(prompts):
            rid = (
                f"{args.request_id}-{i}"
                if args.request_id and len(prompts) > 1
                else args.request_id
            )
            if not args.json:
                print(f"> {text or ids}", flush=True)
            stream_cb = None if args.json else (lambda _ids, t: print(t, end="", flush=True))
            try:
                gen = generate(
                    stub,
                    prompt=text,
                    prompt_token_ids=ids,
                    max_new_tokens=args.max_new_tokens,
                    request_id=rid,
                    timeout=args.timeout,
                    on_tokens=stream_cb,
                    verify_kv=args.verify_kv,
                    stop_token_ids=stop,
                )
            except grpc.RpcError as exc:
                print(f"\nkvbridge generate: {exc.code().name}: {exc.details()}", file=sys.stderr)
                rc = 1
                continue
            if args.json:
                print(json.dumps(gen.to_dict()), flush=True)
            else:
                print(f"\n  tokens {gen.token_ids}\n  transfer {describe_transfer(gen.transfer)}")
    return rc


def stats_main(args: argparse.Namespace) -> int:
    with client_auth(args).channel(args.target) as channel:
        stub = pb_grpc.KVBridgeServiceStub(channel)
        try:
            resp = stub.Stats(
                pb.StatsRequest(include_finished=args.include_finished), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"kvbridge stats: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(json.dumps(json_format.MessageToDict(resp, preserving_proto_field_name=True), indent=2))
    return 0
