"""Real checkpoints through real daemons: tokens equal transformers' ``generate``.

One module-wide set of daemons (CI has 2 cores): a prefill and a decode daemon on the
same Mistral checkpoint (sliding window, ``tokenizer.json``, an EOS id) with different
layouts *and block sizes*; a decode daemon on another checkpoint of the same shapes;
two embedded models that differ only in ``--seed``. Start-up refusals run the CLI and
check the exit code and the one-line message.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from engines import BACKENDS, available
from kvbridge.connector.serving.client import generate
from kvbridge.connector.serving.procs import DaemonProcess, free_port
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2 as pb
from kvbridge.proto.kvbridge.v1 import kvbridge_pb2_grpc as pb_grpc

pytest.importorskip("transformers")
from hf_checkpoints import BY_NAME, build_model, hf_greedy, save_tokenizer

BACKEND = next((b for b in BACKENDS if available(b)), None)
pytestmark = pytest.mark.skipif(BACKEND is None, reason="no transfer engine installed")
PROMPTS = [[5, 77, 120, 9, 250, 31, 64], list(range(40, 59)), [280, 3, 3, 190, 12, 55, 7, 99, 1]]


def _args(layout: str, block_size: int, *extra: str, blocks: int = 48) -> list[str]:
    return [
        "--backend", BACKEND, "--kv-layout", layout, "--num-blocks", str(blocks),
        "--block-size", str(block_size), "--grpc-port", "0", "--metrics-port", "0",
        "--side-port", "0", "--insecure", "--transfer-timeout", "20", *extra,
    ]  # fmt: skip


def _save(path: Path, seed: int, eos: int | None):
    model = build_model(BY_NAME["mistral-window-v5"], seed=seed, eos=eos)
    model.save_pretrained(path)
    return model


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.a_path, self.b_path = tmp / "ckpt-a", tmp / "ckpt-b"
        # EOS = a greedy token of PROMPTS[0] first seen at step >= 2 (found by transformers)
        free = hf_greedy(build_model(BY_NAME["mistral-window-v5"], seed=21), PROMPTS[0], 12)
        self.eos_at = next(i for i, t in enumerate(free) if i >= 2 and t not in free[:i])
        self.eos = free[self.eos_at]
        self.ref = _save(self.a_path, 21, self.eos)
        self.tok = save_tokenizer(self.a_path)
        _save(self.b_path, 22, self.eos)
        self.procs: dict[str, DaemonProcess] = {}
        log = tmp / "logs"

        def start(name: str, role: str, args: list[str]) -> DaemonProcess:
            self.procs[name] = DaemonProcess(role, args, log, name=name).start()
            return self.procs[name]

        a = ("--model-path", str(self.a_path))
        self.prefill = start("ckpt-prefill", "prefill", _args("packed", 4, *a, blocks=256))
        self.emb_prefill = start("emb-prefill", "prefill", _args("nhd", 16))
        self.prefill.wait_ready(120)
        self.emb_prefill.wait_ready(120)
        to_a, to_emb = ("--prefill", self.prefill.target), ("--prefill", self.emb_prefill.target)
        self.decode = start("ckpt-decode", "decode", _args("hnd", 8, *a, *to_a, blocks=128))
        self.other = start(
            "other-decode", "decode", _args("hnd", 8, "--model-path", str(self.b_path), *to_a)
        )
        self.emb_decode = start("emb-decode", "decode", _args("nhd", 16, "--seed", "1", *to_emb))
        for name in ("ckpt-decode", "other-decode", "emb-decode"):
            self.procs[name].wait_ready(120)

    def stub(self, proc: DaemonProcess) -> pb_grpc.KVBridgeServiceStub:
        return pb_grpc.KVBridgeServiceStub(grpc.insecure_channel(proc.target))

    def close(self) -> None:
        for p in self.procs.values():
            p.terminate(30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    torch.set_num_threads(1)
    c = Cluster(tmp_path_factory.mktemp("models"))
    try:
        yield c
    finally:
        c.close()


def test_checkpoint_tokens_equal_transformers_across_block_sizes(cluster):
    stub = cluster.stub(cluster.decode)
    for prompt in PROMPTS:
        want = hf_greedy(cluster.ref, prompt, 12)  # stops at the checkpoint's EOS
        g = generate(stub, prompt_token_ids=prompt, max_new_tokens=12, timeout=120)
        assert g.token_ids == want, (prompt, cluster.decode.log_tail())
        assert (g.transfer.src_layout, g.transfer.dst_layout) == ("packed", "hnd")
    g = generate(stub, prompt_token_ids=PROMPTS[0], max_new_tokens=12, timeout=120)
    assert g.token_ids[-1] == cluster.eos and len(g.token_ids) == cluster.eos_at + 1
    assert g.finish_reason == "FINISH_REASON_STOP"


def test_text_prompt_goes_through_tokenizer_json(cluster):
    text = "héllo wörld ✓ 日本語"
    ids = cluster.tok(text)["input_ids"]
    pieces: list[str] = []
    g = generate(
        cluster.stub(cluster.decode), prompt=text, max_new_tokens=10, timeout=120,
        on_tokens=lambda _ids, t: pieces.append(t),
    )  # fmt: skip
    assert g.token_ids == hf_greedy(cluster.ref, ids, 10)
    assert g.text == cluster.tok.decode(g.token_ids, skip_special_tokens=True)
    assert "".join(pieces) == g.text


def test_generate_cli_stop_token_ids(cluster, capsys):
    from kvbridge.connector.serving.cli import main

    want = hf_greedy(cluster.ref, PROMPTS[1], 8)
    stop = want[2]
    argv = [
        "generate",
        "--target",
        cluster.decode.target,
        "--json",
        "--max-new-tokens",
        "8",
        "--prompt-tokens",
        ",".join(map(str, PROMPTS[1])),
        "--stop-token-ids",
        f"{stop},299",
    ]
    assert main(argv) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["token_ids"] == want[: want.index(stop) + 1]
    assert out["finish_reason"] == "FINISH_REASON_STOP"


@pytest.mark.parametrize("which", ["checkpoint", "embedded-seed"])
def test_other_model_is_refused_before_any_token(cluster, which):
    decode, prefill = (
        (cluster.other, cluster.prefill)
        if which == "checkpoint"
        else (cluster.emb_decode, cluster.emb_prefill)
    )
    prompt = PROMPTS[0] if which == "checkpoint" else [256, 104, 105]
    stream = cluster.stub(decode).Generate(
        pb.GenerateRequest(prompt_token_ids=prompt, max_new_tokens=4), timeout=120
    )
    with pytest.raises(grpc.RpcError) as err:
        next(stream)  # not one token streamed
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    names = ("ckpt-a@", "ckpt-b@") if which == "checkpoint" else ("embedded-seed0@", "seed1@")
    for name in names:
        assert name in err.value.details()
    stats = cluster.stub(prefill).Stats(pb.StatsRequest(), timeout=10)
    assert stats.leased_blocks == 0


def _refused(tmp: Path, name: str) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "kvbridge.connector.serving.cli", "prefill", "--insecure",
         "--model-path", str(tmp / name), "--grpc-port", "0", "--metrics-port", "0",
         "--side-port", "0", "--backend", BACKEND],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return proc.returncode, proc.stderr


def test_unsupported_checkpoints_refused_at_startup(tmp_path):
    from safetensors.torch import load_file, save_file

    rope, extra = tmp_path / "rope", tmp_path / "extra"
    for path in (rope, extra):
        build_model(BY_NAME["llama-default-v5"]).save_pretrained(path)
    spec = json.loads((rope / "config.json").read_text())
    spec["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0}
    (rope / "config.json").write_text(json.dumps(spec))
    f = extra / "model.safetensors"
    save_file(
        load_file(str(f)) | {"model.layers.1.self_attn.q_norm.weight": torch.ones(16)}, str(f)
    )
    for name, message in (
        ("rope", "rope type 'longrope' is not supported"),
        ("extra", "model.layers.1.self_attn.q_norm.weight is not used by the llama model"),
    ):
        rc, err = _refused(tmp_path, name)
        assert rc == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and lines[0].startswith("kvbridge prefill")


@pytest.mark.parametrize(
    "name,layouts",
    [
        ("llama-llama3-v4", (("hnd", 8), ("interleaved", 4))),
        ("qwen2-v5", (("nhd", 16), ("packed", 8))),
        ("qwen3-yarn-v4", (("interleaved", 4), ("nhd", 16))),
    ],
)
def test_each_family_through_a_daemon_pair(tmp_path, name, layouts):
    """Llama (llama3 rope, 4.x form), Qwen2 (biases, tied), Qwen3 (q/k norm, yarn, 4.x form):
    one prefill/decode pair each (started together), other layout and block size per side."""
    from hf_checkpoints import make_checkpoint

    torch.set_num_threads(1)
    ref = make_checkpoint(tmp_path / name, BY_NAME[name], seed=31)
    port = free_port()
    model = ("--model-path", str(tmp_path / name))
    (pl, pbs), (dl, dbs) = layouts
    prefill = DaemonProcess(
        "prefill", [*_args(pl, pbs, *model), "--grpc-port", str(port)], tmp_path, name="p"
    ).start()
    decode = DaemonProcess(
        "decode", _args(dl, dbs, *model, "--prefill", f"127.0.0.1:{port}"), tmp_path, name="d"
    ).start()
    try:
        prefill.wait_ready(120)
        decode.wait_ready(120)
        stub = pb_grpc.KVBridgeServiceStub(grpc.insecure_channel(decode.target))
        for prompt in PROMPTS[1:]:
            g = generate(stub, prompt_token_ids=prompt, max_new_tokens=10, timeout=120)
            assert g.token_ids == hf_greedy(ref, prompt, 10), decode.log_tail()
    finally:
        assert [p.terminate(30) for p in (decode, prefill)] == [0, 0]


def test_long_text_prompt_is_measured_in_tokens(cluster):
    """Text longer in bytes than the cache holds tokens is served when its tokens fit;
    text whose tokens do not fit is INVALID_ARGUMENT."""
    stub = cluster.stub(cluster.decode)
    text = "the quick brown fox jumps over the lazy dog " * 24  # 1056 bytes, ~560 tokens
    ids = cluster.tok(text)["input_ids"]
    assert len(text.encode()) > 128 * 8 > len(ids) + 3  # more bytes than the cache holds tokens
    g = generate(stub, prompt=text, max_new_tokens=3, timeout=120)
    assert g.token_ids == hf_greedy(cluster.ref, ids, 3)
    with pytest.raises(grpc.RpcError) as err:
        generate(stub, prompt="日本語" * 600, max_new_tokens=3, timeout=120)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs more blocks than the decode cache" in err.value.details()
