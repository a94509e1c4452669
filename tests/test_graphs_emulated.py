"""The CUDA-graph runner's capture/replay logic on the CPU, under a fake torch.cuda (tests/_fake_cuda.py).

The GPU tests of tests/test_graphs.py run here unchanged, with this module's ``device`` fixture
(the CPU, with the fake installed) and ``backend`` fixture (the C++ CPU kernel): warm-up, capture
and replay against eager, new seeds, a padded last batch, the cache bound, a host-syncing network
falling back to eager, the NaN flag and its reset, NCSN++, no host sync in a replay.  With the
interpreted Triton step (about 50 ms a call, so fewer calls): the replay test and a short program
through warm-up, capture, replay, padding, new seeds and a sync-free replay.  Added here: every
sampler through warm-up, capture, replay and padding bit-equal to eager; the cache-key reproducer
of issue 19 end to end (a hooked wrapper of a captured network) and autocast's own graph; threads
sharing a runner while others capture their own signatures; the lifted (DenoiserModel) loop and
extra_args through the graph (imported from tests/test_graphs.py, plus the interpreted Triton path).

What a fake cannot show (tests/test_graphs.py on a GPU): real stream ordering, the caching
allocator, cuDNN/cuBLAS inside a capture, the Triton JIT.
"""
from __future__ import annotations

import threading

import pytest
import torch

import psld_fast as pf
from _fake_cuda import fake_cuda
from _step_cases import one_thread  # noqa: F401  (fixture)
from psld_fast import graphs, ops
from test_graphs import (  # noqa: F401  (re-run here with this module's fixtures)
    _entry, _fresh_cache, _sample, digits, test_cache_bound_on_gpu, test_capture_failure_falls_back_to_eager,
    test_nan_is_detected_through_the_graph, test_no_host_sync_in_the_loop, test_replay_matches_eager_and_is_reused,
    test_small_ncsnpp_replay_matches_eager, test_smaller_last_batch_is_padded,
    test_extra_args_replay_from_static_buffers, test_lifted_model_captures_denoiser_and_steps_together,
    test_lifted_model_with_guidance_and_labels_through_the_graph, _lifted_digits,
)


@pytest.fixture
def fake(monkeypatch):
    with fake_cuda(monkeypatch) as f:
        yield f


@pytest.fixture
def device(fake):
    return torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # (tests/_step_cases.py) one torch thread for these small tensors
    yield


@pytest.fixture
def backend():
    assert ops.HAS_CPU_KERNEL, "psld_fast._C is not built"
    return "cpu"


@pytest.fixture
def triton():
    from psld_fast import triton_step

    assert triton_step.INTERPRETED, "TRITON_INTERPRET=1 must be set before triton is imported (conftest.py)"
    return "triton"


def test_triton_replay_matches_eager_and_is_reused(device, digits, triton):
    test_replay_matches_eager_and_is_reused(device, digits, triton, "reduced_oba")


