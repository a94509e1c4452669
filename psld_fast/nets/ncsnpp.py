"""NCSN++ score network of PSLD (Song et al.'s ``score_sde`` NCSN++, as vendored in mandt-lab/PSLD).

What it is
----------
A self-contained, pure-PyTorch re-implementation of the ``NCSNpp`` network that the PSLD code
(``main/models/score_fn/song_sde/ncsnpp.py``) uses as its noise predictor.  It is written from the
architecture description, not copied, and it reproduces the upstream network exactly where it matters:

* **State-dict layout.**  Every module lives in one flat ``nn.ModuleList`` called ``all_modules`` and
  sub-modules keep the upstream names (``GroupNorm_0``, ``Conv_0``, ``Dense_0``, ``NIN_0.W``,
  ``Conv2d_0.weight``, ...), so the official PSLD checkpoints load with ``strict=True``.  NIN weights are
  stored ``[in, out]`` like upstream.  The Gaussian-Fourier ``W`` is a parameter with
  ``requires_grad=False`` (it is in the state dict).
* **Forward convention.**  ``forward(u, tau)`` where ``u = cat([x, m], 1)`` is the packed PSLD state
  ``(B, 2C, H, W)`` and ``tau`` the raw forward-SDE time ``(B,)`` in (0, 1].  With the Fourier embedding
  the network embeds ``log(tau)`` (sin first, then cos); with the positional embedding it embeds the raw
  ``tau`` (DDPM sinusoidal embedding, unscaled, exactly as PSLD does).  The output is the raw eps
  prediction ``(B, out_ch, H, W)``: no division by sigma, no sign flip, no input rescaling.
* **FIR resampling.**  ``upfirdn2d`` (StyleGAN2 definition: zero-insert, pad, true 2-D convolution,
  decimate) is implemented in plain PyTorch with a depthwise ``conv2d``; no CUDA extension.

Trade-offs
----------
* Plain PyTorch everywhere: it runs on any device/dtype (float64 included, useful for reference checks)
  and works with ``torch.compile``, autocast and the meta device, at the price of not using the fused
  CUDA ``upfirdn2d`` kernel.  The FIR ops are a small fraction of the cost next to the 3x3 convolutions.
* Attention uses ``F.scaled_dot_product_attention`` (fused q/k/v 1x1 projection) instead of the two
  ``einsum`` calls of upstream, and NIN layers run as 1x1 convolutions.  Mathematically identical; only the
  floating-point reduction order differs (float64 agrees with upstream to ~1e-15 relative, float32 to a
  few 1e-6, the same size as upstream's own float32-vs-float64 error).
* Attention placement is decided from ``image_size`` at construction (upstream checks the runtime width,
  which is equivalent only for the training resolution).  ``forward`` therefore insists on
  ``H == W == image_size``.
* The FIR up-sampling *convolution* (only used by ``progressive='residual'`` with ``fir=True``, which no
  PSLD config uses) is implemented with the StyleGAN2 semantics; upstream's PyTorch port of that path
  fails (negative-stride slicing), so there is no upstream output to compare it with.
* Initialisation follows upstream (DDPM ``fan_avg`` uniform variance scaling, zero biases, ``init_scale``
  with 0 meaning 1e-10) so the module can also be trained from scratch; random streams differ from
  upstream, so fresh weights are not bit-identical.
* ``centered`` is an extra option (default ``True``, which is what PSLD does: the data are put in [-1, 1]
  by the data pipeline and the network scales nothing).  ``centered=False`` applies score_sde's
  ``u -> 2u - 1`` to the whole input, which PSLD never does.

Presets: ``"cifar10"`` (CIFAR-10 SOTA, 97,627,910 params), ``"celeba64"`` (CelebA-64 SOTA, 62,769,286),
``"small"`` (the 305,702-param numerical test network) -- these three are checked against fixtures made
from the upstream code.  ``"afhqv2"`` is the published PSLD AFHQv2-128 SOTA configuration
(``afhqv2128_psld.yaml`` + the overrides of ``scripts_psld/sota/uncond/afhqv2/*_uncond_psld.sh``:
nf 160, ch_mult [1,2,2,3,3], 2 res blocks, attention at 8 and 16, dropout 0.2, no FIR, no input pyramid,
positional embedding); it is reconstructed from the yaml/scripts and has NOT been checked against a real
checkpoint.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "NCSNpp",
    "PRESETS",
    "PRESET_SDE",
    "preset_config",
    "upfirdn2d",
    "upsample_2d",
    "downsample_2d",
]

_SQRT2 = math.sqrt(2.0)


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------

_CIFAR10_SOTA: dict[str, Any] = dict(
    in_ch=6,
    out_ch=6,
    nonlinearity="swish",
    nf=128,
    ch_mult=(2, 2, 2),
    num_res_blocks=8,
    attn_resolutions=(16,),
    dropout=0.15,
    resamp_with_conv=True,
    noise_cond=True,
    fir=True,
    fir_kernel=(1, 3, 3, 1),
    skip_rescale=True,
    resblock_type="biggan",
    progressive="none",
    progressive_input="residual",
    progressive_combine="sum",
    embedding_type="fourier",
    init_scale=0.0,
    fourier_scale=16.0,
    image_size=32,
    continuous=True,
)

#: Network constructor configs, keyed by preset name.  Use :func:`preset_config` for a fresh copy.
PRESETS: dict[str, dict[str, Any]] = {
    # CIFAR-10 SOTA: cifar10_psld.yaml + scripts_psld/sota/uncond/cifar10/sample_uncond_psld.sh.
    "cifar10": dict(_CIFAR10_SOTA),
    # CelebA-64 SOTA: celeba64_psld.yaml + scripts_psld/sota/uncond/celeba64/sample_uncond_psld.sh.
    "celeba64": dict(
        _CIFAR10_SOTA, ch_mult=(1, 2, 2, 2), num_res_blocks=4, dropout=0.1, image_size=64
    ),
    # AFHQv2-128 SOTA (best knowledge, unverified): afhqv2128_psld.yaml +
    # scripts_psld/sota/uncond/afhqv2/{train,sample}_uncond_psld.sh overrides.
    "afhqv2": dict(
        _CIFAR10_SOTA,
        nf=160,
        ch_mult=(1, 2, 2, 3, 3),
        num_res_blocks=2,
        attn_resolutions=(8, 16),
        dropout=0.2,
        fir=False,
        progressive_input="none",
        embedding_type="positional",
        image_size=128,
    ),
    # Small numerical-fixture network (CIFAR-10 SOTA family, shrunk).
    "small": dict(
        _CIFAR10_SOTA, nf=16, ch_mult=(1, 1, 2), num_res_blocks=2, attn_resolutions=(8,), image_size=16
    ),
}

#: PSLD SDE hyper-parameters published with each preset's checkpoint (sampling-script values, which agree
#: with the checkpoint file names).  ``None``: no published checkpoint.
PRESET_SDE: dict[str, dict[str, float] | None] = {
    "cifar10": dict(gamma=0.02, nu=4.02, kappa=0.04, beta_min=8.0, beta_max=8.0),
    "celeba64": dict(gamma=0.005, nu=4.005, kappa=0.04, beta_min=8.0, beta_max=8.0),
    "afhqv2": dict(gamma=0.01, nu=4.01, kappa=0.04, beta_min=8.0, beta_max=8.0),
    "small": None,
}


def preset_config(name: str) -> dict[str, Any]:
    """A fresh copy of the constructor config of preset ``name``."""
    key = str(name).lower()
    if key not in PRESETS:
        raise ValueError(f"unknown NCSNpp preset {name!r}; known presets: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[key])


# --------------------------------------------------------------------------------------------------
# Initialisation (DDPM / score_sde ``default_init``)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def _default_init_(w: torch.Tensor, scale: float = 1.0, in_axis: int = 1, out_axis: int = 0) -> torch.Tensor:
    """Uniform ``fan_avg`` variance scaling; ``scale == 0`` means 1e-10 (as upstream)."""
    scale = 1e-10 if scale == 0 else float(scale)
    shape = w.shape
    receptive = 1
    for i, s in enumerate(shape):
        if i not in (in_axis, out_axis):
            receptive *= s
    fan_in = shape[in_axis] * receptive
    fan_out = shape[out_axis] * receptive
    variance = scale / ((fan_in + fan_out) / 2.0)
    bound = math.sqrt(3.0 * variance)
    return w.uniform_(-bound, bound)


def _conv3x3(in_ch: int, out_ch: int, *, stride: int = 1, padding: int = 1, bias: bool = True,
             init_scale: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=padding, bias=bias)
    _default_init_(conv.weight, init_scale)
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


def _conv1x1(in_ch: int, out_ch: int, *, init_scale: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, 1)
    _default_init_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def _linear(in_f: int, out_f: int) -> nn.Linear:
    lin = nn.Linear(in_f, out_f)
    _default_init_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


def _group_norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(ch // 4, 32), num_channels=ch, eps=1e-6)


def _get_act(name: str):
    name = str(name).lower()
    if name == "swish":
        return F.silu
    if name == "elu":
        return F.elu
    if name == "relu":
        return F.relu
    if name == "lrelu":
        return functools.partial(F.leaky_relu, negative_slope=0.2)
    raise ValueError(f"unknown nonlinearity {name!r} (expected swish, elu, relu or lrelu)")


# --------------------------------------------------------------------------------------------------
# FIR resampling (upfirdn2d, StyleGAN2 definition) in plain PyTorch
# --------------------------------------------------------------------------------------------------


def _setup_kernel(k: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Separable 1-D FIR taps -> normalised 2-D kernel (float64; cast at use)."""
    k = torch.as_tensor(k, dtype=torch.float64)
    if k.ndim == 1:
        k = torch.outer(k, k)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"FIR kernel must be 1-D or square 2-D, got shape {tuple(k.shape)}")
    return k / k.sum()


