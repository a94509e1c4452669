"""Full sampler runs: every backend equals the reference backend sample for sample (same seeds).

On CPU the C++ kernel runs natively and the Triton kernel under TRITON_INTERPRET=1 (set in
conftest.py); on a GPU the CUDA and Triton kernels are compared with the reference on the GPU.
Tolerance: the kernels compute in float32 like the float32 reference; the normals differ by libm
ulps (<= 2e-6 (1 + |n|)), so after ~20 stages samples agree to ~1e-4 relative (stated bound 2e-4 of
the sample scale; measured ~1e-6).
"""
import os

import pytest
import torch

import psld_fast as pf
from psld_fast import ops
from psld_fast.samplers import SAMPLER_SPECS

TOL = 2e-4


def _backends(device):
    names = []
    if device == "cpu":
        if ops.HAS_CPU_KERNEL:
            names.append("cpu")
        if os.environ.get("TRITON_INTERPRET") == "1" and ops.has_triton():
            names.append("triton")
    else:
        names += [b for b in ("cuda", "triton") if ops.resolve_backend("auto", device) != "reference" or b == "triton"]
    return names


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def digits_small():
    return pf.get_preset("digits")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampler", pf.ALL_SAMPLERS)
def test_backends_equal_reference_sample_for_sample(sampler, device, digits_small):
    backends = _backends(device)
    assert backends, "no kernel backend available to compare"
    model = digits_small.to(device)
    seeds = torch.tensor([3, 11, -7, 2**33 + 1, 5], dtype=torch.int64)
    # 10 steps whatever the sampler; the OU split keeps every sampler stable on such a coarse grid
    # (the additive split's friction step diverges there: the comparison would be between blow-ups)
    nfe = 10 * SAMPLER_SPECS[sampler].evals_per_step + 1
    kw = dict(sampler=sampler, nfe=nfe, seeds=seeds, device=device, progress=False, cuda_graph=False,
              split="ou")
    ref = pf.sample(model, 5, backend="reference", **kw)
    scale = ref.x.abs().max().item()
    assert scale < 50, f"{sampler}: reference samples diverged (max |x| = {scale:.3g})"
    for backend in backends:
        if backend == "cuda" and not ops.HAS_CUDA_KERNEL:
            continue
        got = pf.sample(model, 5, backend=backend, **kw)
        assert got.backend == backend
        err = (got.x - ref.x).abs().max().item()
        assert err <= TOL * max(scale, 1.0), f"{backend} vs reference, {sampler}: max err {err:.3e}"
        # batch invariance on this backend: one sample alone equals its row in the batch, bit for bit
        # on CPU; on a GPU the network's cuBLAS kernels may change with the batch size (see
        # test_fused_loop_is_batch_invariant_with_an_elementwise_network for the sampler alone)
        one = pf.sample(model, 1, backend=backend, **{**kw, "seeds": seeds[3:4]})
        if device == "cpu":
            assert torch.equal(one.x[0], got.x[3]), f"{backend}: batch of 1 differs from its row in the batch"
        else:
            err = (one.x[0] - got.x[3]).abs().max().item()
            assert err <= TOL * max(scale, 1.0), f"{backend}: batch of 1 vs its row: max err {err:.3e}"


class _Elementwise(torch.nn.Module):
    """A network without any batch coupling: every output element depends on its input element and
    tau only, through elementwise kernels whose results do not depend on the batch size."""

    def forward(self, u, tau):
        return torch.tanh(u) * tau.view(-1, *([1] * (u.dim() - 1))).to(u.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampler", ["sscs", "reduced_oba", "reduced_baoab"])
def test_fused_loop_is_batch_invariant_with_an_elementwise_network(sampler, device):
    """With a batch-independent network the whole fused loop is bit-exact across batch sizes and
    positions on every backend (the Philox counter never holds the batch position)."""
    model = pf.EpsModel(_Elementwise(), shape=(1, 3, 5))
    seeds = torch.tensor([9, 4, -2, 2**40 + 3, 17, 5, 6], dtype=torch.int64)
    for backend in _backends(device):
        if backend == "cuda" and not ops.HAS_CUDA_KERNEL:
            continue
        kw = dict(sampler=sampler, nfe=13, device=device, progress=False, cuda_graph=False, backend=backend)
        full = pf.sample(model, 7, seeds=seeds, **kw)
        for bs in (1, 3):
            part = pf.sample(model, 7, seeds=seeds, batch_size=bs, **kw)
            assert torch.equal(part.x, full.x), f"{backend} {sampler}: batch_size={bs} changed the samples"
        rev = pf.sample(model, 7, seeds=seeds.flip(0), **kw)
        assert torch.equal(rev.x, full.x.flip(0)), f"{backend} {sampler}: position changed the samples"


def test_explicit_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend='triton' requested but the state is on cpu") as info:
        ops.resolve_backend("triton", "cpu")
    assert "set TRITON_INTERPRET=1" in str(info.value)  # says how, not only why
