"""Small PSLD eps-networks that train on a CPU: an MLP for 2-D points and a U-Net for 16x16 images
(and :class:`EDMUNet`, the same U-Net as a position-only EDM denoiser D(x, sigma)).

Both follow the project convention ``net(u, tau) -> eps`` with ``u = cat(x, m)`` on dim 1 and forward
time ``tau`` (B,).  Two cheap, exact pieces of preconditioning help small networks a lot and do not
change what the network *means* (it still outputs the HSM eps of spec 1.2):

* **input scaling** (``c_in``): x and m are divided by their marginal standard deviations at tau
  for data of variance ``sigma_data^2`` (``Cov = Sinf + P (diag(sigma_data^2, kappa M) - Sinf) P^T``);
* **Gaussian skip** (``gaussian_skip``): the output is ``eps_G(u, tau) + residual`` where ``eps_G`` is
  the exact eps of data ``N(0, sigma_data^2 I)`` (a per-coordinate 2x2 linear map of u:
  ``eps_G = L^T C^{-1} u``).  The network only learns the non-Gaussian part; at tau -> 1 and for the
  momentum at tau -> 0 the skip is already (nearly) exact.

The time embedding is sinusoidal in ``log(tau)`` (tau spans 1e-5 .. 1).  Build a network from a plain
dict with :func:`build_net` (the dict is what training stores in a checkpoint's ``hyper_parameters``).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models import _cov_entries, _transition_entries, hsm_cholesky_tensor
from ..sde import PSLD

__all__ = ["MLP2d", "SmallUNet", "EDMUNet", "noise_embedding", "build_net", "ARCHS", "default_config", "count_params"]


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def log_tau_embedding(tau: torch.Tensor, dim: int, max_freq: float = 64.0) -> torch.Tensor:
    """(B,) forward times -> (B, dim) sin/cos features of ``s = log(tau) / log(1e-5)`` in [0, 1]
    at geometric frequencies 1 .. ``max_freq`` (times pi)."""
    half = dim // 2
    s = torch.log(tau.clamp_min(1e-8)).float() / math.log(1e-5)
    freqs = math.pi * torch.exp(torch.linspace(0.0, math.log(max_freq), half, device=tau.device))
    arg = s[:, None] * freqs[None]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


class _Precond(nn.Module):
    """Input scaling and Gaussian skip shared by the small networks (see the module docstring)."""

    def __init__(self, sde: dict | None, sigma_data: float, gaussian_skip: bool):
        super().__init__()
        self.sde = PSLD(**{k: v for k, v in (sde or {}).items() if k in ("gamma", "nu", "kappa", "beta_min",
                                                                         "beta_max", "T", "eps_end")})
        self.sigma_data = float(sigma_data)
        self.gaussian_skip = bool(gaussian_skip)

    def _coeffs(self, tau: torch.Tensor):
        """Per-sample (B,) float64: input scales (1/sx, 1/sm) and the 2x2 skip ``L^T C^{-1}``."""
        sde = self.sde
        tau = tau.to(torch.float64)
        b = sde.beta_min * tau + 0.5 * tau * tau * (sde.beta_max - sde.beta_min)
        p = _transition_entries(sde, b)
        c00, c01, c11 = _cov_entries(sde, p, self.sigma_data ** 2, sde.kappa * sde.M)
        det = c00 * c11 - c01 * c01
        i00, i01, i11 = c11 / det, -c01 / det, c00 / det          # C^{-1}
        l11, l21, l22 = hsm_cholesky_tensor(sde, tau)
        # L^T = [[l11, l21], [0, l22]];  K = L^T C^{-1}
        k00 = l11 * i00 + l21 * i01
        k01 = l11 * i01 + l21 * i11
        k10 = l22 * i01
        k11 = l22 * i11
        return 1.0 / torch.sqrt(c00), 1.0 / torch.sqrt(c11), (k00, k01, k10, k11)

    def wrap(self, u: torch.Tensor, tau: torch.Tensor, body) -> torch.Tensor:
        if tau.dim() == 0:
            tau = tau.expand(u.shape[0])
        C = u.shape[1] // 2
        shape = (-1,) + (1,) * (u.dim() - 1)
        ax, am, K = self._coeffs(tau)
        dt = u.dtype if u.is_floating_point() else torch.float32
        ax, am = ax.to(dt).reshape(shape), am.to(dt).reshape(shape)
        x, m = u[:, :C], u[:, C:]
        h = torch.cat([x * ax, m * am], dim=1)
        out = body(h, tau)
        if self.gaussian_skip:
            k00, k01, k10, k11 = (k.to(dt).reshape(shape) for k in K)
            skip = torch.cat([k00 * x + k01 * m, k10 * x + k11 * m], dim=1)
            out = out.to(dt) + skip
        return out


class MLP2d(_Precond):
    """Residual MLP for point data: u (B, 2d) -> eps (B, 2d).  ``data_shape = (d,)``."""

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 4, temb: int = 64,
                 sde: dict | None = None, sigma_data: float = 0.8, gaussian_skip: bool = True):
        super().__init__(sde, sigma_data, gaussian_skip)
        self.data_shape = (int(dim),)
        self.temb = int(temb)
        self.t_mlp = nn.Sequential(nn.Linear(temb, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(2 * dim, hidden)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(nn.ModuleDict({
                "norm": nn.LayerNorm(hidden), "fc1": nn.Linear(hidden, 2 * hidden),
                "fc2": nn.Linear(2 * hidden, hidden), "t": nn.Linear(hidden, 2 * hidden)}))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, 2 * dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _body(self, h: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        t = self.t_mlp(log_tau_embedding(tau, self.temb).to(h.dtype))
        h = self.inp(h)
        for blk in self.blocks:
            r = blk["fc1"](blk["norm"](h)) + blk["t"](t)
            h = h + blk["fc2"](F.silu(r))
        return self.out(F.silu(self.out_norm(h)))

    def forward(self, u: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return self.wrap(u, tau, self._body)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, groups: int = 8, dropout: float = 0.0):
        super().__init__()
        self.n1 = nn.GroupNorm(min(groups, cin), cin)
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.t = nn.Linear(temb, cout)
        self.n2 = nn.GroupNorm(min(groups, cout), cout)
        self.drop = nn.Dropout(dropout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.c2.weight)
        nn.init.zeros_(self.c2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, h, t):
        r = self.c1(F.silu(self.n1(h))) + self.t(t)[:, :, None, None]
        r = self.c2(self.drop(F.silu(self.n2(r))))
        return self.skip(h) + r


class _Attn(nn.Module):
    def __init__(self, ch: int, groups: int = 8):
        super().__init__()
        self.norm = nn.GroupNorm(min(groups, ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h):
        B, C, H, W = h.shape
        q, k, v = self.qkv(self.norm(h)).reshape(B, 3, C, H * W).unbind(1)
        a = F.scaled_dot_product_attention(q.transpose(1, 2)[:, None], k.transpose(1, 2)[:, None],
                                           v.transpose(1, 2)[:, None])[:, 0]
        return h + self.proj(a.transpose(1, 2).reshape(B, C, H, W))


class SmallUNet(_Precond):
    """A compact U-Net for small images: u (B, 2C, H, W) -> eps, ``data_shape = (C, H, W)``.

    ``patch`` > 1 folds ``patch x patch`` pixel blocks into channels first (space-to-depth, 4x fewer
    FLOPs for patch 2) and unfolds the output at the end.  ``mults`` gives the width of each resolution (``base * mult``), ``num_res`` residual blocks per
    level on the way down (and ``num_res + 1`` on the way up, U-Net skips), self-attention at the
    coarsest level when ``attn`` is set.
    """

    def __init__(self, channels: int = 1, size: int = 16, base: int = 32, mults=(1, 2, 2), num_res: int = 1,
                 temb: int = 128, attn: bool = True, dropout: float = 0.0, patch: int = 1,
                 sde: dict | None = None, sigma_data: float = 0.5, gaussian_skip: bool = True):
        super().__init__(sde, sigma_data, gaussian_skip)
        self.data_shape = (int(channels), int(size), int(size))
        self.temb = int(temb)
        self.patch = int(patch)
        if size % (self.patch * 2 ** (len(mults) - 1)):
            raise ValueError(f"SmallUNet: size {size} must be divisible by patch * 2^(levels-1)")
        self.t_mlp = nn.Sequential(nn.Linear(temb, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.inp = nn.Conv2d(2 * channels * self.patch ** 2, base, 3, padding=1)
        widths = [base * m for m in mults]
        self.down = nn.ModuleList()
        skips = [base]
        ch = base
        for i, w in enumerate(widths):
            for _ in range(num_res):
                self.down.append(_ResBlock(ch, w, temb, dropout=dropout))
                ch = w
                skips.append(ch)
            if i < len(widths) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid1 = _ResBlock(ch, ch, temb, dropout=dropout)
        self.mid_attn = _Attn(ch) if attn else nn.Identity()
        self.mid2 = _ResBlock(ch, ch, temb, dropout=dropout)
        self.up = nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            for _ in range(num_res + 1):
                self.up.append(_ResBlock(ch + skips.pop(), w, temb, dropout=dropout))
                ch = w
            if i > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                self.up.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.out_norm = nn.GroupNorm(min(8, ch), ch)
        self.out = nn.Conv2d(ch, 2 * channels * self.patch ** 2, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _time_features(self, tau: torch.Tensor, dtype) -> torch.Tensor:
        return self.t_mlp(log_tau_embedding(tau, self.temb).to(dtype))

    def _body(self, h: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        t = self._time_features(tau, h.dtype)
        if self.patch > 1:  # space-to-depth: the U-Net runs at size / patch
            h = F.pixel_unshuffle(h, self.patch)
        h = self.inp(h)
        hs = [h]
        for layer in self.down:
            h = layer(h, t) if isinstance(layer, _ResBlock) else layer(h)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, t)), t)
        for layer in self.up:
            if isinstance(layer, _ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), t)
            else:
                h = layer(h)
        h = self.out(F.silu(self.out_norm(h)))
        return F.pixel_shuffle(h, self.patch) if self.patch > 1 else h

    def forward(self, u: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return self.wrap(u, tau, self._body)


def noise_embedding(c_noise: torch.Tensor, dim: int, max_freq: float = 64.0) -> torch.Tensor:
    """(B,) EDM noise conditions ``c_noise = log(sigma) / 4`` -> (B, dim) sin/cos features of
    ``s = (c_noise - log(0.002) / 4) / ((log(80) - log(0.002)) / 4)`` (0 at sigma 0.002, 1 at sigma 80)
    at geometric frequencies 1 .. ``max_freq`` (times pi), as :func:`log_tau_embedding` does for tau."""
    half = dim // 2
    lo, hi = math.log(0.002) / 4, math.log(80.0) / 4
    s = (c_noise.float() - lo) / (hi - lo)
    freqs = math.pi * torch.exp(torch.linspace(0.0, math.log(max_freq), half, device=c_noise.device))
    arg = s[:, None] * freqs[None]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


class EDMUNet(SmallUNet):
    """A position-only denoiser ``D(x, sigma) -> x0_hat`` with the EDM preconditioning (Karras et al.
    2022, table 1) around the :class:`SmallUNet` body (same blocks; ``channels`` in and out, not 2C):

    ``D = c_skip x + c_out F(c_in x, c_noise)`` with ``c_skip = sd^2 / (s^2 + sd^2)``,
    ``c_out = s sd / sqrt(s^2 + sd^2)``, ``c_in = 1 / sqrt(s^2 + sd^2)``, ``c_noise = log(s) / 4``,
    ``sd = sigma_data``.  It is a k-diffusion-style denoiser (``sigma_min`` / ``sigma_max`` attributes,
    ``forward(x, sigma)`` with sigma a scalar or (B,)), so k-diffusion samples it natively and
    :class:`psld_fast.DenoiserModel` lifts it to PSLD.  ``data_shape = (C, H, W)``.
    """

    def __init__(self, channels: int = 1, size: int = 16, base: int = 32, mults=(1, 2, 2), num_res: int = 1,
                 temb: int = 128, attn: bool = True, dropout: float = 0.0, patch: int = 1,
                 sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0, sde=None):
        # sde: accepted (and ignored) so that build_net can pass the one of a PSLD run
        super().__init__(channels=channels, size=size, base=base, mults=mults, num_res=num_res, temb=temb,
                         attn=attn, dropout=dropout, patch=patch, sde=None, sigma_data=sigma_data,
                         gaussian_skip=False)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        io = int(channels) * self.patch ** 2
        self.inp = nn.Conv2d(io, base, 3, padding=1)
        self.out = nn.Conv2d(self.out.in_channels, io, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def precond(self, sigma: torch.Tensor):
        """``(c_skip, c_out, c_in, c_noise)`` for noise levels sigma (any shape), in sigma's dtype."""
        sd2 = self.sigma_data ** 2
        s2 = sigma * sigma
        c_skip = sd2 / (s2 + sd2)
        c_out = sigma * self.sigma_data / torch.sqrt(s2 + sd2)
        c_in = 1.0 / torch.sqrt(s2 + sd2)
        c_noise = torch.log(sigma) / 4.0
        return c_skip, c_out, c_in, c_noise

    def _time_features(self, c_noise: torch.Tensor, dtype) -> torch.Tensor:
        return self.t_mlp(noise_embedding(c_noise, self.temb).to(dtype))

    def forward(self, x: torch.Tensor, sigma, **extra_args) -> torch.Tensor:
        wdt = self.inp.weight.dtype
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.dim() == 0:
            sigma = sigma.expand(x.shape[0])
        sigma = sigma.reshape(-1).to(torch.float32 if x.dtype != torch.float64 else torch.float64)
        c_skip, c_out, c_in, c_noise = self.precond(sigma)
        shape = (-1,) + (1,) * (x.dim() - 1)
        F_x = self._body((c_in.reshape(shape) * x).to(wdt), c_noise)
        return (c_skip.reshape(shape) * x + c_out.reshape(shape) * F_x.to(x.dtype)).to(x.dtype)


