"""Cheap repeated launches of a Triton kernel: call the compiled kernel directly.

``JITFunction.__getitem__(grid)(...)`` binds and specialises every argument in
Python on each call (~30 µs for the decode kernel's ~45 arguments on an H200
host). ``launch`` does that once per *specialisation class* of the arguments,
then calls ``CompiledKernel.run`` itself. The class of an argument is at least
as fine as Triton's own specialisation: tensors by (dtype, 16-byte aligned),
ints by (== 1, divisible by 16, fits in int32), anything else by type, so a
cached kernel is only reused where Triton would have picked the same one (the key
uses the exact value of every specialised int, e.g. strides, which is finer still).
Launch hooks (profilers), the interpreter, or a Triton whose ``CompiledKernel``
lacks the expected API fall back to the ordinary path.
"""

from __future__ import annotations

import os

import torch

# False after the first failure of the direct path; KVBRIDGE_TRITON_FAST_LAUNCH=0 turns it off
_STATE = {"ok": os.environ.get("KVBRIDGE_TRITON_FAST_LAUNCH", "1") != "0"}


def _layout(args: tuple, dynamic: frozenset) -> tuple:
    """Positions of tensors, specialised ints and unspecialised ints in ``args``."""
    tensors = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
    ints = [i for i, a in enumerate(args) if type(a) is int]
    return (
        tensors,
        tuple(i for i in ints if i not in dynamic),
        tuple(i for i in ints if i in dynamic),
    )


def _key(args: tuple, layout: tuple) -> tuple:
    """Tensors by (dtype, 16-byte aligned); specialised ints by value (finer than Triton's
    == 1 / divisible by 16 classes); unspecialised ints by whether each fits in int32."""
    tensors, spec, dyn = layout
    key = [(args[i].dtype, args[i].data_ptr() & 15 == 0) for i in tensors]
    key += [args[i] for i in spec]
    key += [-0x80000000 <= args[i] < 0x80000000 for i in dyn]
    return tuple(key)


try:
    from triton import knobs as _knobs
except ImportError:  # a Triton without knobs: always the ordinary path
    _knobs = None


def _hooked() -> bool:
    if _knobs is None:
        return True
    rt = _knobs.runtime
    return _active(rt.launch_enter_hook) or _active(rt.launch_exit_hook)


def _active(hook: object) -> bool:
    """A launch hook that does something (Triton >= 3.5 keeps an empty HookChain)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def launch(jit_fn, cache: dict, grid: tuple, args: tuple, consts: dict, device_index: int):
    """``jit_fn[grid](*args, **consts)``; ``cache`` keeps compiled kernels per argument class.

    ``args`` are the positional (run-time) parameters, ``consts`` the constexprs by
    name plus launch options (num_warps, num_stages). Returns the compiled kernel.
    """
    if not _STATE["ok"] or _hooked():
        return jit_fn[grid](*args, **consts)
    layout = cache.get((id(jit_fn), len(args)))
    if layout is None:
        names = getattr(jit_fn, "arg_names", None)
        if names is None:  # the interpreter, stand-ins: nothing to cache
            return jit_fn[grid](*args, **consts)
        dns = {
            names[i] if isinstance(i, int) else i for i in getattr(jit_fn, "do_not_specialize", ())
        }
        layout = cache[(id(jit_fn), len(args))] = _layout(args, frozenset(
            i for i, n in enumerate(names[: len(args)]) if n in dns))  # fmt: skip
    key = (id(jit_fn), *_key(args, layout))
    hit = cache.get(key)
    if hit is not None:
        kernel, tail = hit
        try:
            stream = torch._C._cuda_getCurrentRawStream(device_index)
            g = (*grid, 1, 1)
            kernel.run(g[0], g[1], g[2], stream, kernel.function,
                       kernel.packed_metadata, None, None, None, *args, *tail)  # fmt: skip
            return kernel
        except (AttributeError, TypeError):  # another Triton API: use the slow path from now on
            _STATE["ok"] = False
            cache.clear()
            return jit_fn[grid](*args, **consts)
    kernel = jit_fn[grid](*args, **consts)
    if not hasattr(kernel, "packed_metadata"):  # interpreter, stand-ins: nothing to cache
        return kernel
    names = jit_fn.arg_names
    tail = tuple(consts[n] for n in names[len(args) :])  # constexprs in parameter order
    cache[key] = (kernel, tail)
    return kernel
