"""bench/serve.py's mismatch diagnostic: where the daemon's tokens leave the monolithic
run and the logit margin there, checked against the float64 dense reference."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from kvbridge.connector.serving.model import LlamaModel, ModelConfig, generate_monolithic
from llama_dense_reference import dense_logits

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import serve as bench_serve  # bench/serve.py

CFG = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                  intermediate_size=128, vocab_size=96, seed=5)  # fmt: skip


def test_first_difference_reports_the_position_and_the_margin():
    torch.manual_seed(0)
    model = LlamaModel.random(CFG)
    prompt = torch.randint(0, CFG.vocab_size, (21,)).tolist()  # crosses a block edge
    want = generate_monolithic(model, prompt, 12, block_size=bench_serve.BLOCK_SIZE)
    for at in (0, 7):
        ref = dense_logits(model.w, CFG, [*prompt, *want[:at]])[0][-1]
        worst = int(ref.argmin())  # a token far from the top: a large, positive margin
        got = [*want[:at], worst, *want[at + 1 :]]
        d = bench_serve.first_difference(model, prompt, got, want)
        assert (d["at"], d["got"], d["want"]) == (at, worst, want[at])
        expect = float(ref[want[at]] - ref[worst])
        assert expect > 0 and abs(d["margin"] - expect) < 1e-4 * max(1.0, expect)
        assert 0 < d["rel_margin"] <= 2
    short = bench_serve.first_difference(model, prompt, want[:5], want)  # a stream cut short
    assert short == {"at": 5, "got_len": 5, "want_len": 12}
