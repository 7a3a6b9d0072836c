"""A PyTorch reference of DetailFlow's GPT (spec 6) on the original's state-dict names, written
from the spec: the eval-mode forward of the original's `Transformer` (group layout, block
mask, 2D RoPE with the zero cls row, SwiGLU, RMSNorm), its `top_k_top_p_filtering`, and its
`generate_group_par` loop (CFG batch [cond ; null], the full prefix re-run every pass): the
guided logits for a given token sequence (the tests) and sampling (the eager side of
`python -m tokenizers_jax.benchmark detailflow_ar --compare-torch`).
"""

import numpy as np
import torch
import torch.nn.functional as F


def group_causal_mask(length, group_size, causal_num):
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    return torch.where(i < causal_num, j <= i, j // group_size <= i // group_size)


def rope_table(num_tokens, group_size, head_dim, base):
    """[1 + N, head_dim // 2, 2] (cos, sin): a zero cls row, then the (row, col) grid."""
    half = head_dim // 2
    inv = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    rows = torch.outer(torch.arange(num_tokens // group_size).float(), inv)
    cols = torch.outer(torch.arange(group_size).float(), inv)
    grid = torch.cat([rows[:, None, :].expand(-1, group_size, -1),
                      cols[None, :, :].expand(num_tokens // group_size, -1, -1)], dim=-1)
    table = torch.stack([grid.cos(), grid.sin()], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(1, half, 2), table])


def rotate(x, table):
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = table[None, :, None]
    out = torch.stack([pairs[..., 0] * f[..., 0] - pairs[..., 1] * f[..., 1],
                       pairs[..., 1] * f[..., 0] + pairs[..., 0] * f[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)


def rms_norm(x, weight, eps):
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def top_k_top_p_filtering(logits, top_k=0, top_p=1.0):
    logits = logits.clone()
    if top_k > 0:
        k = min(top_k, logits.size(-1))
        logits[logits < torch.topk(logits, k)[0][..., -1, None]] = -float("inf")
    if top_p < 1.0:
        ranked, order = torch.sort(logits, descending=True)
        remove = torch.cumsum(F.softmax(ranked, dim=-1), dim=-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits[remove.scatter(-1, order, remove)] = -float("inf")
    return logits


class TorchGPT:
    def __init__(self, state_dict, *, num_tokens, group_size, causal_num, num_heads,
                 num_classes, eps=1e-5, base=10000.0):
        self.sd = {k: torch.tensor(np.asarray(v), dtype=torch.float32)
                   for k, v in state_dict.items()}
        self.n, self.g, self.c = num_tokens, group_size, causal_num
        self.heads, self.num_classes, self.eps = num_heads, num_classes, eps
        self.width = self.sd["norm.weight"].shape[0]
        self.depth = len({k.split(".")[1] for k in self.sd if k.startswith("layers.")})
        self.table = rope_table(num_tokens, group_size, self.width // num_heads, base)
        self.mask = group_causal_mask(num_tokens, group_size, causal_num)

    @torch.no_grad()
    def forward(self, labels, tokens):
        """labels [B], tokens [B, T] -> fp32 logits [B, L, V] (eval mode)."""
        sd = self.sd
        labels = torch.tensor(np.array(labels)).long()
        tokens = torch.tensor(np.array(tokens)).long()
        cls = sd["cls_embedding.embedding_table.weight"][labels][:, None]
        emb = sd["tok_embeddings.weight"][tokens]
        if tokens.shape[1] >= self.c:
            spe = sd["spe_tok_embeddings.special_embeddings.weight"][None].expand(
                labels.shape[0], -1, -1)
            x = torch.cat([cls, emb[:, :self.c], spe, emb[:, self.c:]], dim=1)
        else:
            x = torch.cat([cls, emb], dim=1)
        b, length, width = x.shape
        head_dim = width // self.heads
        mask, table = self.mask[:length, :length], self.table[:length]
        for i in range(self.depth):
            p = f"layers.{i}."
            h = rms_norm(x, sd[p + "attention_norm.weight"], self.eps)
            q, k, v = (h @ sd[p + "attention.wqkv.weight"].T).split(width, dim=-1)
            q, k, v = (t.reshape(b, length, self.heads, head_dim) for t in (q, k, v))
            q, k = rotate(q, table), rotate(k, table)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                 v.transpose(1, 2), attn_mask=mask)
            x = x + out.transpose(1, 2).reshape(b, length, width) @ sd[p + "attention.wo.weight"].T
            h = rms_norm(x, sd[p + "ffn_norm.weight"], self.eps)
            w1, w2, w3 = (sd[f"{p}feed_forward.{w}.weight"] for w in ("w1", "w2", "w3"))
            x = x + (F.silu(h @ w1.T) * (h @ w3.T)) @ w2.T
        return (rms_norm(x, sd["norm.weight"], self.eps) @ sd["output.weight"].T).float()

    def _passes(self, cfg, gradual_cfg):
        """The generation passes: (first token, token count, CFG scale) (spec 6.3)."""
        groups = self.n // self.g
        for i in range(self.c):
            yield i, 1, cfg
        for k in range(self.c // self.g, groups):
            yield k * self.g, self.g, cfg * (groups - k + 1) / (groups + 1) if gradual_cfg else cfg

    def _guided(self, labels, prefix, count, scale):
        """u + (c - u) s of the last `count` logits, the batch run as [cond ; null]."""
        both = torch.cat([labels, torch.full_like(labels, self.num_classes)])
        logits = self.forward(both, torch.cat([prefix, prefix]))[:, -count:]
        cond, uncond = torch.split(logits, len(logits) // 2, dim=0)
        return uncond + (cond - uncond) * scale

    def guided_generation_logits(self, labels, tokens, cfg, gradual_cfg=False):
        """The guided logits every token of `tokens` [B, N] is drawn from in the original's
        `generate_group_par` (teacher-forced with these tokens): fp32 [B, N, V]."""
        labels = torch.tensor(np.array(labels)).long()
        tokens = torch.tensor(np.array(tokens)).long()
        out = torch.zeros(tokens.shape[0], self.n, self.sd["output.weight"].shape[0])
        for start, count, scale in self._passes(cfg, gradual_cfg):
            out[:, start:start + count] = self._guided(labels, tokens[:, :start], count, scale)
        return out

    @torch.no_grad()
    def generate(self, labels, cfg, temperature=1.0, top_k=0, top_p=1.0, gradual_cfg=False):
        """The original's sampling: labels [B] -> tokens [B, N], each pass re-running the whole
        prefix, tokens drawn with torch.multinomial from softmax(filtered logits / T)."""
        labels = torch.tensor(np.array(labels)).long()
        tokens = torch.zeros(labels.shape[0], 0, dtype=torch.long)
        for start, count, scale in self._passes(cfg, gradual_cfg):
            logits = self._guided(labels, tokens[:, :start], count, scale) / max(temperature,
                                                                                 1e-5)
            probs = F.softmax(top_k_top_p_filtering(logits, top_k, top_p), dim=-1)
            drawn = torch.multinomial(probs.flatten(0, 1), 1).reshape(labels.shape[0], count)
            tokens = torch.cat([tokens, drawn], dim=1)
        return tokens
