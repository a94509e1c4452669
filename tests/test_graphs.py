"""CUDA-graph runner (psld_fast.graphs) and the ``cuda_graph`` argument of ``sample``.

CPU: the argument is validated and means eager; the cache, its key and its bound are plain Python
and are tested here too.  GPU (skipped without CUDA; the device is a fixture): replay equals eager
for the same seeds (bitwise with the CUDA kernel), the cache is reused across calls and bounded, a
smaller last batch is padded correctly, a network that syncs falls back to eager with a log, NaN/Inf
is still detected through a graph, and neither the eager fused loop nor a replay syncs the host.
"""
from __future__ import annotations

import logging

import pytest
import torch

import psld_fast as pf
from _tolerances import assert_close_verbose
from psld_fast import graphs, ops
from psld_fast.api import run_program
from psld_fast.ops import get_step_fn, resolve_backend
from psld_fast.samplers import compile_sampler


@pytest.fixture(autouse=True)
def _fresh_cache():
    graphs.clear_cache()
    yield
    graphs.clear_cache()


@pytest.fixture(scope="module")
def ring():
    return pf.get_preset("ring2d")


def _sample(model, n, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("nfe", 21)
    return pf.sample(model, n, **kw)


# ------------------------------------------------------------------------------------------ CPU
@pytest.mark.parametrize("sampler", ["em", "reduced_oba"])
def test_cpu_accepts_every_value_and_runs_eagerly(ring, sampler):
    seeds = torch.arange(5, 17)
    results = [_sample(ring, 12, sampler=sampler, seeds=seeds, cuda_graph=v, batch_size=5)
               for v in ("auto", True, False)]
    for r in results[1:]:
        assert torch.equal(r.x, results[0].x) and torch.equal(r.m, results[0].m)
    assert graphs.cache_info()["size"] == 0  # nothing was captured or cached on CPU


@pytest.mark.parametrize("bad", ["yes", "AUTO", 1, 0, None, "true"])
def test_bad_cuda_graph_value_raises(ring, bad):
    with pytest.raises(ValueError, match="cuda_graph must be 'auto', True or False"):
        _sample(ring, 2, cuda_graph=bad)


def test_policy():
    cuda = torch.device("cuda")  # a device object: no CUDA initialisation
    assert graphs.use_cuda_graph("auto", cuda, "cuda") and graphs.use_cuda_graph("auto", cuda, "triton")
    assert not graphs.use_cuda_graph("auto", cuda, "reference")
    assert graphs.use_cuda_graph(True, cuda, "reference")
    assert not graphs.use_cuda_graph(False, cuda, "cuda")
    assert not graphs.use_cuda_graph(True, cuda, "cuda", callback=print)  # needs every stage's state
    for v in ("auto", True, False):
        assert not graphs.use_cuda_graph(v, "cpu", "cpu")


def test_run_program_check_false_is_the_same_loop(ring):
    program = compile_sampler("reduced_oba", ring.sde, 11)
    seeds = torch.arange(8)
    step_fn = get_step_fn(resolve_backend("auto", "cpu"))
    kw = dict(dtype=torch.float32, device=torch.device("cpu"))
    a = run_program(ring, program, seeds, step_fn, **kw)
    b = run_program(ring, program, seeds, step_fn, check=False, **kw)
    assert torch.equal(a, b)


def test_program_hash_names_the_program(ring):
    h = graphs.program_hash
    a = compile_sampler("reduced_oba", ring.sde, 11)
    assert h(a) == h(compile_sampler("reduced_oba", ring.sde, 11))
    assert h(a) != h(compile_sampler("reduced_oba", ring.sde, 13))
    assert h(a) != h(compile_sampler("reduced_oba", ring.sde, 11, lambda_s=0.5))
    assert h(a) != h(compile_sampler("em", ring.sde, 11))


def _runner(model, nfe=11, batch=4, **kw):
    program = compile_sampler("em", model.sde, nfe)
    args = dict(batch=batch, dtype=torch.float32, device="cpu", stream=0)
    args.update(kw)
    return graphs.get_runner(model, program, "cpu", None, **args)


def test_cache_reuses_and_is_bounded(ring, monkeypatch):
    monkeypatch.setenv(graphs.ENV_CACHE, "2")
    r11 = _runner(ring, 11)
    assert _runner(ring, 11) is r11  # same signature: same runner
    assert _runner(ring, 11, batch=5) is not r11 and _runner(ring, 11, stream=1) is not r11
    info = graphs.cache_info()
    assert info["size"] == 2 and info["capacity"] == 2
    assert _runner(ring, 11) is not r11  # evicted: least recently used of three signatures
    monkeypatch.setenv(graphs.ENV_CACHE, "junk")
    assert graphs.cache_capacity() == graphs.DEFAULT_CACHE_SIZE


def test_cache_key_follows_the_network_not_its_wrapper():
    net = torch.nn.Identity()
    a = pf.EpsModel(net, shape=(2,))
    b = pf.EpsModel(net, shape=(2,))  # sample() wraps a bare callable anew on every call
    assert _runner(a) is _runner(b)
    other = pf.EpsModel(torch.nn.Identity(), shape=(2,))
    assert _runner(other) is not _runner(a)
    del other
    assert graphs.cache_info()["size"] == 1  # the dead network's entry is dropped


def test_cache_key_is_the_wrapper_when_it_has_hooks():
    """Issue 19's reproducer: two wrappers of one network, one with a forward hook.  The graph
    captures the wrapper's forward, hooks included, so they must not share a runner (the eager loop
    calls the hooked wrapper and the bare network of the other)."""
    net = torch.nn.Identity()
    plain = pf.EpsModel(net, shape=(2,))
    hooked = pf.EpsModel(net, shape=(2,))
    hooked.register_forward_hook(lambda module, args, out: out * 2)
    first = _runner(plain)
    assert _runner(hooked) is not first
    assert _runner(hooked) is _runner(hooked)
    assert _runner(pf.EpsModel(net, shape=(2,))) is first  # hook-free wrappers still share
    handle = net.register_forward_pre_hook(lambda module, args: None)  # a hook on the net itself
    assert _runner(plain) is not first
    handle.remove()
    assert _runner(plain) is first
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: out)
    try:  # a global hook: the eager loop calls the wrapper, so the key names the wrapper
        assert _runner(plain) is not first
    finally:
        handle.remove()
    assert _runner(plain) is first


