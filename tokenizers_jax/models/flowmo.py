"""FlowMo (arXiv:2503.11056): an MMDiT diffusion autoencoder with an LFQ bottleneck.

  encode:  images [B, H, W, 3] in [-1, 1] -> continuous code [B, L, ctx]
  LFQ:     code -> +-1 codes, codeword indices [B, L * ctx / fg]
  decode:  (x_t [B, H, W, 3], t [B], code + mask channel [B, L, ctx + 1]) -> velocity
  sample:  a rectified-flow ODE from noise, guided by the code (see `tokenizers_jax.flow`).

Parameters: {"encoder": ..., "decoder": ...}, mirroring the original's module names.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tokenizers_jax import api, flow, layer_stack, layers
from tokenizers_jax.models.mmdit import MMDiT, TrunkConfig
from tokenizers_jax.models.params import abstract_params, init_params  # noqa: F401 (API)
from tokenizers_jax.quantizers import lfq

Params = Any
# perceptual_fn(images, estimate) -> [B] per-image perceptual distances.
PerceptualFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class FlowMoConfig:
    """The `model` section of a FlowMo config, as a hashable dataclass."""

    image_size: int
    patch_size: int
    code_length: int
    context_dim: int
    codebook_size_for_entropy: int
    encoder: TrunkConfig
    decoder: TrunkConfig
    rope_theta: float = 10000.0
    dtype: str = "float32"
    attention_impl: str = "xla"
    remat: bool = False
    scan_layers: bool = False

    def __post_init__(self):
        if self.context_dim % self.codebook_size_for_entropy:
            raise ValueError(
                f"model.context_dim={self.context_dim} must be divisible by "
                f"model.codebook_size_for_entropy={self.codebook_size_for_entropy}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"model.image_size={self.image_size} is not divisible by "
                f"model.patch_size={self.patch_size}"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.attention_impl not in ("xla", "cudnn"):
            raise ValueError(f"model.attention_impl must be 'xla' or 'cudnn', got "
                             f"{self.attention_impl!r}")

    @classmethod
    def from_config(cls, model: ml_collections.ConfigDict) -> "FlowMoConfig":
        fields = dict(model)
        if fields.pop("name", "flowmo") != "flowmo":
            raise ValueError(f"not a FlowMo config: model.name={model.name!r}")
        for trunk in ("encoder", "decoder"):
            trunk_fields = dict(fields[trunk])
            trunk_fields["axes_dim"] = tuple(trunk_fields["axes_dim"])
            fields[trunk] = TrunkConfig(**trunk_fields)
        return cls(**fields)

    @property
    def tokens_per_image(self) -> int:
        """Codeword indices per image: code_length * context_dim / codebook_size_for_entropy."""
        return self.code_length * self.context_dim // self.codebook_size_for_entropy


class FlowMo(nn.Module):
    config: FlowMoConfig

    def setup(self):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        impl = None if c.attention_impl == "xla" else c.attention_impl
        patch_dim = c.patch_size * c.patch_size * 3
        self.encoder = MMDiT(c.encoder, patch_dim, c.context_dim, c.rope_theta, dtype, impl,
                             c.remat, c.scan_layers)
        self.decoder = MMDiT(c.decoder, patch_dim, c.context_dim + 1, c.rope_theta, dtype, impl,
                             c.remat, c.scan_layers)

    def _grid(self, images: jax.Array) -> tuple[int, int]:
        p = self.config.patch_size
        return images.shape[1] // p, images.shape[2] // p

    def encode(self, images: jax.Array) -> jax.Array:
        """[B, H, W, 3] in [-1, 1] -> continuous code [B, code_length, context_dim] (fp32)."""
        c = self.config
        latents = jnp.zeros((images.shape[0], c.code_length, c.context_dim), jnp.float32)
        tokens = layers.patchify(images, c.patch_size)
        _, code = self.encoder(tokens, latents, self._grid(images), None)
        return code.astype(jnp.float32)

    def decode(self, x_t: jax.Array, t: jax.Array, code: jax.Array) -> jax.Array:
        """Velocity [B, H, W, 3] (fp32) at noisy images x_t, times t [B], code [B, L, ctx + 1]."""
        grid = self._grid(x_t)
        velocity, _ = self.decoder(layers.patchify(x_t, self.config.patch_size), code, grid, t)
        return layers.unpatchify(velocity, grid, self.config.patch_size).astype(jnp.float32)

    def __call__(self, images: jax.Array, t: jax.Array) -> jax.Array:
        """Encode, quantize and decode `images` as their own x_t (creates every parameter)."""
        codes = quantize(self.encode(images), self.config, with_losses=False).codes
        return self.decode(images, t, append_mask(codes))

    def dummy_inputs(self, batch_size: int = 1) -> tuple[jax.Array, jax.Array]:
        size = self.config.image_size
        return jnp.zeros((batch_size, size, size, 3), jnp.float32), jnp.zeros((batch_size,))


def build_model(config: ml_collections.ConfigDict) -> FlowMo:
    """The FlowMo module of a full config (its `model` section)."""
    return FlowMo(FlowMoConfig.from_config(config.model))



def quantize(code: jax.Array, model_config: FlowMoConfig, with_losses: bool,
             quantizer: ml_collections.ConfigDict | None = None) -> lfq.LFQOutput:
    """LFQ of a continuous code with the config's weights (losses 0 unless `with_losses`)."""
    q = quantizer or ml_collections.ConfigDict(
        dict(entropy_weight=0.0, commit_weight=0.0, entropy_temperature=0.1))
    return lfq.lfq(code, model_config.codebook_size_for_entropy, q.entropy_weight,
                   q.commit_weight, q.entropy_temperature, with_losses=with_losses)


