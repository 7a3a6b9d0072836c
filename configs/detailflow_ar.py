"""DetailFlow's autoregressive generator (LlamaGen GPT-L with the group layout, spec 6):
`df16` (default, 128 tokens), `df32` (256), `df64` (512) and `tiny` (CPU; it generates the
tokens of configs/detailflow.py:tiny).

Choose a variant with --config=configs/detailflow_ar.py:df32 and override any field with
--config.sampler.cfg=2.0.

Model fields (all under `model`):
  num_tokens          N, tokens per image (the original's block_size); equals the
                      tokenizer's num_latent_tokens.
  group_size          g: tokens drawn per forward pass after the first causal_num.
  causal_num          the first causal_num tokens are drawn one by one (a multiple of g).
  vocab_size          the tokenizer's codebook size.
  num_classes         class labels 0..num_classes-1 (row num_classes of the class table is
                      the null class of classifier-free guidance).
  width, depth, num_heads, mlp_dim   the transformer (GPT-L: 1024, 24, 16, 2816 =
                      find_multiple(int(2 * 4 * width / 3), 256)).
  rope_base, norm_eps 2D RoPE base and RMSNorm eps.
  token_dropout, resid_dropout, ffn_dropout   dropout rates (training only).
  class_dropout       label drop: probability of training on the null class (enables CFG).
  dtype               compute dtype: float32 or bfloat16 (params are always float32).
  attention_impl      "xla" (any backend) or "cudnn" (fused attention on NVIDIA GPUs).

Sampler fields (`sampler`, spec 6.3; `Generator.generate(..., cfg=...)` overrides them):
  cfg                 classifier-free guidance scale u + cfg (c - u), >= 1 (1 = off);
                      1.45 / 1.5 / 1.32 for 128 / 256 / 512 tokens (the original's eval).
  temperature         logits / temperature (1).
  top_k, top_p        0 / 1.0 = off (the original passes top_k = 8192 = V: a no-op).
  gradual_cfg         scale group k by (G - k + 1) / (G + 1) (off in the original's eval).

Training (spec 6.2; sections from tokenizers_jax.training.defaults): AdamW(0.9, 0.95),
weight decay 0.05 on every parameter of rank >= 2, lr 1e-4 with a linear warmup over 5% of the
steps from 0.005 * lr and a cosine to 0.01 * lr, gradient clipping 1.0, EMA 0.9999 every
step, 300 ImageNet epochs; data from a DetailFlow token export (`data.name = "tokens"`,
`data.path` its directory). `train.correction_prob`: probability of training a sample on its
self-correction input / label channels instead of the clean tokens. `eval.tokenizer`: the
DetailFlow that decodes the periodic evaluation's samples ("" = the one recorded in the token
export's manifest).

    python -m tokenizers_jax.train --config=configs/detailflow_ar.py:tiny --workdir=runs/ar_tiny
    python -m tokenizers_jax.train --config=configs/detailflow_ar.py --workdir=DIR \
        --config.data.path=tokens/df16
"""

import ml_collections

IMAGENET_TRAIN_IMAGES = 1_281_167
EPOCHS = 300


def get_config(arg: str = "df16") -> ml_collections.ConfigDict:
    # variant -> (tokens, CFG scale of the original's evaluation, global batch size)
    variants = {"df16": (128, 1.45, 512), "df32": (256, 1.5, 512), "df64": (512, 1.32, 256),
                "tiny": (16, 1.5, 8)}
    if arg not in variants:
        raise ValueError(f"unknown DetailFlow AR variant {arg!r}; choose one of {tuple(variants)}")
    num_tokens, cfg, batch_size = variants[arg]
    config = ml_collections.ConfigDict()
    config.variant = arg
    config.seed = 0

    model = config.model = ml_collections.ConfigDict()
    model.name = "detailflow_ar"
    model.num_tokens = num_tokens
    model.group_size = 8
    model.causal_num = 8
    model.vocab_size = 8192
    model.num_classes = 1000
    model.width = 1024
    model.depth = 24
    model.num_heads = 16
    model.mlp_dim = 2816
    model.rope_base = 10000.0
    model.norm_eps = 1e-5
    model.token_dropout = 0.1
    model.resid_dropout = 0.1
    model.ffn_dropout = 0.1
    model.class_dropout = 0.1
    model.dtype = "float32"
    model.attention_impl = "xla"

    config.sampler = ml_collections.ConfigDict(
        dict(cfg=cfg, temperature=1.0, top_k=0, top_p=1.0, gradual_cfg=False))

    # `python -m tokenizers_jax.benchmark detailflow_ar`: samples per call, timed calls.
    config.benchmark = ml_collections.ConfigDict(dict(batch_size=8, iterations=2))

    if arg == "tiny":
        model.update(group_size=4, causal_num=4, vocab_size=64, num_classes=10, width=32,
                     depth=2, num_heads=2, mlp_dim=96)
        config.benchmark.batch_size = 2
    add_training(config, arg, batch_size)
    return config


def add_training(config: ml_collections.ConfigDict, arg: str, batch_size: int):
    """The training sections of spec 6.2 (see the module docstring)."""
    # pylint: disable=import-outside-toplevel
    from tokenizers_jax.training.defaults import add_training_sections
    from tokenizers_jax.training.optimizer import default_optim_config

    lr = 1e-4
    num_steps = EPOCHS * (IMAGENET_TRAIN_IMAGES // batch_size)  # the original drops the last batch
    add_training_sections(
        config,
        train=dict(num_steps=num_steps, batch_size=batch_size, ema_decay=0.9999, ema_every=1,
                   correction_prob=0.3),
        optim=default_optim_config(
            lr=lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05, clip_grad_norm=1.0,
            schedule="warmup_cosine", warmup_steps=int(0.05 * num_steps),
            warmup_init_lr=0.005 * lr, min_lr=0.01 * lr),
        image_size=32 if arg == "tiny" else 256,
    )
    config.data.name = "tokens"
    config.eval.tokenizer = ""
    if arg == "tiny":  # a few CPU minutes on tokens/detailflow_tiny (the README's export)
        config.data.path = "tokens/detailflow_tiny"
        num_steps = 1000
        config.train.update(num_steps=num_steps, ema_decay=0.99)
        config.optim.update(lr=3e-4, warmup_steps=int(0.05 * num_steps),
                            warmup_init_lr=0.005 * 3e-4, min_lr=0.01 * 3e-4)
        config.checkpoint.update(every=500, keep=2, keep_every=0)
        config.logging.every = 50
        config.eval.update(every=500, batch_size=8, num_images=7)  # a crop of each photo
