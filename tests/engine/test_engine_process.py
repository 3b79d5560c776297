"""The decode engine in its own process: the same tokens as the monolithic run over the
shared cache, cancels, stop, a killed child (every sequence fails and is released, no
new one joins), and the checks that stay in the parent."""

from __future__ import annotations

import os
import queue
import signal
import time

import pytest
import torch
from kvbridge.connector.serving.daemon.allocator import BlockAllocator
from kvbridge.connector.serving.engine import SamplingParams, Sequence
from kvbridge.connector.serving.engine.process import (
    EngineDeadError,
    EngineProcess,
    share_cpu_memory,
)
from kvbridge.connector.serving.model import (
    LlamaModel,
    ModelConfig,
    allocate_cache,
    blocks_needed,
    generate_monolithic,
)

CFG = ModelConfig(
    num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
    intermediate_size=96, vocab_size=300, seed=13,
)  # fmt: skip
BS = 4


class Rig:
    """Shared weights and a ``packed`` cache, an allocator, a running engine process."""

    def __init__(self, num_blocks: int = 96) -> None:
        self.model = LlamaModel.random(CFG)
        self.cache = allocate_cache(self.model, "packed", num_blocks, BS, seed=3)
        share_cpu_memory(self.model, self.cache)
        self.alloc = BlockAllocator(num_blocks)
        self.steps: list[int] = []
        self.dead: list[str] = []
        self.engine = EngineProcess(
            self.model, self.cache, max_batch=4, on_step=lambda n, s: self.steps.append(n),
        ).start()  # fmt: skip
        self.engine.on_dead = self.dead.append

    def submit(self, rid, prompt, max_new, sampling=None) -> tuple[Sequence, queue.Queue]:
        blocks = self.alloc.allocate(blocks_needed(len(prompt) + max_new, BS))
        first = int(self.model.prefill(prompt, self.cache, blocks).argmax())  # here
        out: queue.Queue = queue.Queue()
        seq = Sequence(
            rid, blocks, len(prompt), first, max_new, frozenset(),
            sampling or SamplingParams(), emit=lambda t, f, e: out.put((t, f, e)),
        )  # fmt: skip
        self.engine.submit(seq)
        return seq, out


def collect(seq: Sequence, out: queue.Queue) -> tuple[list[int], str, str | None]:
    toks = [seq.first_token]
    while True:
        t, fin, err = out.get(timeout=60)
        toks += t
        if fin:
            return toks, fin, err


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist()


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.engine.stop()


def test_sequences_in_the_child_give_the_monolithic_tokens(rig):
    spec = [(3, 14), (17, 5), (1, 9), (30, 7), (8, 11), (12, 3)]  # more than max_batch
    prompts = [_prompt(n, 200 + i) for i, (n, _) in enumerate(spec)]
    runs = []
    for i, (p, (_, new)) in enumerate(zip(prompts, spec, strict=True)):
        runs.append(rig.submit(f"r{i}", p, new))
        time.sleep(0.005 * i)  # later ones join mid-run
    for i, (seq, out) in enumerate(runs):
        want = generate_monolithic(rig.model, prompts[i], spec[i][1], block_size=BS)
        assert collect(seq, out) == (want, "length", None), f"request {i}"
        assert seq.left.wait(5)
    assert rig.engine.num_running == 0
    assert max(rig.steps) > 1 and len(rig.steps) < sum(new for _, new in spec)  # batched
    assert not rig.dead


def test_cancel_frees_one_sequence_while_the_other_goes_on(rig):
    p_long, p_other = _prompt(6, 5), _prompt(4, 6)
    s_long, o_long = rig.submit("long", p_long, 80)
    s_other, o_other = rig.submit("other", p_other, 20)
    assert o_long.get(timeout=30)[1] is None
    assert rig.engine.cancel("long", "client left")
    assert s_long.left.wait(10)
    while (msg := o_long.get(timeout=10))[1] is None:
        pass
    assert msg[1:] == ("cancelled", "client left")
    want = generate_monolithic(rig.model, p_other, 20, block_size=BS)
    assert collect(s_other, o_other) == (want, "length", None)
    assert not rig.engine.cancel("long")  # gone


