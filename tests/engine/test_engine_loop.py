"""The engine loop with the real model: batched steps equal the monolithic run per request."""

from __future__ import annotations

import queue
import time

import pytest
import torch
from kvbridge.connector.serving.daemon.allocator import BlockAllocator
from kvbridge.connector.serving.engine import DecodeEngine, SamplingParams, Sequence
from kvbridge.connector.serving.engine.sampling import sample
from kvbridge.connector.serving.model import (
    LlamaModel,
    ModelConfig,
    allocate_cache,
    blocks_needed,
    generate_monolithic,
)

CFG = ModelConfig(
    num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
    intermediate_size=96, vocab_size=300, seed=11,
)  # fmt: skip
BS = 4


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    return LlamaModel.random(CFG)


@pytest.fixture(params=[False, True], ids=["in-step", "overlap"])
def overlap(request) -> bool:
    """Each step read back before the next (CPU default), or queued one ahead (CUDA)."""
    return request.param


class Rig:
    """A cache in a layout other than the reference's, an allocator and a running engine."""

    def __init__(
        self,
        model: LlamaModel,
        layout: str = "packed",
        num_blocks: int = 128,
        interval: int = 1,
        overlap: bool = False,
    ) -> None:
        self.model = model
        self.cache = allocate_cache(model, layout, num_blocks, BS, seed=3)
        self.alloc = BlockAllocator(num_blocks)
        self.engine = DecodeEngine(
            model, self.cache, max_batch=4, stream_interval=interval, overlap=overlap
        ).start()

    def submit(self, rid, prompt, max_new, sampling=None, stop=()) -> tuple[Sequence, queue.Queue]:
        blocks = self.alloc.allocate(blocks_needed(len(prompt) + max_new, BS))
        first = int(self.model.prefill(prompt, self.cache, blocks).argmax())
        out: queue.Queue = queue.Queue()
        seq = Sequence(
            rid, blocks, len(prompt), first, max_new, frozenset(stop),
            sampling or SamplingParams(), emit=lambda t, f, e: out.put((t, f, e)),
        )  # fmt: skip
        self.engine.submit(seq)
        return seq, out


def collect(seq: Sequence, out: queue.Queue, timeout: float = 60) -> tuple[list[int], str]:
    toks = [seq.first_token]
    while True:
        t, fin, _err = out.get(timeout=timeout)
        toks += t
        if fin:
            return toks, fin


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist()


def test_joining_and_leaving_mid_run_gives_the_monolithic_tokens(model, overlap):
    rig = Rig(model, overlap=overlap)
    # more requests than max_batch, different prompt lengths and lengths to generate
    spec = [(3, 20), (17, 5), (1, 12), (30, 9), (8, 2), (12, 16)]
    prompts = [_prompt(n, 100 + i) for i, (n, _) in enumerate(spec)]
    running = []
    for i, (p, (_, new)) in enumerate(zip(prompts, spec, strict=True)):
        running.append(rig.submit(f"r{i}", p, new))
        time.sleep(0.01 * i)  # later ones join while earlier ones are mid-run
    for i, (seq, out) in enumerate(running):
        toks, fin = collect(seq, out)
        want = generate_monolithic(model, prompts[i], spec[i][1], layout="nhd", block_size=BS)
        assert toks == want, f"request {i}"
        assert fin == "length" and seq.left.wait(5)
    assert rig.engine.steps < sum(new for _, new in spec)  # steps were shared
    rig.engine.stop()


def test_stream_interval_sends_fewer_larger_messages_with_the_same_tokens(model, overlap):
    rig = Rig(model, interval=3, overlap=overlap)
    p1, p2 = _prompt(6, 21), _prompt(11, 22)
    want1 = generate_monolithic(model, p1, 11, layout="nhd", block_size=BS)
    stop = want1[7]  # a stop token ends the stream mid-interval: nothing is held back
    want1 = want1[: want1.index(stop) + 1]
    want2 = generate_monolithic(model, p2, 11, layout="nhd", block_size=BS)
    runs = [rig.submit("a", p1, 11, stop=[stop]), rig.submit("b", p2, 11)]
    for (seq, out), want in zip(runs, (want1, want2), strict=True):
        msgs = []
        while not msgs or not msgs[-1][1]:
            msgs.append(out.get(timeout=60))
        assert [seq.first_token, *(t for m in msgs for t in m[0])] == want
        sizes = [len(m[0]) for m in msgs]
        assert all(n == 3 for n in sizes[:-1]) and 1 <= sizes[-1] <= 3, sizes
    rig.engine.stop()
    with pytest.raises(ValueError):
        DecodeEngine(model, rig.cache, stream_interval=0)


