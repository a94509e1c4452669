"""psld_fast.sample: reproducibility contract, results and clear errors for bad input."""
import pytest
import torch

import psld_fast as pf


@pytest.fixture(scope="module")
def ring():
    return pf.get_preset("ring2d")


def _sample(model, n, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("nfe", 31)
    return pf.sample(model, n, **kw)


def test_result_fields(ring):
    r = _sample(ring, 9, sampler="reduced_obab", nfe=12)
    assert r.x.shape == (9, 2) and r.m.shape == (9, 2) and r.x.dtype == torch.float32
    assert r.nfe == 11  # 5 steps * 2 + 1: the budget 12 does not fit, the spent NFE is reported
    assert torch.equal(r.seeds, torch.arange(9)) and r.sampler == "reduced_obab"
    assert {"compile", "sampling", "total"} <= set(r.timings) and r.samples_per_second > 0
    assert r.program_info["steps"] == 5


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_same_seed_same_sample_any_batch_size_and_position(ring, backend):
    seeds = torch.arange(100, 164, dtype=torch.int64)
    full = _sample(ring, 64, seeds=seeds, backend=backend)
    for bs in (1, 7, 64):
        r = _sample(ring, 64, seeds=seeds, batch_size=bs, backend=backend)
        assert torch.equal(r.x, full.x), f"batch_size={bs} changed the samples"
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    r = _sample(ring, 64, seeds=seeds[perm], backend=backend)
    assert torch.equal(r.x, full.x[perm])
    single = _sample(ring, 1, seeds=seeds[37:38], backend=backend)
    assert torch.equal(single.x[0], full.x[37])


def test_generator_and_default_seeds(ring):
    a = _sample(ring, 4, generator=torch.Generator().manual_seed(3))
    b = _sample(ring, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.seeds, b.seeds) and torch.equal(a.x, b.x)
    assert not torch.equal(a.seeds, torch.arange(4))
    c = _sample(ring, 4)
    assert torch.equal(c.seeds, pf.DEFAULT_SEED + torch.arange(4))


def test_float64_reference_matches_float32(ring):
    r64 = _sample(ring, 16, dtype=torch.float64, backend="reference")
    r32 = _sample(ring, 16, dtype=torch.float32, backend="reference")
    assert r64.x.dtype == torch.float64
    assert (r64.x - r32.x.double()).abs().max() < 1e-3


def test_samples_land_near_the_ring(ring):
    r = _sample(ring, 256, sampler="reduced_oba", nfe=101)
    radius = r.x.double().norm(dim=1)
    assert (radius - 0.8).abs().median() < 0.05  # components sit on radius 0.8 with std 0.05


def test_plain_callable_with_sde_and_shape(ring):
    r = pf.sample(lambda u, tau: ring(u, tau), 3, sde=ring.sde, shape=(2,), nfe=11, progress=False)
    assert r.x.shape == (3, 2)
    with pytest.raises(ValueError, match="shape"):
        pf.sample(lambda u, tau: u, 3, nfe=11, progress=False)


def test_callback_sees_every_stage(ring):
    seen = []
    _sample(ring, 2, callback=lambda d: seen.append((d["stage"], d["nfe"])))
    assert [s for s, _ in seen] == list(range(32)) and seen[-1][1] == 31


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(sampler="nope"), ValueError, "unknown sampler 'nope'"),
    (dict(schedule="nope"), ValueError, "unknown schedule"),
    (dict(nfe=1), ValueError, "too small"),
    (dict(lambda_s=-1.0), ValueError, "lambda_s"),
    (dict(num_samples=0), ValueError, "num_samples must be an integer >= 1"),
    (dict(seeds=[1, 2]), ValueError, "expected 4 seeds"),
    (dict(seeds=[0.5, 1.0, 2.0, 3.0]), ValueError, "seeds must be integers"),
    (dict(dtype=torch.int32), ValueError, "dtype must be one of"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(backend="tpu"), ValueError, "backend"),
])
def test_bad_arguments(ring, kwargs, exc, match):
    n = kwargs.pop("num_samples", 4)
    with pytest.raises(exc, match=match):
        _sample(ring, n, **kwargs)