def test_cache_key_holds_autocast_and_tf32():
    """Autocast and TF32 select the kernels a capture bakes in: each setting gets its own graph."""
    model = pf.EpsModel(torch.nn.Identity(), shape=(2,))
    first = _runner(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = _runner(model)
        assert bf16 is not first and _runner(model) is bf16
    with torch.autocast("cpu", dtype=torch.float16):
        assert _runner(model) not in (first, bf16)
    assert _runner(model) is first
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = not previous
    try:
        assert _runner(model) is not first
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = not previous
    try:
        assert _runner(model) is not first
    finally:
        torch.backends.cudnn.allow_tf32 = previous
    assert _runner(model) is first


def test_cache_key_sees_replaced_parameters():
    net = torch.nn.Linear(4, 4)
    model = pf.EpsModel(net, shape=(2,))
    first = _runner(model)
    with torch.no_grad():
        net.weight.copy_(torch.randn(4, 4))  # in place: the graph reads the new values
    assert _runner(model) is first
    net.weight = torch.nn.Parameter(torch.randn(4, 4))  # new storage: a new graph is needed
    assert _runner(model) is not first


def test_captured_body_matches_the_eager_loop(ring):
    """The body that gets captured, run here without a graph on CPU: same state, device-side flags."""
    program = compile_sampler("em", ring.sde, 11)
    step_fn = get_step_fn(resolve_backend("auto", "cpu"))
    runner = graphs.GraphRunner(program, step_fn, batch=6, shape=ring.shape, dtype=torch.float32,
                                device="cpu")
    runner._allocate()
    seeds = torch.arange(6) + 40
    runner.seeds_buf.copy_(seeds)
    runner._loop(ring)
    expected = run_program(ring, program, seeds, step_fn, dtype=torch.float32, device=torch.device("cpu"))
    assert torch.equal(runner.u, expected)
    assert runner.status.tolist() == [-1, 0]
    tau3 = program.stages[3].tau

    def poisoned(u, tau):  # NaN from the network at stage 3 only
        return ring(u, tau) + torch.where(tau == tau3, float("nan"), 0.0).reshape(-1, 1)

    runner._loop(poisoned)
    assert runner.status.tolist() == [3, 1]
    runner._loop(ring)
    assert runner.status.tolist() == [-1, 0]  # the flags are reset by every run of the body
    assert torch.equal(runner._pad(seeds[:2]), torch.tensor([40, 41, 40, 40, 40, 40]))


def test_runner_serialises_threads(ring, monkeypatch):
    """run() holds the runner's lock: two threads never share its static buffers at once (the lock
    is device-independent, so the body is replaced by a recorder here)."""
    import threading
    import time

    program = compile_sampler("em", ring.sde, 11)
    runner = graphs.GraphRunner(program, None, batch=4, shape=ring.shape, dtype=torch.float32, device="cpu")
    active, peak, calls = [0], [0], []
    guard = threading.Lock()

    def body(model, seeds, batch_start, check, extra_args):
        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.01)
        calls.append(int(seeds[0]))
        with guard:
            active[0] -= 1
        return seeds

    monkeypatch.setattr(runner, "_run_locked", body)
    threads = [threading.Thread(target=lambda i=i: [runner.run(ring, torch.tensor([i, i])) for _ in range(5)])
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 1 and sorted(calls) == sorted(list(range(4)) * 5)


def test_training_mode_network_is_warned_about_once(ring):
    import warnings

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1))
    model = pf.EpsModel(lambda u, tau: net(u), sde=ring.sde, shape=(2,))
    model_net = pf.EpsModel(net, sde=ring.sde, shape=(2,))
    program = compile_sampler("em", ring.sde, 11)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            graphs.get_runner(model_net, program, "cpu", None, batch=2, dtype=torch.float32, device="cpu")
        graphs.get_runner(model, program, "cpu", None, batch=2, dtype=torch.float32, device="cpu")
        net.eval()
        graphs.get_runner(model_net, program, "cpu", None, batch=2, dtype=torch.float32, device="cpu")
    found = [w for w in caught if "training mode" in str(w.message)]
    assert len(found) == 1 and "Sequential" in str(found[0].message) and found[0].filename == __file__


