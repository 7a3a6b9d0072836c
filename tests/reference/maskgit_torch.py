"""PyTorch reference of MaskBit's LFQBert generator, written from maskgit.md section 2 (not from
the JAX port): the numerical reference of `tokenizers_jax.models.maskgit.MaskGIT`.

Eager fp32, eval mode (no dropout). Attention is torch.nn.MultiheadAttention (fused in-proj,
as MaskBit's BertAttention), norms are LayerNorm(eps=1e-12), GELU is exact.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class PostNormBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True, bias=True)
        self.attention_norm = nn.LayerNorm(width, eps=1e-12)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, width))
        self.mlp_norm = nn.LayerNorm(width, eps=1e-12)

    def forward(self, x):
        attended, _ = self.attention(x, x, x, need_weights=False)
        x = self.attention_norm(x + attended)
        return self.mlp_norm(x + self.mlp(x))


class LFQBert(nn.Module):
    def __init__(self, positions: int, splits: int, bits: int, num_classes: int, width: int,
                 depth: int, heads: int, mlp_dim: int):
        super().__init__()
        self.positions, self.splits, self.bits = positions, splits, bits
        self.class_emb = nn.Embedding(num_classes + 1, width)
        self.input_proj = nn.Linear(splits * bits, width)
        self.pos_emb = nn.Parameter(torch.zeros(1, positions + 1, width))
        self.first_norm = nn.LayerNorm(width, eps=1e-12)
        self.blocks = nn.ModuleList(PostNormBlock(width, heads, mlp_dim) for _ in range(depth))
        self.last_layer = nn.Sequential(nn.Linear(width, width), nn.GELU(),
                                        nn.LayerNorm(width, eps=1e-12))
        self.prediction = nn.Linear(width, splits * 2**bits)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """tokens [B, P, S] (2**bits = masked), labels [B] -> logits [B, P, S, 2**bits]."""
        weights = 2 ** torch.arange(self.bits)
        bits = ((tokens[..., None] & weights) != 0).float() * 2 - 1
        bits[tokens == 2**self.bits] = 0.0
        x = self.input_proj(bits.flatten(2))
        x = torch.cat([x, self.class_emb(labels)[:, None]], dim=1) + self.pos_emb
        x = self.first_norm(x)
        for block in self.blocks:
            x = block(x)
        logits = self.prediction(self.last_layer(x))[:, :self.positions]
        return logits.reshape(*logits.shape[:2], self.splits, 2**self.bits)


def _linear(module: nn.Linear, params):
    module.weight.data = torch.tensor(np.asarray(params["kernel"]).T.copy())
    module.bias.data = torch.tensor(np.asarray(params["bias"]))


def _norm(module: nn.LayerNorm, params):
    module.weight.data = torch.tensor(np.asarray(params["scale"]))
    module.bias.data = torch.tensor(np.asarray(params["bias"]))


def from_jax(params, positions, splits, bits, num_classes, width, depth, heads, mlp_dim
             ) -> LFQBert:
    """The reference with the weights of a JAX MaskGIT params tree (kernels transposed)."""
    model = LFQBert(positions, splits, bits, num_classes, width, depth, heads, mlp_dim)
    model.class_emb.weight.data = torch.tensor(np.asarray(params["class_embedding"]))
    model.pos_emb.data = torch.tensor(np.asarray(params["position_embedding"]))[None]
    _linear(model.input_proj, params["input_proj"])
    _norm(model.first_norm, params["embedding_norm"])
    for i, block in enumerate(model.blocks):
        p = params[f"block_{i}"]
        block.attention.in_proj_weight.data = torch.tensor(np.asarray(p["qkv"]["kernel"]).T.copy())
        block.attention.in_proj_bias.data = torch.tensor(np.asarray(p["qkv"]["bias"]))
        _linear(block.attention.out_proj, p["out"])
        _norm(block.attention_norm, p["attention_norm"])
        _linear(block.mlp[0], p["fc1"])
        _linear(block.mlp[2], p["fc2"])
        _norm(block.mlp_norm, p["mlp_norm"])
    _linear(model.last_layer[0], params["head_dense"])
    _norm(model.last_layer[2], params["head_norm"])
    _linear(model.prediction, params["predict"])
    return model.eval()
