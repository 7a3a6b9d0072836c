"""DetailFlow AR training on a DetailFlow token export (detailflow.md section 6.2).

One step on a batch {"tokens": int32 [B, N, 3] clean / input / label indices (one of the
image's ten crops, drawn by the loader), "label": int32 [B]}:
  per sample, with probability train.correction_prob, the self-correction sequence: input
  ch1[:, :N - g], target ch2; otherwise input ch0[:, :N - g], target ch0 (`training_sequences`)
  -> `GPT.__call__(labels, inputs, deterministic=False)`, which drops each label to the null
  class with probability model.class_dropout and applies token / residual / FFN dropout
  -> fp32 logits [B, N, V] (position p predicts token p) -> the mean cross-entropy over all
  B x N positions (`token_loss`).

`evaluate` (the loop's periodic evaluation) reports the loss and accuracy on the evaluation
tokens (the clean sequence, and the self-correction one as correction_loss) and returns two
grid rows decoded by the DetailFlow tokenizer at full resolution: the evaluation tokens
themselves and samples generated for their labels by the cached group decoder
(`config.sampler`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from tokenizers_jax import sampling
from tokenizers_jax.data import tokens as token_data
from tokenizers_jax.models import gpt, group_decoding
from tokenizers_jax.models.detailflow import DetailFlow
from tokenizers_jax.tasks.base import Batch, Params
from tokenizers_jax.tasks.token_generator import TokenGeneratorTask

KIND = "detailflow_self_correction"  # the export kind this task reads
CHANNELS = ("clean", "input", "label")  # the export's channel order (token_export)
# The tokenizer params that decoding indices reads (no encoder, no alignment head).
DECODER_PARAMS = ("quantize", "post_quant_conv", "decoder")


def draw_correction(key: jax.Array, batch: int, prob: float) -> jax.Array:
    """bool [B]: which samples train on their self-correction channels (prob each)."""
    return jax.random.uniform(key, (batch,)) < prob


def training_sequences(tokens: jax.Array, correction: jax.Array, group_size: int
                       ) -> tuple[jax.Array, jax.Array]:
    """The original's `generate_z_input_target`.

    Args:
      tokens: int [B, N, 3] clean / input / label; correction: bool [B]; group_size: g.
    Returns:
      (inputs int [B, N - g]: ch1 where correction else ch0, without the last group;
       targets int [B, N]: ch2 where correction else ch0).
    """
    pick = correction[:, None]
    inputs = jnp.where(pick, tokens[..., 1], tokens[..., 0])[:, :-group_size]
    targets = jnp.where(pick, tokens[..., 2], tokens[..., 0])
    return inputs, targets


def token_loss(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(mean cross-entropy over all positions (fp32), {"accuracy": argmax hits}).

    Args:
      logits: [B, N, V]; targets: int [B, N].
    """
    logits = logits.astype(jnp.float32)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))
    return loss, {"accuracy": accuracy}