# ------------------------------------------------------------------------------------------ GPU
@pytest.fixture
def device():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    return torch.device("cuda")


def _gpu_backends():
    return [pytest.param("cuda", marks=pytest.mark.skipif(not ops.HAS_CUDA_KERNEL,
                                                          reason="psld_fast._C built without CUDA")),
            "triton"]


@pytest.fixture(params=_gpu_backends())
def backend(request):
    """The step backend of the graph tests (tests/test_graphs_emulated.py runs them with "cpu" and
    the interpreted "triton" under a fake torch.cuda)."""
    if request.param == "triton" and not ops.has_triton():
        pytest.skip("Triton unavailable")
    return request.param


def _assert_same(actual, expected, backend, what, across_batch_sizes=False):
    """Replay vs eager.  Same batch shape with the CUDA kernel (or the C++ CPU one under the fake
    torch.cuda of tests/test_graphs_emulated.py): bit for bit (same kernels, same arguments, same
    order).  Triton's libdevice normals, or results computed at different batch
    sizes: 1e-4 (a batch size changes the network's cuBLAS kernels and reduction splits in the
    analytic mixture's float64 matmuls, and its softmax amplifies that; the fused step itself is
    batch-invariant, tested bit for bit in test_ops_cuda.py / test_triton_step.py)."""
    if backend in ("cuda", "cpu") and not across_batch_sizes:
        assert torch.equal(actual, expected), f"{what}: max diff {(actual - expected).abs().max():.3g}"
    else:
        assert_close_verbose(actual, expected, atol=1e-4, rtol=1e-4, what=what)


@pytest.fixture
def digits(device):
    return pf.get_preset("digits").to(device)


def _entry():
    (entry,) = graphs.cache_info()["entries"]
    return entry


@pytest.mark.parametrize("sampler", ["em", "reduced_oba"])
def test_replay_matches_eager_and_is_reused(device, digits, backend, sampler):
    kw = dict(sampler=sampler, backend=backend, device=device)
    s1, s2 = torch.arange(100, 132), torch.arange(7000, 7032)
    eager1 = _sample(digits, 32, seeds=s1, cuda_graph=False, **kw)
    eager2 = _sample(digits, 32, seeds=s2, cuda_graph=False, **kw)
    warm = _sample(digits, 32, seeds=s1, cuda_graph=True, **kw)  # first batch: the warm-up, eager
    assert _entry()["state"] == "warm"
    graphed = _sample(digits, 32, seeds=s1, cuda_graph=True, **kw)  # captured and replayed
    assert _entry()["captures"] == 1 and _entry()["replays"] == 1
    _assert_same(warm.x, eager1.x, backend, "warm-up vs eager")
    _assert_same(graphed.x, eager1.x, backend, "replay vs eager (x)")
    _assert_same(graphed.m, eager1.m, backend, "replay vs eager (m)")
    other = _sample(digits, 32, seeds=s2, cuda_graph="auto", **kw)  # same signature, new seeds
    assert _entry()["captures"] == 1 and _entry()["replays"] == 2
    _assert_same(other.x, eager2.x, backend, "second replay, other seeds")
    assert not torch.equal(other.x, graphed.x)


