"""MaskGIT training on a FlowMo token export (maskgit.md section 3).

One step on a batch {"tokens": int32 [B, P * S] FlowMo indices, "label": int32 [B]}:
  tokens -> [B, P, S] (`models.maskgit.flowmo_to_maskgit`) -> N = P * S sub-tokens masked
  (`training_mask`: a ratio gamma(u), u ~ U(0, 1), per image; each sub-token masked with
  probability gamma ("bernoulli", MaskBit) or exactly max(1, round(N gamma)) of them chosen at
  random ("exact_count", 1d-tokenizer)) -> labels replaced by the null label with probability
  loss.label_drop (for CFG) -> logits -> cross-entropy with label smoothing, weight 1 on masked
  and loss.unmasked_weight on unmasked sub-tokens, normalised by the weight sum (1: every
  sub-token, MaskBit; 0: masked only, MaskGIT; 0.1: 1d-tokenizer).

`evaluate` (the loop's periodic evaluation) reports the loss on the evaluation tokens and
returns two grid rows decoded by the FlowMo tokenizer: the evaluation tokens themselves and
samples generated for their labels (`config.sampler`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from tokenizers_jax import sampling
from tokenizers_jax.data import tokens as token_data
from tokenizers_jax.models import flowmo, maskgit
from tokenizers_jax.models.maskgit_sampler import MASK_SCHEDULES, SamplerConfig, mask_ratio
from tokenizers_jax.quantizers import lfq
from tokenizers_jax.tasks.base import Batch, Params
from tokenizers_jax.tasks.token_generator import TokenGeneratorTask

MASK_METHODS = ("bernoulli", "exact_count")


class MaskDraws(NamedTuple):
    """The random inputs of the training masks of a batch."""

    ratio_uniform: jax.Array  # [B] u, the mask ratio is gamma(u)
    unit_uniform: jax.Array  # [B, N] per sub-token uniforms


def sample_mask_draws(key: jax.Array, batch: int, num_units: int) -> MaskDraws:
    ratio_key, unit_key = jax.random.split(key)
    return MaskDraws(jax.random.uniform(ratio_key, (batch,)),
                     jax.random.uniform(unit_key, (batch, num_units)))


def training_mask(draws: MaskDraws, schedule: str, method: str) -> tuple[jax.Array, jax.Array]:
    """(bool [B, N] masked sub-tokens, float [B] mask ratio gamma(u)).

    bernoulli: unit_uniform < gamma. exact_count: the max(1, round(N gamma)) sub-tokens with
    the smallest unit_uniform (a uniformly random subset of that size).
    """
    ratio = mask_ratio(draws.ratio_uniform, schedule)
    if method == "bernoulli":
        return draws.unit_uniform < ratio[:, None], ratio
    if method != "exact_count":
        raise ValueError(f"unknown masking.method {method!r}; choose one of {MASK_METHODS}")
    num_units = draws.unit_uniform.shape[-1]
    count = jnp.maximum(1, jnp.round(num_units * ratio)).astype(jnp.int32)
    ranks = jnp.argsort(jnp.argsort(draws.unit_uniform, axis=-1), axis=-1)
    return ranks < count[:, None], ratio


def token_loss(logits: jax.Array, targets: jax.Array, masked: jax.Array,
               label_smoothing: float, unmasked_weight: float
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted label-smoothed cross-entropy (fp32).

    Args:
      logits: [..., K]; targets: int [...]; masked: bool [...].
    Returns:
      (sum w CE / sum w with w = 1 on masked and unmasked_weight elsewhere, metrics:
      masked_loss (the same CE over masked sub-tokens), masked_accuracy, mask_ratio).
    """
    logits = logits.astype(jnp.float32)
    smoothed = optax.smooth_labels(jax.nn.one_hot(targets, logits.shape[-1]), label_smoothing)
    cross_entropy = optax.softmax_cross_entropy(logits, smoothed)

    def weighted_mean(values, weights):
        total = jnp.sum(weights)
        return jnp.sum(weights * values) / jnp.where(total > 0, total, 1.0)

    weights = jnp.where(masked, 1.0, unmasked_weight)
    masked_f = masked.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return weighted_mean(cross_entropy, weights), dict(
        masked_loss=weighted_mean(cross_entropy, masked_f),
        masked_accuracy=weighted_mean(correct, masked_f),
        mask_ratio=jnp.mean(masked_f))


