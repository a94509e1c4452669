"""The data-prediction exponential integrators (psld_fast.multistep): the exact linear part against
closed forms, the data estimate against the lift's, convergence orders on an exact Gaussian, the
multistep oracle against Monte Carlo, the lambda_s-SDE's step consistency, knob errors.

(Pathwise equality with the readable loops, every backend, the lift and the CUDA-graph runner:
tests/test_samplers.py, test_backends.py, test_lift.py, test_graphs*.py, parametrised over every
sampler.)"""
import math

import numpy as np
import pytest
import torch

import psld_fast as pf
from psld_fast import multistep
from psld_fast.exact import gaussian_eps_affine, gaussian_w2_1d, program_output_moments, stage_maps
from psld_fast.program import Program, run_stages_reference
from psld_fast.runner import ms_estimate

SDE = pf.PSLD()


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tau_n,tau_next", [(0.9, 0.5), (0.05, 0.01), (2e-3, 1e-3), (0.3, 0.29)])
def test_transition_carries_the_point_mass_marginal_exactly(lam, tau_n, tau_next):
    """For data at one point x0 the score is exact with D = x0 constant, and every member of the
    lambda-family keeps the marginal N(mu x0, Sigma): Phi mu_n + J0 = mu_next and
    Phi Sigma_n Phi^T + C = Sigma_next (closed forms of psld_fast.sde), to 2e-7 relative (float32 rounding of the coefficients is 6e-8)."""
    Phi, J, C = multistep.ei_transition(SDE, tau_n, tau_next, lam=lam, weights=[lambda s: 1.0])
    mu_n, mu_next = SDE.P(SDE.b(tau_n))[:, 0], SDE.P(SDE.b(tau_next))[:, 0]
    S_n, S_next = multistep.exact_hsm_cov(SDE, tau_n), multistep.exact_hsm_cov(SDE, tau_next)
    assert np.abs(Phi @ mu_n + J[0] - mu_next).max() <= 2e-7 * np.abs(mu_next).max()
    assert np.abs(Phi @ S_n @ Phi.T + C - S_next).max() <= 2e-7 * np.abs(S_next).max()
    if lam == 0.0:
        assert np.all(C == 0.0)


def test_transition_quadrature_has_converged():
    """Doubling the default RK4 sub-steps changes Phi, J (weights 1 and a line in log sigma) and C by < 1e-7 (the kernels round them to float32)."""
    w = [lambda s: 1.0, lambda s: math.log(multistep.sigma_y(SDE, s)) - math.log(multistep.sigma_y(SDE, 0.2))]
    for tau_n, tau_next in [(1.0, 0.8), (0.2, 0.05), (2e-3, 1e-3)]:
        n = multistep.rk4_substeps(tau_n, tau_next)
        a = multistep.ei_transition(SDE, tau_n, tau_next, lam=1.0, weights=w)
        b = multistep.ei_transition(SDE, tau_n, tau_next, lam=1.0, weights=w, substeps=2 * n)
        for x, y in zip(a, b):
            assert np.abs(x - y).max() <= 1e-7 * max(1.0, np.abs(y).max())


def test_data_estimate_is_the_lifts_x0_estimate():
    """denoiser_coef (the multistep stages' D = a^T z + c^T eps) equals lift.x0_from_eps, and on the
    lifted exact eps of a known D it returns that D (float64, 1e-12)."""
    from psld_fast.lift import _scalar_terms, x0_from_eps

    g = torch.Generator().manual_seed(0)
    u = torch.randn(6, 4, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 4, 3, generator=g, dtype=torch.float64)
    for tau in (1e-3, 0.07, 0.6, 1.0):
        t = _scalar_terms(SDE, tau)
        want = x0_from_eps(t, u[:, :2], u[:, 2:], eps[:, :2], eps[:, 2:])
        got = ms_estimate(u, eps, multistep.denoiser_coef(SDE, tau))
        assert (got - want).abs().max() <= 1e-12 * want.abs().max()
        D = torch.randn(6, 2, 3, generator=g, dtype=torch.float64)
        z_x, z_m = u[:, :2], u[:, 2:]
        lift_eps = torch.cat([t["E00"] * z_x + t["E01"] * z_m - t["e0"] * D, t["E10"] * z_x + t["E11"] * z_m - t["e1"] * D], 1)
        back = ms_estimate(u, lift_eps, multistep.denoiser_coef(SDE, tau))
        assert (back - D).abs().max() <= 1e-10 * max(1.0, D.abs().max().item())


def _x_law_error(sampler, nfe, mu, var, ref):
    p = pf.compile_sampler(sampler, SDE, nfe, denoise=False)
    mean, cov = program_output_moments(p, SDE, mu, var)
    return gaussian_w2_1d(mean[:, 0], cov[:, 0, 0], ref[0], ref[1])


