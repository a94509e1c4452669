"""Readable reference samplers, written in the spec's notation (float64-capable).

One short function per sampler, sharing the leading signature
``(eps_fn, shape, sde, grid, noise, *, lambda_s, reading, net_time, denoise)``:

* ``eps_fn(z, tau) -> eps`` the network (z packed (B, 2C, ...), tau a float forward time);
* ``noise() -> (xi_x, xi_m)`` draws N(0, I) pairs shaped like x, in the order the sampler uses them
  (the prior draw first);
* the return value is the final packed state z = cat(x, m).

These loops are the oracle for the compiled programs of :mod:`psld_fast.samplers` (the tests feed
both the same noise and compare pathwise); ``psld_fast.sample`` runs the compiled programs.
"""
from __future__ import annotations

import math

import torch

__all__ = ["REFERENCE_SAMPLERS", "run_reference", "run_reference_like", "IIDNoise", "ProgramNoise"]


class IIDNoise:
    """``noise()`` drawing fresh float64 N(0, I) pairs from a torch generator."""

    def __init__(self, shape, generator=None, dtype=torch.float64, device=None):
        self.shape, self.generator, self.dtype, self.device = tuple(shape), generator, dtype, device

    def __call__(self):
        kw = dict(generator=self.generator, dtype=self.dtype, device=self.device)
        return torch.randn(self.shape, **kw), torch.randn(self.shape, **kw)


class _Ctx:
    """The process and knobs shared by the loops below: score, drift and the O, A, B updates."""

    def __init__(self, eps_fn, sde, noise, lambda_s, reading, split="additive", coupling="sequential",
                 lambda_form="std"):
        self.eps_fn, self.sde, self.noise = eps_fn, sde, noise
        self.G, self.nu, self.M, self.Minv = sde.gamma, sde.nu, sde.M, sde.Minv
        self.lx = lambda_s if lambda_form == "std" else math.sqrt(lambda_s)
        self.cx = 1.0 + self.lx ** 2 if reading == "marginal" else 2.0
        self.ou = split == "ou"
        self.joint = coupling == "joint"

    def eps(self, x, m, tau):
        """The network output split into its x and m halves."""
        eps = self.eps_fn(torch.cat([x, m], 1), tau).to(x.dtype)
        C = x.shape[1]
        return eps[:, :C], eps[:, C:]

    def score(self, x, m, tau):
        """s = -L^{-T} eps (spec 1.2)."""
        ex, em = self.eps(x, m, tau)
        l11, l21, l22 = self.sde.hsm_cholesky(tau)
        return -ex / l11 + l21 / (l11 * l22) * em, -em / l22

    def O(self, x, m, d):
        xi_x, xi_m = self.noise()
        if self.ou:  # exact friction + noise (spec 4.3, alternative reading)
            kx = (self.cx - 1.0) * self.G
            var_x = self.G * (-math.expm1(-kx * d) / kx if kx > 0 else d)
            return (math.exp(-kx * d / 2) * x + self.lx * math.sqrt(var_x) * xi_x,
                    math.exp(-self.nu * d / 2) * m + math.sqrt(-self.M * math.expm1(-self.nu * d)) * xi_m)
        return x + self.lx * math.sqrt(self.G * d) * xi_x, m + math.sqrt(self.M * self.nu * d) * xi_m

    def B(self, x, m, d, s_m):
        if self.ou:
            return m + d / 2 * (x + 2 * self.M * self.nu * (s_m + self.Minv * m))
        return m + d / 2 * (x + self.nu * m + 2 * self.M * self.nu * s_m)

    def A(self, x, m, d, s_x):
        if self.ou:
            return x + d / 2 * (-self.Minv * m + self.cx * self.G * (s_x + x))
        return x + d / 2 * (self.G * x - self.Minv * m + self.cx * self.G * s_x)

    # PF ODE split (spec 4.6): the halved score terms, no noise
    def A_pf(self, x, m, d, s_x):
        return x + d / 2 * (self.G * x - self.Minv * m + self.G * s_x)

    def B_pf(self, x, m, d, s_m):
        return m + d / 2 * (x + self.nu * m + self.M * self.nu * s_m)

    def BA(self, x, m, dB, dA, s_x, s_m):
        """B(dB) then A(dA) from one score: A sees the new m (sequential) or the old one (joint)."""
        m_new = self.B(x, m, dB, s_m)
        return self.A(x, m if self.joint else m_new, dA, s_x), m_new

    def AB(self, x, m, dA, dB, s_x, s_m):
        """A(dA) then B(dB) from one score: B sees the new x (sequential) or the old one (joint)."""
        x_new = self.A(x, m, dA, s_x)
        return x_new, self.B(x if self.joint else x_new, m, dB, s_m)

    def step_times(self, grid, n):
        tau_n, tau_next = self.sde.T - grid[n], self.sde.T - grid[n + 1]
        return tau_n, tau_next, self.sde.b(tau_n) - self.sde.b(tau_next), grid[n + 1] - grid[n]