def test_smaller_last_batch_is_padded(device, digits, backend):
    seeds = torch.arange(40) * 7 + 3
    kw = dict(sampler="reduced_oba", backend=backend, device=device, seeds=seeds)
    eager = _sample(digits, 40, cuda_graph=False, **kw)
    graphed = _sample(digits, 40, batch_size=16, cuda_graph=True, **kw)  # 16 eager, 16 + 8 replayed
    e = _entry()
    assert (e["batch"], e["eager"], e["captures"], e["replays"]) == (16, 1, 1, 2)
    _assert_same(graphed.x, eager.x, backend, "padded last batch", across_batch_sizes=True)
    again = _sample(digits, 5, batch_size=16, cuda_graph=True, **dict(kw, seeds=seeds[:5]))
    _assert_same(again.x, eager.x[:5], backend, "a batch of 5 from a graph of 16",  # new signature
                 across_batch_sizes=True)
    # the padding itself changes nothing: the same batch shape, eagerly, gives the same bits
    eager16 = _sample(digits, 40, batch_size=16, cuda_graph=False, **kw)
    _assert_same(graphed.x, eager16.x, backend, "padded last batch vs eager at batch 16")


def test_cache_bound_on_gpu(device, digits, monkeypatch):
    monkeypatch.setenv(graphs.ENV_CACHE, "2")
    for nfe in (11, 13, 15):
        for _ in range(2):
            _sample(digits, 4, nfe=nfe, cuda_graph=True, device=device)
    info = graphs.cache_info()
    assert info["size"] == 2 and [e["nfe"] for e in info["entries"]] == [13, 15]
    assert all(e["state"] == "captured" for e in info["entries"])


class _SyncingNet(torch.nn.Module):
    """Reads a tensor value on the host each call: runs eagerly, cannot be captured."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, u, tau):
        if float(tau[0].item()) < 0:  # never true: the sync is the point
            raise AssertionError
        return self.inner(u, tau)


def test_capture_failure_falls_back_to_eager(device, digits, caplog):
    net = _SyncingNet(digits)
    kw = dict(sde=digits.sde, shape=digits.shape, device=device, seeds=torch.arange(24))
    eager = _sample(net, 24, cuda_graph=False, **kw)
    with caplog.at_level(logging.WARNING, logger="psld_fast"):
        graphed = _sample(net, 24, batch_size=8, cuda_graph=True, **kw)
        again = _sample(net, 24, batch_size=8, cuda_graph=True, **kw)
    failures = [r for r in caplog.records if "capture failed" in r.getMessage()]
    assert len(failures) == 1, "the reason is logged once per signature"
    e = _entry()
    assert e["state"] == "failed" and e["replays"] == 0 and e["failure"]
    eager8 = _sample(net, 24, batch_size=8, cuda_graph=False, **kw)
    assert torch.equal(graphed.x, eager8.x) and torch.equal(again.x, eager8.x)  # same batch shape
    _assert_same(graphed.x, eager.x, "cuda", "batch 8 vs 24", across_batch_sizes=True)
    assert not torch.cuda.is_current_stream_capturing()
    torch.cuda.synchronize()  # the device is healthy after the failed capture
    ok = _sample(digits, 8, cuda_graph=True, device=device, seeds=torch.arange(8))
    assert torch.isfinite(ok.x).all()


class _PoisonedNet(torch.nn.Module):
    """Adds a device scalar to eps: 0 while warming up and capturing, NaN later (read by the graph)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.register_buffer("poison", torch.zeros(()))

    def forward(self, u, tau):
        return self.inner(u, tau) + self.poison


