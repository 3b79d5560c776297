"""The packed batch state: each named field reads back what a row was given."""

from __future__ import annotations

import random

import pytest
import torch
from kvbridge.connector.serving.engine.batch_state import BatchState


def _row(state: BatchState, r: int) -> tuple:
    return (
        int(state.tokens[r]), int(state.positions[r]), int(state.active[r]),
        float(state.temperature[r]), float(state.top_p[r]), int(state.top_k[r]),
        int(state.seeds[r]), state.tables[r].tolist(),
    )  # fmt: skip


@pytest.mark.parametrize("max_pages", [5, 6])  # odd: the last int64 holds one int32
def test_rows_read_back_what_they_were_given(max_pages):
    rng = random.Random(3)
    state = BatchState(4, max_pages, torch.device("cpu"), pad_block=99)
    want = {}
    for r in range(4):
        blocks = rng.sample(range(2**31 - 1), rng.randint(0, max_pages))
        sampling = (rng.random(), rng.random(), rng.randrange(50), rng.randrange(2**32))
        token, pos = rng.randrange(2**31), rng.randrange(2**40)
        state.set_row(r, token, pos, blocks, sampling)
        pad = blocks + [99] * (max_pages - len(blocks))
        want[r] = (token, pos, 1, *(torch.tensor(sampling[:2]).tolist()), *sampling[2:], pad)
    for r in range(4):
        assert _row(state, r) == want[r]
    state.move_row(3, 1)
    assert _row(state, 1) == want[3] and _row(state, 0) == want[0]
    state.clear_row(3)
    assert _row(state, 3) == (0, 0, 0, 0.0, 0.0, 0, 0, [99] * max_pages)
    with pytest.raises(ValueError, match="do not fit"):
        state.set_row(0, 1, 1, list(range(max_pages + 1)), (0.0, 1.0, 0, 0))


def test_advance_moves_active_rows_only():
    state = BatchState(4, 3, torch.device("cpu"), pad_block=0)
    state.set_row(0, 5, 10, [1], (0.0, 1.0, 0, 0))
    state.set_row(1, 6, 20, [2], (0.0, 1.0, 0, 0))
    state.clear_row(2)  # padding row of a bucket
    state.advance(3, torch.tensor([7, 8, 9]))
    assert state.tokens[:3].tolist() == [7, 8, 0]
    assert state.positions[:3].tolist() == [11, 21, 0]
