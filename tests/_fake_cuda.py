"""A fake ``torch.cuda`` on the CPU, for testing the CUDA-graph runner (psld_fast.graphs) without a GPU.

What it keeps of the real thing, as far as the runner can tell:

* ``CUDAGraph.capture_begin`` / ``capture_end`` record every op run in the capturing thread (a
  TorchDispatchMode: thread-local, like ``capture_error_mode="thread_local"``); capture is refused
  on the default stream.  A real capture executes nothing, so every tensor an op writes during
  capture (its mutated arguments and fresh outputs) is poisoned afterwards: NaN for floating
  tensors, 0 for integer ones (they may be indices), so code that trusts a value computed during
  capture sees garbage, as it would on a GPU.
* A host sync during capture (``.item()``, ``bool(t)``, ``torch.equal``, ``nonzero``,
  ``torch.cuda.synchronize``, ``Stream.synchronize``) raises like CUDA's "operation not permitted
  when stream is capturing" and invalidates the capture (``capture_end`` then raises too).
* ``replay`` re-runs the recorded ops on the same tensors: in-place ops mutate them again, fresh
  outputs are copied into the tensors the capture returned (later ops read those), views need
  nothing.  So a graph sees the static buffers' current contents and nothing else.
* Streams are objects with a per-thread current stream; ``torch.cuda.set_sync_debug_mode("error")``
  makes a host sync raise until it is set back to 0.

Tensors stay CPU tensors and the device is ``cpu``; ``psld_fast.api.use_cuda_graph`` is patched to
treat the CPU like a GPU and the C++ CPU kernel like a GPU kernel backend.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default,
            aten.nonzero.default, aten.masked_select.default}


class HostSyncError(RuntimeError):
    pass


class FakeStream:
    def __init__(self, device=None, priority=0, name="side"):
        self.device, self.name = device, name
        self.waits = 0

    def wait_stream(self, other):
        self.waits += 1

    def synchronize(self):
        _FAKE.host_sync("Stream.synchronize()")

    def __repr__(self):
        return f"<FakeStream {self.name}>"


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _poison(t: torch.Tensor) -> None:
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    else:
        t.fill_(0)


class _CaptureMode(TorchDispatchMode):
    """Records and poisons every op of the capturing thread; raises on host syncs."""

    def __init__(self, graph):
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            self.graph.invalidated = f"{func} syncs the host"
            raise HostSyncError(f"CUDA error: operation not permitted when stream is capturing ({func} "
                                "syncs the host during CUDA graph capture)")
        out = func(*args, **kwargs)
        self.graph.ops.append((func, args, kwargs, out))
        schema = func._schema
        written = []
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = args[i] if i < len(args) else kwargs.get(arg.name)
                written += _tensors(value)
        outs = out if isinstance(out, (list, tuple)) else (out,)
        for ret, value in zip(schema.returns, outs):
            if ret.alias_info is None:  # a fresh tensor (views and in-place returns alias an input)
                written += _tensors(value)
        with torch.no_grad():
            for t in written:
                _poison(t)
        return out


class FakeGraph:
    def __init__(self, *args, **kwargs):
        self.ops: list = []
        self.invalidated: str | None = None
        self.captured = False
        self._mode = None
        self.replays = 0

    def capture_begin(self, pool=None, capture_error_mode="global"):
        if _FAKE.current_stream() is _FAKE.default_stream:
            raise RuntimeError("CUDA graphs must be captured on a non-default stream")
        if _FAKE.capturing() is not None:
            raise RuntimeError("a capture is already underway in this thread")
        self._mode = _CaptureMode(self)
        self._mode.__enter__()
        _FAKE.local.capturing = self

    def capture_end(self):
        if self._mode is None:
            raise RuntimeError("capture_end without capture_begin")
        self._mode.__exit__(None, None, None)
        self._mode = None
        _FAKE.local.capturing = None
        _FAKE.captures += 1
        if self.invalidated:
            raise RuntimeError(f"CUDA error: operation failed due to a previous error during capture "
                               f"({self.invalidated})")
        self.captured = True

    def replay(self):
        if not self.captured:
            raise RuntimeError("replay of a graph that was not captured")
        with torch.no_grad():
            for func, args, kwargs, out in self.ops:
                fresh = func(*args, **kwargs)
                outs = out if isinstance(out, (list, tuple)) else (out,)
                news = fresh if isinstance(fresh, (list, tuple)) else (fresh,)
                for ret, old, new in zip(func._schema.returns, outs, news):
                    if ret.alias_info is None and isinstance(old, torch.Tensor):
                        old.copy_(new)
        self.replays += 1
        _FAKE.replays += 1


class _SyncCheckMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS:
            raise HostSyncError(f"called a synchronizing CUDA operation ({func}) under "
                                "torch.cuda.set_sync_debug_mode('error')")
        return func(*args, **(kwargs or {}))


class FakeCuda:
    """The state behind the patched functions (one per test)."""

    def __init__(self):
        self.local = threading.local()
        self.default_stream = FakeStream(name="default")
        self.captures = self.replays = self.record_streams = 0

    def current_stream(self, device=None):
        return getattr(self.local, "stream", None) or self.default_stream

    def capturing(self):
        return getattr(self.local, "capturing", None)

    def host_sync(self, what):
        graph = self.capturing()
        if graph is not None:
            graph.invalidated = f"{what} syncs the host"
            raise HostSyncError(f"CUDA error: operation not permitted when stream is capturing ({what})")
        if getattr(self.local, "sync_mode", None) is not None:
            raise HostSyncError(f"called a synchronizing CUDA operation ({what}) under sync debug mode")

    @contextlib.contextmanager
    def stream(self, s):
        previous = getattr(self.local, "stream", None)
        self.local.stream = s
        try:
            yield
        finally:
            self.local.stream = previous

    def set_sync_debug_mode(self, mode):
        on = mode not in (0, "default")
        current = getattr(self.local, "sync_mode", None)
        if on and current is None:
            self.local.sync_mode = _SyncCheckMode()
            self.local.sync_mode.__enter__()
        elif not on and current is not None:
            current.__exit__(None, None, None)
            self.local.sync_mode = None

    def install(self, monkeypatch):
        import psld_fast.api
        from psld_fast import graphs

        cuda = torch.cuda
        monkeypatch.setattr(cuda, "Stream", FakeStream)
        monkeypatch.setattr(cuda, "CUDAGraph", FakeGraph)
        monkeypatch.setattr(cuda, "current_stream", self.current_stream)
        monkeypatch.setattr(cuda, "stream", self.stream)
        monkeypatch.setattr(cuda, "device", lambda device=None: contextlib.nullcontext())
        monkeypatch.setattr(cuda, "current_device", lambda: 0)
        monkeypatch.setattr(cuda, "is_current_stream_capturing", lambda: self.capturing() is not None)
        monkeypatch.setattr(cuda, "synchronize", lambda device=None: self.host_sync("torch.cuda.synchronize()"))
        monkeypatch.setattr(cuda, "set_sync_debug_mode", self.set_sync_debug_mode)

        def record_stream(tensor, stream):
            assert isinstance(stream, FakeStream), f"record_stream({stream!r})"
            self.record_streams += 1

        monkeypatch.setattr(torch.Tensor, "record_stream", record_stream)
        real_policy = graphs.use_cuda_graph

        def use_cuda_graph(cuda_graph, device, backend, callback=None):
            device = "cuda" if torch.device(device).type == "cpu" else device
            return real_policy(cuda_graph, device, "cuda" if backend == "cpu" else backend, callback)

        monkeypatch.setattr(psld_fast.api, "use_cuda_graph", use_cuda_graph)
        return self

    def close(self):
        self.set_sync_debug_mode(0)


_FAKE: FakeCuda = FakeCuda()


@contextlib.contextmanager
def fake_cuda(monkeypatch):
    """Install a fresh fake torch.cuda for the duration of the block (see the module doc)."""
    global _FAKE
    _FAKE = FakeCuda().install(monkeypatch)
    try:
        yield _FAKE
    finally:
        _FAKE.close()
