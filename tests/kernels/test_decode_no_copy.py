"""paged_decode never copies the cache (no .contiguous(), no gather of the whole cache).

Every aten op is recorded under a TorchDispatchMode; no op may produce a tensor
anywhere near the size of a cache view, and the cache bytes stay unchanged. A
control shows the probe catches a ``.contiguous()``. The Triton wrapper is checked
with its kernels replaced by recorders: it hands the kernel the caller's own
views (same pointers, real strides). On a GPU, bench/decode.py also checks that
peak memory during a call stays far below the cache size.
"""

from __future__ import annotations

import kvbridge.kernels.triton_launch as launch
import pytest
import torch
from decode_truth import check_case, make_case
from kvbridge.kernels import paged_decode
from kvbridge.kernels.checks import check_inputs
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class OpRecorder(TorchDispatchMode):
    """Records (op, largest output numel) of every aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.ops.append((str(func), max(sizes, default=0)))
        return out

    def largest(self) -> tuple[str, int]:
        return max(self.ops, key=lambda o: o[1], default=("none", 0))


def _case(layout):
    # 6 needed blocks out of ~200: a gather of the needed blocks is 3% of a view
    return make_case(layout, seq_lens=[5, 17, 40], num_q_heads=8, extra_blocks=200)


@pytest.mark.parametrize("layout", ["hnd", "packed", "mla"])
def test_torch_backend_never_copies_the_cache(layout):
    c = _case(layout)
    backing = [b.clone() for b in c.cache.backing]
    with OpRecorder() as rec:
        out = paged_decode(c.q, c.k, c.v, c.block_table, c.seq_lens, backend="torch")
    op, size = rec.largest()
    assert size < c.k.numel() / 10, f"{op} produced {size} elements (K view: {c.k.numel()})"
    assert all(torch.equal(a, b) for a, b in zip(backing, c.cache.backing, strict=True))
    check_case(c, out)


def test_probe_catches_a_contiguous_copy():
    c = _case("hnd")
    assert not c.k.is_contiguous()
    with OpRecorder() as rec:
        paged_decode(c.q, c.k.contiguous(), c.v, c.block_table, c.seq_lens, backend="torch")
    assert rec.largest()[1] >= c.k.numel()


class LaunchRecorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **meta)`` is recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.calls.append((grid, args, meta))


@pytest.mark.parametrize("layout", ["interleaved", "head_groups", "mla"])
def test_triton_wrapper_passes_the_views_themselves(layout, monkeypatch):
    c = _case(layout)
    s1, s2 = LaunchRecorder(), LaunchRecorder()
    monkeypatch.setattr(launch, "paged_decode_stage1", s1)
    monkeypatch.setattr(launch, "paged_decode_stage2", s2)
    p = check_inputs(c.q, c.k, c.v, c.block_table, c.seq_lens, None, None, None, None)
    out = torch.empty(3, 8, c.v.shape[3], dtype=c.q.dtype)
    with OpRecorder() as rec:
        launch.triton_paged_decode(c.q, c.k, c.v, c.block_table, c.seq_lens, p, None, None, out)
    assert rec.largest()[1] < c.k.numel() / 10, rec.largest()
    (_, args, meta), = s1.calls  # fmt: skip
    assert args[1] is c.k and args[2] is c.v and args[3] is c.block_table
    ints = [a for a in args if isinstance(a, int)]
    assert tuple(c.k.stride()[:3]) in {tuple(ints[i : i + 3]) for i in range(len(ints) - 2)}
    assert meta["V_SHARED"] == (layout == "mla")  # MLA: the latent is read once for K and V