def _prior(c: _Ctx):
    xi_x, xi_m = c.noise()
    return xi_x, math.sqrt(c.M) * xi_m


def _em(c, grid, net_time):
    x, m = _prior(c)
    for n in range(len(grid) - 1):
        tau_n, _, _, h = c.step_times(grid, n)
        beta = c.sde.beta(tau_n)
        s_x, s_m = c.score(x, m, tau_n)
        xi_x, xi_m = c.noise()
        dx = beta / 2 * (c.G * x - c.Minv * m) + c.cx / 2 * beta * c.G * s_x
        dm = beta / 2 * (x + c.nu * m) + beta * c.M * c.nu * s_m
        x, m = (x + h * dx + math.sqrt(h) * c.lx * math.sqrt(beta * c.G) * xi_x,
                m + h * dm + math.sqrt(h) * math.sqrt(beta * c.M * c.nu) * xi_m)
    return x, m


def _ode_euler(c, grid, net_time):
    x, m = _prior(c)
    for n in range(len(grid) - 1):
        tau_n, _, _, h = c.step_times(grid, n)
        beta = c.sde.beta(tau_n)
        s_x, s_m = c.score(x, m, tau_n)
        x, m = (x + h * (beta / 2 * (c.G * x - c.Minv * m) + beta / 2 * c.G * s_x),
                m + h * (beta / 2 * (x + c.nu * m) + beta / 2 * c.M * c.nu * s_m))
    return x, m


def _ou_half(c, x, m, d):
    """SSCS's exact A: mean Sg P(d) Sg z, noise covariance Sg (Sinf - P Sinf P^T) Sg."""
    mean, chol = c.sde.ou_half(d)
    xi_x, xi_m = c.noise()
    return (mean[0, 0] * x + mean[0, 1] * m + chol[0, 0] * xi_x,
            mean[1, 0] * x + mean[1, 1] * m + chol[1, 0] * xi_x + chol[1, 1] * xi_m)


def _sscs(c, grid, net_time):
    x, m = _prior(c)
    for n in range(len(grid) - 1):
        tau_n, _, _, h = c.step_times(grid, n)
        beta = c.sde.beta(tau_n)
        x, m = _ou_half(c, x, m, h * beta / 2)
        s_x, s_m = c.score(x, m, tau_n)
        x, m = x + h * beta * c.G * (s_x + x), m + h * beta * c.M * c.nu * (s_m + c.Minv * m)
        x, m = _ou_half(c, x, m, h * beta / 2)
    return x, m


def _after_o(net_time, tau_n, tau_next):
    return tau_next if net_time == "end" else tau_n


def _naive_oba(c, grid, net_time):
    x, m = _prior(c)
    for n in range(len(grid) - 1):
        tau_n, tau_next, d, _ = c.step_times(grid, n)
        tau = _after_o(net_time, tau_n, tau_next)
        x, m = c.O(x, m, d)
        m = c.B(x, m, d, c.score(x, m, tau)[1])
        x = c.A(x, m, d, c.score(x, m, tau)[0])
    return x, m


def _naive_bao(c, grid, net_time):
    x, m = _prior(c)
    for n in range(len(grid) - 1):
        tau_n, _, d, _ = c.step_times(grid, n)
        m = c.B(x, m, d, c.score(x, m, tau_n)[1])
        x = c.A(x, m, d, c.score(x, m, tau_n)[0])
        x, m = c.O(x, m, d)
    return x, m


def _naive_obab(c, grid, net_time):
    x, m = _prior(c)
    for n in range(len(grid) - 1):
        tau_n, tau_next, d, _ = c.step_times(grid, n)
        tau = _after_o(net_time, tau_n, tau_next)
        x, m = c.O(x, m, d)
        m = c.B(x, m, d / 2, c.score(x, m, tau)[1])
        x = c.A(x, m, d, c.score(x, m, tau)[0])
        m = c.B(x, m, d / 2, c.score(x, m, tau)[1])
    return x, m