@pytest.mark.parametrize("sampler,order", [("ei_x0", 1.0), ("ei_2m", 2.0), ("ei_2m_sde", 2.0)])
def test_convergence_order_on_an_exact_gaussian(sampler, order, capsys):
    """Exact W2 of the x-law at eps_end (no denoising step) against the same sampler at NFE 1280, on
    the 16-d Gaussian preset: the local order from NFE 80 to 160 is within 0.25 of ``order``
    (measured: ei_x0 1.06, ei_2m 1.94, ei_2m_sde 1.95 at its default lambda_s 0.25, 2.03 at 1; NFE 20 -> 40
    is pre-asymptotic for ei_2m, 1.05)."""
    model = pf.get_preset("gaussian")
    mu, var = (t.numpy().ravel() for t in model.data_moments())
    pr = pf.compile_sampler(sampler, SDE, 1280, denoise=False)
    mr, cr = program_output_moments(pr, SDE, mu, var)
    errs = [_x_law_error(sampler, n, mu, var, (mr[:, 0], cr[:, 0, 0])) for n in (20, 40, 80, 160)]
    local = -np.diff(np.log(errs)) / math.log(2)
    with capsys.disabled():
        print(f"\n{sampler}: W2 vs NFE 1280 at NFE 20/40/80/160: " + " ".join(f"{e:.3e}" for e in errs)
              + "  local orders " + " ".join(f"{o:.2f}" for o in local))
    assert all(b < a for a, b in zip(errs, errs[1:]))
    assert abs(local[-1] - order) < 0.25, f"{sampler}: local order {local[-1]:.2f}, expected {order}"


def test_multistep_law_matches_monte_carlo():
    """The augmented-state oracle (x, m, D_prev) of exact.program_output_moments against 5000
    samples of ei_2m_sde through the fused CPU loop (float32) on the exact Gaussian: 5-sigma bands on every
    coordinate's mean and variance; and the deterministic ei_2m's samples are the oracle's
    affine map of the prior draw (its law: 5-sigma too)."""
    model = pf.get_preset("gaussian")
    mu, var = (t.numpy().ravel() for t in model.data_moments())
    n = 5000
    for sampler in ("ei_2m_sde", "ei_2m"):
        program = pf.compile_sampler(sampler, model.sde, 12)
        mean, cov = program_output_moments(program, model.sde, mu, var)
        res = pf.sample(model, n, sampler=sampler, nfe=12, backend="cpu", progress=False)
        x = res.x.reshape(n, -1).numpy()
        assert np.all(np.abs(x.mean(0) - mean[:, 0]) < 5 * np.sqrt(cov[:, 0, 0] / n)), sampler
        assert np.all(np.abs(x.var(0) - cov[:, 0, 0]) < 5 * cov[:, 0, 0] * np.sqrt(2 / n)), sampler


def test_multistep_oracle_is_not_the_one_step_oracle():
    """The previous call's term matters: dropping G2 (the 2x2 maps of stage_maps) changes the law of
    ei_2m by far more than rounding, so the augmented oracle is what the tests above check."""
    model = pf.get_preset("gaussian")
    mu, var = (t.numpy().ravel() for t in model.data_moments())
    program = pf.compile_sampler("ei_2m", model.sde, 12)
    assert program.multistep and sum(s.G2 is not None for s in program.stages) == 10  # every step but the first
    mean, cov = program_output_moments(program, model.sde, mu, var)
    m1, c1 = np.zeros((16, 2)), np.zeros((16, 2, 2))
    for A, b, noise in stage_maps(program, model.sde, mu, var, drop_multistep=True):
        m1, c1 = np.einsum("dij,dj->di", A, m1) + b, A @ c1 @ np.transpose(A, (0, 2, 1)) + noise
    assert gaussian_w2_1d(mean[:, 0], cov[:, 0, 0], m1[:, 0], c1[:, 0, 0]) > 1e-3
    with pytest.raises(ValueError, match="multistep program"):  # never silently without the term
        next(stage_maps(program, model.sde, mu, var))


def test_run_stages_reference_equals_sample_for_multistep_programs():
    """The pure-PyTorch stage runner and psld_fast.sample agree on ring2d: the runner's loop with the
    reference step in float64 to 1e-12, the fused CPU kernel in float32 to 1e-5."""
    model = pf.get_preset("ring2d")
    seeds = torch.tensor([0, 7, -3], dtype=torch.int64)
    for sampler in ("ei_2m", "ei_2m_sde"):
        program = pf.compile_sampler(sampler, model.sde, 9, ms_variable="log_sigma")
        want = run_stages_reference(lambda u, tau: model(u, torch.full((u.shape[0],), tau, dtype=torch.float64)),
                                    program, seeds, model.shape)
        scale = want.abs().max().item()
        kw = dict(sampler=sampler, nfe=9, seeds=seeds, ms_variable="log_sigma", progress=False)
        got = pf.sample(model, 3, backend="reference", dtype=torch.float64, **kw)
        assert (got.x - want[:, :2]).abs().max() <= 1e-12 * scale
        fused = pf.sample(model, 3, backend="cpu", **kw)
        assert (fused.x.double() - want[:, :2]).abs().max() <= 1e-5 * scale


