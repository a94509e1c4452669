"""The exact lift of a position-space denoiser to PSLD (psld_fast.lift) and its fused op.

Oracles: GaussianMixture's closed-form PSLD eps (the lift of its closed-form EDM denoiser must equal
it), the mixture's closed-form denoiser (for as_denoiser), the float64 reference loops (pathwise),
the reference definition of the lifted op (for the C++ kernel) and k-diffusion's own VP wrappers.
"""
import math

import numpy as np
import pytest
import torch

import psld_fast
from psld_fast.lift import (DenoiserModel, as_denoiser, lift_terms, lifted_coefficients, sigma_y,
                            tau_for_sigma, vp_denoiser, CFGDenoiser)
from psld_fast.ops import HAS_CPU_KERNEL
from psld_fast.program import lifted_step_reference
from psld_fast.runner import run_program
from psld_fast.ops import get_step_fn

PRESETS = ["ring2d", "gaussian", "digits"]


def _wide(gm, **kw):
    """A lift of the mixture's exact denoiser whose trained range covers the whole process (and, by
    default, ends where the native process ends: end='process')."""
    kw.setdefault("end", "process")
    return DenoiserModel(gm.as_edm_denoiser(), gm.shape, sigma_min=1e-4, sigma_max=1e4, **kw)


@pytest.mark.parametrize("name", PRESETS)
def test_lift_of_the_exact_denoiser_is_the_exact_psld_eps(name):
    gm = psld_fast.get_preset(name)
    dm = _wide(gm)
    g = torch.Generator().manual_seed(1)
    B = 7
    u = 0.7 * torch.randn(B, 2 * gm.shape[0], *gm.shape[1:], generator=g, dtype=torch.float64)
    tau = torch.tensor([1e-3, 3e-3, 0.02, 0.1, 0.4, 0.83, 1.0], dtype=torch.float64)
    a, b = gm(u, tau), dm(u, tau)
    assert ((a - b).norm() / a.norm()).item() < 1e-10


@pytest.mark.parametrize("name", PRESETS)
def test_as_denoiser_is_the_closed_form_denoiser(name):
    gm = psld_fast.get_preset(name)
    den = as_denoiser(gm)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, *gm.shape, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.05, 0.3, 1.0, 5.0, 50.0], dtype=torch.float64)
    d1, d2 = den(x, sigma), gm.denoise(x, sigma)
    assert ((d1 - d2).norm() / d2.norm()).item() < 1e-10
    assert den.sigma_min == pytest.approx(float(sigma_y(gm.sde, gm.sde.eps_end)))
    assert den.sigma_max == pytest.approx(257.65, rel=1e-3)


def test_sigma_y_range_and_inverse():
    sde = psld_fast.PSLD()
    s = sigma_y(sde, [1e-3, 1.0])
    assert s[0] == pytest.approx(0.00897, rel=1e-3) and s[1] == pytest.approx(257.65, rel=1e-3)
    assert float(tau_for_sigma(sde, 80.0)) == pytest.approx(0.8334, abs=1e-3)
    taus = np.array([1e-5, 1e-3, 0.1, 0.5, 1.0, 3.0])
    assert np.allclose(tau_for_sigma(sde, sigma_y(sde, taus)), taus, rtol=1e-10)
    assert np.all(np.diff(sigma_y(sde, np.linspace(1e-4, 2, 200))) > 0)
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        tau_for_sigma(sde, -1.0)
    with pytest.raises(ValueError, match="beyond this PSLD process's range"):
        tau_for_sigma(sde, 1e300)


@pytest.mark.parametrize("sampler", psld_fast.ALL_SAMPLERS)
def test_sampling_through_the_lift_equals_native_sampling_pathwise(sampler):
    gm = psld_fast.get_preset("ring2d")
    dm = _wide(gm, start="T")
    kw = dict(sampler=sampler, nfe=41, backend="reference", dtype=torch.float64, progress=False, seeds=range(5))
    a, b = psld_fast.sample(gm, 5, **kw), psld_fast.sample(dm, 5, **kw)
    assert a.nfe == b.nfe
    assert torch.isfinite(a.x).all() and a.x.abs().max() < 10
    assert torch.allclose(a.x, b.x, rtol=1e-10, atol=1e-10) and torch.allclose(a.m, b.m, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="C++ CPU kernel not built")
