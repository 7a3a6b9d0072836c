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

Training (`python -m tokenizers_jax.train --config=configs/detailflow.py`, the tokenizer recipe
of spec 5; see `add_training` for the fields): the generator loss of `loss`, the DINO
discriminator of `discriminator` with its own optimizer `discriminator_optim`.
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
    add_training(config, arg)
    return config


def add_training(config: ml_collections.ConfigDict, arg: str):
    """Training sections (tokenizers_jax.training.defaults) with the tokenizer recipe of spec 5.

    loss (the generator loss, spec 5; applied to the 2B decoder batch at the output size):
      reconstruction_weight   MSE weight (1).
      perceptual_weight       VGG-LPIPS weight (1), its heads' dropout active; warmed up
                              linearly over perceptual_warmup steps (10k); 0 drops LPIPS.
      disc_weight, disc_start  hinge generator loss weight 0.2 from step disc_start (40k) on;
                              the discriminator loss uses the same weight and switch.
      lecam_weight, lecam_decay  LeCam regulariser 0.001, its EMAs' decay 0.999.
      cr_weight               consistency regularisation 4.0 (not scaled by disc_weight).
      alignment_weight        first-token alignment to the frozen SigLIP2 teacher (1, the
                              README's --global-token-loss-weight; 0 drops the teacher, as the
                              original allows).
    discriminator: the frozen DINO trunk (`dino`: ViT-S/16 shape, the blocks the heads read)
      and its heads (`kernel_size` of the residual conv); `crop_probability` of the random
      224 crop instead of a resize.
    discriminator_optim: its optimizer (Adam, the same recipe as `optim`).
    train (DetailFlow's fields besides the shared ones):
      perceptual_weights (LPIPS), dino_weights, siglip2_weights  converted weight
                              directories ("" = the default location, see
                              tokenizers_jax.perceptual); siglip2 holds the so400m tower
                              (the teacher, and the encoder's first layers).
      allow_random_init_networks  random LPIPS / DINO / SigLIP2 weights when theirs are
                              absent (smoke tests only: the losses become meaningless).
      encoder_from_siglip2    a fresh run starts the encoder from SigLIP2's first layers
                              (spec 1.1, enc_pretrained); skipped with random SigLIP2 weights.
      discriminator_init      a converted release's discriminator heads (`convert detailflow
                              --discriminator` writes OUTPUT/discriminator) to start from; with
                              --config.init_from=OUTPUT this resumes training from a release.
      codebook_window         codebook usage is measured over the last N clean indices (the
                              original's 65536-entry rolling buffer).
    The original keeps no EMA (`ema: False`): train.ema_decay = 0 makes the exported "EMA"
    params the raw ones.
    """
    # pylint: disable=import-outside-toplevel
    from tokenizers_jax.training.defaults import add_training_sections
    from tokenizers_jax.training.optimizer import default_optim_config

    steps_per_epoch = 5004  # ImageNet train at batch 256 (spec 5)

    def adam():  # Adam(0.9, 0.95), no weight decay, clip 1.0, timm warmup (1 epoch) + cosine
        return default_optim_config(lr=1e-4, b1=0.9, b2=0.95, eps=1e-8, clip_grad_norm=1.0,
                                    schedule="timm_cosine", warmup_steps=steps_per_epoch,
                                    warmup_init_lr=1e-5, min_lr=1e-5)

    add_training_sections(
        config,
        train=dict(num_steps=250 * steps_per_epoch, batch_size=256, grad_accum_steps=1,
                   loss_groups=1, ema_decay=0.0, ema_every=1, perceptual_weights="",
                   dino_weights="", siglip2_weights="", allow_random_init_networks=False,
                   encoder_from_siglip2=True, discriminator_init="", codebook_window=65536),
        optim=adam(),
    )
    config.discriminator_optim = adam()
    config.loss = ml_collections.ConfigDict(dict(
        reconstruction_weight=1.0, perceptual_weight=1.0, perceptual_warmup=10_000,
        disc_weight=0.2, disc_start=40_000, lecam_weight=0.001, lecam_decay=0.999,
        cr_weight=4.0, alignment_weight=1.0))
    config.discriminator = ml_collections.ConfigDict(dict(
        dino=dict(width=384, depth=12, num_heads=6, mlp_dim=1536, patch_size=16, image_size=224,
                  feature_blocks=(2, 5, 8, 11)),
        kernel_size=9, crop_probability=0.5))
    config.data.transform = "adm"  # ADM random crop + hflip (train), ADM centre crop (eval)
    config.logging.every = 100
    # The evaluation job (tokenizers_jax.evaluation): the per-prefix curve at R(n) (empty
    # prefix_lengths: every allowed prefix length) and the original's noisy-eval variants.
    config.eval.update(prefix_curve=True, prefix_lengths=(), noisy=True)

    if arg == "tiny":  # a few CPU minutes on the built-in photos; the GAN switches on
        # A small DINO trunk at 32 px, random frozen networks, no LPIPS (random VGG weights
        # would only add noise and time; tests opt in with loss.perceptual_weight).
        config.discriminator.dino.update(width=32, depth=4, num_heads=2, mlp_dim=64,
                                         patch_size=8, image_size=32, feature_blocks=(0, 1, 2, 3))
        config.discriminator.kernel_size = 3
        config.loss.update(perceptual_weight=0.0, perceptual_warmup=50, disc_start=100)
        config.train.update(num_steps=300, batch_size=8, allow_random_init_networks=True,
                            codebook_window=1024)
        for optim in (config.optim, config.discriminator_optim):
            optim.update(lr=3e-4, warmup_steps=20, warmup_init_lr=3e-5, min_lr=3e-5)
        config.checkpoint.update(every=100, keep=2, keep_every=0)
        config.logging.every = 10
        config.eval.update(every=100, num_images=6, batch_size=10, grid_size=6,
                           allow_random_init_networks=True)