class DetailFlowARTask(TokenGeneratorTask):
    """DetailFlow's GPT: params of `models.gpt.GPT`; batches of a DetailFlow token export."""

    title = "the DetailFlow AR model"

    def __init__(self, config: ml_collections.ConfigDict):
        self.model = gpt.model_from_config(config)
        m = config.model
        self.sampler = group_decoding.SamplerSettings.from_config(config.sampler, m.vocab_size)
        if not 0 <= config.train.correction_prob <= 1:
            raise ValueError(f"train.correction_prob must be in [0, 1], got "
                             f"{config.train.correction_prob}")
        super().__init__(config)

    def check_export(self, path, manifest):
        m = self.config.model
        token_data.check_manifest(manifest, tokens_per_image=m.num_tokens,
                                  codebook_size=m.vocab_size, kind=KIND,
                                  num_classes=m.num_classes,
                                  where="the DetailFlow AR config (model.*)")
        if tuple(manifest["channels"]) != CHANNELS:
            raise ValueError(f"token export {path} has channels {manifest['channels']}; the "
                             f"DetailFlow AR task reads {list(CHANNELS)}: export again with "
                             "python -m tokenizers_jax.export_tokens")
        self.check_tokenizer_model(manifest["tokenizer_config"]["model"],
                                   f"the DetailFlow of token export {path}")

    def check_tokenizer_model(self, tokenizer_model, what):
        gpt.check_tokenizer_model(self.config.model, tokenizer_model, what)

    def init_params(self, key: jax.Array) -> Params:
        return self.model.init(key, *self.model.dummy_inputs(1))["params"]

    @property
    def constants(self) -> Any:
        """The tokenizer's decoding params when the run evaluates."""
        if not self.evaluates:
            return {}
        params = self.tokenizer.params
        return {"detailflow_decoder": {name: params[name] for name in DECODER_PARAMS}}

    def forward(self, params, batch: Batch, key: jax.Array, correction: jax.Array | None,
                train: bool) -> tuple[jax.Array, jax.Array]:
        """(fp32 logits [B, N, V], targets int [B, N]) of a batch.

        Args:
          correction: bool [B], the samples on their self-correction channels; None draws
            it with probability train.correction_prob from `key`.
          train: dropout and label drop (the model's, from `key`).
        """
        tokens = batch["tokens"]
        correction_key, dropout_key = jax.random.split(key)
        if correction is None:
            correction = draw_correction(correction_key, tokens.shape[0],
                                         self.config.train.correction_prob)
        inputs, targets = training_sequences(tokens, correction, self.model.group_size)
        logits = self.model.apply({"params": params}, batch["label"], inputs,
                                  deterministic=not train,
                                  rngs={"dropout": dropout_key} if train else None)
        return logits, targets

    def loss(self, params, constants, batch: Batch, key):
        del constants
        logits, targets = self.forward(params, batch, key, None, train=True)
        return token_loss(logits, targets)

    def _decode(self, decoder_params, indices: jax.Array) -> jax.Array:
        """int [B, N] -> images [B, S, S, 3] in [-1, 1]: all N tokens at full resolution."""
        tokenizer = self.tokenizer
        size = tokenizer.resolutions.output_resolution(tokenizer.num_tokens)
        grid = size // tokenizer.config.model.decoder.patch_size
        images = tokenizer.model.apply({"params": decoder_params}, indices,
                                       tokenizer.num_tokens, grid,
                                       method=DetailFlow.decode_indices)
        return jnp.clip(images, -1.0, 1.0)

    def evaluate(self, params, constants, batch: Batch, key):
        if "detailflow_decoder" not in constants:
            raise ValueError("evaluate needs the DetailFlow tokenizer (config.eval.every > 0)")
        labels = batch["label"]
        metrics = {}
        for prefix, correction in (("", False), ("correction_", True)):
            flags = jnp.full(labels.shape, correction)
            logits, targets = self.forward(params, batch, key, flags, train=False)
            loss, accuracy = token_loss(logits, targets)
            metrics.update({f"{prefix}loss": loss, f"{prefix}accuracy": accuracy["accuracy"]})
        keys = sampling.sample_keys(key, 0, labels.shape[0])
        s = self.sampler
        generated, _ = group_decoding.sample_cached(
            self.model, params, labels, keys, s.cfg, s.temperature, top_k=s.top_k,
            top_p=s.top_p, gradual_cfg=s.gradual_cfg)
        both = self._decode(constants["detailflow_decoder"],
                            jnp.concatenate([batch["tokens"][..., 0], generated]))
        # [2, B, S, S, 3]: the data's clean tokens, then the samples of their labels.
        return metrics, both.reshape(2, -1, *both.shape[1:])

    def synthetic_batch(self, batch_size: int) -> Batch:
        m = self.config.model
        rng = np.random.default_rng(0)
        return {"tokens": rng.integers(0, m.vocab_size, (batch_size, m.num_tokens, 3), np.int32),
                "label": rng.integers(0, m.num_classes, (batch_size,), np.int32)}