def test_stop_token_ends_one_sequence_only(model, overlap):
    rig = Rig(model, overlap=overlap)
    p1, p2 = _prompt(5, 1), _prompt(9, 2)
    want1 = generate_monolithic(model, p1, 12, layout="nhd", block_size=BS)
    want2 = generate_monolithic(model, p2, 12, layout="nhd", block_size=BS)
    stop = want1[4]
    s1, o1 = rig.submit("a", p1, 12, stop=[stop])
    s2, o2 = rig.submit("b", p2, 12)
    toks1, fin1 = collect(s1, o1)
    assert toks1 == want1[: want1.index(stop) + 1] and fin1 == "stop"
    assert collect(s2, o2) == (want2, "length")
    rig.engine.stop()


def test_cancel_leaves_at_a_step_boundary_while_others_continue(model, overlap):
    rig = Rig(model, overlap=overlap)
    p_long, p_other = _prompt(6, 5), _prompt(4, 6)
    s_long, o_long = rig.submit("long", p_long, 300)
    s_other, o_other = rig.submit("other", p_other, 30)
    got = o_long.get(timeout=30)
    assert got[0] and got[1] is None
    assert rig.engine.cancel("long", "client left")
    assert s_long.left.wait(10) and s_long.finish == "cancelled"
    while (msg := o_long.get(timeout=10))[1] is None:
        pass
    assert msg[1:] == ("cancelled", "client left")
    rig.alloc.free(s_long.blocks)  # safe now: the engine dropped the rows
    want = generate_monolithic(model, p_other, 30, layout="nhd", block_size=BS)
    assert collect(s_other, o_other) == (want, "length")
    assert rig.engine.num_running == 0
    rig.engine.stop()


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(model, overlap):
    rig = Rig(model, overlap=overlap)
    p = _prompt(7, 9)
    sp = SamplingParams(temperature=1.5, top_p=0.9, top_k=50, seed=1234)
    alone = collect(*rig.submit("alone", p, 24, sp))[0]
    crowd = [rig.submit(f"c{i}", _prompt(5, 40 + i), 24) for i in range(2)]
    again = collect(*rig.submit("again", p, 24, sp))[0]
    for s, o in crowd:
        collect(s, o)
    assert alone == again
    greedy = generate_monolithic(model, p, 24, layout="nhd", block_size=BS)
    assert alone != greedy  # temperature 1.5 over a random model: not the argmax path
    other = collect(*rig.submit("other", p, 24, SamplingParams(1.5, 0.9, 50, seed=99)))[0]
    assert other != alone
    rig.engine.stop()


def test_sample_filters_and_frequencies():
    torch.manual_seed(0)
    b, v = 4, 12
    logits = torch.randn(b, v)
    rows = torch.arange(b)
    ones = torch.ones(b)

    def draw(temp, top_p, top_k, n=3000):
        seeds = torch.arange(b, dtype=torch.int64) * 7 + 1
        out = torch.stack([
            sample(logits, temp * ones, top_p * ones, torch.full((b,), top_k), seeds,
                   torch.full((b,), i, dtype=torch.int64))
            for i in range(n)
        ])  # fmt: skip
        return out  # (n, b)

    greedy = logits.argmax(-1)
    assert torch.equal(draw(0.0, 1.0, 0, 5)[0], greedy)
    assert (draw(1.0, 1.0, 1, 50) == greedy).all()  # top-k 1 is greedy
    assert (draw(1.0, 1e-6, 0, 50) == greedy).all()  # top-p ~0 keeps only the best
    top3 = logits.topk(3, -1).indices
    d = draw(1.0, 1.0, 3, 200)
    assert all(set(d[:, r].tolist()) <= set(top3[r].tolist()) for r in rows.tolist())
    # frequencies follow softmax(logits / T) (plain sampling, float64 truth)
    t = 0.8
    d = draw(t, 1.0, 0)
    want = torch.softmax(logits.double() / t, -1)
    for r in range(b):
        freq = torch.bincount(d[:, r], minlength=v).double() / d.shape[0]
        assert (freq - want[r]).abs().max() < 0.04, (freq, want[r])
    # top-p: only the smallest prefix of the sorted distribution reaching p is drawn
    p = 0.6
    d = draw(1.0, p, 0, 400)
    probs, order = torch.softmax(logits.double(), -1).sort(-1, descending=True)
    for r in range(b):
        keep = int((probs[r].cumsum(0) - probs[r] < p).sum())
        assert set(d[:, r].tolist()) <= set(order[r, :keep].tolist())


def test_with_overlap_blocks_are_released_only_after_the_step_in_flight(model):
    """The step queued before a sequence's last tokens were read still writes its
    blocks: ``left`` (blocks may be freed) comes only after that step completed."""
    rig = Rig(model, overlap=True)
    steps_at_end = []
    blocks = rig.alloc.allocate(blocks_needed(5 + 6, BS))
    p = _prompt(5, 31)
    first = int(model.prefill(p, rig.cache, blocks).argmax())
    seq = Sequence("a", blocks, 5, first, 6,
                   emit=lambda t, f, e: f and steps_at_end.append(rig.engine.steps))  # fmt: skip
    rig.engine.submit(seq)
    assert seq.left.wait(30) and seq.finish == "length"
    assert steps_at_end and rig.engine.steps == steps_at_end[0] + 1  # one more step ran
    rig.engine.stop()