ARCHS = {"mlp": MLP2d, "unet": SmallUNet, "edm_unet": EDMUNet}


def default_config(arch: str, **overrides: Any) -> dict:
    """A plain-dict network config (stored in checkpoints) with the defaults of ``arch``."""
    if arch not in ARCHS:
        raise ValueError(f"unknown small-network arch {arch!r}; choose one of {sorted(ARCHS)}")
    if arch == "mlp":
        cfg = dict(dim=2, hidden=128, depth=3, temb=32, sigma_data=0.8, gaussian_skip=True)
    elif arch == "edm_unet":
        cfg = dict(channels=1, size=16, base=48, mults=[1, 2], num_res=1, temb=128, attn=True, dropout=0.0, patch=2,
                   sigma_data=0.5, sigma_min=0.002, sigma_max=80.0)
    else:
        cfg = dict(channels=1, size=16, base=48, mults=[1, 2], num_res=1, temb=128, attn=True, dropout=0.0, patch=2,
                   sigma_data=0.5, gaussian_skip=True)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    cfg["arch"] = arch
    return cfg


def build_net(config: dict, sde: PSLD | dict | None = None) -> nn.Module:
    """Build a small network from its config dict (``{"arch": "mlp" | "unet", ...}``)."""
    cfg = dict(config)
    arch = cfg.pop("arch", None)
    if arch not in ARCHS:
        raise ValueError(f"unknown small-network arch {arch!r}; choose one of {sorted(ARCHS)}")
    if isinstance(sde, PSLD):
        sde = sde.to_dict()
    if sde is not None:
        cfg["sde"] = dict(sde)
    if "mults" in cfg:
        cfg["mults"] = tuple(cfg["mults"])
    return ARCHS[arch](**cfg)