def append_mask(codes: jax.Array) -> jax.Array:
    """[B, L, ctx] -> [B, L, ctx + 1]: the decoder's conditioning with a ones mask channel."""
    return jnp.concatenate([codes, jnp.ones((*codes.shape[:2], 1), codes.dtype)], axis=-1)


class TrainingDraws(NamedTuple):
    """The random inputs of one training loss evaluation (replayable)."""

    times: jax.Array  # [B] flow times
    noise: jax.Array  # [B, H, W, 3] epsilon
    keep_code: jax.Array  # [B] bool: False replaces the code by the null code
    posttrain_noise: jax.Array  # [B, H, W, 3] z_1 of the post-training integrator
    posttrain_uniforms: jax.Array  # [B, k + 1] step-size draws of the integrator


def sample_training_draws(key: jax.Array, images_shape: tuple[int, ...],
                          config: ml_collections.ConfigDict) -> TrainingDraws:
    k_time, k_noise, k_keep, k_post_noise, k_post_steps = jax.random.split(key, 5)
    batch = images_shape[0]
    return TrainingDraws(
        times=flow.sample_train_times(k_time, batch, config.loss.time_schedule),
        noise=jax.random.normal(k_noise, images_shape, jnp.float32),
        keep_code=jax.random.uniform(k_keep, (batch,)) > config.loss.code_dropout,
        posttrain_noise=jax.random.normal(k_post_noise, images_shape, jnp.float32),
        posttrain_uniforms=jax.random.uniform(
            k_post_steps, (batch, config.loss.posttrain_sample_k + 1)),
    )