def test_nan_is_detected_through_the_graph(device, digits):
    net = pf.EpsModel(_PoisonedNet(digits).to(device), sde=digits.sde, shape=digits.shape)
    kw = dict(device=device, seeds=torch.arange(8), cuda_graph=True)
    _sample(net, 8, **kw)
    _sample(net, 8, **kw)
    assert _entry()["state"] == "captured"
    net.net.poison.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN/Inf at stage 1 "):
        _sample(net, 8, **kw)
    net.net.poison.zero_()
    assert torch.isfinite(_sample(net, 8, **kw).x).all()  # the flag is reset at every replay


def test_small_ncsnpp_replay_matches_eager(device, backend):
    from psld_fast.nets.ncsnpp import NCSNpp

    net = NCSNpp.from_preset("small").to(device).eval().requires_grad_(False)
    model = pf.EpsModel(net, shape=net.data_shape)
    kw = dict(nfe=11, device=device, backend=backend, seeds=torch.arange(4))
    eager = _sample(model, 4, cuda_graph=False, **kw)
    _sample(model, 4, cuda_graph=True, **kw)
    graphed = _sample(model, 4, cuda_graph=True, **kw)
    assert _entry()["replays"] == 1
    # cuDNN may pick other convolution algorithms inside the capture: float32 rounding only
    assert_close_verbose(graphed.x, eager.x, atol=1e-4, rtol=1e-4, what="NCSN++ replay vs eager")