def _naive_baoab(c, grid, net_time):
    x, m = _prior(c)
    for n in range(len(grid) - 1):
        tau_n, tau_next, d, _ = c.step_times(grid, n)
        tau = _after_o(net_time, tau_n, tau_next)
        m = c.B(x, m, d / 2, c.score(x, m, tau_n)[1])
        x = c.A(x, m, d / 2, c.score(x, m, tau_n)[0])
        x, m = c.O(x, m, d)
        x = c.A(x, m, d / 2, c.score(x, m, tau)[0])
        m = c.B(x, m, d / 2, c.score(x, m, tau)[1])
    return x, m


def _reduced_oba(c, grid, net_time):
    x, m = _prior(c)
    for n in range(len(grid) - 1):
        tau_n, tau_next, d, _ = c.step_times(grid, n)
        x, m = c.O(x, m, d)                                           # O: noise in x and m
        s_x, s_m = c.score(x, m, _after_o(net_time, tau_n, tau_next))  # one call serves
        x, m = c.BA(x, m, d, d, s_x, s_m)                             # B and A (s_x reused)
    return x, m


def _reduced_bao(c, grid, net_time):
    x, m = _prior(c)
    for n in range(len(grid) - 1):
        tau_n, _, d, _ = c.step_times(grid, n)
        s_x, s_m = c.score(x, m, tau_n)
        x, m = c.BA(x, m, d, d, s_x, s_m)
        x, m = c.O(x, m, d)
    return x, m


def _reduced_obab(c, grid, net_time):
    x, m = _prior(c)
    for n in range(len(grid) - 1):
        tau_n, tau_next, d, _ = c.step_times(grid, n)
        x, m = c.O(x, m, d)
        s_x, s_m = c.score(x, m, _after_o(net_time, tau_n, tau_next))
        x, m = c.BA(x, m, d / 2, d, s_x, s_m)
        m = c.B(x, m, d / 2, c.score(x, m, tau_next)[1])  # closing B at the advanced time
    return x, m


def _reduced_baoab(c, grid, net_time):
    x, m = _prior(c)
    for n in range(len(grid) - 1):
        tau_n, tau_next, d, _ = c.step_times(grid, n)
        s_x, s_m = c.score(x, m, tau_n)
        x, m = c.BA(x, m, d / 2, d / 2, s_x, s_m)
        x, m = c.O(x, m, d)
        s_x, s_m = c.score(x, m, _after_o(net_time, tau_n, tau_next))
        x, m = c.AB(x, m, d / 2, d / 2, s_x, s_m)
    return x, m


# ----------------------------------------------------- deterministic splitting of the PF ODE (spec 4.6)
def _nse(c, grid, net_time):
    x, m = _prior(c)
    for n in range(len(grid) - 1):
        tau_n, tau_next, d, _ = c.step_times(grid, n)
        x = c.A_pf(x, m, d, c.score(x, m, tau_n)[0])
        m = c.B_pf(x, m, d, c.score(x, m, _after_o(net_time, tau_n, tau_next))[1])  # call after A
    return x, m


def _nvv(c, grid, net_time):
    x, m = _prior(c)
    for n in range(len(grid) - 1):
        tau_n, tau_next, d, _ = c.step_times(grid, n)
        m = c.B_pf(x, m, d / 2, c.score(x, m, tau_n)[1])
        x = c.A_pf(x, m, d, c.score(x, m, tau_n)[0])
        m = c.B_pf(x, m, d / 2, c.score(x, m, _after_o(net_time, tau_n, tau_next))[1])
    return x, m


def _rse(c, grid, net_time):
    x, m = _prior(c)
    for n in range(len(grid) - 1):
        tau_n, _, d, _ = c.step_times(grid, n)
        s_x, s_m = c.score(x, m, tau_n)                      # one call serves A and B
        x_new = c.A_pf(x, m, d, s_x)
        m = c.B_pf(x if c.joint else x_new, m, d, s_m)
        x = x_new
    return x, m


def _rvv(c, grid, net_time):
    x, m = _prior(c)
    for n in range(len(grid) - 1):
        tau_n, tau_next, d, _ = c.step_times(grid, n)
        s_x, s_m = c.score(x, m, tau_n)                      # one call serves B(h/2) and A(h)
        m_new = c.B_pf(x, m, d / 2, s_m)
        x = c.A_pf(x, m if c.joint else m_new, d, s_x)
        m = c.B_pf(x, m_new, d / 2, c.score(x, m_new, _after_o(net_time, tau_n, tau_next))[1])
    return x, m


# ---------------------------------------------------------- conjugate integrators (psld_fast.conjugate)
def _apply(Mat, x, m):
    return Mat[0, 0] * x + Mat[0, 1] * m, Mat[1, 0] * x + Mat[1, 1] * m