def test_cancel_of_a_sequence_still_waiting_for_a_row_reaches_its_stream():
    """Its "left" comes up before its "cancelled" in the same message: both arrive."""
    rig = Rig(num_blocks=1024)  # rows busy for 1000 steps: none frees before the cancel
    full = [rig.submit(f"f{i}", _prompt(3, 60 + i), 1000) for i in range(4)]  # max_batch
    for _, out in full:
        assert out.get(timeout=30)[1] is None
    waiting, w_out = rig.submit("waiting", _prompt(3, 70), 10)
    assert rig.engine.cancel("waiting", "gone")
    assert w_out.get(timeout=10) == ([], "cancelled", "gone") and waiting.left.wait(10)
    for i, (seq, _) in enumerate(full):
        rig.engine.cancel(f"f{i}")
        assert seq.left.wait(10)
    rig.engine.stop()


def test_bad_sequences_are_refused_here_and_count_as_left(rig):
    seq, _ = rig.submit("dup", _prompt(3, 1), 40)
    refused = {
        "do not fit": Sequence("big", [0], 3, 1, 10),
        "outside the cache": Sequence("far", [0, 96], 3, 1, 2),
        "already running": Sequence("dup", [5, 6], 3, 1, 2),
    }
    for message, bad in refused.items():
        with pytest.raises(ValueError, match=message):
            rig.engine.submit(bad)
        assert bad.left.is_set()  # never joined: the caller may free its blocks
    assert not seq.left.is_set()
    rig.engine.cancel("dup")
    assert seq.left.wait(10)


def test_a_killed_engine_process_fails_and_releases_every_sequence():
    rig = Rig(num_blocks=320)
    runs = [rig.submit(f"k{i}", _prompt(5, 30 + i), 400) for i in range(3)]
    for _, out in runs:
        assert out.get(timeout=30)[1] is None  # running
    os.kill(rig.engine.pid, signal.SIGKILL)
    for seq, out in runs:
        _, fin, err = collect(seq, out)
        assert fin == "failed" and "died" in err
        assert seq.left.wait(10)  # its blocks may be freed: nothing writes them now
    assert rig.dead and "exit code -9" in rig.dead[0]
    late = Sequence("late", [0], 1, 1, 2)
    with pytest.raises(EngineDeadError, match="died"):
        rig.engine.submit(late)
    assert late.left.is_set()
    assert rig.engine.num_running == 0
    rig.engine.stop()  # nothing left to stop: returns at once


def test_stop_fails_what_still_runs_and_unshared_memory_is_refused():
    r = Rig()
    seq, out = r.submit("s", _prompt(4, 3), 300)
    assert out.get(timeout=30)[1] is None
    r.engine.stop()
    assert collect(seq, out)[1:] == ("failed", "the decode engine stopped")
    assert seq.left.wait(5) and not r.dead
    model = LlamaModel.random(CFG)
    cache = allocate_cache(model, "nhd", 8, BS)
    with pytest.raises(ValueError, match="shared memory"):
        EngineProcess(model, cache).start()


def test_too_little_shared_memory_is_a_clear_error(monkeypatch, tmp_path):
    import kvbridge.connector.serving.engine.process as proc

    model = LlamaModel.random(CFG)
    cache = allocate_cache(model, "nhd", 8, BS)
    small = os.statvfs_result((4096, 4096, 100, 1, 1, 10, 1, 1, 0, 255))  # 4 KiB free
    monkeypatch.setattr(proc.os, "statvfs", lambda path: small)
    with pytest.raises(MemoryError, match="MiB free: give it more"):
        share_cpu_memory(model, cache, shm=str(tmp_path))
    assert not cache.backing[0].is_shared()  # nothing moved