@pytest.mark.parametrize("sampler", ["reduced_oba", "sscs", "reduced_baoab", "rvv", "ci_ddim2"])
@pytest.mark.parametrize("name", ["ring2d", "digits"])
def test_fused_lifted_cpu_loop_matches_native_and_unfused(sampler, name):
    gm = psld_fast.get_preset(name)
    dm = _wide(gm, start="T")
    kw = dict(sampler=sampler, nfe=21, backend="cpu", progress=False, seeds=range(40))
    a, b = psld_fast.sample(gm, 40, **kw), psld_fast.sample(dm, 40, **kw)
    assert (a.x - b.x).abs().max().item() < 2e-5
    # the unfused path (the model's forward + the plain fused step) agrees with the fused one
    program = psld_fast.compile_sampler(sampler, dm.process_for(sampler), 21)
    seeds = torch.arange(40)
    u_unfused = run_program(dm, program, seeds, get_step_fn("cpu"), dtype=torch.float32, device="cpu")
    assert (u_unfused[:, :gm.shape[0]] - b.x).abs().max().item() < 2e-5


def _lifted_case(B, shape, state_dtype, d_dtype, with_d, with_y, seed):
    g = torch.Generator().manual_seed(seed)
    C = shape[0]
    u = torch.randn(B, 2 * C, *shape[1:], generator=g).to(state_dtype)
    d = torch.randn(B, C, *shape[1:], generator=g).to(d_dtype) if with_d else None
    y = torch.zeros(B, C, *shape[1:], dtype=state_dtype) if with_y else None
    coef = torch.randn(16, generator=g, dtype=torch.float64).tolist()
    return u, d, y, torch.randint(-2**62, 2**62, (B,), generator=g), coef


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="C++ CPU kernel not built")
@pytest.mark.parametrize("B,shape", [(1, (1,)), (33, (1,)), (5, (2,)), (3, (1, 16, 16)), (2, (3, 7, 5)), (4, (1, 64, 65))])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.float16, torch.bfloat16), (torch.float32, torch.float16)])
@pytest.mark.parametrize("with_d,with_y", [(True, True), (True, False), (False, True)])
def test_lifted_step_cpu_kernel_matches_reference(B, shape, dtypes, with_d, with_y):
    u, d, y, seeds, coef = _lifted_case(B, shape, *dtypes, with_d, with_y, seed=B + len(shape))
    u_ref, y_ref = lifted_step_reference(u, d, y, seeds, coef, 3, 1)
    torch.ops.psld_fast.lifted_step_(u, d, y, seeds, coef, 3, 1)
    tol = 1e-5 if dtypes[0] == torch.float32 else 2e-2
    assert torch.allclose(u.float(), u_ref.float(), rtol=tol, atol=tol * 4)
    if with_y:
        assert torch.allclose(y.float(), y_ref.float(), rtol=tol, atol=tol * 4)


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="C++ CPU kernel not built")
def test_lifted_step_equals_plain_step_with_doubled_eps_and_aliased_y():
    """Noise bit-for-bit the plain op's; the denoiser may return its input (d is y)."""
    u, d, y, seeds, coef = _lifted_case(6, (2, 5, 5), torch.float32, torch.float32, True, True, seed=5)
    from psld_fast.program import lifted_plain_coef

    u2 = u.clone()
    torch.ops.psld_fast.affine_step_(u2, torch.cat([d, d], dim=1), seeds, lifted_plain_coef(coef), 7, 0)
    y.copy_(d)
    torch.ops.psld_fast.lifted_step_(u, y, y, seeds, coef, 7, 0)  # d aliases y
    assert torch.equal(u, u2)
    assert torch.allclose(y, coef[14] * u2[:, :2] + coef[15] * u2[:, 2:], rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="C++ CPU kernel not built")
def test_lifted_step_rejects_bad_arguments():
    u, d, y, seeds, coef = _lifted_case(2, (2, 4), torch.float32, torch.float32, True, True, seed=0)
    with pytest.raises(RuntimeError, match="d must have the shape of one half"):
        torch.ops.psld_fast.lifted_step_(u, torch.zeros(2, 4, 4), y, seeds, coef, 0, 0)
    with pytest.raises(RuntimeError, match="y must have u's dtype"):
        torch.ops.psld_fast.lifted_step_(u, d, y.double(), seeds, coef, 0, 0)
    with pytest.raises(RuntimeError, match="coef must hold 16 numbers"):
        torch.ops.psld_fast.lifted_step_(u, d, y, seeds, coef[:15], 0, 0)