def _conjugate(c, grid, net_time):
    """zhat = A(tau_n) z;  zhat += -d A_n B A_n^{-1} zhat + dPhi eps(z, tau_n);  z = A(tau_{n+1})^{-1} zhat."""
    import numpy as np

    from .conjugate import CI_KINDS, conjugate_A, conjugate_B, conjugate_dphi

    kind, lam = CI_KINDS[c.sampler], c.ci_lambda
    B = conjugate_B(kind, lam)
    x, m = _prior(c)
    for n in range(len(grid) - 1):
        tau_n, tau_next, d, _ = c.step_times(grid, n)
        A_n, A_next = conjugate_A(c.sde, kind, lam, tau_n), conjugate_A(c.sde, kind, lam, tau_next)
        dphi = conjugate_dphi(c.sde, kind, lam, tau_next, tau_n)
        e_x, e_m = c.eps(x, m, tau_n)
        xh, mh = _apply(A_n, x, m)
        lin_x, lin_m = _apply(A_n @ B @ np.linalg.inv(A_n), xh, mh)
        phi_x, phi_m = _apply(dphi, e_x, e_m)
        xh, mh = xh - d * lin_x + phi_x, mh - d * lin_m + phi_m
        x, m = _apply(np.linalg.inv(A_next), xh, mh)
    return x, m


def _csps_d(c, grid, net_time):
    """Reduced velocity Verlet with scalar conjugate sub-steps (psld_fast.conjugate.conjugate_substeps):
    m <- gm m + bx x + be eps_m ;  x <- gx x + am m + ae . eps."""
    from .conjugate import conjugate_substeps, tau_of_b

    lam, sde = c.ci_lambda, c.sde
    x, m = _prior(c)
    for n in range(len(grid) - 1):
        tau_n, tau_next, d, _ = c.step_times(grid, n)
        tau_mid = tau_of_b(sde, (sde.b(tau_n) + sde.b(tau_next)) / 2)
        (B1z, B1e), _ = conjugate_substeps(sde, lam, tau_mid, tau_n)
        (B2z, B2e), _ = conjugate_substeps(sde, lam, tau_next, tau_mid)
        _, (Az, Ae) = conjugate_substeps(sde, lam, tau_next, tau_n)
        e_x, e_m = c.eps(x, m, tau_n)                                     # one call serves
        m = B1z[1, 1] * m + B1z[1, 0] * x + B1e[1, 1] * e_m                # B(h/2) and
        x = Az[0, 0] * x + Az[0, 1] * m + Ae[0, 0] * e_x + Ae[0, 1] * e_m  # A(h), with the new m
        e_x, e_m = c.eps(x, m, _after_o(net_time, tau_n, tau_next))
        m = B2z[1, 1] * m + B2z[1, 0] * x + B2e[1, 1] * e_m                # closing B(h/2)
    return x, m


def _ei(c, grid, net_time):
    """Data-prediction exponential integrators (psld_fast.multistep): per step
    D = E[x0 | z] = w^T (z + Sigma s) (Tweedie, s from eps);  z <- Phi z + J0 D + J1 (D - D_prev) + chol(C) xi,
    J1 = 0 for ei_x0 and for the first step (no D_prev yet); noise for ei_2m_sde only (lambda = lambda_s)."""
    from .multistep import ei_transition, exact_hsm_cov, ms_variable
    from .sde import chol2

    sde = c.sde
    lam = c.lambda_s if c.sampler == "ei_2m_sde" else 0.0
    x, m = _prior(c)
    d_prev = tau_prev = None
    for n in range(len(grid) - 1):
        tau_n, tau_next, _, _ = c.step_times(grid, n)
        s_x, s_m = c.score(x, m, tau_n)
        Sig, mu = exact_hsm_cov(sde, tau_n), sde.P(sde.b(tau_n))[:, 0]
        w = torch.linalg.solve(torch.as_tensor(Sig), torch.as_tensor(mu)).tolist()
        k = w[0] * mu[0] + w[1] * mu[1]
        zx, zm = x + Sig[0, 0] * s_x + Sig[0, 1] * s_m, m + Sig[1, 0] * s_x + Sig[1, 1] * s_m  # mu D
        D = (w[0] * zx + w[1] * zm) / k
        weights = [lambda s: 1.0]
        if c.sampler != "ei_x0" and d_prev is not None:
            v = lambda s: ms_variable(sde, c.ms_variable, s)  # noqa: E731
            weights.append(lambda s: (v(s) - v(tau_n)) / (v(tau_n) - v(tau_prev)))
        Phi, J, C = ei_transition(sde, tau_n, tau_next, lam=lam, weights=weights)
        x, m = _apply(Phi, x, m)
        x, m = x + J[0, 0] * D, m + J[0, 1] * D
        if len(J) > 1:
            x, m = x + J[1, 0] * (D - d_prev), m + J[1, 1] * (D - d_prev)
        if lam > 0:
            xi_x, xi_m = c.noise()
            R = chol2(C)
            x, m = x + R[0, 0] * xi_x, m + R[1, 0] * xi_x + R[1, 1] * xi_m
        d_prev, tau_prev = D, tau_n
    return x, m