def test_triton_short_program_through_every_phase(device, triton):
    """Warm-up, capture + replay, padded batch, new seeds, and a replay without host sync, with the
    interpreted Triton step on a small program (ring2d, 7 NFE)."""
    model = pf.get_preset("ring2d")
    kw = dict(sampler="reduced_oba", nfe=7, batch_size=4, backend=triton)
    seeds = torch.arange(10) + 7
    eager = _sample(model, 10, seeds=seeds, cuda_graph=False, **kw)
    graphed = _sample(model, 10, seeds=seeds, cuda_graph=True, **kw)  # 4 warm-up, 4 capture + replay, 2 padded
    e = _entry()
    assert (e["state"], e["eager"], e["captures"], e["replays"]) == ("captured", 1, 1, 2)
    assert torch.equal(graphed.x, eager.x) and torch.equal(graphed.m, eager.m)
    from psld_fast.samplers import compile_sampler

    program = compile_sampler("reduced_oba", model.sde, 7)
    runner = graphs.get_runner(model, program, triton, ops.get_step_fn(triton), batch=4, dtype=torch.float32,
                               device=device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        u = runner.run(model, torch.arange(3) + 500, check=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(u[:, :model.shape[0]], _sample(model, 3, seeds=torch.arange(3) + 500, cuda_graph=False, **kw).x)


def test_the_fake_captures_poisons_and_replays(fake):
    """The fixture itself: a capture records without trusting its values, a replay recomputes
    from the static inputs, a host sync during capture raises and invalidates it."""
    side = torch.cuda.Stream()
    x = torch.arange(4.0)
    out = torch.empty(4)
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="non-default stream"):
        g.capture_begin()
    with torch.cuda.stream(side):
        g.capture_begin()
        y = x * 2
        out.copy_(y + 1)
        g.capture_end()
    assert out.isnan().all() and y.isnan().all(), "values written during capture are poisoned"
    g.replay()
    assert torch.equal(out, torch.tensor([1.0, 3.0, 5.0, 7.0]))
    x.fill_(10.0)
    g.replay()
    assert torch.equal(out, torch.full((4,), 21.0))
    bad = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        bad.capture_begin()
        with pytest.raises(RuntimeError, match="not permitted when stream is capturing"):
            x.sum().item()
        with pytest.raises(RuntimeError, match="previous error"):
            bad.capture_end()
    assert not torch.cuda.is_current_stream_capturing()


@pytest.mark.parametrize("sampler", pf.SAMPLERS + pf.DETERMINISTIC_SAMPLERS)
def test_every_sampler_replays_bit_equal_to_eager(device, sampler):
    """Warm-up (eager), capture + replay, a padded last batch, then new seeds (replay only): each
    equal to the eager loop at the same batch size, bit for bit (the same C++ kernel)."""
    model = pf.get_preset("ring2d")
    kw = dict(sampler=sampler, nfe=9, batch_size=5, backend="cpu")
    seeds = torch.arange(12) * 3 + 1
    eager = _sample(model, 12, seeds=seeds, cuda_graph=False, **kw)
    graphed = _sample(model, 12, seeds=seeds, cuda_graph=True, **kw)  # 5 warm-up, 5 capture + replay, 2 padded
    e = _entry()
    assert (e["state"], e["eager"], e["captures"], e["replays"]) == ("captured", 1, 1, 2)
    assert torch.equal(graphed.x, eager.x) and torch.equal(graphed.m, eager.m)
    other = torch.arange(5) + 1000
    again = _sample(model, 5, seeds=other, cuda_graph=True, **kw)
    assert _entry()["replays"] == 3
    assert torch.equal(again.x, _sample(model, 5, seeds=other, cuda_graph=False, **kw).x)


def test_hooked_wrapper_does_not_replay_the_plain_graph(device, digits):
    """Issue 19's reproducer end to end: a network captured through a plain wrapper, then sampled
    through a second wrapper with a forward hook, gets the hook (it used to replay the first graph)."""
    net = digits  # an nn.Module: the wrappers' inner network
    plain = pf.EpsModel(net, sde=digits.sde, shape=digits.shape)
    hooked = pf.EpsModel(net, sde=digits.sde, shape=digits.shape)
    hooked.register_forward_hook(lambda module, args, out: out * 0.5)
    kw = dict(seeds=torch.arange(8), backend="cpu")
    for _ in range(2):
        _sample(plain, 8, cuda_graph=True, **kw)
    assert _entry()["state"] == "captured"
    expected = _sample(hooked, 8, cuda_graph=False, **kw)
    for _ in range(3):  # warm-up, capture, replay of the hooked wrapper's own graph
        got = _sample(hooked, 8, cuda_graph=True, **kw)
        assert torch.equal(got.x, expected.x)
    assert graphs.cache_info()["size"] == 2


def test_autocast_gets_its_own_graph(device):
    net = torch.nn.Linear(4, 4).eval().requires_grad_(False)
    model = pf.EpsModel(lambda u, tau: net(u), shape=(2,))
    kw = dict(seeds=torch.arange(6), backend="cpu", nfe=7)
    plain = [_sample(model, 6, cuda_graph=True, **kw) for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast_eager = _sample(model, 6, cuda_graph=False, **kw)
        cast = [_sample(model, 6, cuda_graph=True, **kw) for _ in range(2)]
    assert graphs.cache_info()["size"] == 2
    assert torch.equal(cast[1].x, cast_eager.x) and not torch.equal(cast[1].x, plain[1].x)


def test_threads_share_a_runner_and_capture_side_by_side(device, digits):
    """Four threads sample one signature at once (one runner: its lock serialises warm-up, capture
    and replay) while two others capture their own signatures: every result equals eager."""
    kw = dict(backend="cpu", nfe=11)
    jobs = [(8, torch.arange(8) + 100 * i) for i in range(4)] + [(3, torch.arange(3)), (5, torch.arange(5))]
    expected = [_sample(digits, n, seeds=s, cuda_graph=False, **kw).x for n, s in jobs]
    results, errors = {}, []

    def work(i, n, seeds):
        try:
            results[i] = [_sample(digits, n, seeds=seeds, cuda_graph=True, **kw).x for _ in range(3)]
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(f"thread {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(i, n, s)) for i, (n, s) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, want in enumerate(expected):
        for got in results[i]:
            assert torch.equal(got, want), f"thread {i} differs from eager"
    states = {e["batch"]: e for e in graphs.cache_info()["entries"]}
    assert states[8]["captures"] == 1 and states[8]["eager"] == 1 and states[8]["replays"] == 11
    assert states[3]["captures"] == states[5]["captures"] == 1


# ------------------------------------------------------ lifted models and extra_args (issue 18)
def test_triton_lifted_model_through_the_graph(device, triton):
    """The composite lifted step (Triton's fused step + the y pass) captured with the denoiser,
    equal to the eager Triton loop, and within float32 rounding of the fused C++ lifted op."""
    model = _lifted_digits()
    kw = dict(sampler="reduced_oba", nfe=5, batch_size=3, seeds=torch.arange(3))
    eager = _sample(model, 3, cuda_graph=False, backend=triton, **kw)
    for _ in range(2):
        graphed = _sample(model, 3, cuda_graph=True, backend=triton, **kw)
        assert torch.equal(graphed.x, eager.x)
    assert _entry()["state"] == "captured"
    cpu = _sample(model, 3, cuda_graph=False, backend="cpu", **kw)
    assert torch.allclose(eager.x, cpu.x, rtol=1e-5, atol=1e-5)
