"""CUDA-graph runner: the score network and the fused steps of a whole sampler program in one graph.

``psld_fast.sample`` runs ``eps = net(u, tau_k); affine_step_(u, eps, seeds, coef_k, k)`` for every
stage k.  Eagerly that is one Python loop iteration, a network's worth of kernel launches and one
fused-step launch per NFE, so for small batches the GPU waits on the host.  This module captures the
whole loop (all stages) in one ``torch.cuda.CUDAGraph`` and replays it with a single launch:

* per-stage coefficients are Python floats, so they are baked into the captured kernel arguments;
  the Philox step index ``k`` and stream id likewise;
* the per-stage forward times are static device tensors made before capture;
* the per-batch input is the seeds, copied into a static buffer (``seeds_buf.copy_(seeds)``); the
  state buffer needs no refill since stage 0 (the prior draw) overwrites it without reading it;
* the NaN/Inf tracking of the eager loop is a static device ``status`` tensor updated by torch ops
  inside the graph and read once after replay (the batch's one host sync, skipped with
  ``check=False``).

A graph is valid for one signature: batch size, data shape, dtype, device, backend, Philox stream,
sampler program (a hash of every stage's tau and coefficients), network (its identity, guarded by
a weak reference, plus the addresses of its parameters and buffers, which the graph reads in place,
and its forward hooks) and the numerics a capture bakes in (autocast on the device and its dtype,
TF32 for matmuls and convolutions).  The network is the object the eager loop calls
(``runner._callable``): a plain ``EpsModel`` stands for its inner ``net`` only when the wrapper has
no hooks, since a capture of a hooked wrapper records the hooks too.
Graphs live in a small LRU cache (``PSLD_FAST_GRAPH_CACHE`` entries, default 4).

Life of a signature: its first batch runs eagerly on the runner's own side stream.  That run is the warm-up (it
JIT-compiles the Triton kernel, picks cuDNN/cuBLAS algorithms and creates the side stream's library
workspaces) and its result is the batch's result, so a one-batch call costs no more than eager.  The
second batch with the same signature captures the graph on that side stream and replays it; later
batches (and later ``sample`` calls) only replay.  A smaller last batch is padded with copies of its
first seed and sliced: a sample depends only on its own seed, so padding changes nothing.  When
capture fails (a network that syncs the host, e.g. ``.item()``, or branches on tensor values) the
capture is ended, its memory released, the reason logged once per signature on the ``psld_fast``
logger, and that signature runs eagerly from then on.

Threads and streams: each runner has its own lock (``run`` is serialised per runner, so two threads
sampling the same signature never share its static buffers or interleave a warm-up with a capture)
and its own side stream (a runner's capture never records another runner's work).  Everything a
runner does on the device (warm-up, static buffers, capture, replay, the copy handed back) happens
on that side stream, ordered after the caller's current stream and before it again; tensors crossing
streams are marked with ``record_stream``, so the caching allocator never reuses them early.

Training mode: ``sample`` never changes the network's mode (it does not call ``.eval()``, which
would mutate the caller's module).  The ``training`` flag is part of the signature, so switching
modes captures another graph; a module in training mode that holds dropout or batch-norm layers is
sampled as it is (random dropout masks, batch statistics and, for batch norm, running statistics
updated on every call, inside a graph too) with one RuntimeWarning per network, on every sampling path
(:func:`psld_fast.runner.warn_if_training`): call ``net.eval()`` first.
"""
from __future__ import annotations

import collections
import hashlib
import inspect
import logging
import os
import struct
import threading
import weakref
from dataclasses import dataclass

import torch

from .program import Program
from .runner import _callable, multistep_for, as_step_eps, nonfinite, raise_if_nonfinite, run_program, warn_if_training

__all__ = ["GraphRunner", "get_runner", "extra_args_spec", "use_cuda_graph", "clear_cache", "cache_info",
           "cache_capacity", "program_hash", "ENV_CACHE", "DEFAULT_CACHE_SIZE"]

log = logging.getLogger("psld_fast")

ENV_CACHE = "PSLD_FAST_GRAPH_CACHE"
DEFAULT_CACHE_SIZE = 4
KERNEL_BACKENDS = ("cuda", "triton")

_lock = threading.RLock()
_cache: "collections.OrderedDict[tuple, _Entry]" = collections.OrderedDict()
_logged: set[tuple] = set()


