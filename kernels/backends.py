"""The backend registry of ``paged_decode``: name -> (supports-check, launcher).

A backend is a ``Backend``: ``support_error(problem, device)`` says why it cannot
run a call (None: it can), ``auto_ok(problem, device)`` whether ``backend="auto"``
may pick it, and ``launch(q, k, v, block_table, seq_lens, problem, k_scale,
v_scale, out)`` fills ``out``. ``auto`` takes the first registered backend, in
registration order, whose ``auto_ok`` holds and whose ``support_error`` is None.
``device_metadata``: the launcher wants ``block_table``/``seq_lens`` on q's device
(``paged_decode`` copies host metadata once, after validating it on the host).
Registering a new backend: ``register(Backend(...), first=True)`` (see README.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from kvbridge.kernels.checks import DecodeProblem, PagedDecodeError
from kvbridge.kernels.reference import torch_paged_decode


@dataclass(frozen=True)
class Backend:
    name: str
    support_error: Callable[[DecodeProblem, torch.device], str | None]
    auto_ok: Callable[[DecodeProblem, torch.device], bool]
    launch: Callable[..., torch.Tensor]
    device_metadata: bool = True


REGISTRY: dict[str, Backend] = {}


def register(backend: Backend, *, first: bool = False) -> None:
    """Add (or replace) a backend; ``first`` puts it ahead of the others for ``auto``."""
    REGISTRY.pop(backend.name, None)
    items = list(REGISTRY.items())
    REGISTRY.clear()
    if first:
        REGISTRY[backend.name] = backend
    REGISTRY.update(items)
    REGISTRY.setdefault(backend.name, backend)


def backend_names() -> tuple[str, ...]:
    return ("auto", *REGISTRY)


def resolve(name: str, p: DecodeProblem, device: torch.device) -> Backend:
    """The backend that runs ``p`` for ``backend=name``; PagedDecodeError when none."""
    if name == "auto":
        for b in REGISTRY.values():
            if b.auto_ok(p, device) and b.support_error(p, device) is None:
                return b
        raise PagedDecodeError(f"no backend supports this call on {device}")
    b = REGISTRY.get(name)
    if b is None:
        raise PagedDecodeError(f"unknown backend {name!r}; supported: {', '.join(backend_names())}")
    err = b.support_error(p, device)
    if err:
        raise PagedDecodeError(err)
    return b


# -- Triton (portable kernel): CUDA, or the CPU interpreter when asked for by name --


def _triton_module():
    try:
        from kvbridge.kernels import triton_launch
    except ImportError:
        return None
    return triton_launch


def _triton_support(p: DecodeProblem, device: torch.device) -> str | None:
    mod = _triton_module()
    if mod is None:
        return (
            "backend='triton' needs the triton package (pip install 'kvbridge[triton]'); "
            "use backend='torch'"
        )
    err = mod.support_error(p)
    if err:
        return err
    if device.type != "cuda" and not mod.is_interpreted():
        return (
            f"backend='triton' needs CUDA tensors (q is on {device}) or the Triton "
            "interpreter (TRITON_INTERPRET=1 set before triton is imported); use "
            "backend='torch' or 'auto' on the CPU"
        )
    return None


def _triton_launch(*args, **kw) -> torch.Tensor:
    fn = _TRITON.get("launch")
    if fn is None:
        from kvbridge.kernels.triton_launch import triton_paged_decode as fn

        _TRITON["launch"] = fn
    return fn(*args, **kw)


_TRITON: dict = {}


def _gluon_support(p: DecodeProblem, device: torch.device) -> str | None:
    mod = _triton_module()
    if mod is None:
        return "backend='gluon-mla' needs the triton package; use backend='torch'"
    return mod.gluon_mla_support_error(p, device)


def _gluon_auto_ok(p: DecodeProblem, device: torch.device) -> bool:
    """``auto`` takes the Hopper MLA kernel on CUDA; for an fp8 latent while
    ``GLUON_FP8_AUTO`` is set (checked on an H200 against the float64 reference and
    faster than the portable kernel there: bench/README.md)."""
    if device.type != "cuda":
        return False
    return p.kv_dtype != torch.float8_e4m3fn or GLUON_FP8_AUTO


GLUON_FP8_AUTO = True


def _gluon_launch(*args, **kw) -> torch.Tensor:
    fn = _TRITON.get("gluon")
    if fn is None:
        from kvbridge.kernels.triton_launch import gluon_mla_paged_decode as fn

        _TRITON["gluon"] = fn
    return fn(*args, **kw)


# -- Hopper MLA (Gluon: wgmma, cp.async ring), first for ``auto`` on sm_90 MLA calls --
register(Backend("gluon-mla", _gluon_support, _gluon_auto_ok, _gluon_launch))
register(Backend("triton", _triton_support, lambda p, d: d.type == "cuda", _triton_launch))
register(
    Backend(
        "torch",
        lambda p, d: None,
        lambda p, d: True,
        torch_paged_decode,
        device_metadata=False,
    )
)
