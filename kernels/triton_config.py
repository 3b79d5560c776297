"""Tile sizes and the split-K count of the Triton paged decode.

Defaults come from sweeps on an H100 (bench/decode.py, bench/README.md). The split
count is chosen against wave quantisation: with ``S`` programs resident at once
(programs per SM from the compiled kernel's registers and shared memory, times the
SM count) and ``P`` programs per split, ``P * s`` programs should either fit in
one wave or leave the last wave at least half full: measured on an H100, 1.1 or
1.3 waves of bandwidth-bound programs ran 15-30% slower than 1 or 1.9 waves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
from kvbridge.kernels.checks import DecodeProblem

MAX_SPLITS = 64
MIN_SPLIT_TOKENS = 128
GUESS_CTAS_PER_SM = 4  # before a variant's first launch tells its real occupancy
REGS_PER_SM = 65536
SMEM_PER_SM = 233472  # bytes (228 KiB on Hopper); 1 KiB reserved per program
MAX_WARPS_PER_SM = 64


@dataclass(frozen=True)
class TritonConfig:
    """Tile sizes and launch parameters; ``num_splits=None`` picks from the occupancy."""

    block_n: int = 32
    block_h: int = 16
    dv_tiles: int = 1
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 3
    kernel: str = "triton"  # "triton": the portable kernel; "gluon": the Hopper MLA kernel
    dup_scores: bool = False  # gluon: both warpgroups compute all of S (warp-local softmax)
    pv_overlap: bool = False  # gluon: P V in flight under the next scores' MMAs (C7514)
    # gluon (gluon_mla_config picks): one block id per tile (when block_size is a multiple
    # of block_n), P V retired in its own iteration, P through shared memory (implies
    # pv_wait), row sums reduced once after the walk
    one_id: bool = False
    pv_wait: bool = False
    p_smem: bool = False
    lazy_l: bool = False
    fuse_reduce: bool = True  # portable kernel: the last split merges (no stage-2 launch)


def default_config(p: DecodeProblem) -> TritonConfig:
    """One row tile covers a GQA group times the T query tokens (up to 64 rows; MLA:
    64 of its heads)."""
    da = p.head_dim_v if p.head_dim_qk > p.head_dim_v else p.head_dim_qk
    block_h = min(max(16, triton.next_power_of_2(p.group * p.tokens)), 64)
    if da <= 128:
        return TritonConfig(block_n=32, block_h=block_h, num_warps=4, num_stages=3)
    if da <= 256:
        return TritonConfig(block_n=32, block_h=min(block_h, 32), num_warps=4, num_stages=2)
    # MLA-sized (512 columns): 64 heads per latent tile, 8 warps; 64-token tiles were
    # 11% faster than 32 on an H200 (0.465 vs 0.523 ms, bench/README.md) despite spills
    return TritonConfig(block_n=64, block_h=block_h, num_warps=8, num_stages=2)


def gluon_mla_config(p: DecodeProblem) -> TritonConfig:
    """The Hopper MLA kernel (gluon_mla.py): 64 query rows, two warpgroups. bf16: 64-key
    latent tiles, two in a cp.async ring (``num_stages``), one block id per tile
    (``one_id``), P handed to the P V MMA through shared memory (``p_smem``): 0.208 ms
    for mla-b64-s4096 on an H200 against 0.259 ms with both warpgroups computing all the
    scores (``dup_scores``, the former choice) and 0.300 ms with neither
    (bench/decode_mla_sweep.py). An fp8 latent: 32-key tiles, 4 in the ring (plus the
    two widened tiles), ``one_id``, and for one query token ``dup_scores`` (0.357
    against 0.388 ms)."""
    if p.kv_dtype == torch.float8_e4m3fn:
        return TritonConfig(block_n=32, block_h=64, num_warps=8, num_stages=4, kernel="gluon",
                            dup_scores=p.tokens == 1, one_id=True)  # fmt: skip
    return TritonConfig(block_n=64, block_h=64, num_warps=8, num_stages=2, kernel="gluon",
                        one_id=True, p_smem=True)  # fmt: skip


@lru_cache(maxsize=16)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def ctas_per_sm(kernel: object, num_warps: int) -> int | None:
    """Programs of a compiled kernel resident per SM (None when unknown, e.g. interpreter)."""
    regs = getattr(kernel, "n_regs", None)
    smem = getattr(getattr(kernel, "metadata", None), "shared", None)
    if not regs or smem is None:
        return None
    per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = REGS_PER_SM // (per_warp * num_warps)
    by_smem = SMEM_PER_SM // (smem + 1024)
    return max(1, min(by_regs, by_smem, MAX_WARPS_PER_SM // num_warps, 32))


def pick_splits(
    p: DecodeProblem,
    programs: int,
    sms: int,
    block_n: int,
    occupancy: tuple[int | None, int | None] = (None, None),
) -> int:
    """Split-K count from the resident-program slots (one split, several splits).

    Fewer programs than slots: split until they just fit in one wave (all run at
    once). More: keep one split unless the last wave would be under half full and
    there are fewer than 4 waves, then the fewest splits that fix that.
    """
    cap = max(p.key_span(), 1)
    s_max = max(1, min(MAX_SPLITS, cap // max(MIN_SPLIT_TOKENS, block_n)))
    slots_one = (occupancy[0] or GUESS_CTAS_PER_SM) * sms
    slots_many = (occupancy[1] or GUESS_CTAS_PER_SM) * sms
    if programs < slots_one:
        return max(1, min(s_max, slots_many // max(programs, 1)))
    for s in range(1, s_max + 1):
        waves = programs * s / (slots_one if s == 1 else slots_many)
        if waves >= 4 or waves - math.floor(waves) == 0 or waves - math.floor(waves) >= 0.5:
            return s
    return 1