# ----------------------------------------------------------------------------------------- policy
def use_cuda_graph(cuda_graph, device, backend: str, callback=None) -> bool:
    """Whether ``sample`` runs its batches through a graph; validates ``cuda_graph``.

    ``cuda_graph``: "auto" (graphs on a CUDA device with a kernel backend, "cuda" or "triton"),
    True (graphs on any CUDA device and backend), False (eager).  On CPU every value means eager.
    A ``callback`` needs the state after every stage, which a replayed graph cannot give: eager.
    """
    valid = cuda_graph is True or cuda_graph is False or (isinstance(cuda_graph, str) and cuda_graph == "auto")
    if not valid:
        raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
    if torch.device(device).type != "cuda" or cuda_graph is False:
        return False
    if callback is not None:
        if cuda_graph is True:
            _log_once(("callback",), "psld_fast: cuda_graph=True ignored: a callback needs the state "
                                     "after every stage, so the batches run eagerly")
        return False
    return cuda_graph is True or backend in KERNEL_BACKENDS


# ------------------------------------------------------------------------------------------ cache
def cache_capacity() -> int:
    """Entries the graph cache keeps (``PSLD_FAST_GRAPH_CACHE``, default 4, at least 1)."""
    raw = os.environ.get(ENV_CACHE, "").strip()
    if not raw:
        return DEFAULT_CACHE_SIZE
    try:
        value = int(raw)
        if value < 1:
            raise ValueError
    except ValueError:
        _log_once(("env", raw), f"psld_fast: {ENV_CACHE}={raw!r} is not an integer >= 1; "
                                f"keeping {DEFAULT_CACHE_SIZE} graphs")
        return DEFAULT_CACHE_SIZE
    return value


def clear_cache() -> None:
    """Drop every cached graph (their memory pools are released with them)."""
    with _lock:
        _cache.clear()


def cache_info() -> dict:
    """``size``, ``capacity`` and per-entry ``entries`` (least recently used first): the runner's
    state, batch, sampler, NFE and counts of eager batches, captures and replays."""
    with _lock:
        _purge_dead()
        entries = [dict(state=r.state, batch=r.batch, sampler=r.program.sampler, nfe=r.program.nfe,
                        eager=r.stats.eager, captures=r.stats.captures, replays=r.stats.replays,
                        failure=r.stats.failure)
                   for r in (e.runner for e in _cache.values())]
        return {"size": len(_cache), "capacity": cache_capacity(), "entries": entries}


@dataclass
class _Entry:
    net_ref: object          # callable returning the network object, or None once it is gone
    runner: "GraphRunner"


def _purge_dead() -> None:
    for key in [k for k, e in _cache.items() if e.net_ref() is None]:
        del _cache[key]


def _net_object(model):
    """The object whose identity names the network: the user's net inside a plain EpsModel wrapper
    (``sample`` builds a fresh wrapper per call around a bare callable) when the eager loop calls
    that net directly (``runner._callable``: no hooks on the wrapper), the instance behind a bound
    method, else the model itself (a hooked wrapper: the graph records its hooks)."""
    net = _callable(model)
    if inspect.ismethod(net):
        return net.__self__, getattr(net.__func__, "__qualname__", "")
    return net, ""


def _hooks_fingerprint(*objs) -> tuple:
    """Identities of the forward (pre-)hooks of ``objs`` (modules) and the global ones: a capture
    records them, so adding or removing one needs a new graph."""
    dicts = [torch.nn.modules.module._global_forward_pre_hooks, torch.nn.modules.module._global_forward_hooks]
    for obj in objs:
        if isinstance(obj, torch.nn.Module):
            dicts += [obj._forward_pre_hooks, obj._forward_hooks]
    return tuple(tuple(id(h) for h in d.values()) for d in dicts)


def _numerics_fingerprint(device: torch.device) -> tuple:
    """Autocast on ``device``'s type (enabled, dtype) and TF32 flags: a capture bakes in the kernels
    they select, so a graph captured under one setting must not replay under another."""
    dev = device.type
    autocast = torch.is_autocast_enabled(dev)
    return (autocast, torch.get_autocast_dtype(dev) if autocast else None,
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision())


def _weak(obj):
    try:
        return weakref.ref(obj)
    except TypeError:  # not weak-referenceable: the cache holds it (bounded by the cache size)
        return lambda: obj


