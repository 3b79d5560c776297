"""Helpers of the e2e tests: daemon arguments, gRPC stubs, KV sizes."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2_grpc as pb_grpc

NUM_BLOCKS = 64
BLOCK_SIZE = 16


def daemon_args(backend: str, layout: str, *extra: str) -> list[str]:
    """Flags of an e2e daemon; ``backend`` carries the KV (the same-host transport is off
    unless ``extra`` turns it back on with a later ``--local-transport``)."""
    return [
        "--backend", backend, "--kv-layout", layout, "--num-blocks", str(NUM_BLOCKS),
        "--block-size", str(BLOCK_SIZE), "--grpc-port", "0", "--metrics-port", "0",
        "--side-port", "0", "--insecure", "--transfer-timeout", "20",
        "--local-transport", "off", *extra,
    ]  # fmt: skip


@dataclass
class Client:
    target: str
    channel: grpc.Channel = field(init=False)
    stub: pb_grpc.KVBridgeServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.KVBridgeServiceStub(self.channel)

    def stats(self, include_finished: bool = True) -> pb.StatsResponse:
        return self.stub.Stats(pb.StatsRequest(include_finished=include_finished), timeout=10)

    def close(self) -> None:
        self.channel.close()


def kv_bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, itemsize: int = 4) -> int:
    """Logical K+V bytes of one block over all layers."""
    return 2 * num_layers * BLOCK_SIZE * num_kv_heads * head_dim * itemsize