class MaskGITTask(TokenGeneratorTask):
    """MaskGIT: params of `models.maskgit.MaskGIT`; batches of exported FlowMo tokens."""

    title = "MaskGIT"

    def __init__(self, config: ml_collections.ConfigDict):
        self.model = maskgit.build_model(config)
        self.sampler = SamplerConfig.from_config(config.sampler)
        if config.masking.schedule not in MASK_SCHEDULES:
            raise ValueError(f"masking.schedule={config.masking.schedule!r}; choose one of "
                             f"{MASK_SCHEDULES}")
        if config.masking.method not in MASK_METHODS:
            raise ValueError(f"masking.method={config.masking.method!r}; choose one of "
                             f"{MASK_METHODS}")
        if config.loss.unmasked_weight < 0 or not 0 <= config.loss.label_drop < 1:
            raise ValueError("loss.unmasked_weight must be >= 0 and loss.label_drop in [0, 1)")
        super().__init__(config)

    def check_export(self, path, manifest):
        c = self.model.config
        token_data.check_manifest(manifest, tokens_per_image=c.num_units,
                                  codebook_size=c.codebook_size, kind="flowmo_lfq",
                                  num_classes=c.num_classes, where="the MaskGIT config (model.*)")
        self.check_tokenizer_model(manifest["tokenizer_config"]["model"],
                                   f"the FlowMo of token export {path}")

    def check_tokenizer_model(self, tokenizer_model, what):
        maskgit.check_flowmo_model(self.model.config, tokenizer_model, what)

    def init_params(self, key: jax.Array) -> Params:
        return self.model.init(key, *self.model.dummy_inputs(1))["params"]

    @property
    def constants(self) -> Any:
        """The FlowMo decoder params when the run evaluates (only the decoder is needed)."""
        if not self.evaluates:
            return {}
        return {"flowmo_decoder": self.tokenizer.params["decoder"]}

    def _loss(self, params, batch: Batch, key: jax.Array, train: bool):
        c = self.model.config
        targets = maskgit.flowmo_to_maskgit(batch["tokens"], c)  # [B, P, S]
        batch_size = targets.shape[0]
        mask_key, label_key, dropout_key = jax.random.split(key, 3)
        draws = sample_mask_draws(mask_key, batch_size, c.num_units)
        masked, _ = training_mask(draws, self.config.masking.schedule,
                                  self.config.masking.method)
        masked = masked.reshape(targets.shape)
        inputs = jnp.where(masked, c.codebook_size, targets)
        labels = batch["label"]
        if train:
            drop = jax.random.uniform(label_key, (batch_size,)) < self.config.loss.label_drop
            labels = jnp.where(drop, c.num_classes, labels)
        logits = self.model.apply({"params": params}, inputs, labels, deterministic=not train,
                                  rngs={"dropout": dropout_key} if train else None)
        return token_loss(logits, targets, masked, self.config.loss.label_smoothing,
                          self.config.loss.unmasked_weight)

    def loss(self, params, constants, batch: Batch, key):
        del constants
        return self._loss(params, batch, key, train=True)

    def _flowmo_decode(self, decoder_params, indices: jax.Array, keys: jax.Array) -> jax.Array:
        """FlowMo indices [B, N] -> images [B, S, S, 3] by the tokenizer's own sampler."""
        model = self.tokenizer.model
        c = model.config
        codes = lfq.indices_to_codes(indices, c.codebook_size_for_entropy, c.code_length)
        noise = maskgit.decoding_noise(keys, c.image_size)
        return flowmo.sample(model, {"decoder": decoder_params}, codes, noise,
                             self.tokenizer.config.sampler)

    def evaluate(self, params, constants, batch: Batch, key):
        loss_key, sample_key = jax.random.split(key)
        loss, metrics = self._loss(params, batch, loss_key, train=False)
        metrics = {"loss": loss, **metrics}
        if "flowmo_decoder" not in constants:
            raise ValueError("evaluate needs the FlowMo tokenizer (config.eval.every > 0)")
        keys = sampling.sample_keys(sample_key, 0, batch["label"].shape[0])
        generated = maskgit.generate_tokens(self.model, params, batch["label"], keys,
                                            self.sampler)
        both = self._flowmo_decode(constants["flowmo_decoder"],
                                   jnp.concatenate([batch["tokens"], generated]),
                                   jnp.concatenate([keys, keys]))
        # [2, B, S, S, 3]: the data's tokens, then the samples, each with sample i's noise.
        return metrics, both.reshape(2, -1, *both.shape[1:])

    def synthetic_batch(self, batch_size: int) -> Batch:
        c = self.model.config
        rng = np.random.default_rng(0)
        return {"tokens": rng.integers(0, c.codebook_size, (batch_size, c.num_units), np.int32),
                "label": rng.integers(0, c.num_classes, (batch_size,), np.int32)}
