"""DetailFlow tokenizer configs: `df16` (default, 128 tokens), `df32` (256), `df64` (512) and
`tiny` (CPU smoke test).

Choose a variant with --config=configs/detailflow.py:df32 and override any field with
--config.model.dtype=bfloat16.

Model fields (all under `model`):
  image_size          encoder input size R (square) and the full output size.
  num_latent_tokens   N, the 1D tokens (appended causal queries of the encoder).
  group_size          g: tokens per group; groups after the first `causal_num` tokens are
                      bidirectional inside and causal between groups.
  causal_num          the first causal_num tokens are token-causal (a multiple of g).
  degradation_power   p of the resolution map R(n) (spec 2).
  codebook_size, codebook_dim, commit_beta   the VQ bottleneck (spec 1.2).
  neighbour_top_k     self-correction perturbs a token to one of its top-k nearest codes.
  alignment_hidden    hidden width of the first-token alignment MLP (global_token_proj).
  encoder / decoder / teacher   SigLIP2 towers: width, depth, num_heads, mlp_dim,
                      patch_size, position_grid (side of the learned position table),
                      layer_norm_eps. The encoder is the first 12 so400m layers, the teacher
                      the full 27-layer so400m (frozen, used only for the alignment target).
  dtype               compute dtype: float32 or bfloat16 (params are always float32).
  attention_impl      "xla" (any backend) or "cudnn" (fused attention on NVIDIA GPUs).

Training draws (spec 2, 3), used by the training task: `degradation.prob` (probability of a
degraded prefix t < N), `correction.prob` (probability of a self-correction pass).
"""

import ml_collections


def siglip_tower(width, depth, num_heads, mlp_dim, patch_size=16, position_grid=16):
    return ml_collections.ConfigDict(
        dict(width=width, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim,
             patch_size=patch_size, position_grid=position_grid, layer_norm_eps=1e-6)
    )


def get_config(arg: str = "df16") -> ml_collections.ConfigDict:
    variants = {"df16": 128, "df32": 256, "df64": 512, "tiny": 16}
    if arg not in variants:
        raise ValueError(f"unknown DetailFlow variant {arg!r}; choose one of {tuple(variants)}")
    config = ml_collections.ConfigDict()
    config.variant = arg
    config.seed = 0

    model = config.model = ml_collections.ConfigDict()
    model.name = "detailflow"
    model.image_size = 256
    model.num_latent_tokens = variants[arg]
    model.group_size = 8
    model.causal_num = 8
    model.degradation_power = 1.5
    model.codebook_size = 8192
    model.codebook_dim = 8
    model.commit_beta = 0.25
    model.neighbour_top_k = 50
    model.alignment_hidden = 1024
    so400m = dict(width=1152, num_heads=16, mlp_dim=4304)
    model.encoder = siglip_tower(depth=12, **so400m)
    model.decoder = siglip_tower(width=768, depth=12, num_heads=12, mlp_dim=3072)
    model.teacher = siglip_tower(depth=27, **so400m)
    model.dtype = "float32"
    model.attention_impl = "xla"

    config.degradation = ml_collections.ConfigDict(dict(prob=0.2))
    config.correction = ml_collections.ConfigDict(dict(prob=1.0))

    # `python -m tokenizers_jax.benchmark detailflow`: batch size, timed iterations, and the
    # prefix lengths to time (empty: one per decoder output resolution).
    config.benchmark = ml_collections.ConfigDict(
        dict(batch_size=8, iterations=3, prefix_lengths=())
    )

    if arg == "tiny":
        model.image_size = 32
        model.group_size = 4
        model.causal_num = 4
        model.codebook_size = 64
        model.neighbour_top_k = 8
        model.alignment_hidden = 32
        tiny = dict(width=64, depth=2, num_heads=2, mlp_dim=128, patch_size=8, position_grid=4)
        model.encoder = siglip_tower(**tiny)
        model.decoder = siglip_tower(**tiny)
        model.teacher = siglip_tower(**tiny)
        config.benchmark.batch_size = 2
    return config