@functools.lru_cache(maxsize=64)
def _fir_kernel_cached(taps: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return _setup_kernel(taps).to(device=device, dtype=dtype)


def _fir_kernel(taps: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Normalised 2-D FIR kernel for ``taps`` on ``device`` / ``dtype`` (cached in eager mode; under
    ``torch.compile`` it is built in the graph, where it becomes a constant)."""
    if torch.compiler.is_compiling():
        return _setup_kernel(taps).to(device=device, dtype=dtype)
    return _fir_kernel_cached(taps, device, dtype)


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample (zero insertion), pad, FIR-filter (true convolution) and downsample, per channel.

    ``x``: ``(B, C, H, W)``; ``kernel``: 2-D; the same ``pad = (before, after)`` is used on both axes
    (negative values crop).  Output size per axis: ``(H*up + p0 + p1 - kh) // down + 1``.
    """
    B, C, H, W = x.shape
    kh, kw = kernel.shape
    if up > 1:
        # Each input sample followed by (up - 1) zeros.
        x = x.reshape(B, C, H, 1, W, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(B, C, H * up, W * up)
    p0, p1 = pad
    if p0 or p1:
        x = F.pad(x, (p0, p1, p0, p1))
    # True convolution = cross-correlation with the flipped kernel; depthwise over channels.
    w = torch.flip(kernel, (0, 1)).to(device=x.device, dtype=x.dtype)
    w = w[None, None].expand(C, 1, kh, kw)
    # Decimation after a valid convolution == strided valid convolution (same products and sums).
    return F.conv2d(x, w, stride=down, groups=C)


def upsample_2d(x: torch.Tensor, k: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """FIR upsampling; ``k`` is the normalised 2-D kernel from :func:`_setup_kernel`."""
    kk = k * (factor ** 2)
    p = kk.shape[0] - factor
    return upfirdn2d(x, kk, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: torch.Tensor, k: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """FIR downsampling; ``k`` is the normalised 2-D kernel from :func:`_setup_kernel`."""
    p = k.shape[0] - factor
    return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


def _naive_upsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    B, C, H, W = x.shape
    x = x.reshape(B, C, H, 1, W, 1).expand(B, C, H, factor, W, factor)
    return x.reshape(B, C, H * factor, W * factor)


def _naive_downsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    B, C, H, W = x.shape
    return x.reshape(B, C, H // factor, factor, W // factor, factor).mean(dim=(3, 5))


class _FIRConv2d(nn.Module):
    """3x3 (odd) convolution fused with FIR up- or down-sampling (StyleGAN2 ``Conv2d``).

    Parameters ``weight [out, in, k, k]`` and ``bias [out]``, as upstream's ``up_or_down_sampling.Conv2d``.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, *, up: bool = False, down: bool = False,
                 resample_kernel: Sequence[int] = (1, 3, 3, 1), use_bias: bool = True):
        super().__init__()
        if up and down:
            raise ValueError("up and down are exclusive")
        if kernel < 1 or kernel % 2 != 1:
            raise ValueError("kernel must be odd")
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, kernel, kernel))
        _default_init_(self.weight)
        if use_bias:
            self.bias = nn.Parameter(torch.zeros(out_ch))
        else:
            self.register_parameter("bias", None)
        self.up, self.down, self.kernel = up, down, kernel
        self.resample_kernel = tuple(resample_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        k = _fir_kernel(self.resample_kernel, x.device, x.dtype)
        factor = 2
        if self.up:
            # upsample_conv_2d: transposed conv (weights flipped, in/out swapped), then FIR filter.
            kk = k * (factor ** 2)
            p = (kk.shape[0] - factor) - (self.kernel - 1)
            wt = torch.flip(w, (2, 3)).transpose(0, 1)
            x = F.conv_transpose2d(x, wt, stride=factor)
            x = upfirdn2d(x, kk, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))
        elif self.down:
            # conv_downsample_2d: FIR filter with padding, then strided valid conv.
            p = (k.shape[0] - factor) + (self.kernel - 1)
            x = upfirdn2d(x, k, pad=((p + 1) // 2, p // 2))
            x = F.conv2d(x, w, stride=factor)
        else:
            x = F.conv2d(x, w, padding=self.kernel // 2)
        if self.bias is not None:
            x = x + self.bias.reshape(1, -1, 1, 1)
        return x


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


class GaussianFourierProjection(nn.Module):
    """``[sin(2*pi*x*W), cos(2*pi*x*W)]`` with fixed random ``W ~ N(0, scale^2)`` (a frozen parameter)."""

    def __init__(self, embedding_size: int = 256, scale: float = 1.0):
        super().__init__()
        self.W = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_proj = x[:, None] * self.W[None, :] * 2 * math.pi
        return torch.cat([torch.sin(x_proj), torch.cos(x_proj)], dim=-1)


def _timestep_embedding(t: torch.Tensor, dim: int, dtype: torch.dtype, max_positions: int = 10000) -> torch.Tensor:
    """DDPM sinusoidal embedding of the raw ``t`` (frequencies computed in float32, as upstream)."""
    half = dim // 2
    scale = math.log(max_positions) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -scale)
    work = torch.promote_types(dtype, torch.float32)
    emb = t.to(work)[:, None] * freqs.to(work)[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb.to(dtype)


class NIN(nn.Module):
    """Per-pixel linear map over channels, ``y = x W + b`` with ``W`` stored ``[in, out]``."""

    def __init__(self, in_dim: int, num_units: int, init_scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(torch.empty(in_dim, num_units))
        _default_init_(self.W, init_scale)
        self.b = nn.Parameter(torch.zeros(num_units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.W.t()[:, :, None, None], self.b)


class Combine(nn.Module):
    """Combine the input pyramid with the main path (``cat`` or ``sum``) after a 1x1 conv."""

    def __init__(self, dim1: int, dim2: int, method: str = "cat"):
        super().__init__()
        if method not in ("cat", "sum"):
            raise ValueError(f"progressive_combine must be 'cat' or 'sum', got {method!r}")
        self.Conv = _conv1x1(dim1, dim2)
        self.method = method

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.Conv(x)
        return torch.cat([h, y], dim=1) if self.method == "cat" else h + y


class AttnBlockpp(nn.Module):
    """Single-head self-attention over all pixels, with residual connection."""

    def __init__(self, channels: int, skip_rescale: bool = False, init_scale: float = 0.0):
        super().__init__()
        self.GroupNorm_0 = _group_norm(channels)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.GroupNorm_0(x)
        w_qkv = torch.cat([self.NIN_0.W, self.NIN_1.W, self.NIN_2.W], dim=1).t()[:, :, None, None]
        b_qkv = torch.cat([self.NIN_0.b, self.NIN_1.b, self.NIN_2.b])
        qkv = F.conv2d(h, w_qkv, b_qkv).reshape(B, 3, C, H * W).transpose(-1, -2)  # (B, 3, HW, C)
        q, k, v = qkv.unbind(1)
        h = F.scaled_dot_product_attention(q, k, v, scale=C ** -0.5)  # (B, HW, C)
        h = self.NIN_3(h.transpose(1, 2).reshape(B, C, H, W))
        return (x + h) / _SQRT2 if self.skip_rescale else x + h


class Upsample(nn.Module):
    def __init__(self, in_ch: int, out_ch: int | None = None, with_conv: bool = False, fir: bool = False,
                 fir_kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        if with_conv:
            if fir:
                self.Conv2d_0 = _FIRConv2d(in_ch, out_ch, 3, up=True, resample_kernel=fir_kernel)
            else:
                self.Conv_0 = _conv3x3(in_ch, out_ch)
        self.fir, self.with_conv, self.out_ch = fir, with_conv, out_ch
        self.fir_kernel = tuple(fir_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fir:
            h = _naive_upsample_2d(x, 2)
            if self.with_conv:
                h = self.Conv_0(h)
        elif self.with_conv:
            h = self.Conv2d_0(x)
        else:
            h = upsample_2d(x, _fir_kernel(self.fir_kernel, x.device, x.dtype), 2)
        return h


class Downsample(nn.Module):
    def __init__(self, in_ch: int, out_ch: int | None = None, with_conv: bool = False, fir: bool = False,
                 fir_kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        if with_conv:
            if fir:
                self.Conv2d_0 = _FIRConv2d(in_ch, out_ch, 3, down=True, resample_kernel=fir_kernel)
            else:
                self.Conv_0 = _conv3x3(in_ch, out_ch, stride=2, padding=0)
        self.fir, self.with_conv, self.out_ch = fir, with_conv, out_ch
        self.fir_kernel = tuple(fir_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fir:
            x = F.pad(x, (0, 1, 0, 1))  # emulate TF 'SAME' for the stride-2 conv
            return self.Conv_0(x) if self.with_conv else F.avg_pool2d(x, 2, stride=2)
        if self.with_conv:
            return self.Conv2d_0(x)
        return downsample_2d(x, _fir_kernel(self.fir_kernel, x.device, x.dtype), 2)


class ResnetBlockDDPMpp(nn.Module):
    """DDPM residual block (``resblock_type='ddpm'``)."""

    def __init__(self, act, in_ch: int, out_ch: int | None = None, temb_dim: int | None = None,
                 conv_shortcut: bool = False, dropout: float = 0.1, skip_rescale: bool = False,
                 init_scale: float = 0.0):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        self.GroupNorm_0 = _group_norm(in_ch)
        self.Conv_0 = _conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = _linear(temb_dim, out_ch)
        self.GroupNorm_1 = _group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv3x3(out_ch, out_ch, init_scale=init_scale)
        if in_ch != out_ch:
            if conv_shortcut:
                self.Conv_2 = _conv3x3(in_ch, out_ch)
            else:
                self.NIN_0 = NIN(in_ch, out_ch)
        self.act, self.skip_rescale, self.out_ch, self.conv_shortcut = act, skip_rescale, out_ch, conv_shortcut

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        act = self.act
        h = self.Conv_0(act(self.GroupNorm_0(x)))
        if temb is not None:
            h = h + self.Dense_0(act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(act(self.GroupNorm_1(h))))
        if x.shape[1] != self.out_ch:
            x = self.Conv_2(x) if self.conv_shortcut else self.NIN_0(x)
        return (x + h) / _SQRT2 if self.skip_rescale else x + h


class ResnetBlockBigGANpp(nn.Module):
    """BigGAN-style residual block with optional FIR (or naive) up/down-sampling."""

    def __init__(self, act, in_ch: int, out_ch: int | None = None, temb_dim: int | None = None,
                 up: bool = False, down: bool = False, dropout: float = 0.1, fir: bool = False,
                 fir_kernel: Sequence[int] = (1, 3, 3, 1), skip_rescale: bool = True,
                 init_scale: float = 0.0):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        self.GroupNorm_0 = _group_norm(in_ch)
        self.up, self.down, self.fir = up, down, fir
        self.Conv_0 = _conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = _linear(temb_dim, out_ch)
        self.GroupNorm_1 = _group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv3x3(out_ch, out_ch, init_scale=init_scale)
        self.has_shortcut = in_ch != out_ch or up or down
        if self.has_shortcut:
            self.Conv_2 = _conv1x1(in_ch, out_ch)
        self.act, self.skip_rescale, self.in_ch, self.out_ch = act, skip_rescale, in_ch, out_ch
        self.fir_kernel = tuple(fir_kernel)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return upsample_2d(x, _fir_kernel(self.fir_kernel, x.device, x.dtype), 2) if self.fir else _naive_upsample_2d(x, 2)
        if self.down:
            return downsample_2d(x, _fir_kernel(self.fir_kernel, x.device, x.dtype), 2) if self.fir else _naive_downsample_2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        act = self.act
        h = act(self.GroupNorm_0(x))
        if self.up or self.down:
            h = self._resample(h)
            x = self._resample(x)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(act(self.GroupNorm_1(h))))
        if self.has_shortcut:
            x = self.Conv_2(x)
        return (x + h) / _SQRT2 if self.skip_rescale else x + h


# --------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------

# Keys of upstream score_fn / score_sde model configs that do not affect this network.
_IGNORED_CONFIG_KEYS = {"name", "ema_rate", "sigma_min", "sigma_max", "num_scales", "beta_min", "beta_max"}


class NCSNpp(nn.Module):
    """NCSN++ score network with the PSLD conventions (see the module docstring).

    All arguments are keyword-only and use the upstream config names; defaults are the CIFAR-10 SOTA
    PSLD network.  ``forward(u, tau) -> eps`` with ``u: (B, in_ch, S, S)``, ``tau: (B,)`` (or a scalar),
    ``S == image_size``.
    """

    def __init__(
        self,
        *,
        in_ch: int = 6,
        out_ch: int = 6,
        nf: int = 128,
        ch_mult: Sequence[int] = (2, 2, 2),
        num_res_blocks: int = 8,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.15,
        resamp_with_conv: bool = True,
        noise_cond: bool = True,
        fir: bool = True,
        fir_kernel: Sequence[int] = (1, 3, 3, 1),
        skip_rescale: bool = True,
        resblock_type: str = "biggan",
        progressive: str = "none",
        progressive_input: str = "residual",
        progressive_combine: str = "sum",
        embedding_type: str = "fourier",
        init_scale: float = 0.0,
        fourier_scale: float = 16.0,
        nonlinearity: str = "swish",
        image_size: int = 32,
        continuous: bool = True,
        centered: bool = True,
    ):
        super().__init__()
        ch_mult = tuple(int(c) for c in ch_mult)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        fir_kernel = tuple(fir_kernel)
        resblock_type = str(resblock_type).lower()
        progressive = str(progressive).lower()
        progressive_input = str(progressive_input).lower()
        combine_method = str(progressive_combine).lower()
        embedding_type = str(embedding_type).lower()
        if progressive not in ("none", "output_skip", "residual"):
            raise ValueError(f"progressive must be none/output_skip/residual, got {progressive!r}")
        if progressive_input not in ("none", "input_skip", "residual"):
            raise ValueError(f"progressive_input must be none/input_skip/residual, got {progressive_input!r}")
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(f"embedding_type must be fourier/positional, got {embedding_type!r}")
        if resblock_type not in ("ddpm", "biggan"):
            raise ValueError(f"resblock_type must be ddpm/biggan, got {resblock_type!r}")
        if combine_method not in ("cat", "sum"):
            raise ValueError(f"progressive_combine must be cat/sum, got {combine_method!r}")
        if embedding_type == "fourier" and not continuous:
            raise ValueError("Fourier features are only used for continuous training (continuous=True)")
        num_resolutions = len(ch_mult)
        if image_size % (2 ** (num_resolutions - 1)) != 0:
            raise ValueError(f"image_size {image_size} is not divisible by 2**{num_resolutions - 1}")

        self.config: dict[str, Any] = dict(
            in_ch=in_ch, out_ch=out_ch, nf=nf, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
            attn_resolutions=attn_resolutions, dropout=dropout, resamp_with_conv=resamp_with_conv,
            noise_cond=noise_cond, fir=fir, fir_kernel=fir_kernel, skip_rescale=skip_rescale,
            resblock_type=resblock_type, progressive=progressive, progressive_input=progressive_input,
            progressive_combine=combine_method, embedding_type=embedding_type, init_scale=init_scale,
            fourier_scale=fourier_scale, nonlinearity=nonlinearity, image_size=image_size,
            continuous=continuous, centered=centered,
        )
        self.act = act = _get_act(nonlinearity)
        self.nf = nf
        self.in_ch, self.out_ch = in_ch, out_ch
        self.num_res_blocks = num_res_blocks
        self.num_resolutions = num_resolutions
        self.image_size = image_size
        self.all_resolutions = [image_size // (2 ** i) for i in range(num_resolutions)]
        self.attn_resolutions = attn_resolutions
        self._attn_at = [r in attn_resolutions for r in self.all_resolutions]
        self.noise_cond = noise_cond
        self.skip_rescale = skip_rescale
        self.resblock_type = resblock_type
        self.progressive = progressive
        self.progressive_input = progressive_input
        self.embedding_type = embedding_type
        self.centered = centered

        def ResnetBlock(in_ch: int, out_ch: int | None = None, up: bool = False, down: bool = False):
            if resblock_type == "ddpm":
                return ResnetBlockDDPMpp(act, in_ch, out_ch, temb_dim=4 * nf, dropout=dropout,
                                         skip_rescale=skip_rescale, init_scale=init_scale)
            return ResnetBlockBigGANpp(act, in_ch, out_ch, temb_dim=4 * nf, up=up, down=down, dropout=dropout,
                                       fir=fir, fir_kernel=fir_kernel, skip_rescale=skip_rescale,
                                       init_scale=init_scale)

        def AttnBlock(channels: int):
            return AttnBlockpp(channels, skip_rescale=skip_rescale, init_scale=init_scale)

        # Parameter-free pyramid resamplers (not in the module list, as upstream).
        if progressive == "output_skip":
            self.pyramid_upsample = Upsample(in_ch, fir=fir, fir_kernel=fir_kernel, with_conv=False)
        if progressive_input == "input_skip":
            self.pyramid_downsample = Downsample(in_ch, fir=fir, fir_kernel=fir_kernel, with_conv=False)

        modules: list[nn.Module] = []
        if embedding_type == "fourier":
            modules.append(GaussianFourierProjection(embedding_size=nf, scale=fourier_scale))
            embed_dim = 2 * nf
        else:
            embed_dim = nf
        if noise_cond:
            modules.append(_linear(embed_dim, 4 * nf))
            modules.append(_linear(4 * nf, 4 * nf))

        channels = in_ch
        input_pyramid_ch = channels
        modules.append(_conv3x3(channels, nf))
        hs_c = [nf]
        c = nf
        # Downsampling path.
        for i_level in range(num_resolutions):
            for _ in range(num_res_blocks):
                out_c = nf * ch_mult[i_level]
                modules.append(ResnetBlock(c, out_c))
                c = out_c
                if self._attn_at[i_level]:
                    modules.append(AttnBlock(c))
                hs_c.append(c)
            if i_level != num_resolutions - 1:
                if resblock_type == "ddpm":
                    modules.append(Downsample(c, with_conv=resamp_with_conv, fir=fir, fir_kernel=fir_kernel))
                else:
                    modules.append(ResnetBlock(c, down=True))
                if progressive_input == "input_skip":
                    modules.append(Combine(input_pyramid_ch, c, method=combine_method))
                    if combine_method == "cat":
                        c *= 2
                elif progressive_input == "residual":
                    modules.append(Downsample(input_pyramid_ch, c, with_conv=True, fir=fir, fir_kernel=fir_kernel))
                    input_pyramid_ch = c
                hs_c.append(c)
        # Middle.
        c = hs_c[-1]
        modules.append(ResnetBlock(c))
        modules.append(AttnBlock(c))
        modules.append(ResnetBlock(c))
        # Upsampling path.
        pyramid_ch = 0
        for i_level in reversed(range(num_resolutions)):
            for _ in range(num_res_blocks + 1):
                out_c = nf * ch_mult[i_level]
                modules.append(ResnetBlock(c + hs_c.pop(), out_c))
                c = out_c
            if self._attn_at[i_level]:
                modules.append(AttnBlock(c))
            if progressive != "none":
                if i_level == num_resolutions - 1:
                    modules.append(_group_norm(c))
                    if progressive == "output_skip":
                        modules.append(_conv3x3(c, channels, init_scale=init_scale))
                        pyramid_ch = channels
                    else:
                        modules.append(_conv3x3(c, c))
                        pyramid_ch = c
                else:
                    if progressive == "output_skip":
                        modules.append(_group_norm(c))
                        modules.append(_conv3x3(c, channels, init_scale=init_scale))
                        pyramid_ch = channels
                    else:
                        modules.append(Upsample(pyramid_ch, c, with_conv=True, fir=fir, fir_kernel=fir_kernel))
                        pyramid_ch = c
            if i_level != 0:
                if resblock_type == "ddpm":
                    modules.append(Upsample(c, with_conv=resamp_with_conv, fir=fir, fir_kernel=fir_kernel))
                else:
                    modules.append(ResnetBlock(c, up=True))
        assert not hs_c
        if progressive != "output_skip":
            modules.append(_group_norm(c))
            modules.append(_conv3x3(c, out_ch, init_scale=init_scale))
        self.all_modules = nn.ModuleList(modules)

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> "NCSNpp":
        """Build from a config mapping.

        Accepts (a) flat constructor kwargs, (b) the fixture / Hydra-resolved form
        ``{"model.score_fn": {...}, "data.image_size": 32, "training.continuous": True}`` or
        (c) the nested form ``{"model": {"score_fn": {...}}, "data": {"image_size": ...}, "training": {...}}``.
        Upstream-only keys (``name``, SDE constants, ...) are ignored; unknown keys raise ``ValueError``.
        """
        cfg = dict(config)
        kwargs: dict[str, Any] = {}
        if "model.score_fn" in cfg or "model" in cfg:
            score = cfg.get("model.score_fn")
            if score is None:
                score = dict(cfg["model"]).get("score_fn")
            if score is None:
                raise ValueError("config has no model.score_fn section")
            kwargs.update(dict(score))
            data = dict(cfg.get("data", {}) or {})
            training = dict(cfg.get("training", {}) or {})
            image_size = cfg.get("data.image_size", data.get("image_size"))
            continuous = cfg.get("training.continuous", training.get("continuous"))
            if image_size is not None:
                kwargs["image_size"] = image_size
            if continuous is not None:
                kwargs["continuous"] = continuous
        else:
            kwargs.update(cfg)
        kwargs.update(overrides)

        name = kwargs.get("name")
        if name is not None and str(name).lower() != "ncsnpp":
            raise ValueError(f"config is for score_fn {name!r}, not 'ncsnpp'")
        if "conditional" in kwargs:  # score_sde's name for noise conditioning
            kwargs.setdefault("noise_cond", kwargs["conditional"])
            kwargs.pop("conditional")
        if kwargs.pop("scale_by_sigma", False):
            raise ValueError("scale_by_sigma=True is not supported: PSLD's network outputs raw eps")
        norm = kwargs.pop("normalization", "GroupNorm")
        if str(norm) != "GroupNorm":
            raise ValueError(f"only GroupNorm normalization is supported, got {norm!r}")
        if int(kwargs.pop("conv_size", 3)) != 3:
            raise ValueError("only conv_size=3 is supported")
        for k in _IGNORED_CONFIG_KEYS:
            kwargs.pop(k, None)
        allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise ValueError(f"unknown NCSNpp config keys: {unknown}; allowed: {sorted(allowed)}")
        return cls(**kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "NCSNpp":
        """Build a preset network: ``"cifar10"``, ``"celeba64"``, ``"afhqv2"`` or ``"small"``.

        Keyword overrides replace preset values (e.g. ``dropout=0.0``).  Wrap in
        ``with torch.device("meta"):`` to inspect the layout without allocating weights.
        """
        cfg = preset_config(name)
        cfg.update(overrides)
        net = cls(**cfg)
        net.preset = str(name).lower()
        return net

    @property
    def data_shape(self) -> tuple[int, int, int] | None:
        """Shape ``(C, S, S)`` of one data sample x (the packed input u has ``2C = in_ch`` channels)."""
        if self.in_ch % 2:
            return None
        return (self.in_ch // 2, self.image_size, self.image_size)

    # ------------------------------------------------------------------ forward

    def _embed_time(self, tau: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor | None:
        """Time embedding ``(B, 4 nf)``; ``None`` when ``noise_cond`` is off."""
        if not self.noise_cond:
            return None
        modules = self.all_modules
        tau = torch.as_tensor(tau, device=device)
        if tau.ndim == 0 or (tau.ndim == 1 and tau.shape[0] == 1 and batch != 1):
            tau = tau.reshape(()).expand(batch)
        if tau.ndim != 1 or tau.shape[0] != batch:
            raise ValueError(f"tau must have shape ({batch},) or be a scalar, got {tuple(tau.shape)}")
        if self.embedding_type == "fourier":
            proj = modules[0]
            # PSLD feeds the raw forward time; the network embeds log(tau).
            temb = proj(torch.log(tau.to(proj.W.dtype)))
            m_idx = 1
        else:
            # PSLD feeds the raw tau (unscaled) to the DDPM sinusoidal embedding.
            temb = _timestep_embedding(tau, self.nf, modules[0].weight.dtype)
            m_idx = 0
        temb = modules[m_idx](temb)
        return modules[m_idx + 1](self.act(temb))

    def forward(self, u: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """``u``: packed state ``(B, in_ch, S, S)``; ``tau``: forward time ``(B,)`` in (0, 1].  Returns eps."""
        if u.ndim != 4 or u.shape[1] != self.in_ch or u.shape[2] != self.image_size or u.shape[3] != self.image_size:
            raise ValueError(
                f"expected u of shape (B, {self.in_ch}, {self.image_size}, {self.image_size}), got {tuple(u.shape)}"
            )
        modules = self.all_modules
        act = self.act
        temb = self._embed_time(tau, u.shape[0], u.device)
        m_idx = (1 if self.embedding_type == "fourier" else 0) + (2 if self.noise_cond else 0)

        x = u if self.centered else 2 * u - 1.0

        # Downsampling path.
        input_pyramid = x if self.progressive_input != "none" else None
        hs = [modules[m_idx](x)]
        m_idx += 1
        for i_level in range(self.num_resolutions):
            for _ in range(self.num_res_blocks):
                h = modules[m_idx](hs[-1], temb)
                m_idx += 1
                if self._attn_at[i_level]:
                    h = modules[m_idx](h)
                    m_idx += 1
                hs.append(h)
            if i_level != self.num_resolutions - 1:
                if self.resblock_type == "ddpm":
                    h = modules[m_idx](hs[-1])
                else:
                    h = modules[m_idx](hs[-1], temb)
                m_idx += 1
                if self.progressive_input == "input_skip":
                    input_pyramid = self.pyramid_downsample(input_pyramid)
                    h = modules[m_idx](input_pyramid, h)
                    m_idx += 1
                elif self.progressive_input == "residual":
                    input_pyramid = modules[m_idx](input_pyramid)
                    m_idx += 1
                    input_pyramid = (input_pyramid + h) / _SQRT2 if self.skip_rescale else input_pyramid + h
                    h = input_pyramid
                hs.append(h)

        # Middle.
        h = hs[-1]
        h = modules[m_idx](h, temb)
        h = modules[m_idx + 1](h)
        h = modules[m_idx + 2](h, temb)
        m_idx += 3

        # Upsampling path.
        pyramid = None
        for i_level in reversed(range(self.num_resolutions)):
            for _ in range(self.num_res_blocks + 1):
                h = modules[m_idx](torch.cat([h, hs.pop()], dim=1), temb)
                m_idx += 1
            if self._attn_at[i_level]:
                h = modules[m_idx](h)
                m_idx += 1
            if self.progressive != "none":
                if i_level == self.num_resolutions - 1:
                    pyramid = modules[m_idx + 1](act(modules[m_idx](h)))
                    m_idx += 2
                elif self.progressive == "output_skip":
                    pyramid = self.pyramid_upsample(pyramid)
                    pyramid_h = modules[m_idx + 1](act(modules[m_idx](h)))
                    m_idx += 2
                    pyramid = pyramid + pyramid_h
                else:
                    pyramid = modules[m_idx](pyramid)
                    m_idx += 1
                    pyramid = (pyramid + h) / _SQRT2 if self.skip_rescale else pyramid + h
                    h = pyramid
            if i_level != 0:
                if self.resblock_type == "ddpm":
                    h = modules[m_idx](h)
                else:
                    h = modules[m_idx](h, temb)
                m_idx += 1
        assert not hs

        if self.progressive == "output_skip":
            h = pyramid
        else:
            h = modules[m_idx + 1](act(modules[m_idx](h)))
            m_idx += 2
        assert m_idx == len(modules)
        return h

    def extra_repr(self) -> str:
        c = self.config
        return (f"nf={c['nf']}, ch_mult={c['ch_mult']}, num_res_blocks={c['num_res_blocks']}, "
                f"attn_resolutions={c['attn_resolutions']}, image_size={c['image_size']}, "
                f"embedding={c['embedding_type']}, resblock={c['resblock_type']}, fir={c['fir']}")
