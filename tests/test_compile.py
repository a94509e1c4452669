"""sample(..., compile=...): torch.compile of the network, cached per network, timed separately."""
from __future__ import annotations

import pytest
import torch

import psld_fast as pf
from _tolerances import assert_close_verbose
from psld_fast import graphs, runner


class TinyNet(torch.nn.Module):
    """eps(u, tau) for a 2-d data law: a two-layer MLP on (u, tau)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(5, 16, generator=g) * 0.3)
        self.w2 = torch.nn.Parameter(torch.randn(16, 4, generator=g) * 0.3)

    def forward(self, u, tau):
        h = torch.tanh(torch.cat([u, tau[:, None].to(u.dtype)], dim=1) @ self.w1)
        return h @ self.w2


def test_compile_mode_choice():
    assert runner.compile_mode(False, graphed=False) is None
    assert runner.compile_mode(True, graphed=False) == "default"
    assert runner.compile_mode("reduce-overhead", graphed=False) == "reduce-overhead"
    # under our CUDA-graph runner torch.compile must not make CUDA graphs of its own
    assert runner.compile_mode("reduce-overhead", graphed=True) == "default"
    assert runner.compile_mode("max-autotune", graphed=True) == "max-autotune-no-cudagraphs"
    with pytest.raises(ValueError, match="compile must be"):
        runner.compile_mode("fast", graphed=False)


def test_compiled_network_matches_eager_and_is_cached():
    net = TinyNet().eval().requires_grad_(False)
    model = pf.EpsModel(net, sde=pf.PSLD(), shape=(2,))
    kw = dict(sampler="reduced_oba", nfe=11, seeds=torch.arange(6), progress=False)
    eager = pf.sample(model, 6, **kw)
    assert "net_compile" not in eager.timings
    runner.clear_compile_cache()
    first = pf.sample(model, 6, compile=True, **kw)
    assert first.timings["net_compile"] > 0
    assert first.timings["total"] >= first.timings["net_compile"]
    assert_close_verbose(first.x, eager.x, atol=1e-5, rtol=1e-5, what="compiled vs eager network")
    again = pf.sample(model, 6, compile=True, **kw)
    # same network and shape: nothing compiled, only the cache lookup
    assert again.timings["net_compile"] < min(0.05, first.timings["net_compile"] / 10)
    assert torch.equal(again.x, first.x)
    assert runner.compiled_model(model, "default").net is runner.compiled_model(model, "default").net


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_compiled_network_inside_the_cuda_graph():
    """compile + CUDA-graph runner: the compiled network (mode without torch.compile's own CUDA
    graphs) is captured in our graph; the replay equals the eager compiled run to rounding."""
    net = TinyNet().cuda().eval().requires_grad_(False)
    model = pf.EpsModel(net, sde=pf.PSLD(), shape=(2,))
    kw = dict(sampler="reduced_oba", nfe=11, seeds=torch.arange(8), progress=False, device="cuda",
              compile="reduce-overhead")
    graphs.clear_cache()
    eager = pf.sample(model, 8, cuda_graph=False, **kw)
    pf.sample(model, 8, cuda_graph=True, **kw)  # warm-up
    graphed = pf.sample(model, 8, cuda_graph=True, **kw)  # capture + replay
    assert graphs.cache_info()["entries"][-1]["state"] == "captured"
    assert_close_verbose(graphed.x, eager.x, atol=1e-5, rtol=1e-5, what="compiled net in the graph")