def training_loss(
    model: FlowMo,
    params: Params,
    images: jax.Array,
    key: jax.Array,
    config: ml_collections.ConfigDict,
    perceptual_fn: PerceptualFn | None = None,
    draws: TrainingDraws | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """FlowMo's training loss on one (micro-)batch (spec 5; spec 6 with config.loss.posttrain).

    LFQ entropy statistics come from this batch alone, as the original's per-micro-batch ones.

    Args:
      images: [B, H, W, 3] in [-1, 1].
      perceptual_fn: (images, estimate) -> [B]; weighted by config.loss.perceptual_weight. The
        estimate is the one-step x0 (stage 1A) or the random-step ODE sample (stage 1B).
      draws: explicit random inputs (default: drawn from `key`).
    Returns:
      (total loss, terms): flow, entropy (H_s - H_b), sample_entropy, codebook_entropy, commit,
      quantizer, perceptual, total, and code usage statistics.
    """
    apply = functools.partial(model.apply, {"params": params})
    draws = draws or sample_training_draws(key, images.shape, config)
    images = images.astype(jnp.float32)
    q = quantize(apply(images, method=FlowMo.encode), model.config, True, config.quantizer)
    code = append_mask(q.codes)
    code_in = jnp.where(draws.keep_code[:, None, None], code, jnp.zeros_like(code))

    t = draws.times[:, None, None, None]
    x_t = (1 - t) * images + t * draws.noise
    velocity = apply(x_t, draws.times, code_in, method=FlowMo.decode)
    flow_loss = jnp.mean(jnp.square(draws.noise - velocity - images))

    perceptual = jnp.zeros((), jnp.float32)
    if perceptual_fn is not None and config.loss.perceptual_weight:
        if config.loss.posttrain:
            times = flow.random_step_times(draws.posttrain_uniforms)
            decode = lambda z, t_: apply(z, t_, code, method=FlowMo.decode)
            estimate = flow.integrate_random_steps(decode, draws.posttrain_noise, times)
        else:
            estimate = x_t - t * velocity
        perceptual = jnp.mean(perceptual_fn(images, estimate))
    total = flow_loss + q.loss + config.loss.perceptual_weight * perceptual
    usage = jnp.zeros(2**model.config.codebook_size_for_entropy).at[q.indices.ravel()].add(1.0)
    terms = dict(
        total=total,
        flow=flow_loss,
        entropy=q.sample_entropy - q.codebook_entropy,
        sample_entropy=q.sample_entropy,
        codebook_entropy=q.codebook_entropy,
        commit=q.commitment,
        quantizer=q.loss,
        perceptual=perceptual,
        code_usage=jnp.mean(usage > 0),
    )
    return total, terms


def sample(model: FlowMo, params: Params, codes: jax.Array, noise: jax.Array,
           sampler: ml_collections.ConfigDict) -> jax.Array:
    """Decodes +-1 codes [B, L, ctx] from noise [B, H, W, 3] with the config's sampler.

    Returns images [B, H, W, 3] fp32, clipped to [-1, 1].
    """
    times = flow.sampler_times(sampler.steps, sampler.schedule)
    guided = flow.guided_steps(times, sampler.cfg, sampler.cfg_interval_sigma)
    code = append_mask(codes)
    decode = lambda z, t, c: model.apply({"params": params}, z, t, c, method=FlowMo.decode)
    z = flow.euler_sample(decode, noise, code, jnp.zeros_like(code), times, guided, sampler.cfg)
    return jnp.clip(z, -1.0, 1.0)


def reconstruct(model: FlowMo, params: Params, images: jax.Array, key: jax.Array,
                config: ml_collections.ConfigDict, noise: jax.Array | None = None) -> jax.Array:
    """Encode, quantize (eval mode) and sample: [B, H, W, 3] in [-1, 1] -> same."""
    code = model.apply({"params": params}, images, method=FlowMo.encode)
    codes = quantize(code, model.config, with_losses=False).codes
    if noise is None:
        noise = jax.random.normal(key, images.shape, jnp.float32)
    return sample(model, params, codes, noise, config.sampler)


class FlowMoTokenizer(api.Tokenizer):
    """`load_tokenizer` front end. Indices are LFQ codewords: [B, tokens_per_image] int32."""

    def __init__(self, config: ml_collections.ConfigDict, params: Params):
        self.model = build_model(config)
        # Params of either block layout (stacked or not) are read into the config's.
        super().__init__(config, layer_stack.match_layout(params, abstract_params(self.model)))
        self._encode = jax.jit(self._encode_impl)
        self._decode = jax.jit(self._decode_impl, static_argnames=("sampler",))

    def _encode_impl(self, params, images):
        code = self.model.apply({"params": params}, images, method=FlowMo.encode)
        return quantize(code, self.model.config, with_losses=False).indices

    def _decode_impl(self, params, indices, noise, sampler):
        c = self.model.config
        codes = lfq.indices_to_codes(indices, c.codebook_size_for_entropy, c.code_length)
        return sample(self.model, params, codes, noise, ml_collections.ConfigDict(dict(sampler)))

    def encode(self, images: Any, *, image_size: int | None = None) -> jax.Array:
        """uint8 or [-1, 1] float images [B, S, S, 3] -> int32 indices [B, tokens_per_image].

        Args:
          image_size: S, the side the images must have (default: the config's image_size, the
            size the model was trained at). Pass another S to encode, and then decode with the
            same `image_size=`, at a size the model was not trained at.
        """
        c = self.model.config
        images = api.prepare_images(images, c.patch_size)
        size = image_size or c.image_size
        if images.shape[1:3] != (size, size):
            raise ValueError(
                f"this FlowMo encodes {size}x{size} images, got {images.shape[1]}x"
                f"{images.shape[2]}; resize or center-crop them to {size}x{size}, or pass "
                f"image_size={images.shape[1]} to encode (and decode) at another square size.")
        return self._encode(self.params, images)

    def reconstruct(self, images: Any, *, image_size: int | None = None, **kwargs) -> jax.Array:
        """encode then decode at the same size: [B, S, S, 3] -> float32 [B, S, S, 3] in [-1, 1].

        Args:
          image_size: as in `encode` (default: the config's image_size).
          kwargs: `decode`'s seed, noise, steps, cfg.
        """
        indices = self.encode(images, image_size=image_size)
        return self.decode(indices, image_size=image_size, **kwargs)

    def decode(self, indices: Any, *, seed: int = 0, noise: jax.Array | None = None,
               image_size: int | None = None, steps: int | None = None,
               cfg: float | None = None) -> jax.Array:
        """int indices [B, tokens_per_image] -> images [B, S, S, 3] in [-1, 1].

        Args:
          seed: seeds the starting noise (ignored when `noise` is given).
          noise: explicit z_1 [B, S, S, 3].
          image_size: S (default: the config's image_size).
          steps / cfg: override the config's sampler.
        """
        c = self.model.config
        expected = c.tokens_per_image
        shape = np.shape(indices)
        if len(shape) != 2 or shape[1] != expected:
            raise ValueError(f"expected indices shaped [B, {expected}], got {shape}")
        indices = api.check_indices(indices, 2**c.codebook_size_for_entropy)
        size = image_size or c.image_size
        if size % c.patch_size:
            raise ValueError(f"image_size {size} is not divisible by the patch size {c.patch_size}")
        shape = (indices.shape[0], size, size, 3)
        if noise is None:
            noise = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must be shaped {shape}, got {tuple(noise.shape)}")
        sampler = dict(self.config.sampler)
        sampler["cfg_interval_sigma"] = tuple(sampler["cfg_interval_sigma"])
        if steps is not None:
            sampler["steps"] = steps
        if cfg is not None:
            sampler["cfg"] = cfg
        frozen = tuple(sorted(sampler.items()))
        return self._decode(self.params, jnp.asarray(indices), noise, frozen)