def test_no_host_sync_in_the_loop(device, digits, backend):
    program = compile_sampler("reduced_oba", digits.sde, 21)
    step_fn = get_step_fn(backend)
    seeds = torch.arange(16, device=device)
    kw = dict(dtype=torch.float32, device=device)
    run_program(digits, program, seeds, step_fn, **kw)  # compiles/loads everything first
    runner = graphs.get_runner(digits, program, backend, step_fn, batch=16, **kw)
    runner.run(digits, seeds)  # warm-up
    runner.run(digits, seeds)  # capture + replay
    assert runner.state == "captured"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        u_eager = run_program(digits, program, seeds, step_fn, check=False, **kw)
        u_graph = runner.run(digits, seeds, check=False)
        u_padded = runner.run(digits, seeds[:5], check=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    _assert_same(u_graph, u_eager, backend, "replay vs eager")
    _assert_same(u_padded, u_eager[:5], backend, "padded replay vs eager")


# ------------------------------------------------------ lifted models and extra_args (issue 18)
class _LabelNet(torch.nn.Module):
    """A native eps network with conditioning: a per-sample class label, a shared scale tensor and a
    plain float (each changes the output, so a stale buffer or a baked-in value would show)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, u, tau, class_labels=None, scale=None, gain=1.0):
        h = self.lin(u) + self.emb(class_labels) * tau[:, None]
        return gain * torch.tanh(h) * scale


def _conditioned_model(device):
    torch.manual_seed(0)
    return pf.EpsModel(_LabelNet().eval().requires_grad_(False).to(device), shape=(2,))


def test_extra_args_replay_from_static_buffers(device, backend):
    """extra_args through the graph runner: per-sample labels sliced and padded with the batch, a
    shared tensor and a float; new labels and a new shared tensor replay the same graph (static
    buffers refilled), a new float captures another; every result equals eager bit for bit."""
    model = _conditioned_model(device)
    kw = dict(sampler="em", nfe=9, batch_size=5, backend=backend, device=device)
    seeds = torch.arange(12) + 3

    def args(shift, scale, gain):
        return dict(class_labels=(torch.arange(12) + shift) % 10, scale=torch.tensor([scale]), gain=gain)

    for shift, scale, gain in [(0, 1.0, 1.0), (3, 0.5, 1.0), (7, 2.0, 1.0)]:
        a = args(shift, scale, gain)
        eager = _sample(model, 12, seeds=seeds, cuda_graph=False, extra_args=a, **kw)
        graphed = _sample(model, 12, seeds=seeds, cuda_graph=True, extra_args=a, **kw)
        _assert_same(graphed.x, eager.x, backend, f"x, labels + {shift}")
        _assert_same(graphed.m, eager.m, backend, f"m, labels + {shift}")
        e = _entry()
        assert e["state"] == "captured" and e["captures"] == 1 and e["eager"] == 1, e
    assert e["replays"] == 2 + 3 + 3  # batches 2-3 of the first call, then three per call
    other = torch.tensor([0.0] * 2)  # a different element count
    a = args(1, 1.0, 0.25)  # a new float: baked into the graph, so a new signature
    eager = _sample(model, 12, seeds=seeds, cuda_graph=False, extra_args=a, **kw)
    graphed = [_sample(model, 12, seeds=seeds, cuda_graph=True, extra_args=a, **kw) for _ in range(2)]
    assert graphs.cache_info()["size"] == 2
    for g in graphed:
        _assert_same(g.x, eager.x, backend, "x, new gain")
    base = _sample(model, 12, seeds=seeds, cuda_graph=False, extra_args=args(1, 1.0, 1.0), **kw)
    assert (base.x - eager.x).abs().max() > 1e-3
    runner = next(e for e in graphs._cache.values()).runner
    with pytest.raises(ValueError, match=r"extra_args\['scale'\] does not match"):
        runner.run(model, torch.arange(5, device=device),
                   extra_args=dict(class_labels=torch.arange(5, device=device), scale=other.to(device), gain=1.0))


def _lifted_digits(device="cpu", **kw):
    gm = pf.get_preset("digits").to(device)
    return pf.DenoiserModel(gm.as_edm_denoiser(), gm.shape, **kw)


@pytest.mark.parametrize("sampler", ["reduced_oba", "sscs", "rvv", "ei_2m", "ei_2m_sde"])
def test_lifted_model_captures_denoiser_and_steps_together(device, backend, sampler):
    """A DenoiserModel through the graph runner: the captured body is the lifted loop itself (one
    denoiser call and one fused lifted step per NFE, sigmas and y in static buffers), bit-equal to
    the eager fused loop through warm-up, capture, replay and a padded batch; no host sync in a
    replay (the unfused forward would sync for its coefficients every call)."""
    model = _lifted_digits(device)
    kw = dict(sampler=sampler, nfe=9, batch_size=4, backend=backend, device=device)
    seeds = torch.arange(10) + 50
    eager = _sample(model, 10, seeds=seeds, cuda_graph=False, **kw)
    graphed = _sample(model, 10, seeds=seeds, cuda_graph=True, **kw)
    e = _entry()
    assert (e["state"], e["eager"], e["captures"], e["replays"]) == ("captured", 1, 1, 2)
    _assert_same(graphed.x, eager.x, backend, "x")
    _assert_same(graphed.m, eager.m, backend, "m")
    runner = next(e for e in graphs._cache.values()).runner
    assert runner.lifted_step_fn is not None and runner.y is not None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        u = runner.run(model, seeds[:4].to(device), check=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    _assert_same(u[:, :model.shape[0]], eager.x[:4].to(device), backend, "x, sync-free replay")


def test_lifted_model_with_guidance_and_labels_through_the_graph(device, backend):
    """Classifier-free guidance (CFGDenoiser) on a class-conditional denoiser, labels per sample in
    extra_args, through the graph runner: equal to eager, and the labels matter."""
    gm = pf.get_preset("digits").to(device)
    means = gm.means.reshape(10, 10, -1).mean(1)  # one mean image per class

    def cond(x, sigma, class_labels=None):
        base = gm.as_edm_denoiser()(x, sigma)
        if class_labels is None:
            return base
        return base + 0.1 * means[class_labels.clamp(min=0)].reshape(x.shape).to(x.dtype) * (class_labels >= 0).to(x.dtype).reshape(-1, 1, 1, 1)

    den = pf.CFGDenoiser(cond, cond_scale=2.0, uncond={"class_labels": -1})
    model = pf.DenoiserModel(den, gm.shape)
    kw = dict(sampler="reduced_oba", nfe=7, batch_size=4, backend=backend, device=device)
    seeds = torch.arange(8)
    labels = torch.arange(8) % 10
    eager = _sample(model, 8, seeds=seeds, cuda_graph=False, extra_args={"class_labels": labels}, **kw)
    for _ in range(2):
        graphed = _sample(model, 8, seeds=seeds, cuda_graph=True, extra_args={"class_labels": labels}, **kw)
        _assert_same(graphed.x, eager.x, backend, "x, guided")
    assert _entry()["state"] == "captured"
    other = _sample(model, 8, seeds=seeds, cuda_graph=True, extra_args={"class_labels": (labels + 5) % 10}, **kw)
    assert (other.x - eager.x).abs().max() > 1e-3 and _entry()["captures"] == 1
