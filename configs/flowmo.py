"""FlowMo configs: `lo` (default, FlowMo-Lo), `hi` (FlowMo-Hi) and `tiny` (CPU smoke test).

Choose a variant with --config=configs/flowmo.py:hi and override any field with
--config.optim.lr=5e-5. Unknown field names are errors (the config is locked).

Model fields (all under `model`):
  image_size          training / evaluation crop size (square), pixels.
  patch_size          pixels per patch side; images become (size/patch)^2 tokens of patch^2*3.
  code_length         number of latent tokens (the "txt" stream of the MMDiT).
  context_dim         channels per latent token = bits per token after LFQ.
  codebook_size_for_entropy  bits per LFQ entropy codeword (fg); context_dim % fg == 0.
  encoder / decoder   hidden_size, num_heads, depth, axes_dim (RoPE dims per axis; sum =
                      head dim), mlp_ratio.
  rope_theta          RoPE base.
  dtype               compute dtype: float32 or bfloat16 (params are always float32).
  attention_impl      "xla" (any backend) or "cudnn" (fused attention on NVIDIA GPUs).
  remat               recompute each MMDiT block in the backward pass (jax.checkpoint): far
                      less activation memory for about one more forward of compute. Same
                      parameters and numbers either way.
  scan_layers         run the MMDiT blocks with nn.scan: one compiled block per trunk, so
                      compiles take a fraction of the time. Params are then stacked under
                      double_blocks_scan; importers, model directories and init_from convert
                      between the layouts (tokenizers_jax.layer_stack). Same numbers either way.
"""

import ml_collections


def flux_widths(width: int) -> ml_collections.ConfigDict:
    """The original's muP-width scaling of dit_b_4: hidden 192w, 12 heads, axes (2w, 7w, 7w)."""
    return ml_collections.ConfigDict(
        dict(hidden_size=192 * width, num_heads=12, axes_dim=(2 * width, 7 * width, 7 * width),
             mlp_ratio=4.0)
    )


def get_config(arg: str = "lo") -> ml_collections.ConfigDict:
    variants = ("lo", "hi", "lo_posttrain", "hi_posttrain", "tiny")
    if arg not in variants:
        raise ValueError(f"unknown FlowMo variant {arg!r}; choose one of {variants}")
    config = ml_collections.ConfigDict()
    config.variant = arg
    config.seed = 0

    model = config.model = ml_collections.ConfigDict()
    model.name = "flowmo"
    model.image_size = 256
    model.patch_size = 4
    model.code_length = 256
    model.context_dim = 18
    model.codebook_size_for_entropy = 9
    model.encoder = flux_widths(4)
    model.encoder.depth = 8
    model.decoder = flux_widths(6)
    model.decoder.depth = 16
    model.rope_theta = 10000.0
    model.dtype = "float32"
    model.attention_impl = "xla"
    model.remat = True
    model.scan_layers = False

    # LFQ bottleneck (spec 4).
    config.quantizer = ml_collections.ConfigDict(
        dict(entropy_weight=0.0025, commit_weight=0.000625, entropy_temperature=0.1)
    )

    # Rectified-flow training loss (spec 5) and mode-seeking post-training (spec 6).
    config.loss = ml_collections.ConfigDict(
        dict(
            time_schedule="fat_lognormal",  # lognormal | fat_lognormal | uniform
            code_dropout=0.1,  # probability of replacing a sample's code by the null code
            perceptual="lpips",  # lpips (VGG, stage 1A) | resnet (logit MSE, stage 1B) | none
            perceptual_weight=0.1,
            posttrain=False,  # stage 1B: perceptual loss on a sample from the random-step ODE
            posttrain_sample_k=8,  # Euler steps of the post-training integrator
        )
    )

    # Reconstruction sampler (spec 7).
    config.sampler = ml_collections.ConfigDict(
        dict(steps=25, schedule="pow_0.25", cfg=1.5, cfg_interval_sigma=(0.17, 1.02))
    )

    if arg in ("hi", "hi_posttrain"):
        model.context_dim = 56
        model.codebook_size_for_entropy = 14
    elif arg == "tiny":
        model.image_size = 32
        model.code_length = 16
        model.context_dim = 8
        model.codebook_size_for_entropy = 4
        model.encoder = ml_collections.ConfigDict(
            dict(hidden_size=128, num_heads=4, axes_dim=(4, 14, 14), mlp_ratio=4.0, depth=2)
        )
        model.decoder = ml_collections.ConfigDict(
            dict(hidden_size=192, num_heads=6, axes_dim=(4, 14, 14), mlp_ratio=4.0, depth=3)
        )
        model.remat = False  # activations are tiny; recomputing them only costs time
        config.sampler.steps = 8
    add_training(config, arg)
    return config


def add_training(config: ml_collections.ConfigDict, arg: str):
    """Training sections (tokenizers_jax.training.defaults): stage 1A for lo/hi, stage 1B for
    *_posttrain.

    FlowMo's own fields:
      train.loss_groups   8: the original's per-GPU LFQ entropy statistics (8 GPUs).
      train.fix_initial_norms  keep double_blocks kernels at their initial Frobenius norm.
      train.perceptual_weights  converted perceptual-network weights ("" = default location).
      train.perceptual_random_init  use random perceptual weights (smoke tests only).
      optim               Adam lr, b1, b2, eps (constant lr, no clipping or weight decay, as
                          the original); freeze_after: freeze the encoder from this update on
                          (-1 never, 0 from the start).
    """
    # pylint: disable=import-outside-toplevel
    from tokenizers_jax.training.defaults import add_training_sections
    from tokenizers_jax.training.optimizer import default_optim_config

    add_training_sections(
        config,
        train=dict(num_steps=1_300_000, batch_size=128, grad_accum_steps=2, loss_groups=8,
                   ema_decay=0.9999, ema_every=10, fix_initial_norms=True,
                   perceptual_weights="", perceptual_random_init=False),
        optim=default_optim_config(lr=1e-4, b1=0.9, b2=0.95, eps=1e-8, freeze_after=200_000),
    )

    if arg.endswith("_posttrain"):  # stage 1B (spec 6), from --config.init_from=STAGE_1A_DIR
        config.loss.posttrain = True
        config.loss.perceptual = "resnet"
        config.loss.perceptual_weight = 0.01
        config.optim.lr = 5e-5
        config.optim.freeze_after = 0
        config.train.num_steps = 25_000
        config.train.batch_size = 64
    elif arg == "tiny":  # a few CPU minutes on the built-in photos
        # No perceptual term: random VGG weights would only add noise and 6x the step time.
        # Tests opt into random LPIPS weights with train.perceptual_random_init=True.
        config.loss.perceptual = "none"
        config.train.update(num_steps=500, batch_size=8, grad_accum_steps=1, loss_groups=1,
                            ema_decay=0.98, ema_every=1)
        config.optim.update(lr=3e-4, freeze_after=-1)
        config.checkpoint.update(every=250, keep=2, keep_every=0)
        config.logging.every = 10
        config.eval.update(every=250, num_images=8, batch_size=10,
                           allow_random_init_networks=True)

