"""PyTorch re-statement of the original DetailFlow forward (eval mode, fp32), on a state dict
with the original key names (spec 1, 3, 4, 8).

It follows the original code path by path: HF SigLIP2 layers with an additive finfo.min mask
built like `create_attn_mask_for_x_z`, F.interpolate(bilinear, antialias) position tables, the
VQ with F.normalize and topk, and `encode_image`'s two passes. Images are NCHW in [-1, 1].
`tokenizers_jax.convert.detailflow.params_to_state_dict` gives the state dict of our params.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class Reference:
    """The original DetailFlow forward in eval mode, on a torch state dict."""

    def __init__(self, state_dict, config):
        self.sd = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}
        self.m = config.model

    def layer(self, prefix, x, mask, heads):
        sd, eps = self.sd, 1e-6
        b, length, width = x.shape
        h = F.layer_norm(x, (width,), sd[f"{prefix}.layer_norm1.weight"],
                         sd[f"{prefix}.layer_norm1.bias"], eps)

        def proj(name, t):
            return F.linear(t, sd[f"{prefix}.self_attn.{name}.weight"],
                            sd[f"{prefix}.self_attn.{name}.bias"])

        def split(t):
            return t.view(b, length, heads, width // heads).transpose(1, 2)

        q, k, v = split(proj("q_proj", h)), split(proj("k_proj", h)), split(proj("v_proj", h))
        weights = (q @ k.transpose(-1, -2)) * (width // heads) ** -0.5
        if mask is not None:
            weights = weights + mask
        out = torch.softmax(weights.float(), dim=-1) @ v
        x = x + proj("out_proj", out.transpose(1, 2).reshape(b, length, width))
        h = F.layer_norm(x, (width,), sd[f"{prefix}.layer_norm2.weight"],
                         sd[f"{prefix}.layer_norm2.bias"], eps)
        h = F.linear(h, sd[f"{prefix}.mlp.fc1.weight"], sd[f"{prefix}.mlp.fc1.bias"])
        h = F.gelu(h, approximate="tanh")
        return x + F.linear(h, sd[f"{prefix}.mlp.fc2.weight"], sd[f"{prefix}.mlp.fc2.bias"])

    def tower(self, prefix, x, mask, tower_cfg):
        for i in range(tower_cfg.depth):
            x = self.layer(f"{prefix}.encoder.layers.{i}", x, mask, tower_cfg.num_heads)
        return F.layer_norm(x, (x.shape[-1],), self.sd[f"{prefix}.post_layernorm.weight"],
                            self.sd[f"{prefix}.post_layernorm.bias"], 1e-6)

    def positions(self, prefix, grid, side):
        table = self.sd[f"{prefix}.embeddings.position_embedding.weight"]
        table = table.reshape(side, side, -1).permute(2, 0, 1).unsqueeze(0)
        table = F.interpolate(table, size=(grid, grid), mode="bilinear", align_corners=False,
                              antialias=True)
        return table.reshape(table.shape[1], grid * grid).transpose(0, 1)

    @staticmethod
    def patches(x, p):  # NCHW -> (B, L, p*p*C), (row, col, channel)
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), -1)

    def mask(self, n, m):  # create_attn_mask_for_x_z(z_causal, x_see_z=False, z_see_x=True)
        g, causal = self.m.group_size, self.m.causal_num
        blocked = torch.zeros((n + m, n + m), dtype=torch.bool)
        blocked[:n, n:] = True
        for start in range(n, n + m, g):
            end = start + g
            if start < n + causal:
                blocked[start:end, start:end] = torch.triu(torch.ones(g, g, dtype=torch.bool), 1)
                blocked[start:end, end:] = True
            else:
                blocked[start:end, end:] = True
        return torch.zeros(n + m, n + m).masked_fill(blocked, torch.finfo(torch.float32).min)

    def encoder(self, x, noise_token=None):
        sd, enc = self.sd, self.m.encoder
        prefix = "encoder.visual_model"
        tokens = self.patches(x, enc.patch_size)
        grid = x.shape[-1] // enc.patch_size
        h = F.linear(tokens, sd[f"{prefix}.embeddings.patch_embedding.weight"],
                     sd[f"{prefix}.embeddings.patch_embedding.bias"])
        h = h + self.positions(prefix, grid, enc.position_grid)
        n_lat = self.m.num_latent_tokens
        if noise_token is None:
            z = sd["encoder.latent_tokens"].expand(x.shape[0], -1, -1)
        else:
            refined = sd["encoder.refined_tokens"][:, noise_token.shape[1]:]
            z = torch.cat([noise_token, refined.expand(x.shape[0], -1, -1)], dim=1)
        z = z + sd["encoder.latent_pos_embed"][:, :n_lat]
        out = self.tower(prefix, torch.cat([h, z], 1), self.mask(h.shape[1], n_lat), enc)
        return F.linear(out[:, h.shape[1]:], sd["quant_conv.weight"], sd["quant_conv.bias"])

    def quantize(self, z, ranks=None, top_k=None):
        z = F.normalize(z, p=2, dim=-1)
        flat = z.reshape(-1, z.shape[-1])
        emb = F.normalize(self.sd["quantize.embedding.weight"], p=2, dim=-1)
        d = (flat ** 2).sum(1, keepdim=True) + (emb ** 2).sum(1) - 2 * flat @ emb.t()
        if ranks is None:
            idx, noise, noise_idx = d.argmin(1), None, None
        else:
            top = torch.topk(d, k=top_k, dim=1, largest=False).indices
            noise_idx = top[torch.arange(d.shape[0]), ranks.reshape(-1)]
            idx = top[:, 0]
            noise = emb[noise_idx].view(z.shape)
            noise = z + (noise - z).detach()
            noise_idx = noise_idx.view(z.shape[:2])
        z_q = emb[idx].view(z.shape)
        return z + (z_q - z).detach(), idx.view(z.shape[:2]), noise, noise_idx

    def encode_image(self, x, noise_idx, ranks):
        """`VQModel.encode_image` in eval mode with a noise index."""
        h = self.encoder(x)
        quant_clean, index_clean, h_noise, index_noise = self.quantize(
            h, ranks, self.m.neighbour_top_k)
        noise_num = 1 if noise_idx < self.m.causal_num else self.m.group_size
        end = noise_idx + noise_num
        quant_noise = torch.cat([quant_clean[:, :noise_idx], h_noise[:, noise_idx:end]], 1)
        noise_token = F.linear(quant_noise, self.sd["refine_conv.weight"],
                               self.sd["refine_conv.bias"])
        quant2, index_new, _, _ = self.quantize(self.encoder(x, noise_token))
        quant = torch.cat([quant_noise, quant2[:, end:]], 1)
        index_input = torch.cat([index_clean[:, :noise_idx], index_noise[:, noise_idx:end],
                                 index_new[:, end:]], 1)
        index_label = torch.cat([index_clean[:, :end], index_new[:, end:]], 1)
        return quant, torch.stack([index_clean, index_input, index_label], -1)

    def decode(self, quant, t, img_size):
        sd, dec = self.sd, self.m.decoder
        prefix = "decoder.visual_model"
        z = F.linear(quant, sd["post_quant_conv.weight"], sd["post_quant_conv.bias"])[:, :t]
        grid = img_size // dec.patch_size
        h = sd["decoder.mask_token"].expand(z.shape[0], grid * grid, -1)
        h = h + self.positions(prefix, grid, dec.position_grid)
        z = z + sd["decoder.latent_pos_embed"][:, :t]
        out = self.tower(prefix, torch.cat([h, z], 1), None, dec)[:, : grid * grid]
        pix = F.linear(out, sd["decoder.to_pixel.model.weight"], sd["decoder.to_pixel.model.bias"])
        p = dec.patch_size
        pix = pix.reshape(pix.shape[0], grid, grid, p, p, 3)
        pix = torch.einsum("nhwpqc->nchpwq", pix)
        return pix.reshape(pix.shape[0], 3, grid * p, grid * p)

    def teacher_target(self, x):
        """forward_features (HF forward + a second post_layernorm), patch mean, normalise."""
        sd, cfg = self.sd, self.m.teacher
        prefix = "repa_model.visual_model"
        h = F.linear(self.patches(x, cfg.patch_size),
                     sd[f"{prefix}.embeddings.patch_embedding.weight"],
                     sd[f"{prefix}.embeddings.patch_embedding.bias"])
        h = h + self.positions(prefix, x.shape[-1] // cfg.patch_size, cfg.position_grid)
        h = self.tower(prefix, h, None, cfg)
        h = F.layer_norm(h, (h.shape[-1],), sd[f"{prefix}.post_layernorm.weight"],
                         sd[f"{prefix}.post_layernorm.bias"], 1e-6)
        return F.normalize(h.mean(1), dim=-1)