REFERENCE_SAMPLERS = {
    "em": _em, "sscs": _sscs, "ode_euler": _ode_euler,
    "naive_oba": _naive_oba, "naive_bao": _naive_bao, "naive_obab": _naive_obab, "naive_baoab": _naive_baoab,
    "reduced_oba": _reduced_oba, "reduced_bao": _reduced_bao, "reduced_obab": _reduced_obab,
    "reduced_baoab": _reduced_baoab,
    "nse": _nse, "nvv": _nvv, "rse": _rse, "rvv": _rvv,
    "ci_ei": _conjugate, "ci_ddim": _conjugate, "ci_ddim2": _conjugate, "csps_d": _csps_d,
    "ei_x0": _ei, "ei_2m": _ei, "ei_2m_sde": _ei,
}


def run_reference(sampler, eps_fn, sde, grid, noise, *, lambda_s=1.0, reading="marginal",
                  net_time="start", denoise=True, split="additive", coupling="sequential",
                  lambda_form="std", ci_lambda=None, ms_variable=None) -> torch.Tensor:
    """Run the readable loop of ``sampler`` and the final denoising step; returns z = cat(x, m)."""
    c = _Ctx(eps_fn, sde, noise, lambda_s, reading, split, coupling, lambda_form)
    c.sampler, c.ci_lambda, c.ms_variable, c.lambda_s = sampler, ci_lambda, ms_variable, lambda_s
    x, m = REFERENCE_SAMPLERS[sampler](c, grid, net_time)
    if denoise:  # one noise-free Euler step of the full reverse SDE from eps_end to 0
        tau, beta = sde.eps_end, sde.beta(sde.eps_end)
        s_x, s_m = c.score(x, m, tau)
        x, m = (x + tau * (beta / 2 * (c.G * x - c.Minv * m) + beta * c.G * s_x),
                m + tau * (beta / 2 * (x + c.nu * m) + beta * c.M * c.nu * s_m))
    return torch.cat([x, m], 1)


class ProgramNoise:
    """``noise()`` that replays the Philox draws a compiled program consumes, in program order.

    Feeding this to :func:`run_reference` makes the readable loop see exactly the noise that
    ``psld_fast.sample`` (any backend) injects, so the two can be compared pathwise.
    """

    def __init__(self, program, seeds: torch.Tensor, shape, dtype=torch.float64, stream: int = 0):
        from .rng import philox_normals

        self._draws = []
        B, numel = seeds.shape[0], math.prod(shape)
        for k, stage in enumerate(program.stages):
            if stage.n_draws:
                n = [t.reshape(B, *shape).to(dtype) for t in philox_normals(seeds, numel, k, stream)]
                self._draws += [(n[0], n[1]), (n[2], n[3])][:stage.n_draws]
        self._next = 0

    def __call__(self):
        if self._next >= len(self._draws):
            raise RuntimeError("ProgramNoise: the reference loop drew more noise than the program")
        self._next += 1
        return self._draws[self._next - 1]

    @property
    def exhausted(self) -> bool:
        return self._next == len(self._draws)


def run_reference_like(program, eps_fn, sde, seeds: torch.Tensor, shape, dtype=torch.float64) -> torch.Tensor:
    """The readable loop of ``program.sampler`` with the program's knobs and exactly the Philox noise
    the compiled program (any backend of ``psld_fast.sample``) draws for ``seeds``: what
    ``sample(model, len(seeds), seeds=seeds, ...)`` computes, written in the spec's notation."""
    info = program.info
    noise = ProgramNoise(program, seeds, shape, dtype=dtype)
    return run_reference(program.sampler, eps_fn, sde, program.grid, noise, lambda_s=info["lambda_s"],
                         reading=info["lambda_reading"], net_time=info["net_time"],
                         denoise=info["denoise"], split=info["split"], coupling=info["coupling"],
                         lambda_form=info["lambda_form"], ci_lambda=info.get("ci_lambda"),
                         ms_variable=info.get("ms_variable"))