def test_lifted_coefficients_fold_eps_exactly():
    sde = psld_fast.PSLD()
    program = psld_fast.compile_sampler("reduced_oba", sde, 11)
    lp = lifted_coefficients(program, sde)
    for k, st in enumerate(program.stages[1:], start=1):
        t = {key: float(v) for key, v in lift_terms(sde, torch.tensor([st.tau], dtype=torch.float64)).items()}
        E = np.array([[t["E00"], t["E01"]], [t["E10"], t["E11"]]])
        P = np.array(lp.coef[k][:4]).reshape(2, 2)
        assert np.allclose(P, st.P + st.Q @ E, rtol=1e-12, atol=1e-12)
        assert lp.sigmas[k] == pytest.approx(t["sigma"])
    assert lp.writes_y[:-1] == [True] * (len(program.stages) - 1) and lp.writes_y[-1] is False


def test_range_knobs_and_errors():
    gm = psld_fast.get_preset("gaussian")
    den = gm.as_edm_denoiser()
    dm = DenoiserModel(den, gm.shape)                       # EDM defaults 0.002 .. 80
    assert dm.process_for("reduced_oba").T == pytest.approx(float(tau_for_sigma(dm.sde, 80.0)), rel=1e-9) \
        or dm.process_for("reduced_oba").T == dm.sde.T
    assert dm.eps_end == dm.sde.eps_end                     # sigma_y(1e-3) = 0.009 > 0.002
    ddpm = DenoiserModel(den, gm.shape, sigma_min=0.01, sigma_max=157.0)
    assert float(sigma_y(ddpm.sde, ddpm.eps_end)) >= 0.01 and ddpm.eps_end > 1e-3
    assert DenoiserModel(den, gm.shape, start="sigma_max").process_for("rvv").T < 0.84
    assert DenoiserModel(den, gm.shape, start="T").process_for("em").T == 1.0
    with pytest.raises(ValueError, match="above sigma_y"):
        DenoiserModel(den, gm.shape, sigma_min=300.0, sigma_max=400.0)
    with pytest.raises(ValueError, match="must be < sigma_max"):
        DenoiserModel(den, gm.shape, sigma_min=1.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="unknown start"):
        DenoiserModel(den, gm.shape, start="middle")
    with pytest.raises(TypeError, match="must be callable"):
        DenoiserModel(3, gm.shape)
    bad = DenoiserModel(lambda x, s: x[:, :1], (2,), sigma_min=0.01, sigma_max=10.0)
    with pytest.raises(ValueError, match="expected a tensor of its input's shape"):
        psld_fast.sample(bad, 2, nfe=5, progress=False)


def test_clamped_start_T_calls_the_denoiser_inside_its_range():
    seen = []

    def den(x, sigma):
        seen.append(float(sigma.max()))
        return torch.zeros_like(x)

    dm = DenoiserModel(den, (3,), sigma_min=0.01, sigma_max=80.0, start="T")
    psld_fast.sample(dm, 4, sampler="em", nfe=20, progress=False)
    assert max(seen) == pytest.approx(80.0, rel=1e-6) and min(seen) >= 0.01 * (1 - 1e-6)


def test_extra_args_are_sliced_with_the_batch_and_reach_the_denoiser():
    gm = psld_fast.get_preset("ring2d")
    labels = torch.arange(10)
    got = []

    def den(x, sigma, class_labels, scale):
        got.append((class_labels.clone(), scale))
        return gm.denoise(x, sigma) + 0.01 * class_labels[:, None].to(x.dtype)

    dm = DenoiserModel(den, gm.shape, sigma_min=1e-4, sigma_max=1e4)
    a = psld_fast.sample(dm, 10, nfe=6, batch_size=4, progress=False, extra_args={"class_labels": labels, "scale": 2})
    batches = {tuple(lbl.tolist()) for lbl, _ in got}
    assert batches == {(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)} and all(s == 2 for _, s in got)
    b = psld_fast.sample(dm, 10, nfe=6, batch_size=10, progress=False, extra_args={"class_labels": labels, "scale": 2})
    assert torch.allclose(a.x, b.x, atol=1e-6)
    with pytest.raises(ValueError, match="one row per sample"):
        psld_fast.sample(dm, 10, nfe=6, progress=False, extra_args={"class_labels": torch.arange(3)})


def test_cfg_denoiser_combines_conditional_and_unconditional():
    def den(x, sigma, class_labels):
        return x * 0 + class_labels.to(x.dtype)[:, None]

    x = torch.zeros(3, 2)
    sigma = torch.ones(3)
    lab = torch.tensor([1, 2, 3])
    null = torch.tensor([10])
    for scale, want in [(1.0, lab), (0.0, torch.full((3,), 10)), (2.5, 10 + 2.5 * (lab - 10))]:
        out = CFGDenoiser(den, scale, {"class_labels": null})(x, sigma, class_labels=lab)
        assert torch.allclose(out, want.to(out.dtype)[:, None].expand(3, 2))
    with pytest.raises(ValueError, match="lack"):
        CFGDenoiser(den, 2.0, {"class_labels": null})(x, sigma)


