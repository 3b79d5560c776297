"""CUDA IPC through the driver API (``libcuda``, ctypes): export, open, copy, events.

What torch's own multiprocessing does for a shared CUDA tensor, for raw registered
regions: ``cuMemGetAddressRange`` finds the ``cudaMalloc`` allocation holding an
address, ``cuIpcGetMemHandle`` exports it, the peer process maps it once with
``cuIpcOpenMemHandle`` (peer access enabled lazily, so another GPU of the host works
too) and copies with ``cuMemcpyDtoDAsync`` on a stream of its own; an event recorded
after the copies says when they are done. Everything runs in the device's primary
context (the one torch uses). Imported only when a region or a peer is GPU memory.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
from kvbridge.connector.transfer.errors import EngineUnavailableError, TransferFailedError

CUDA_SUCCESS = 0
CUDA_ERROR_NOT_READY = 600
IPC_LAZY_ENABLE_PEER_ACCESS = 1
STREAM_NON_BLOCKING = 1
EVENT_DISABLE_TIMING = 2
_u64, _vp = ctypes.c_uint64, ctypes.c_void_p


class IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]


_SIGNATURES = {
    "cuInit": [ctypes.c_uint],
    "cuDeviceGet": [ctypes.POINTER(ctypes.c_int), ctypes.c_int],
    "cuDevicePrimaryCtxRetain": [ctypes.POINTER(_vp), ctypes.c_int],
    "cuCtxSetCurrent": [_vp],
    "cuMemGetAddressRange_v2": [ctypes.POINTER(_u64), ctypes.POINTER(ctypes.c_size_t), _u64],
    "cuIpcGetMemHandle": [ctypes.POINTER(IpcHandle), _u64],
    "cuIpcOpenMemHandle_v2": [ctypes.POINTER(_u64), IpcHandle, ctypes.c_uint],
    "cuIpcCloseMemHandle": [_u64],
    "cuStreamCreate": [ctypes.POINTER(_vp), ctypes.c_uint],
    "cuMemcpyDtoDAsync_v2": [_u64, _u64, ctypes.c_size_t, _vp],
    "cuEventCreate": [ctypes.POINTER(_vp), ctypes.c_uint],
    "cuEventRecord": [_vp, _vp],
    "cuEventQuery": [_vp],
    "cuEventDestroy_v2": [_vp],
    "cuGetErrorString": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
}


class CudaDriver:
    """The process's driver handle (``CudaDriver.get()``); thread-safe."""

    _instance: CudaDriver | None = None
    _instance_lock = threading.Lock()

    @classmethod
    def get(cls) -> CudaDriver:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            # the same library, called without releasing the GIL: for the calls that
            # never block (queueing a copy, recording or querying an event). ``CDLL``
            # releases and re-takes the GIL around every call, and under contention
            # (an engine thread, many streams) each re-take waits a switch interval:
            # a pull of hundreds of ranges then took hundreds of milliseconds.
            fast = ctypes.PyDLL("libcuda.so.1")
        except OSError as exc:
            raise EngineUnavailableError(f"CUDA IPC needs the CUDA driver: {exc}") from None
        for handle in (lib, fast):
            for name, args in _SIGNATURES.items():
                fn = getattr(handle, name)
                fn.argtypes, fn.restype = args, ctypes.c_int
        self._lib, self._fast = lib, fast
        self._lock = threading.Lock()
        self._ctx: dict[int, ctypes.c_void_p] = {}
        self._streams: dict[int, ctypes.c_void_p] = {}
        self._opened: dict[bytes, list] = {}  # handle -> [base, users]
        self._call("cuInit", 0)

    def _call(self, name: str, *args) -> None:
        rc = getattr(self._lib, name)(*args)
        if rc != CUDA_SUCCESS:
            raise TransferFailedError(f"CUDA {name} failed: {self._error(rc)}")

    def _error(self, rc: int) -> str:
        text = ctypes.c_char_p()
        self._lib.cuGetErrorString(rc, ctypes.byref(text))
        return f"{rc} ({text.value.decode() if text.value else 'unknown'})"

    def use(self, device: int) -> None:
        """Make ``device``'s primary context current on this thread."""
        ctx = self._ctx.get(device)
        if ctx is None:
            with self._lock:
                ctx = self._ctx.get(device)
                if ctx is None:
                    dev, ctx = ctypes.c_int(), _vp()
                    self._call("cuDeviceGet", ctypes.byref(dev), device)
                    self._call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)
                    self._ctx[device] = ctx
        rc = self._fast.cuCtxSetCurrent(ctx)
        if rc != CUDA_SUCCESS:
            raise TransferFailedError(f"CUDA cuCtxSetCurrent failed: {self._error(rc)}")

    def export(self, addr: int, device: int) -> tuple[bytes, int]:
        """``(ipc handle, offset of addr in its allocation)`` of device memory at ``addr``."""
        self.use(device)
        base, size, handle = _u64(), ctypes.c_size_t(), IpcHandle()
        self._call("cuMemGetAddressRange_v2", ctypes.byref(base), ctypes.byref(size), addr)
        self._call("cuIpcGetMemHandle", ctypes.byref(handle), base.value)
        return bytes(handle), addr - base.value  # all 64 bytes (a c_char field stops at NUL)

    def open(self, handle: bytes, device: int) -> int:
        """Map a peer's allocation into this process (once per handle); its base address."""
        with self._lock:
            entry = self._opened.get(handle)
            if entry is not None:
                entry[1] += 1
                return entry[0]
        self.use(device)
        raw, base = IpcHandle.from_buffer_copy(handle), _u64()
        self._call("cuIpcOpenMemHandle_v2", ctypes.byref(base), raw, IPC_LAZY_ENABLE_PEER_ACCESS)
        with self._lock:
            entry = self._opened.setdefault(handle, [base.value, 0])
            entry[1] += 1
            return entry[0]

    def close(self, handle: bytes, device: int) -> None:
        with self._lock:
            entry = self._opened.get(handle)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del self._opened[handle]
        self.use(device)
        self._lib.cuIpcCloseMemHandle(entry[0])

    def _stream(self, device: int) -> ctypes.c_void_p:
        stream = self._streams.get(device)
        if stream is None:
            stream = _vp()
            self._call("cuStreamCreate", ctypes.byref(stream), STREAM_NON_BLOCKING)
            self._streams[device] = stream
        return stream

    def copy(self, device: int, dst: np.ndarray, src: np.ndarray, nbytes: np.ndarray):
        """Queue ``nbytes[i]`` from ``src[i]`` to ``dst[i]`` on ``device``'s copy stream;
        returns the event recorded after the last copy."""
        self.use(device)
        with self._lock:
            stream = self._stream(device)
        memcpy = self._fast.cuMemcpyDtoDAsync_v2  # asynchronous: holds the GIL throughout
        for d, s, n in zip(dst.tolist(), src.tolist(), nbytes.tolist(), strict=True):
            rc = memcpy(d, s, n, stream)
            if rc != CUDA_SUCCESS:
                raise TransferFailedError(f"CUDA copy of {n} bytes failed: {self._error(rc)}")
        event = _vp()
        for name, args in (("cuEventCreate", (ctypes.byref(event), EVENT_DISABLE_TIMING)),
                           ("cuEventRecord", (event, stream))):  # fmt: skip
            rc = getattr(self._fast, name)(*args)
            if rc != CUDA_SUCCESS:
                raise TransferFailedError(f"CUDA {name} failed: {self._error(rc)}")
        return event

    def done(self, device: int, event) -> bool:
        """Whether the copies before ``event`` finished (``TransferFailedError`` if they broke)."""
        self.use(device)
        rc = self._fast.cuEventQuery(event)
        if rc == CUDA_ERROR_NOT_READY:
            return False
        if rc != CUDA_SUCCESS:
            raise TransferFailedError(f"CUDA copy failed: {self._error(rc)}")
        return True

    def destroy(self, device: int, event) -> None:
        self.use(device)
        self._lib.cuEventDestroy_v2(event)
