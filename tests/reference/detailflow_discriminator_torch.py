"""Independent PyTorch reference of DetailFlow's DINO discriminator (spec 5, 8), written from
the spec and the public timm / torch APIs, not from the JAX port.

`DinoTrunk` re-states timm's `VisionTransformer` as DINO ViT-S/16 uses it (module names give
the released `dino_deitsmall16_pretrain.pth` keys); `DinoInput` the input mapping with the
random choices injected; `DiscriminatorHeads` the five heads built from the real torch pieces
(`torch.nn.utils.spectral_norm`, `nn.BatchNorm1d` in train mode, `nn.Conv1d` with
`padding_mode="circular"`), so its `state_dict()` has spec 8's `discriminator` key names.
Eager fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MEAN = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * (c // self.num_heads) ** -0.5
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoTrunk(nn.Module):
    """timm VisionTransformer (no head) with the DINO ViT-S/16 key names."""

    def __init__(self, dim=384, depth=12, num_heads=6, patch_size=16, img_size=224,
                 key_depths=(2, 5, 8, 11), mlp_ratio=4.0):
        super().__init__()
        self.key_depths = key_depths
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (img_size // patch_size) ** 2 + 1, dim))
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        """Normalised NCHW images -> [embedding output, outputs of key_depths], each [B, L, D]."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        activations = [x]
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.key_depths:
                activations.append(x)
        return activations


def dino_input(x, img_size=224, crop=None):
    """[-1, 1] NCHW -> normalised [B, 3, S, S]; `crop` = (top, left) takes the crop branch
    (only valid when H, W > S), None the resize branch."""
    x = (0.5 / STD) * x + (0.5 - MEAN) / STD
    h = x.shape[-2]
    if crop is not None:
        top, left = crop
        return x[:, :, top:top + img_size, left:left + img_size]
    mode = "area" if h > img_size else "bicubic"
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(x, size=(img_size, img_size), mode=mode, **kwargs)


def readout(activation):
    """patch + cls: [B, L, D] -> [B, D, L - 1] (NCL for the Conv1d heads)."""
    return (activation[:, 1:] + activation[:, :1]).transpose(1, 2)


class ResidualBlock(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return (self.fn(x) + x) / math.sqrt(2)


def sn_conv(c_in, c_out, kernel_size):
    conv = nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2, padding_mode="circular")
    return nn.utils.spectral_norm(conv, n_power_iterations=1, dim=0, eps=1e-12)


def make_block(channels, kernel_size):
    return nn.Sequential(sn_conv(channels, channels, kernel_size),
                         nn.BatchNorm1d(channels, eps=1e-6), nn.LeakyReLU(0.2))


class DiscriminatorHeads(nn.Module):
    """`discriminator.heads.{0..4}`: [block k=1] -> Residual([block k=9]) -> SNConv1d(C -> 1)."""

    def __init__(self, channels=384, num_heads=5, kernel_size=9):
        super().__init__()
        self.heads = nn.ModuleList([
            nn.Sequential(make_block(channels, 1),
                          ResidualBlock(make_block(channels, kernel_size)),
                          sn_conv(channels, 1, 1))
            for _ in range(num_heads)
        ])

    def forward(self, activations):
        b = activations[0].shape[0]
        return torch.cat([head(readout(a)).view(b, -1)
                          for head, a in zip(self.heads, activations)], dim=1)


def randomize_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm affine params and running statistics (torch inits them 1/0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):
                n = module.num_features
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                module.num_batches_tracked.fill_(7)
    return model