def test_callback_gets_the_x0_estimate_for_native_and_lifted_models():
    gm = psld_fast.get_preset("ring2d")
    for model in (gm, _wide(gm, start="T")):
        infos = []
        psld_fast.sample(model, 3, nfe=6, progress=False, backend="reference", dtype=torch.float64,
                         callback=infos.append)
        calls = [i for i in infos if "denoised" in i]
        assert len(calls) == 6
        # the estimate is the closed-form denoiser of the call's position-space state
        for info in calls:
            want = gm.denoise(info["x"], torch.full((3,), info["sigma"], dtype=torch.float64))
            assert torch.allclose(info["denoised"], want, atol=1e-8)


def test_cli_samples_a_user_denoiser_factory(tmp_path, capsys):
    (tmp_path / "myden.py").write_text(
        "import psld_fast, torch\n"
        "def make():\n"
        "    gm = psld_fast.get_preset('ring2d')\n"
        "    return gm.as_edm_denoiser(), dict(shape=gm.shape, sigma_min=0.002, sigma_max=80.0)\n"
        "def labelled():\n"
        "    def den(x, sigma, class_labels):\n"
        "        return torch.zeros_like(x) + class_labels[:, None].to(x.dtype)\n"
        "    return den, dict(shape=(2,), sigma_min=0.002, sigma_max=80.0)\n")
    from psld_fast.cli import main

    spec = f"{tmp_path / 'myden.py'}:make"
    out = tmp_path / "s.npz"
    assert main(["sample", "--denoiser", spec, "-n", "4", "--nfe", "10", "--out", str(out), "--no-progress"]) == 0
    assert "myden.py:make (2,)" in capsys.readouterr().out
    assert np.load(out)["x"].shape == (4, 2)
    lab = f"{tmp_path / 'myden.py'}:labelled"
    assert main(["sample", "--denoiser", lab, "--class-label", "3", "-n", "2", "--nfe", "10", "--out", str(out),
                 "--no-progress", "--no-denoise"]) == 0
    assert main(["sample", "--denoiser", lab, "--class-label", "3", "--guidance", "2", "-n", "2", "--nfe", "10",
                 "--out", str(out), "--no-progress"]) == 2
    assert "--guidance needs --null-label" in capsys.readouterr().err
    assert main(["sample", "--denoiser", "nomodule_here:f", "-n", "2", "--no-progress"]) == 2
    assert "cannot import nomodule_here" in capsys.readouterr().err
    assert main(["sample", "--denoiser", "bad", "-n", "2", "--no-progress"]) == 2
    assert "expected MODULE:FACTORY" in capsys.readouterr().err


def test_lifted_exact_law_is_the_native_law_unclamped_and_matches_monte_carlo_clamped():
    """psld_fast.lift.lifted_program_x_law (the oracle bench/compare_kdiffusion.py scores with):
    without clamping it is the native exact law; with the denoiser's range clamping (range 0.05 .. 1,
    so the first 12 of 20 calls see D at sigma 1) it matches 40000 samples of ``sample`` on that
    DenoiserModel (5 standard errors per coordinate), and differs from the unclamped law by more than
    that bound (at the data end the clamp leaves this Gaussian x-law unchanged, so the top one matters)."""
    from psld_fast.exact import program_x_law
    from psld_fast.lift import lifted_program_x_law

    gm = psld_fast.get_preset("gaussian")
    mu, var = gm.means[0].numpy(), gm.vars[0].numpy()
    for sampler in ["reduced_oba", "em"]:
        wide = _wide(gm, start="T")
        prog = psld_fast.compile_sampler(sampler, wide.process_for(sampler), 20)
        m_nat, v_nat = program_x_law(prog, gm.sde, mu, var)
        m_lift, v_lift = lifted_program_x_law(prog, gm.sde, mu, var, 1e-4, 1e4)
        assert np.allclose(m_lift, m_nat, rtol=0, atol=1e-10) and np.allclose(v_lift, v_nat, rtol=1e-9)

        dm = DenoiserModel(gm.as_edm_denoiser(), gm.shape, sigma_min=0.05, sigma_max=1.0, start="T")
        prog = psld_fast.compile_sampler(sampler, dm.process_for(sampler), 20)
        m, v = lifted_program_x_law(prog, dm.process_for(sampler), mu, var, 0.05, 1.0)
        N = 40000
        res = psld_fast.sample(dm, N, sampler=sampler, nfe=20, backend="reference", dtype=torch.float64,
                               progress=False, seeds=range(N))
        assert res.nfe == prog.nfe
        x = res.x.reshape(N, -1).numpy()
        se_m, se_v = np.sqrt(v / N), v * math.sqrt(2.0 / N)
        assert np.all(np.abs(x.mean(0) - m) < 5 * se_m), sampler
        assert np.all(np.abs(x.var(0) - v) < 5 * se_v), sampler
        m_un, v_un = lifted_program_x_law(prog, dm.process_for(sampler), mu, var, 0.0, math.inf)
        assert np.max(np.abs(v_un - v) / se_v) > 5 or np.max(np.abs(m_un - m) / se_m) > 5, sampler