def _tensor_fingerprint(obj) -> tuple:
    """Addresses, shapes and dtypes of a module's parameters and buffers: a graph reads them in
    place, so replacing a tensor (not an in-place update such as load_state_dict) needs a new graph."""
    if not isinstance(obj, torch.nn.Module):
        return ()
    tensors = list(obj.parameters()) + list(obj.buffers())
    return (obj.training, hash(tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in tensors)))


def program_hash(program: Program) -> str:
    """Digest of a program's stages (tau and the 16 coefficients each, as float64 bytes)."""
    h = hashlib.sha1(program.sampler.encode())
    for stage in program.stages:
        tau = float("nan") if stage.tau is None else float(stage.tau)
        h.update(struct.pack("<17d", tau, *stage.coef))
        for extra in (stage.G2, stage.dcoef):  # multistep stages
            h.update(b"-" if extra is None else struct.pack(f"<{len(extra)}d", *extra))
    return h.hexdigest()


def get_runner(model, program: Program, backend: str, step_fn, *, batch: int, dtype: torch.dtype,
               device, stream: int = 0, lifted_step_fn=None, extra_spec: tuple = ()) -> "GraphRunner":
    """The cached runner for this signature, or a new one (evicting the least recently used).

    ``lifted_step_fn``: for a lifted model (:class:`psld_fast.lift.DenoiserModel`), the lifted step
    the graph runs after each denoiser call.  ``extra_spec``: :func:`extra_args_spec` of the
    call's ``extra_args`` (tensors become static buffers refilled per batch; other values are baked
    into the graph and so part of its signature)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    net, method = _net_object(model)
    warn_if_training(model)  # sample() warns first, on every path; once per network
    lifted = lifted_step_fn is not None and hasattr(model, "lifted")
    hooked = (model, net) + ((model.denoiser,) if lifted else ())
    key = (id(net), method, _tensor_fingerprint(net), _hooks_fingerprint(*hooked), int(batch),
           tuple(model.shape), dtype, str(device), backend, int(stream), program_hash(program),
           _numerics_fingerprint(device), lifted, tuple(extra_spec))
    with _lock:
        _purge_dead()
        entry = _cache.get(key)
        if entry is not None and entry.net_ref() is net:
            _cache.move_to_end(key)
            return entry.runner
        runner = GraphRunner(program, step_fn, batch=batch, shape=model.shape, dtype=dtype,
                             device=device, stream=stream, key=key,
                             lifted_step_fn=lifted_step_fn if lifted else None, extra_spec=extra_spec)
        _cache[key] = _Entry(_weak(net), runner)
        capacity = cache_capacity()
        while len(_cache) > capacity:
            _cache.popitem(last=False)
        return runner


def extra_args_spec(extra_args: dict, num_samples: int) -> tuple:
    """The graph signature of ``extra_args`` (already checked by ``sample``): per name, a tensor's
    kind ("per_sample": one row per sample, sliced with the batch; "shared": the same every batch),
    its per-row shape and dtype; any other value by its repr (a capture bakes it in)."""
    spec = []
    for name in sorted(extra_args):
        v = extra_args[name]
        if isinstance(v, torch.Tensor):
            per_sample = v.dim() > 0 and v.shape[0] == num_samples and num_samples > 1
            spec.append((name, "per_sample" if per_sample else "shared",
                         tuple(v.shape[1:]) if per_sample else tuple(v.shape), v.dtype))
        else:
            spec.append((name, "value", type(v).__name__, repr(v)))
    return tuple(spec)


# ----------------------------------------------------------------------------------------- runner
@dataclass
class RunnerStats:
    """What a runner did: eager batches (the warm-up included), captures and replays."""

    eager: int = 0
    captures: int = 0
    replays: int = 0
    failure: str | None = None


class GraphRunner:
    """Runs batches of one program for one signature through a CUDA graph (see the module doc).

    ``state``: "new" (no batch run yet), "warm" (warm-up done, capture on the next batch),
    "captured" (replaying), "failed" (capture impossible: eager).  The runner holds no reference to
    the network: ``run`` receives the model each time.
    """

    def __init__(self, program: Program, step_fn, *, batch: int, shape, dtype, device, stream=0,
                 key=None, lifted_step_fn=None, extra_spec: tuple = ()):
        self.program, self.step_fn, self.lifted_step_fn = program, step_fn, lifted_step_fn
        self.extra_spec = tuple(extra_spec)
        self.batch, self.shape, self.dtype = int(batch), tuple(shape), dtype
        self.device, self.stream, self.key = torch.device(device), int(stream), key
        self.coefs = [stage.coef for stage in program.stages]
        self.state = "new"
        self.stats = RunnerStats()
        self.graph = None
        self.u = self.seeds_buf = self.status = self.y = self.ms = None
        self.taus: list = []
        self.extra: dict = {}          # static buffers of the extra_args tensors
        self._lock = threading.Lock()  # one batch at a time per runner (see the module doc)
        self._stream = None            # this runner's side stream, made on first use

    # -------------------------------------------------------------------------------- public
    def run(self, model, seeds: torch.Tensor, *, batch_start: int = 0, bar=None, check: bool = True,
            extra_args: dict | None = None):
        """Final packed state (b, 2C, ...) for ``seeds`` (b,) int64 on the device, b <= batch.

        ``extra_args``: this batch's network keywords (per-sample tensors already sliced to b rows),
        of the runner's ``extra_spec``.  Raises FloatingPointError like
        :func:`psld_fast.runner.run_program` when ``check``; with ``check=False`` nothing here syncs
        the host once the graph is captured.  Thread-safe: calls on one runner run one after another.
        """
        b = seeds.shape[0]
        if not 1 <= b <= self.batch:
            raise ValueError(f"GraphRunner: got {b} seeds for a graph of batch {self.batch}")
        extra_args = dict(extra_args or {})
        self._check_extra(extra_args, b)
        with self._lock:
            u = self._run_locked(model, seeds, batch_start, check, extra_args)
        if bar is not None:
            bar.update(b * self.program.nfe)
        return u

    def _run_locked(self, model, seeds, batch_start, check, extra_args):
        with torch.cuda.device(self.device):
            if self.state == "warm":
                self._try_capture(model, extra_args)
            if self.state == "captured":
                try:
                    return self._replay(seeds, batch_start, check, extra_args)
                except FloatingPointError:
                    # the graph flags only the first NaN/Inf network output; the eager rerun (same
                    # seeds: same path) tells a failing network from a sampler whose state overflowed
                    self._run_eager(model, seeds, batch_start, True, extra_args)
                    raise
            return self._eager(model, seeds, batch_start, check, extra_args, warm_up=self.state == "new")

    def _run_eager(self, model, seeds, batch_start, check, extra_args):
        return run_program(model, self.program, seeds, self.step_fn, dtype=self.dtype, device=self.device,
                           stream=self.stream, batch_start=batch_start, check=check, extra_args=extra_args,
                           lifted_step_fn=self.lifted_step_fn)

    def _check_extra(self, extra_args: dict, b: int) -> None:
        """``extra_args`` must fit the signature the graph was made for: the same names, tensors of the
        same kind, row shape and dtype (per-sample ones with b rows), other values equal."""
        names = [n for n, *_ in self.extra_spec]
        if sorted(extra_args) != names:
            raise ValueError(f"GraphRunner: extra_args {sorted(extra_args)} do not match the graph's {names}")
        for name, kind, *rest in self.extra_spec:
            v = extra_args[name]
            if kind == "value":
                ok = not isinstance(v, torch.Tensor) and (type(v).__name__, repr(v)) == tuple(rest)
            else:
                shape, dtype = rest
                ok = isinstance(v, torch.Tensor) and v.dtype == dtype and (
                    tuple(v.shape) == (b, *shape) if kind == "per_sample" else tuple(v.shape) == shape)
            if not ok:
                raise ValueError(f"GraphRunner: extra_args[{name!r}] does not match the graph's signature "
                                 f"({kind}, {rest})")

    def _per_sample(self, name: str) -> bool:
        return any(n == name and kind == "per_sample" for n, kind, *_ in self.extra_spec)

    def _pad_extra(self, extra_args: dict, b: int) -> dict:
        """Per-sample tensors padded to the graph's batch with copies of their first row."""
        if b == self.batch:
            return extra_args
        return {k: torch.cat([v, v[:1].expand(self.batch - b, *v.shape[1:])])
                if self._per_sample(k) else v for k, v in extra_args.items()}

    def _side(self):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        return self._stream

    # ------------------------------------------------------------------------------- eager
    def _eager(self, model, seeds, batch_start, check, extra_args, warm_up):
        """Eager run.  The first one (``warm_up``) is padded to the graph's batch and runs on the
        side stream that the capture will use, so that stream's cuBLAS/cuDNN workspaces exist and
        every kernel (Triton JIT, cuDNN algorithm choice) is ready before capture."""
        self.stats.eager += 1
        if not warm_up:  # a signature that cannot be captured: plain eager, no padding
            return self._run_eager(model, seeds, batch_start, check, extra_args)
        b = seeds.shape[0]
        padded = self._pad(seeds)  # the warm-up runs the shapes the graph will be captured with
        extra = self._pad_extra(extra_args, b)
        cur = torch.cuda.current_stream(self.device)
        side = self._side()
        side.wait_stream(cur)
        _record(padded, side)  # made on the caller's stream, read on the side stream
        for v in extra.values():
            if isinstance(v, torch.Tensor):
                _record(v, side)
        try:
            with torch.cuda.stream(side), torch.no_grad():
                u = self._run_eager(model, padded, batch_start, check, extra)
        finally:
            cur.wait_stream(side)
        u.record_stream(cur)  # allocated on the side stream, handed to the caller's stream
        self.state = "warm"
        return u[:b]

    def _pad(self, seeds):
        b = seeds.shape[0]
        if b == self.batch:
            return seeds
        return torch.cat([seeds, seeds[:1].expand(self.batch - b)])

    # ----------------------------------------------------------------------------- capture
    def _allocate(self):
        """The static buffers, made on the side stream (called inside ``torch.cuda.stream(side)``):
        every later use (capture, replay, the copy handed back) is on that stream too."""
        B, dev = self.batch, self.device
        tau_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.u = torch.empty((B, 2 * self.shape[0], *self.shape[1:]), dtype=self.dtype, device=dev)
        self.seeds_buf = torch.zeros((B,), dtype=torch.int64, device=dev)
        self.status = torch.full((2,), -1, dtype=torch.int64, device=dev)  # first bad stage, state bad
        self.taus = [torch.full((B,), s.tau, dtype=tau_dtype, device=dev) if s.uses_network else None
                     for s in self.program.stages]
        # multistep programs: the static dbuf (the previous call's data estimate) and the fused ops
        self.ms = multistep_for(self.program, self.u, self.step_fn, self.lifted_step_fn)

    def _allocate_model(self, model, extra_args: dict):
        """The model's static buffers: per-call sigmas and y for a lifted model, the extra_args
        tensors (per-sample ones at the graph's batch)."""
        B, dev = self.batch, self.device
        if self.lifted_step_fn is not None:
            lp = model.lifted(self.program)
            sig_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
            self.taus = [None if s is None else torch.full((B,), min(max(s, model.sigma_min), model.sigma_max),
                                                          dtype=sig_dtype, device=dev) for s in lp.sigmas]
            self.coefs, self.writes_y = lp.coef, lp.writes_y
            self.y = torch.empty((B, *self.shape), dtype=self.dtype, device=dev)
        self.extra = {}
        for k, v in self._pad_extra(extra_args, self._rows(extra_args)).items():
            self.extra[k] = torch.empty_like(v, device=dev).copy_(v) if isinstance(v, torch.Tensor) else v

    def _rows(self, extra_args: dict) -> int:
        for k, v in extra_args.items():
            if self._per_sample(k):
                return v.shape[0]
        return self.batch

    def _fill_extra(self, extra_args: dict, b: int) -> None:
        """Refill the static extra_args buffers for a replay (per-sample rows padded)."""
        for k, v in extra_args.items():
            buf = self.extra[k]
            if not isinstance(buf, torch.Tensor):
                continue
            if self._per_sample(k):
                buf[:b].copy_(v)
                if b < self.batch:
                    buf[b:].copy_(v[:1].expand(self.batch - b, *v.shape[1:]))
            else:
                buf.copy_(v)

    def _loop(self, model):
        """The captured body: every stage, NaN/Inf flags on the device, no host sync."""
        u, seeds, first_bad, state_bad = self.u, self.seeds_buf, self.status[0], self.status[1]
        first_bad.fill_(-1)
        extra = self.extra
        if self.lifted_step_fn is not None:
            den, y = model.denoiser, self.y
            lower = self.dtype != torch.float64
            ms = self.ms
            for k, stage in enumerate(self.program.stages):
                D = None
                if self.taus[k] is not None:
                    D = den(y, self.taus[k], **extra)
                    if not isinstance(D, torch.Tensor):
                        D = D.sample  # a diffusers-style output object (checked by the warm-up run)
                    if lower and D.dtype == torch.float64:
                        D = D.float()
                    first_bad.masked_fill_(nonfinite(D) & (first_bad < 0), k)
                y_k = y if self.writes_y[k] else None
                if ms is not None and stage.is_multistep:
                    ms.lifted_step(stage, u, D, y_k, seeds, self.coefs[k], k, self.stream)
                else:
                    self.lifted_step_fn(u, D, y_k, seeds, self.coefs[k], k, self.stream)
        else:
            net = _callable(model)  # what the eager loop calls (the key names it, see _net_object)
            ms = self.ms
            for k, stage in enumerate(self.program.stages):
                eps = None
                if stage.uses_network:
                    eps = as_step_eps(net(u, self.taus[k], **extra) if extra else net(u, self.taus[k]), u)
                    first_bad.masked_fill_(nonfinite(eps) & (first_bad < 0), k)
                if ms is not None and stage.is_multistep:
                    ms.step(stage, u, eps, seeds, k, self.stream)
                else:
                    self.step_fn(u, eps, seeds, self.coefs[k], k, self.stream)
        state_bad.copy_(~torch.isfinite(u).all())

    def _try_capture(self, model, extra_args: dict):
        side = self._side()
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._allocate()
            self._allocate_model(model, extra_args)
        side.synchronize()  # one-time setup: the static buffers are ready (this stream only)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(side), torch.no_grad():
                # thread_local: a sync in this thread (e.g. .item() in the net) invalidates the
                # capture and raises; other threads are not disturbed.
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    self._loop(model)
                except BaseException:
                    _end_failed_capture(graph)
                    raise
                graph.capture_end()
        except Exception as exc:  # noqa: BLE001  (any capture failure means: run eagerly)
            del graph
            self.graph = None
            self.u = self.seeds_buf = self.status = self.y = self.ms = None
            self.taus, self.extra = [], {}
            self.coefs = [stage.coef for stage in self.program.stages]
            self.state = "failed"
            first_line = (str(exc).strip().splitlines() or [""])[0]
            self.stats.failure = f"{type(exc).__name__}: {first_line}"
            _log_once(("capture", self.key),
                      f"psld_fast: CUDA-graph capture failed for {self.program.sampler} nfe={self.program.nfe} "
                      f"batch={self.batch} ({self.stats.failure}); running eagerly. A network that "
                      "syncs the host (.item(), .cpu(), printing a tensor) or branches on tensor values "
                      "cannot be captured.")
            return
        self.graph = graph
        self.state = "captured"
        self.stats.captures += 1

    # ------------------------------------------------------------------------------ replay
    def _replay(self, seeds, batch_start, check, extra_args):
        b = seeds.shape[0]
        cur = torch.cuda.current_stream(self.device)
        side = self._side()
        side.wait_stream(cur)  # the caller's seeds (and earlier work) are ready
        _record(seeds, side)
        for v in extra_args.values():
            if isinstance(v, torch.Tensor):
                _record(v, side)
        with torch.cuda.stream(side):
            self._fill_extra(extra_args, b)
            self.seeds_buf[:b].copy_(seeds)
            if b < self.batch:  # pad with copies of the first seed: their rows are discarded
                self.seeds_buf[b:].copy_(seeds[:1].expand(self.batch - b))
            self.graph.replay()
            u = self.u[:b].clone()  # the static buffer is overwritten by the next replay
        cur.wait_stream(side)
        u.record_stream(cur)  # made on the side stream, handed to the caller's stream
        self.stats.replays += 1
        if check:
            # read on the caller's stream, after the replay; the next replay waits for this
            # call's return (the runner's lock), so the static status cannot change under it
            bad_stage, state_bad = self.status.tolist()  # the batch's one host sync
            raise_if_nonfinite(bad_stage, bool(state_bad) and bad_stage < 0, self.program, batch_start)
        return u


def _record(t: torch.Tensor, stream) -> None:
    """``t.record_stream(stream)`` for a CUDA tensor from the caching allocator (a no-op otherwise)."""
    if t.is_cuda:
        t.record_stream(stream)


def _end_failed_capture(graph) -> None:
    """End an invalidated capture so the stream leaves capture mode and the allocator stops routing
    to the graph's pool; the error that call reports is the expected one and is dropped."""
    try:
        graph.capture_end()
    except Exception:  # noqa: BLE001
        pass


def _log_once(key, msg: str) -> None:
    with _lock:
        if key in _logged:
            return
        _logged.add(key)
    log.warning(msg)