def test_model_output_wrong_shape_or_dtype(ring):
    with pytest.raises(ValueError, match="eps of shape"):
        pf.sample(lambda u, tau: u[:, :2], 3, sde=ring.sde, shape=(2,), nfe=11, progress=False)
    with pytest.raises(ValueError, match="dtype torch.int64"):
        pf.sample(lambda u, tau: u.long(), 3, sde=ring.sde, shape=(2,), nfe=11, progress=False)
    with pytest.raises(TypeError, match="must return a tensor"):
        pf.sample(lambda u, tau: 1.0, 3, sde=ring.sde, shape=(2,), nfe=11, progress=False)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_nan_from_network_names_the_stage(ring, backend):
    def net(u, tau):
        eps = ring(u, tau)
        return torch.where(tau[:, None] < 0.5, torch.full_like(eps, float("nan")), eps)

    with pytest.raises(FloatingPointError, match=r"network returned NaN/Inf at stage \d+ \(tau=0\.4"):
        pf.sample(net, 4, sde=ring.sde, shape=(2,), nfe=11, schedule="uniform", progress=False, backend=backend)


def test_lean_import_and_sampling_without_compiled_module_or_triton():
    """The package imports without initialising CUDA or importing Triton, and samples with the
    reference backend when neither the compiled module nor Triton can be imported."""
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['psld_fast._C'] = None  # as if the extension were not built (import psld_fast loads ops)\n"
        "import psld_fast\n"
        "assert 'triton' not in sys.modules, 'import psld_fast imported triton'\n"
        "import torch\n"
        "assert not torch.cuda.is_initialized()\n"
        "assert hasattr(torch.ops.psld_fast, 'affine_step_')\n"
        "sys.modules['triton'] = None\n"
        "r = psld_fast.sample(psld_fast.get_preset('ring2d'), 4, nfe=11, progress=False)\n"
        "assert r.backend == 'reference' and r.x.shape == (4, 2), r.backend\n"
        "for b in ('cpu', 'triton'):\n"
        "    try:\n"
        "        psld_fast.sample(psld_fast.get_preset('ring2d'), 2, nfe=11, backend=b, progress=False)\n"
        "    except RuntimeError as e:\n"
        "        assert f\"backend='{b}' requested but\" in str(e), e\n"
        "    else:\n"
        "        raise AssertionError(b)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PSLD_FAST_BACKEND", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_network_with_trainable_parameters_runs_without_autograd():
    """Sampling builds no autograd graph even for a network whose parameters require grad."""
    ring = pf.get_preset("ring2d")
    lin = torch.nn.Linear(4, 4)
    seen = []

    def net(u, tau):
        seen.append(torch.is_grad_enabled())
        return ring(u, tau) + 0.0 * lin(u.float())

    r = pf.sample(net, 3, sde=ring.sde, shape=(2,), nfe=11, progress=False)
    assert not any(seen) and not r.x.requires_grad


def test_device_errors_are_clear(ring):
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device='cuda' requested but CUDA is not available"):
            _sample(ring, 2, device="cuda")
    else:
        with pytest.raises(ValueError, match="the model's tensors are on cpu but device='cuda'"):
            _sample(ring, 2, device="cuda")
    with pytest.raises(ValueError, match="the model's tensors are on cpu but device='meta'"):
        _sample(ring, 2, device="meta")


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_float64_network_output_with_float32_state(ring, backend):
    """A network answering in float64 works on every backend and gives the float32 network's samples."""
    seeds = torch.arange(6)
    r64 = pf.sample(lambda u, t: ring(u.double(), t.double()), 6, sde=ring.sde, shape=(2,), nfe=21, seeds=seeds,
                    progress=False, backend=backend)
    r32 = pf.sample(ring, 6, nfe=21, seeds=seeds, progress=False, backend=backend)
    assert r64.x.dtype == torch.float32 and (r64.x - r32.x).abs().max() < 1e-4