@pytest.mark.parametrize("backend,dtypes", [
    (b, d) for b in ["reference", "cpu", "triton"]
    for d in [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)]
] + [("reference", (torch.float64, torch.float64))])  # the kernels take 16/32-bit states only
@pytest.mark.parametrize("with_d,with_y", [(True, True), (False, True), (True, False)])
def test_composite_lifted_step_matches_the_lifted_op(backend, dtypes, with_d, with_y):
    """The lifted step of the CUDA and Triton paths (the backend's plain fused step with eps = (d, d),
    then y from the new state) against the op's reference definition; d may alias y."""
    from psld_fast.ops import composite_lifted_step, get_step_fn, unavailable_reason

    assert unavailable_reason(backend, "cpu", dtypes[0]) is None, unavailable_reason(backend, "cpu", dtypes[0])
    u, d, y, seeds, coef = _lifted_case(3, (2, 4, 4), *dtypes, with_d, with_y, seed=11)
    if with_d and with_y:
        y.copy_(d)
        d = y  # the denoiser returned its input
    u_ref, y_ref = lifted_step_reference(u, d, y, seeds, coef, 2, 0)
    composite_lifted_step(get_step_fn(backend))(u, d, y, seeds, coef, 2, 0)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtypes[0]]
    assert torch.allclose(u.double(), u_ref.double(), rtol=tol, atol=tol * 4)
    if with_y:
        assert torch.allclose(y.double(), y_ref.double(), rtol=tol, atol=tol * 4)


def test_end_knob_resolves_per_sampler_group():
    """end=None follows lift.DEFAULT_END (part 2 of docs/any_model_protocol.md: multistep samplers end at
    tau(sigma_min), the one-step ones at the process's eps_end); an explicit end wins; the process ends
    where it says (sigma_y(eps_end) = sigma_min for 'sigma_min'); a bad name is a clear error."""
    from psld_fast.lift import DEFAULT_END, sampler_group, sigma_y

    dm = psld_fast.DenoiserModel(lambda x, s: x, (4,), sigma_min=0.002, sigma_max=80.0)
    assert DEFAULT_END == {"stochastic": "process", "deterministic": "process", "multistep": "sigma_min"}
    assert [sampler_group(s) for s in ("ei_2m", "ei_2m_sde", "ei_x0", "reduced_oba", "ci_ei")] == \
        ["multistep"] * 3 + ["stochastic", "deterministic"]
    low, base = dm.process_for("ei_2m"), dm.process_for("reduced_oba")
    assert float(sigma_y(low, low.eps_end)) == pytest.approx(0.002, rel=1e-9)
    assert base.eps_end == psld_fast.PSLD().eps_end and float(sigma_y(base, base.eps_end)) > 0.008
    forced = psld_fast.DenoiserModel(lambda x, s: x, (4,), end="process")
    assert forced.process_for("ei_2m").eps_end == base.eps_end
    assert psld_fast.DenoiserModel(lambda x, s: x, (4,), end="sigma_min").process_for("reduced_oba").eps_end == low.eps_end
    with pytest.raises(ValueError, match="unknown end 'x'"):
        psld_fast.DenoiserModel(lambda x, s: x, (4,), end="x")
    # the sampler really stops there: the last denoiser call of ei_2m is at sigma_min
    seen = []
    model = psld_fast.DenoiserModel(lambda x, s: (seen.append(float(s.max())), x)[1], (4,))
    psld_fast.sample(model, 2, sampler="ei_2m", nfe=6, progress=False)
    assert min(seen) == pytest.approx(0.002, rel=1e-6)
