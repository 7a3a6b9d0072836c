"""Independent PyTorch reference of FlowMo (arXiv:2503.11056), written from the behavioural
spec of the original code (not from the JAX port).

Eager fp32, no autocast. Module names follow the original release so that `state_dict()` has
exactly the original key names (spec section 9), e.g.
`encoder.double_blocks.0.img_attn.qkv.weight` or
`decoder.final_layer_img.adaLN_modulation.1.weight`.

Everything random (t, eps, code-keep mask, sampler noise, post-training uniforms and noise) is
injected by the caller, so the reference is deterministic.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrunkConfig:
    hidden_size: int
    num_heads: int
    depth: int
    axes_dim: Sequence[int]
    mlp_ratio: float = 4.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def flux_widths(width: int, depth: int) -> TrunkConfig:
    """dit_b_4 scaled by muP width w: hidden 192w, 12 heads, axes (2w, 7w, 7w) (spec 1.1)."""
    return TrunkConfig(192 * width, 12, depth, (2 * width, 7 * width, 7 * width), 4.0)


@dataclasses.dataclass(frozen=True)
class FlowMoConfig:
    image_size: int = 256
    patch_size: int = 4
    code_length: int = 256
    context_dim: int = 18
    codebook_size_for_entropy: int = 9
    encoder: TrunkConfig = flux_widths(4, 8)
    decoder: TrunkConfig = flux_widths(6, 16)
    rope_theta: float = 10000.0


LO = FlowMoConfig()
HI = dataclasses.replace(LO, context_dim=56, codebook_size_for_entropy=14)


# ----------------------------------------------------------------------------------------------
# Flux pieces (spec 1.2 - 1.4)
# ----------------------------------------------------------------------------------------------
def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0,
                       time_factor: float = 1000.0) -> Tensor:
    """[cos(1000 t f_k), sin(1000 t f_k)], f_k = exp(-ln(1e4) k / (dim/2)), fp32, cos first."""
    t = time_factor * t.float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(pos: Tensor, dim: int, theta: float) -> Tensor:
    """Rotation matrices [..., n, dim/2, 2, 2] for one axis; angles in float64, cast to fp32."""
    assert dim % 2 == 0
    scale = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    omega = 1.0 / (theta ** scale)
    out = pos.to(torch.float64)[..., None] * omega  # outer product in float64
    cos, sin = torch.cos(out), torch.sin(out)
    mat = torch.stack([cos, -sin, sin, cos], dim=-1).reshape(*out.shape, 2, 2)
    return mat.float()


def embed_nd(ids: Tensor, axes_dim: Sequence[int], theta: float) -> Tensor:
    """ids [B, L, 3] -> pe [B, 1, L, head_dim/2, 2, 2]; axis 0 pairs first, then 1, then 2."""
    emb = torch.cat([rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], dim=-3)
    return emb[:, None]


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate interleaved pairs (x_2j, x_2j+1) in fp32."""
    xr = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * xr[..., 0] + pe[..., 1] * xr[..., 1]
    return out.reshape(*x.shape).type_as(x)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """q, k, v [B, H, L, D]; RoPE then SDPA with the muP scale 8/D; heads merged head-major."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    d = q.shape[-1]
    scale = 8.0 / d
    w = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
    x = w @ v
    b, h, l, _ = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, l, h * d)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        rrms = torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + 1e-6)
        return (xf * rrms).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(head_dim)
        self.proj = nn.Linear(dim, dim)


@dataclasses.dataclass
class ModulationOut:
    shift: Tensor
    scale: Tensor
    gate: Tensor


class Modulation(nn.Module):
    """lin = Linear(h, 6h) on silu(vec): shift1, scale1, gate1, shift2, scale2, gate2."""

    def __init__(self, dim: int):
        super().__init__()
        self.multiplier = 6
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)
        with torch.no_grad():  # zero-init gates (spec 1.3); tests overwrite this anyway
            if self.lin.weight.device.type != "meta":
                self.lin.weight[2 * dim:3 * dim].zero_()
                self.lin.weight[5 * dim:6 * dim].zero_()
                self.lin.bias[2 * dim:3 * dim].zero_()
                self.lin.bias[5 * dim:6 * dim].zero_()

    def forward(self, vec: Tensor):
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:])


def _split_qkv(qkv: Tensor, num_heads: int):
    """"B L (K H D) -> K B H L D" with K = 3 outermost."""
    b, l, _ = qkv.shape
    x = qkv.reshape(b, l, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return x[0], x[1], x[2]


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = True):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_mod = Modulation(hidden_size)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden, bias=True),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden, hidden_size, bias=True),
        )
        self.txt_mod = Modulation(hidden_size)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden, bias=True),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden, hidden_size, bias=True),
        )

    def _mods(self, mod: Modulation, vec: Optional[Tensor], like: Tensor):
        if vec is None:  # encoder: shift 0, scale 0, gate 1; mod layers never called
            zero = torch.zeros((), dtype=like.dtype)
            one = torch.ones((), dtype=like.dtype)
            return ModulationOut(zero, zero, one), ModulationOut(zero, zero, one)
        return mod(vec)

    def forward(self, img: Tensor, txt: Tensor, vec: Optional[Tensor], pe: Tensor):
        img_mod1, img_mod2 = self._mods(self.img_mod, vec, img)
        txt_mod1, txt_mod2 = self._mods(self.txt_mod, vec, txt)

        img_in = (1 + img_mod1.scale) * self.img_norm1(img) + img_mod1.shift
        img_q, img_k, img_v = _split_qkv(self.img_attn.qkv(img_in), self.num_heads)
        img_q, img_k = self.img_attn.norm(img_q, img_k, img_v)

        txt_in = (1 + txt_mod1.scale) * self.txt_norm1(txt) + txt_mod1.shift
        txt_q, txt_k, txt_v = _split_qkv(self.txt_attn.qkv(txt_in), self.num_heads)
        txt_q, txt_k = self.txt_attn.norm(txt_q, txt_k, txt_v)

        q = torch.cat([txt_q, img_q], dim=2)
        k = torch.cat([txt_k, img_k], dim=2)
        v = torch.cat([txt_v, img_v], dim=2)
        attn = attention(q, k, v, pe)
        n_txt = txt.shape[1]
        txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:]

        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * self.img_mlp(
            (1 + img_mod2.scale) * self.img_norm2(img) + img_mod2.shift)
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp(
            (1 + txt_mod2.scale) * self.txt_norm2(txt) + txt_mod2.shift)
        return img, txt


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        # MuReadout with width_mult 1 and output_mult 1: a plain Linear (spec 1.4 / 2).
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, vec: Optional[Tensor]) -> Tensor:
        if vec is None:
            x = self.norm_final(x)
        else:
            shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
            x = (1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :]
            x = self.norm_final(x)  # the original's second LayerNorm (spec 1.4)
        return self.linear(x)


class Flux(nn.Module):
    def __init__(self, cfg: TrunkConfig, context_dim: int, patch_size: int, theta: float):
        super().__init__()
        assert sum(cfg.axes_dim) == cfg.head_dim, (cfg.axes_dim, cfg.head_dim)
        self.cfg = cfg
        self.patch_size = patch_size
        self.theta = theta
        self.in_channels = 3 * patch_size * patch_size
        h = cfg.hidden_size
        self.img_in = nn.Linear(self.in_channels, h, bias=True)
        self.time_in = MLPEmbedder(256, h)
        self.txt_in = nn.Linear(context_dim, h)
        self.double_blocks = nn.ModuleList(
            [DoubleStreamBlock(h, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final_layer_img = LastLayer(h, 1, self.in_channels)
        self.final_layer_txt = LastLayer(h, 1, context_dim)

    def patchify(self, img: Tensor) -> Tensor:
        """[B,3,H,W] -> [B,(H/p)(W/p), p*p*3], feature (py*p+px)*3+c, row-major tokens."""
        b, c, hh, ww = img.shape
        p = self.patch_size
        x = img.reshape(b, c, hh // p, p, ww // p, p)
        x = x.permute(0, 2, 4, 3, 5, 1)  # b, gh, gw, py, px, c
        return x.reshape(b, (hh // p) * (ww // p), p * p * c)

    def unpatchify(self, x: Tensor, hh: int, ww: int) -> Tensor:
        b = x.shape[0]
        p = self.patch_size
        x = x.reshape(b, hh // p, ww // p, p, p, 3).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, 3, hh, ww)

    def position_ids(self, b: int, n_txt: int, gh: int, gw: int) -> Tensor:
        img_ids = torch.zeros(gh, gw, 3)
        img_ids[..., 1] = torch.arange(gh)[:, None]
        img_ids[..., 2] = torch.arange(gw)[None, :]
        img_ids = img_ids.reshape(1, gh * gw, 3)
        txt_ids = torch.arange(n_txt, dtype=torch.float32)[None, :, None].expand(1, n_txt, 3)
        ids = torch.cat([txt_ids, img_ids], dim=1)  # [txt; img]
        return ids.expand(b, -1, -1)

    def forward(self, img: Tensor, txt: Tensor, timesteps: Optional[Tensor]):
        b, _, hh, ww = img.shape
        p = self.patch_size
        x = self.img_in(self.patchify(img))
        y = self.txt_in(txt)
        vec = None if timesteps is None else self.time_in(timestep_embedding(timesteps, 256))
        ids = self.position_ids(b, txt.shape[1], hh // p, ww // p)
        pe = embed_nd(ids, self.cfg.axes_dim, self.theta)
        for block in self.double_blocks:
            x, y = block(x, y, vec, pe)
        img_out = self.unpatchify(self.final_layer_img(x, vec), hh, ww)
        txt_out = self.final_layer_txt(y, vec)
        return img_out, txt_out


# ----------------------------------------------------------------------------------------------
# LFQ (spec 4)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LFQOutput:
    codes: Tensor  # [B, L, ctx], +-1 (straight-through)
    indices: Tensor  # [B, L, fh] little-endian codeword indices
    sample_entropy: Tensor
    codebook_entropy: Tensor
    commitment: Tensor
    loss: Tensor


def lfq_codebook(fg: int) -> Tensor:
    """[2^fg, fg]: row j has bit g = (j >> g) & 1 mapped to +-1 (little-endian)."""
    j = torch.arange(2 ** fg)[:, None]
    bits = (j >> torch.arange(fg)[None, :]) & 1
    return bits.float() * 2 - 1


def lfq(code: Tensor, fg: int, entropy_weight: float = 0.0025, commit_weight: float = 0.000625,
        temperature: float = 0.1, with_losses: bool = True) -> LFQOutput:
    b, t, f = code.shape
    assert f % fg == 0
    fh = f // fg
    # "b t (fg fh) -> b fg (t fh)", then LFQ moves dim 1 last -> [b, t*fh, fg]
    x = code.reshape(b, t, fg, fh).permute(0, 2, 1, 3).reshape(b, fg, t * fh)
    x = x.permute(0, 2, 1)  # [b, N, fg]; codeword (t, j) = features g*fh + j
    q = torch.where(x > 0, torch.ones_like(x), -torch.ones_like(x))
    weights = 2 ** torch.arange(fg)
    indices = ((q > 0).long() * weights).sum(-1).reshape(b, t, fh)
    out = x + (q - x).detach()
    # inverse rearrange
    out = out.permute(0, 2, 1).reshape(b, fg, t, fh).permute(0, 2, 1, 3).reshape(b, t, f)
    if not with_losses:
        z = torch.zeros((), dtype=code.dtype)
        return LFQOutput(out, indices, z, z, z, z)
    cb = lfq_codebook(fg).to(x.dtype)
    logits = 2 * torch.einsum("bnd,jd->bnj", x, cb)
    probs = torch.softmax(logits / temperature, dim=-1)
    log_probs = torch.log_softmax(logits / temperature + 1e-5, dim=-1)
    avg_probs = probs.reshape(-1, probs.shape[-1]).mean(0)
    codebook_entropy = -torch.sum(avg_probs * torch.log(avg_probs + 1e-5))
    sample_entropy = torch.mean(-torch.sum(probs * log_probs, dim=-1))
    commitment = torch.mean((x - q.detach()) ** 2)
    loss = entropy_weight * (sample_entropy - codebook_entropy) + commit_weight * commitment
    return LFQOutput(out, indices, sample_entropy, codebook_entropy, commitment, loss)


# ----------------------------------------------------------------------------------------------
# FlowMo
# ----------------------------------------------------------------------------------------------
def append_mask(codes: Tensor) -> Tensor:
    return torch.cat([codes, torch.ones_like(codes[..., :1])], dim=-1)


def parse_pow_schedule(schedule: str) -> float:
    assert schedule.startswith("pow_"), schedule
    return float(schedule[len("pow_"):])


def pow_times(steps: int, p: float) -> Tensor:
    """ts_i = ((steps - i)/steps)^(1/p), i = 0..steps (float64)."""
    i = torch.arange(steps + 1, dtype=torch.float64)
    return ((steps - i) / steps) ** (1.0 / p)


def cfg_interval_t(sigma_interval) -> tuple[float, float]:
    lo, hi = sigma_interval
    return lo / (1 + lo), hi / (1 + hi)


def random_step_times(uniforms: Tensor) -> Tensor:
    """u [B, k+1] -> ts [B, k+1] from 1 to 0 with steps proportional to u_1..u_k (spec 6)."""
    c = torch.cumsum(uniforms, dim=1)
    c = c - c[:, :1]
    return torch.flip(c / c[:, -1:], dims=[1])


class FlowMo(nn.Module):
    def __init__(self, cfg: FlowMoConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Flux(cfg.encoder, cfg.context_dim, cfg.patch_size, cfg.rope_theta)
        self.decoder = Flux(cfg.decoder, cfg.context_dim + 1, cfg.patch_size, cfg.rope_theta)

    # -- networks
    def encode(self, images: Tensor) -> Tensor:
        b = images.shape[0]
        zeros = torch.zeros(b, self.cfg.code_length, self.cfg.context_dim, dtype=images.dtype)
        _, code = self.encoder(images, zeros, None)
        return code

    def decode(self, x_t: Tensor, t: Tensor, code_with_mask: Tensor) -> Tensor:
        img, _ = self.decoder(x_t, code_with_mask, t)
        return img

    def quantize(self, code: Tensor, with_losses: bool = True, entropy_weight: float = 0.0025,
                 commit_weight: float = 0.000625, temperature: float = 0.1) -> LFQOutput:
        return lfq(code, self.cfg.codebook_size_for_entropy, entropy_weight, commit_weight,
                   temperature, with_losses)

    # -- spec 6
    def integrate_random_steps(self, noise: Tensor, code_with_mask: Tensor,
                               uniforms: Tensor) -> Tensor:
        ts = random_step_times(uniforms).to(noise.dtype)
        z = noise
        for i in range(ts.shape[1] - 1):
            t = ts[:, i]
            dt = (ts[:, i] - ts[:, i + 1])[:, None, None, None]
            z = z - dt * self.decode(z, t, code_with_mask)
        return z

    # -- spec 5 / 6
    def training_loss(self, images: Tensor, times: Tensor, noise: Tensor, keep_code: Tensor,
                      perceptual_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                      perceptual_weight: float = 0.1, posttrain: bool = False,
                      posttrain_noise: Optional[Tensor] = None,
                      posttrain_uniforms: Optional[Tensor] = None,
                      entropy_weight: float = 0.0025, commit_weight: float = 0.000625,
                      temperature: float = 0.1):
        code = self.encode(images)
        q = self.quantize(code, True, entropy_weight, commit_weight, temperature)
        code_pre_cfg = append_mask(q.codes)
        code_in = code_pre_cfg * keep_code.to(code.dtype)[:, None, None]
        t = times.to(images.dtype)
        tb = t[:, None, None, None]
        x_t = (1 - tb) * images + tb * noise
        v_hat = self.decode(x_t, t, code_in)
        diff = noise - v_hat - images
        flow = torch.mean(torch.mean(diff ** 2, dim=(1, 2, 3)))
        x0_hat = x_t - tb * v_hat
        if posttrain:
            x0_hat = self.integrate_random_steps(posttrain_noise, code_pre_cfg, posttrain_uniforms)
        if perceptual_fn is not None:
            perceptual = torch.mean(perceptual_fn(images, x0_hat))
        else:
            perceptual = torch.zeros((), dtype=images.dtype)
        total = flow + q.loss + perceptual_weight * perceptual
        terms = dict(flow=flow, sample_entropy=q.sample_entropy,
                     codebook_entropy=q.codebook_entropy, commit=q.commitment, quantizer=q.loss,
                     perceptual=perceptual, total=total)
        return total, terms

    # -- spec 7
    def sample(self, codes_pm1: Tensor, noise: Tensor, steps: int = 25, schedule: str = "pow_0.25",
               cfg: float = 1.5, cfg_interval_sigma=(0.17, 1.02), return_evals: bool = False):
        code = append_mask(codes_pm1)
        null = torch.zeros_like(code)
        ts = pow_times(steps, parse_pow_schedule(schedule))
        lo, hi = cfg_interval_t(cfg_interval_sigma)
        z = noise
        b = noise.shape[0]
        n_evals = 0
        for i in range(steps):
            t_i = float(ts[i])
            dt = float(ts[i] - ts[i + 1])
            t = torch.full((b,), t_i, dtype=noise.dtype)
            v = self.decode(z, t, code)
            n_evals += 1
            if cfg != 1.0 and lo <= t_i <= hi:
                v_u = self.decode(z, t, null)
                n_evals += 1
                v = v_u + cfg * (v - v_u)
            z = z - dt * v
        out = torch.clamp(z, -1.0, 1.0)
        return (out, n_evals) if return_evals else out

    def reconstruct(self, images: Tensor, noise: Tensor, **sampler_kwargs) -> Tensor:
        code = self.encode(images)
        q = self.quantize(code, with_losses=False)
        return self.sample(q.codes, noise, **sampler_kwargs)


def randomize_(model: nn.Module, seed: int = 0, bias_std: float = 0.1,
               norm_std: float = 0.2) -> nn.Module:
    """Overwrite EVERY parameter (including the zero-initialised gates) with random values:
    Linear weights ~ N(0, 1/fan_in), biases ~ N(0, bias_std^2), RMSNorm scales ~ 1 + N(0, norm_std^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".scale"):
                p.copy_(1 + norm_std * torch.randn(p.shape, generator=g))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            else:
                p.copy_(bias_std * torch.randn(p.shape, generator=g))
    return model
