"""The fixed shapes of the side-by-side CPU benchmark against eager PyTorch (issue 12):
`flowmo` (default) and `detailflow`.

  python -m tokenizers_jax.benchmark train --config=configs/benchmark.py:flowmo --compare-torch
  python -m tokenizers_jax.benchmark flowmo --config=configs/benchmark.py:flowmo --compare-torch
  python -m tokenizers_jax.benchmark detailflow --config=configs/benchmark.py:detailflow \
      --compare-torch

They are written out here, field by field, so that the figures in the README do not move when
the tiny configs change.

flowmo      FlowMo with hidden 384 (12 heads of 32, RoPE axes (4, 14, 14), the original's
            muP width 2), 2 encoder / 4 decoder blocks, 64 px images in 4 px patches (256
            patch tokens), 64 latent tokens of 18 channels (LFQ groups of 9, as FlowMo-Lo), the
            25-step pow_0.25 sampler with CFG 1.5 on its interval (31 decoder evaluations), and
            a train step of batch 8: one micro-batch, one LFQ group, no perceptual term (the
            PyTorch side has none), Adam, EMA every step, fixed initial norms.
detailflow  the `tiny` DetailFlow towers (width 64, 2 layers, 2 heads, MLP 128, patch 8,
            4 x 4 position tables, 16 tokens in groups of 4) at 256 px: 1024 patch tokens per
            image in the encoder, and a decoder that decodes all 16 tokens to 256 px (a 32 x 32
            canvas). Batch 8.
"""

import os

import ml_collections

from tokenizers_jax.config_file import load_config

_HERE = os.path.dirname(os.path.abspath(__file__))


def _flowmo() -> ml_collections.ConfigDict:
    config = load_config(os.path.join(_HERE, "flowmo.py:lo"))
    config.unlock()
    model = config.model
    model.update(image_size=64, patch_size=4, code_length=64, context_dim=18,
                 codebook_size_for_entropy=9, dtype="float32", attention_impl="xla",
                 remat=False)
    for trunk, depth in (("encoder", 2), ("decoder", 4)):
        model[trunk].update(hidden_size=384, num_heads=12, axes_dim=(4, 14, 14), mlp_ratio=4.0,
                            depth=depth)
    config.data.image_size = model.image_size  # the train step's synthetic batch
    config.sampler.update(steps=25, schedule="pow_0.25", cfg=1.5, cfg_interval_sigma=(0.17, 1.02))
    config.loss.update(perceptual="none", posttrain=False)
    config.train.update(batch_size=8, grad_accum_steps=1, loss_groups=1, ema_every=1,
                        ema_decay=0.999, fix_initial_norms=True)
    config.optim.update(lr=1e-4, freeze_after=-1)
    return config


def _detailflow() -> ml_collections.ConfigDict:
    config = load_config(os.path.join(_HERE, "detailflow.py:tiny"))
    config.unlock()
    model = config.model
    model.update(image_size=256, num_latent_tokens=16, group_size=4, causal_num=4,
                 codebook_size=64, codebook_dim=8, neighbour_top_k=8, alignment_hidden=32,
                 dtype="float32", attention_impl="xla")
    for tower in ("encoder", "decoder", "teacher"):
        model[tower].update(width=64, depth=2, num_heads=2, mlp_dim=128, patch_size=8,
                            position_grid=4, layer_norm_eps=1e-6)
    config.benchmark.update(batch_size=8, iterations=3, prefix_lengths=(16,))
    return config


def get_config(arg: str = "flowmo") -> ml_collections.ConfigDict:
    variants = {"flowmo": _flowmo, "detailflow": _detailflow}
    if arg not in variants:
        raise ValueError(f"unknown benchmark config {arg!r}; choose one of {tuple(variants)}")
    config = variants[arg]()
    config.variant = f"benchmark_{arg}"
    return config