def _composite(monkeypatch):
    """Inside, the loops find no fused multistep op: the term runs as composite torch ops."""
    from psld_fast import ops

    monkeypatch.setattr(ops, "_fused_variant", lambda fn, lifted: None)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_loops_run_the_fused_multistep_op(backend):
    """The step functions sample() uses map to the fused multistep ops of their backend (one pass per
    NFE), not to the composite fallback a caller's own step function gets."""
    from psld_fast import ops

    if backend == "triton" and not ops.has_triton():
        pytest.skip("triton is not installed")
    plain, lifted = ops.multistep_fns(ops.get_step_fn(backend), ops.get_lifted_step_fn(backend))
    assert plain is ops.get_ms_step_fn(backend)
    if backend == "cpu":
        assert lifted is torch.ops.psld_fast.lifted_ms_step_.default
    assert "composite" not in getattr(lifted, "__name__", "")
    own, own_lifted = ops.multistep_fns(lambda *a: None, lambda *a: None)
    assert own.__name__.startswith("composite_ms_step") and own_lifted.__name__.startswith("composite_lifted_ms_step")


@pytest.mark.parametrize("kind", ["native", "lifted"])
@pytest.mark.parametrize("sampler", ["ei_2m", "ei_2m_sde"])
def test_fused_multistep_equals_the_composite_term(monkeypatch, kind, sampler):
    """The fused op (D_prev and this call's D inside the step's pass) against the multistep term as
    composite torch ops after the plain fused step, float32 on the CPU kernel: the same samples up to
    float32 rounding (the composite rounds the state before adding G2 D_prev)."""
    model = pf.get_preset("gaussian")
    if kind == "lifted":
        mu, var = (t.reshape(model.shape) for t in model.data_moments())
        model = pf.DenoiserModel(lambda y, s: (var * y + (s.reshape(-1, *[1] * (y.dim() - 1)) ** 2) * mu)
                                 / (var + s.reshape(-1, *[1] * (y.dim() - 1)) ** 2), model.shape)
    kw = dict(sampler=sampler, nfe=15, seeds=torch.arange(64) * 7 + 3, backend="cpu", progress=False)
    fused = pf.sample(model, 64, **kw).x
    _composite(monkeypatch)
    comp = pf.sample(model, 64, **kw).x
    scale = float(comp.abs().max())
    err = float((fused - comp).abs().max())
    assert err <= 2e-5 * scale, err


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_ei_step_is_consistent_with_the_lambda_family(lam):
    """One small step (h = 1e-4 in reverse time, first step: no D_prev) of ei_2m_sde at lambda_s = lam
    against the lambda-family SDE on the exact Gaussian: (M - I)/h -> the drift Jacobian
    -(beta F - c beta Dh^2 S E), b/h -> its offset, noise/h -> lam^2 beta Dh^2 (first order: < 2%)."""
    mu, var = np.array([0.3]), np.array([0.05])
    c = (1 + lam * lam) / 2
    F = 0.5 * np.array([[-SDE.gamma, SDE.Minv], [-1.0, -SDE.nu]])
    Dh2 = np.diag([SDE.gamma, SDE.M * SDE.nu])
    for t0 in (0.5, 0.95):
        h = 1e-4
        grid = np.array([0.0, t0, t0 + h, SDE.T - SDE.eps_end])
        p = pf.compile_sampler("ei_2m_sde", SDE, 3, schedule=grid, denoise=False, lambda_s=lam)
        step = Program(p.sampler, p.stages[2:3], p.grid, p.info)  # the call at t0 and the step t0 -> t0 + h
        # its D_prev term (the line through the call at t = 0) is O(h^2 / t0): the 2x2 maps leave it out
        G2 = step.stages[0].G2
        assert np.abs(G2).max() < 1e-2 * h
        (A, b, noise), = list(stage_maps(step, SDE, mu, var, drop_multistep=True))
        tau = SDE.T - t0
        beta = SDE.beta(tau)
        E, e0 = gaussian_eps_affine(SDE, tau, mu, var)
        S = SDE.score_matrix(tau)
        J = -(beta * F - c * beta * Dh2 @ S @ E[0])
        off = c * beta * Dh2 @ S @ e0[0]
        assert np.abs((A[0] - np.eye(2)) / h - J).max() < 0.02 * np.abs(J).max()
        assert np.abs(b[0] / h - off).max() < 0.02 * np.abs(off).max()
        want = lam * lam * beta * Dh2
        assert np.abs(noise / h - want).max() <= 0.02 * max(np.abs(want).max(), 1e-12) + 1e-12


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="reduced_oba", ms_variable="tau"), "multistep samplers only"),
    (dict(sampler="ei_2m", ms_variable="log"), "unknown ms_variable"),
    (dict(sampler="ei_x0", ms_variable="tau"), "multistep samplers only"),
])
def test_ms_variable_errors(kwargs, match):
    sampler = kwargs.pop("sampler")
    with pytest.raises(ValueError, match=match):
        pf.compile_sampler(sampler, SDE, 10, **kwargs)
