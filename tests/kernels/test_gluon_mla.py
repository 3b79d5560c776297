"""The Hopper MLA backend (``gluon-mla``) on the CPU: who may run it, and that its kernel
compiles for sm_90 (wgmma, cp.async, shared memory within Hopper's 227 KiB).

Its numbers are checked on the GPU (bench/decode_mla.py, float64 brute force); here
nothing can run it, so these tests pin the choice logic and the compiled program.
"""

from __future__ import annotations

import re

import pytest
import torch
from decode_truth import make_case
from kvbridge.kernels import PagedDecodeError, paged_decode
from kvbridge.kernels.backends import REGISTRY, resolve
from kvbridge.kernels.checks import check_inputs

HOPPER_SMEM = 232448  # bytes of shared memory one program may use on sm_90


def _mla(**kw):
    return make_case("mla", seq_lens=[5, 70], num_q_heads=16, block_size=64, **kw)


def _problem(c):
    return check_inputs(c.q, c.k, c.v, c.block_table, c.seq_lens, None, None, None, None)


def test_auto_on_cpu_never_picks_it():
    c = _mla()
    assert resolve("auto", _problem(c), torch.device("cpu")).name == "torch"
    assert next(iter(REGISTRY)) == "gluon-mla"  # first for auto where it can run


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: _mla(), r"needs a CUDA device"),
        (
            lambda: make_case("nhd", seq_lens=[5], num_q_heads=4, num_kv_heads=2),
            r"needs the MLA shape",
        ),
        (lambda: _mla(dtype=torch.float32), r"needs a bf16 or fp16 q"),
        (lambda: _mla(kv_dtype=torch.float8_e4m3fn), r"needs a CUDA device"),  # fp8: supported
    ],
)
def test_refused_with_a_clear_error(make, match):
    c = make()
    with pytest.raises(PagedDecodeError, match=match):
        paged_decode(c.q, c.k, c.v, c.block_table, c.seq_lens, backend="gluon-mla",
                     **c.kwargs())  # fmt: skip


def test_auto_takes_an_fp8_latent_unless_switched_off(monkeypatch):
    import kvbridge.kernels.backends as backends

    gluon, cuda = REGISTRY["gluon-mla"], torch.device("cuda", 0)
    assert gluon.auto_ok(_problem(_mla()), cuda)
    assert not gluon.auto_ok(_problem(_mla()), torch.device("cpu"))
    fp8 = _problem(_mla(kv_dtype=torch.float8_e4m3fn))
    assert gluon.auto_ok(fp8, cuda)
    monkeypatch.setattr(backends, "GLUON_FP8_AUTO", False)
    assert not gluon.auto_ok(fp8, cuda)


def test_v_not_a_prefix_of_k_is_refused():
    c = _mla()
    v = c.k[..., :512].clone()  # same values, other memory: the kernel reads V from K's tile
    with pytest.raises(PagedDecodeError, match=r"needs the MLA shape"):
        paged_decode(c.q, c.k, v, c.block_table, c.seq_lens, backend="gluon-mla")


