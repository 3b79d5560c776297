"""The cached (direct) Triton launch path, with stand-ins for the JIT function and kernel.

A compiled kernel is reused only for arguments of the same specialisation class
(tensor dtype and 16-byte alignment; specialised ints by value; unspecialised ints
by int32 range), and gets the run-time arguments then the constexprs in order.
"""

from __future__ import annotations

import kvbridge.kernels.triton_fastlaunch as fl
import pytest
import torch


class FakeKernel:
    packed_metadata = "meta"
    function = "fn"

    def __init__(self) -> None:
        self.runs: list[tuple] = []

    def run(self, *a):
        self.runs.append(a)


class FakeJit:
    arg_names = ("x", "n", "m", "scale", "A", "B")
    do_not_specialize = ("n",)

    def __init__(self) -> None:
        self.compiled: list[tuple] = []

    def __getitem__(self, grid):
        def go(*args, **consts):
            k = FakeKernel()
            self.compiled.append((grid, args, consts, k))
            return k

        return go


@pytest.fixture(autouse=True)
def direct(monkeypatch):
    monkeypatch.setitem(fl._STATE, "ok", True)
    monkeypatch.setattr(fl, "_hooked", lambda: False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda i: 1234, raising=False)


def test_reuses_the_kernel_for_the_same_class():
    jit, cache = FakeJit(), {}
    x = torch.zeros(64)
    consts = {"A": 3, "B": True, "num_warps": 4}
    fl.launch(jit, cache, (2, 1, 1), (x, 32, 16, 0.5), consts, 0)
    fl.launch(jit, cache, (5, 1), (x, 33, 16, 0.7), consts, 0)  # n is not specialised
    assert len(jit.compiled) == 1
    k = jit.compiled[0][3]
    (run,) = k.runs
    assert run[:4] == (5, 1, 1, 1234) and run[4:6] == ("fn", "meta")
    assert run[9:] == (x, 33, 16, 0.7, 3, True)  # args, then constexprs A, B in order


@pytest.mark.parametrize(
    "other",
    [
        lambda x: (x[1:], 32, 16, 0.5),  # 4-byte offset: not 16-byte aligned
        lambda x: (x.double(), 32, 16, 0.5),  # dtype
        lambda x: (x, 32, 1, 0.5),  # == 1 (Triton makes it a constant)
        lambda x: (x, 32, 17, 0.5),  # not divisible by 16
        lambda x: (x, 2**31 + 16, 16, 0.5),  # int64
    ],
)
def test_another_class_goes_through_triton(other):
    jit, cache = FakeJit(), {}
    x = torch.zeros(64)
    fl.launch(jit, cache, (1, 1, 1), (x, 32, 16, 0.5), {"A": 1, "B": False}, 0)
    fl.launch(jit, cache, (1, 1, 1), other(x), {"A": 1, "B": False}, 0)
    assert len(jit.compiled) == 2


def test_api_mismatch_falls_back_for_good():
    jit, cache = FakeJit(), {}
    x = torch.zeros(64)
    fl.launch(jit, cache, (1, 1, 1), (x, 32, 16, 0.5), {"A": 1, "B": False}, 0)
    jit.compiled[0][3].run = None  # not callable: TypeError
    fl.launch(jit, cache, (1, 1, 1), (x, 32, 16, 0.5), {"A": 1, "B": False}, 0)
    assert not fl._STATE["ok"] and len(jit.compiled) == 2
