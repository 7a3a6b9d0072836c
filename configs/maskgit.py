"""MaskGIT on FlowMo tokens: `lo` (default; FlowMo-Lo tokens) and `tiny` (CPU smoke test).

    python -m tokenizers_jax.train --config=configs/maskgit.py:tiny --workdir=runs/maskgit_tiny
    python -m tokenizers_jax.train --config=configs/maskgit.py --workdir=DIR \
        --config.data.path=tokens/flowmo_lo

The FlowMo paper trains "MaskGiT" on FlowMo-Lo tokens without stating its recipe; the defaults
are MaskBit's 18-bit generator (maskgit.md sections 2-4) and every open choice is a field.

Model fields (`model`, see tokenizers_jax.models.maskgit):
  num_positions / splits / bits_per_split  P positions x S sub-tokens of fg bits: FlowMo's
                      code_length, context_dim / fg and fg (Lo: 256 x 2 x 9).
  grouping            "strided": split j of position t is FlowMo's codeword t * S + j (FlowMo's
                      even/odd channels); "contiguous": channels j*fg .. j*fg+fg-1 (MaskBit's
                      low/high halves of an 18-bit index).
  num_classes         class labels 0 .. num_classes - 1; one more row is the null label.
  hidden_size, depth, num_heads, mlp_dim, dropout   the post-LN BERT (MaskBit: 1024, 24, 16,
                      4096, 0.1).
  dtype               compute dtype: float32 or bfloat16 (params, norms, softmax, logits and
                      losses stay fp32).
Training (`masking`, `loss`):
  masking.schedule    mask ratio gamma(u), u ~ U(0, 1): "arccos" (MaskBit, 1d-tokenizer) or
                      "cosine" (MaskGIT).
  masking.method      "bernoulli": each sub-token masked with probability gamma (MaskBit);
                      "exact_count": exactly max(1, round(N gamma)) (1d-tokenizer).
  loss.unmasked_weight  weight of unmasked sub-tokens in the cross-entropy: 1.0 all tokens
                      (MaskBit), 0.0 masked only (MaskGIT), 0.1 (1d-tokenizer).
  loss.label_smoothing, loss.label_drop  0.1 each (label drop trains the null label for CFG).
Decoding (`sampler`, see tokenizers_jax.models.maskgit_sampler):
  steps               T decoding steps.
  cfg, cfg_ramp, cfg_power   l = l_c + s_k (l_c - l_u); s_k = cfg * ramp: "power_cosine"
                      (1 - cos(pi (k/T)^p)) / 2, "linear" k / T, "constant" 1; cfg 0: no
                      unconditional pass.
  choice_temperature  tau: Gumbel noise tau (1 - r) on the confidences (and on the logits with
                      token_sampling "gumbel_max").
  softmax_temperature, softmax_annealing   logits / tau_s; annealed 0.5 + 0.8 (1 - r).
  token_sampling      "categorical" (MaskBit) or "gumbel_max" (1d-tokenizer).
  confidence          "log_prob" (MaskGIT, MaskBit) or "logit" (1d-tokenizer).
  mask_schedule       gamma of the re-mask count floor(N gamma(r)): "arccos" or "cosine".
  cutoff              "<=" (MaskBit, 1d-tokenizer) or "<" (MaskGIT) against the sorted
                      confidences.
Samples are decoded by the FlowMo tokenizer's own sampler (its config.sampler).
  eval.tokenizer      the FlowMo that decodes evaluation samples ("" = the one recorded in the
                      token export's manifest).
"""

import ml_collections


def get_config(arg: str = "lo") -> ml_collections.ConfigDict:
    variants = ("lo", "tiny")
    if arg not in variants:
        raise ValueError(f"unknown MaskGIT variant {arg!r}; choose one of {variants}")
    config = ml_collections.ConfigDict()
    config.variant = arg
    config.seed = 0
    config.model = ml_collections.ConfigDict(dict(
        name="maskgit", num_positions=256, splits=2, bits_per_split=9, grouping="strided",
        num_classes=1000, hidden_size=1024, depth=24, num_heads=16, mlp_dim=4096, dropout=0.1,
        dtype="float32"))
    config.masking = ml_collections.ConfigDict(dict(schedule="arccos", method="bernoulli"))
    config.loss = ml_collections.ConfigDict(
        dict(label_smoothing=0.1, unmasked_weight=1.0, label_drop=0.1))
    # MaskBit's 18-bit sampling settings (maskgit.md section 4).
    config.sampler = ml_collections.ConfigDict(dict(
        steps=64, cfg=5.7, cfg_ramp="power_cosine", cfg_power=2.5, choice_temperature=8.5,
        softmax_temperature=1.0, softmax_annealing=False, token_sampling="categorical",
        confidence="log_prob", mask_schedule="arccos", cutoff="<="))
    if arg == "tiny":  # tokens of configs/flowmo.py:tiny (16 tokens x 8 bits) on the 7 photos
        config.model.update(num_positions=16, splits=2, bits_per_split=4, num_classes=7,
                            hidden_size=64, depth=2, num_heads=4, mlp_dim=256)
        config.sampler.steps = 8
    add_training(config, arg)
    return config


def add_training(config: ml_collections.ConfigDict, arg: str):
    """Training sections (tokenizers_jax.training.defaults) with MaskBit's optimisation.

    AdamW lr 1e-4, betas (0.9, 0.96), eps 1e-8, weight decay 0.045 (on parameters of rank >= 2),
    5k warmup steps from 0, cosine to 0.1 x lr (MaskBit's cosine_with_minimum), clip 1.0, fp32,
    EMA 0.999 every step. Batch 1024 and 375k steps (~300 ImageNet epochs, the length reported
    for the FlowMo paper's generator) are choices: neither paper states them for this model.
    """
    # pylint: disable=import-outside-toplevel
    from tokenizers_jax.training.defaults import add_training_sections
    from tokenizers_jax.training.optimizer import default_optim_config

    add_training_sections(
        config,
        train=dict(num_steps=375_000, batch_size=1024, ema_decay=0.999, ema_every=1),
        optim=default_optim_config(lr=1e-4, b1=0.9, b2=0.96, eps=1e-8, weight_decay=0.045,
                                   clip_grad_norm=1.0, schedule="warmup_cosine",
                                   warmup_steps=5000, min_lr=1e-5),
        image_size=256,
    )
    config.data.name = "tokens"
    config.eval.tokenizer = ""
    config.eval.every = 10_000
    if arg == "tiny":  # a few CPU minutes on tokens/flowmo_tiny (the README's export)
        config.data.image_size = 32
        config.data.path = "tokens/flowmo_tiny"
        config.train.update(num_steps=300, batch_size=32, ema_decay=0.99)
        config.optim.update(lr=1e-3, warmup_steps=20, min_lr=1e-4)
        config.checkpoint.update(every=150, keep=2, keep_every=0)
        config.logging.every = 10
        config.eval.update(every=150, num_images=7)