def _compile(direct: bool, causal: bool, window: bool, block_n: int, stages: int, dup: bool,
             kv8: bool = False, one_id: bool = False, p_smem: bool = False):  # fmt: skip
    triton = pytest.importorskip("triton")
    pytest.importorskip("triton.experimental.gluon")
    from kvbridge.kernels.gluon_mla import mla_decode_hopper as k
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    ptrs = ["q_ptr", "k_ptr", "v_ptr", "bt_ptr", "seq_ptr", "o_ptr", "lse_ptr", "ks_ptr", "vs_ptr",
            "out_ptr", "sem_ptr"]  # fmt: skip
    types = {n: "*bf16" for n in ptrs}
    if kv8:
        types.update(k_ptr="*fp8e4nv", v_ptr="*fp8e4nv")
    types.update(bt_ptr="*i32", seq_ptr="*i32", lse_ptr="*fp32", sem_ptr="*i32", qk_scale="fp32",
                 k_scale="fp32", v_scale="fp32", o_ptr="*bf16" if direct else "*fp32")  # fmt: skip
    consts = dict(PAGE=64, HEAD_TILES=2, DV_TILES=1, DA=512, DT=64, DV=512, BLOCK_DA=512,
                  BLOCK_DT=64, BLOCK_DV=512, BLOCK_H=64, BLOCK_N=block_n, V_SHARED=True,
                  DIRECT=direct, K_SCALE_PTR=False, V_SCALE_PTR=False, CAUSAL=causal,
                  WINDOW=window, PRECISION="tf32", UPCAST=False, FUSED=False,
                  NUM_STAGES=stages, DUP_S=dup, KV8=kv8, PV_OVERLAP=False, ONE_ID=one_id,
                  PV_WAIT=p_smem, P_SMEM=p_smem, LAZY_L=False)  # fmt: skip
    sig = {n: "constexpr" if n in consts else types.get(n, "i64") for n in k.arg_names}
    aligned = [*ptrs, "stride_kb", "stride_kt", "stride_qb", "stride_qh", "stride_ob"]
    attrs = {(k.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    try:
        src = GluonASTSource(k, sig, consts, attrs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
    except RuntimeError as e:  # no ptxas for this platform
        if "ptxas" in str(e).lower():
            pytest.skip(f"cannot assemble for sm_90 here: {e}")
        raise


@pytest.mark.parametrize(
    "direct,causal,window,block_n,stages,dup,kv8,one_id,p_smem",
    [
        (True, False, False, 64, 2, False, False, True, True),  # the bf16 default
        (False, True, True, 64, 2, False, False, True, True),
        (True, False, False, 64, 2, True, False, False, False),
        (False, True, True, 64, 2, True, False, False, False),
        (True, False, False, 64, 2, False, False, False, False),
        (True, False, False, 32, 3, False, False, False, False),
        (True, False, False, 32, 4, True, True, True, False),  # the fp8 default at T = 1
        (False, True, True, 32, 4, False, True, True, False),
    ],
)
def test_kernel_compiles_for_sm90(direct, causal, window, block_n, stages, dup, kv8, one_id,
                                  p_smem):  # fmt: skip
    c = _compile(direct, causal, window, block_n, stages, dup, kv8, one_id, p_smem)
    ptx = c.asm["ptx"]
    # Q K^T: 576 / 16 k-steps, P V: block_n / 16 k-steps, each one wgmma per warpgroup
    assert len(re.findall(r"wgmma\.mma_async", ptx)) == 576 // 16 + block_n // 16
    assert "cp.async.cg.shared.global" in ptx  # 16-byte async copies of the latent rows
    assert c.metadata.shared <= HOPPER_SMEM


def test_only_sm90_is_accepted(monkeypatch):
    from kvbridge.kernels import triton_launch

    p = _problem(_mla())
    monkeypatch.setattr(triton_launch, "is_interpreted", lambda: False)
    for cap, ok in (((9, 0), True), ((8, 0), False), ((10, 0), False), ((12, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, cap=cap: cap)
        err = triton_launch.gluon_mla_support_error(p, torch.device("cuda", 0))
        assert (err is None) == ok, (cap, err)
        if not ok:
            assert "sm_90" in err


@pytest.mark.parametrize(
    "offset,pad,gluon",
    [(0, 0, True), (8, 0, True), (8, 16, True), (3, 0, False), (4, 0, False), (0, 8, False)],
)
def test_rows_not_16_aligned_take_the_portable_kernel(offset, pad, gluon, monkeypatch):
    """cp.async moves 16 bytes: a cache base or stride off 16 elements goes portable."""
    from kvbridge.kernels import triton_launch

    c = _mla(storage_offset=offset, block_pad=pad)  # offset in elements (bf16: 2 bytes)
    seen = []
    monkeypatch.setattr(triton_launch, "triton_paged_decode",
                        lambda *a, **kw: seen.append(a[9] if len(a) > 9 else None))  # fmt: skip
    p = _problem(c)
    out = torch.empty(p.out_shape, dtype=c.q.dtype)
    triton_launch.gluon_mla_paged_decode(c.q, c.k, c.v, c.block_table, c.seq_lens, p, None,
                                         None, out)  # fmt: skip
    (cfg,) = seen
    assert (cfg is not None and cfg.kernel == "gluon") == gluon
