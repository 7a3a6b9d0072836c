"""DetailFlow (arXiv:2505.21473): a 1D coarse-to-fine tokenizer (spec 1-4).

  images [B, R, R, 3] -> SigLIP2 encoder with N appended causal query tokens -> quant_conv
  -> VQ (unit codes) -> first t codes -> post_quant_conv -> decoder over G x G mask tokens
  -> to_pixel -> [B, pG, pG, 3], with pG = R(t) rounded up to a multiple of the patch size
  p (coarse to fine).

Static shapes: the decoder always takes all N code slots and masks the keys of slots >= t
(exact: masked keys get zero attention weight), so a compiled decoder exists per output grid
only. Self-correction uses the traced noise index as a mask over the fixed N query slots.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tokenizers_jax import api, layers
from tokenizers_jax.detailflow_resolution import ResolutionMap
from tokenizers_jax.layers import EMBED, IO, MLP, Dense
from tokenizers_jax.models.siglip import SiglipViT, vit_from_config
from tokenizers_jax.quantizers.vq import (
    VectorQuantizer,
    VQOutput,
    draw_neighbour_ranks,
    l2_normalize,
)

Dtype = Any


def encoder_attention_mask(
    num_patches: int, num_latents: int, group_size: int, causal_num: int
) -> np.ndarray:
    """The encoder's boolean mask over [patches ; latents] (True = may attend; spec 1.1).

    Patches see only patches. Latent i sees every patch, and latents j <= i if i < causal_num
    (token-causal), else latents j < g * (i // g + 1) (earlier groups and its whole group).

    Returns:
      [L, L] bool, L = num_patches + num_latents.
    """
    if num_latents % group_size or causal_num % group_size:
        raise ValueError("num_latents and causal_num must be multiples of group_size")
    length = num_patches + num_latents
    mask = np.zeros((length, length), bool)
    mask[:num_patches, :num_patches] = True
    mask[num_patches:, :num_patches] = True
    i = np.arange(num_latents)[:, None]
    j = np.arange(num_latents)[None, :]
    group_end = group_size * (i // group_size + 1)
    mask[num_patches:, num_patches:] = np.where(i < causal_num, j <= i, j < group_end)
    return mask


def _token_table(name: str, module: nn.Module, shape, init) -> jax.Array:
    return module.param(name, nn.with_logical_partitioning(init, (None, EMBED)), shape)


class DetailFlowEncoder(nn.Module):
    """SigLIP2 tower over [patches ; N latent queries] with the causal-group mask (spec 1.1)."""

    vit: SiglipViT
    num_latent_tokens: int
    group_size: int
    causal_num: int

    def setup(self):
        shape = (self.num_latent_tokens, self.vit.width)
        normal = nn.initializers.normal(0.02)
        self.latent_tokens = _token_table("latent_tokens", self, shape, normal)
        self.refined_tokens = _token_table("refined_tokens", self, shape, normal)
        self.latent_pos_embed = _token_table("latent_pos_embed", self, shape, normal)

    def __call__(
        self,
        images: jax.Array,
        refine_inputs: jax.Array | None = None,
        refine_end: jax.Array | int = 0,
    ) -> jax.Array:
        """Encodes images into N latent features.

        Args:
          images: [B, H, W, 3] in [-1, 1], H and W multiples of the patch size.
          refine_inputs: optional [B, N, width]: the self-correction pass 2, whose query slots
            < refine_end take these inputs and the rest the learned `refined_tokens`.
          refine_end: int scalar (may be traced).
        Returns:
          [B, N, width] post-LayerNorm latent outputs.
        """
        b = images.shape[0]
        p = self.vit.patch_size
        grid = (images.shape[1] // p, images.shape[2] // p)
        patches = self.vit.embed(layers.patchify(images, p), grid)  # [B, P, width]
        if refine_inputs is None:
            queries = jnp.broadcast_to(self.latent_tokens, (b, *self.latent_tokens.shape))
        else:
            slot = jnp.arange(self.num_latent_tokens)[None, :, None]
            queries = jnp.where(slot < refine_end, refine_inputs, self.refined_tokens[None])
        queries = (queries + self.latent_pos_embed).astype(patches.dtype)
        mask = encoder_attention_mask(
            patches.shape[1], self.num_latent_tokens, self.group_size, self.causal_num
        )
        hidden = self.vit.transform(jnp.concatenate([patches, queries], axis=1), jnp.asarray(mask))
        return hidden[:, patches.shape[1]:]


class DetailFlowDecoder(nn.Module):
    """G x G mask tokens + the first t latents, full attention, to_pixel (spec 1.3)."""

    vit: SiglipViT  # without patch embedding
    num_latent_tokens: int

    def setup(self):
        width = self.vit.width
        self.mask_token = self.param(
            "mask_token",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (EMBED,)),
            (width,),
        )
        self.latent_pos_embed = _token_table(
            "latent_pos_embed", self, (self.num_latent_tokens, width), nn.initializers.normal(0.02)
        )
        p = self.vit.patch_size
        self.to_pixel = Dense(p * p * 3, kernel_axes=(EMBED, IO), dtype=self.vit.dtype)

    def __call__(self, latents: jax.Array, num_tokens: jax.Array | int, grid: int) -> jax.Array:
        """Decodes the first `num_tokens` latents into an image of grid x grid patches.

        Args:
          latents: [B, L, width] post_quant_conv outputs, L <= N; slots >= num_tokens ignored.
          num_tokens: int scalar or [B] (may be traced), 1 <= num_tokens <= L.
          grid: static output grid side G.
        Returns:
          [B, G * p, G * p, 3] float32, unclamped.
        """
        b, length, width = latents.shape
        positions = self.vit.positions((grid, grid))
        canvas = jnp.broadcast_to(self.mask_token + positions, (b, grid * grid, width))
        latents = latents + self.latent_pos_embed[:length]
        tokens = jnp.concatenate([canvas.astype(latents.dtype), latents], axis=1)
        key_slot = jnp.arange(grid * grid + length) - grid * grid  # < 0 for the canvas
        limit = jnp.broadcast_to(jnp.asarray(num_tokens), (b,))
        mask = key_slot[None, :] < limit[:, None]  # [B, L_total]
        hidden = self.vit.transform(tokens, mask[:, None, None, :])
        pixels = self.to_pixel(hidden[:, : grid * grid]).astype(jnp.float32)
        return layers.unpatchify(pixels, (grid, grid), self.vit.patch_size)


class AlignmentHead(nn.Module):
    """`global_token_proj`: Linear(8, h) - SiLU - Linear(h, h) - SiLU - Linear(h, out) (spec 4)."""

    hidden: int
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.silu(Dense(self.hidden, kernel_axes=(IO, EMBED), dtype=self.dtype, name="fc1")(x))
        x = nn.silu(Dense(self.hidden, kernel_axes=(EMBED, MLP), dtype=self.dtype, name="fc2")(x))
        return Dense(self.features, kernel_axes=(MLP, EMBED), dtype=self.dtype, name="fc3")(x)


class SelfCorrection(NamedTuple):
    """Outputs of the two-pass self-correction encode (spec 3); shapes for [B, N] tokens."""

    quant_clean: jax.Array  # [B, N, D] pass-1 straight-through codes
    quant: jax.Array  # [B, N, D] sg(clean prefix ; perturbed slots) ; pass-2 codes after
    indices: jax.Array  # [B, N, 3] int32: clean / input / label
    codebook_loss: jax.Array  # scalar, the two passes mixed as the original
    commitment_loss: jax.Array  # scalar
    noise_end: jax.Array  # int32 scalar: first slot re-encoded by pass 2


class DetailFlow(nn.Module):
    """The DetailFlow tokenizer: encoder, VQ, decoder, refine_conv and the alignment head.

    The frozen teacher is a separate `SiglipViT` with its own params (see `alignment_target`).
    """

    encoder: DetailFlowEncoder
    decoder: DetailFlowDecoder
    codebook_size: int
    codebook_dim: int
    commit_beta: float
    neighbour_top_k: int
    alignment_hidden: int
    alignment_features: int
    dtype: Dtype = jnp.float32

    def setup(self):
        enc_width, dec_width = self.encoder.vit.width, self.decoder.vit.width
        self.quant_conv = Dense(self.codebook_dim, kernel_axes=(EMBED, IO), dtype=self.dtype)
        self.post_quant_conv = Dense(dec_width, kernel_axes=(IO, EMBED), dtype=self.dtype)
        self.refine_conv = Dense(enc_width, kernel_axes=(IO, EMBED), dtype=self.dtype)
        self.quantize = VectorQuantizer(self.codebook_size, self.codebook_dim, self.commit_beta)
        self.global_token_proj = AlignmentHead(
            self.alignment_hidden, self.alignment_features, self.dtype
        )

    @property
    def causal_num(self) -> int:
        return self.encoder.causal_num

    def encode(self, images: jax.Array, neighbour_ranks: jax.Array | None = None) -> VQOutput:
        """Clean encode: [B, R, R, 3] in [-1, 1] -> VQOutput over N tokens (indices [B, N])."""
        return self.quantize(
            self.quant_conv(self.encoder(images)), neighbour_ranks=neighbour_ranks,
            top_k=self.neighbour_top_k,
        )

    def decode(self, codes: jax.Array, num_tokens: jax.Array | int, grid: int) -> jax.Array:
        """[B, L, D] unit codes -> [B, pG, pG, 3] from the first num_tokens codes."""
        return self.decoder(self.post_quant_conv(codes), num_tokens, grid)

    def decode_indices(self, indices: jax.Array, num_tokens: jax.Array | int, grid: int):
        """[B, L] int codes -> [B, pG, pG, 3] from the first num_tokens codes."""
        return self.decode(self.quantize.lookup(indices), num_tokens, grid)

    def self_correction(
        self, images: jax.Array, noise_idx: jax.Array | int, neighbour_ranks: jax.Array
    ) -> SelfCorrection:
        """The two-pass self-correction encode (spec 3).

        Args:
          images: [B, R, R, 3] in [-1, 1].
          noise_idx: int scalar (may be traced) in [0, N); slot noise_idx (if < causal_num) or
            the group starting there is replaced by random top-k neighbours.
          neighbour_ranks: [B, N] ints in [0, top_k): the neighbour drawn for every slot
            (see `quantizers.vq.draw_neighbour_ranks`).
        """
        num_tokens = self.encoder.num_latent_tokens
        noise_idx = jnp.asarray(noise_idx, jnp.int32)
        noise_num = jnp.where(noise_idx < self.causal_num, 1, self.encoder.group_size)
        noise_end = noise_idx + noise_num
        slot = jnp.arange(num_tokens)[None, :]

        clean = self.encode(images, neighbour_ranks)
        perturbed = jax.lax.stop_gradient(
            jnp.where((slot < noise_idx)[..., None], clean.quantized, clean.neighbours)
        )
        refine_inputs = self.refine_conv(perturbed)
        hidden = self.encoder(images, refine_inputs, noise_end)
        second = self.quantize(self.quant_conv(hidden), loss_start=noise_end)

        before_end = slot < noise_end
        quant = jnp.where(before_end[..., None], perturbed, second.quantized)
        index_input = jnp.where(
            slot < noise_idx, clean.indices, jnp.where(before_end, clean.neighbour_indices,
                                                       second.indices)
        )
        index_label = jnp.where(before_end, clean.indices, second.indices)
        indices = jnp.stack([clean.indices, index_input, index_label], axis=-1)

        total = 2 * num_tokens - noise_end
        w_clean = num_tokens / total
        w_second = (num_tokens - noise_end) / total
        return SelfCorrection(
            quant_clean=clean.quantized,
            quant=quant,
            indices=indices,
            codebook_loss=clean.codebook_loss * w_clean + second.codebook_loss * w_second,
            commitment_loss=clean.commitment_loss * w_clean
            + second.commitment_loss * w_second,
            noise_end=noise_end,
        )

    def align_first_token(self, first_code: jax.Array) -> jax.Array:
        """[B, D] first clean code -> [B, teacher width] l2-normalised prediction (spec 4)."""
        return l2_normalize(self.global_token_proj(first_code).astype(jnp.float32))

    def __call__(
        self,
        images: jax.Array,
        noise_idx: jax.Array | int,
        neighbour_ranks: jax.Array,
        num_tokens: jax.Array | int,
        grid: int,
    ) -> dict[str, Any]:
        """The training forward with self-correction (also initialises every parameter).

        Returns a dict: `reconstructions` [2B, pG, pG, 3] (the clean codes, then the
        corrected ones, decoded from their first num_tokens), `correction` (SelfCorrection)
        and `first_token` ([B, teacher width], the alignment prediction).
        """
        correction = self.self_correction(images, noise_idx, neighbour_ranks)
        codes = jnp.concatenate([correction.quant_clean, correction.quant], axis=0)
        return dict(
            reconstructions=self.decode(codes, num_tokens, grid),
            correction=correction,
            first_token=self.align_first_token(correction.quant_clean[:, 0]),
        )


def alignment_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """mean_b(-cos): both [B, F] already l2-normalised (spec 4; weight applied by the caller)."""
    return jnp.mean(-jnp.sum(prediction * target, axis=-1))


def alignment_target(teacher: SiglipViT, teacher_params: Any, images: jax.Array) -> jax.Array:
    """The teacher's first-token target (spec 4): SigLIP2 on the clean image, post LayerNorm
    applied a second time (as the original's `forward_features`), mean over patches, l2-norm.

    Args:
      teacher: the 27-layer so400m tower (`teacher_from_config`).
      teacher_params: its params.
      images: [B, R, R, 3] in [-1, 1].
    Returns:
      [B, width] fp32, gradient-stopped.
    """

    def features(module: SiglipViT, x: jax.Array) -> jax.Array:
        return module.post_layernorm(module(x))

    hidden = teacher.apply({"params": teacher_params}, images, method=features)
    target = l2_normalize(jnp.mean(hidden.astype(jnp.float32), axis=1))
    return jax.lax.stop_gradient(target)


def _dtype(model_config: ml_collections.ConfigDict):
    if model_config.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"model.dtype must be float32 or bfloat16, got {model_config.dtype!r}")
    return jnp.dtype(model_config.dtype)


def teacher_from_config(config: ml_collections.ConfigDict) -> SiglipViT:
    """The frozen first-token teacher (full SigLIP2 so400m) of a DetailFlow config."""
    model = config.model
    return vit_from_config(model.teacher, _dtype(model), model.attention_impl)


def model_from_config(config: ml_collections.ConfigDict) -> DetailFlow:
    """The `DetailFlow` module of a configs/detailflow.py config."""
    model = config.model
    dtype = _dtype(model)
    encoder = DetailFlowEncoder(
        vit=vit_from_config(model.encoder, dtype, model.attention_impl),
        num_latent_tokens=model.num_latent_tokens,
        group_size=model.group_size,
        causal_num=model.causal_num,
    )
    decoder = DetailFlowDecoder(
        vit=vit_from_config(model.decoder, dtype, model.attention_impl, use_patch_embedding=False),
        num_latent_tokens=model.num_latent_tokens,
    )
    return DetailFlow(
        encoder=encoder,
        decoder=decoder,
        codebook_size=model.codebook_size,
        codebook_dim=model.codebook_dim,
        commit_beta=model.commit_beta,
        neighbour_top_k=model.neighbour_top_k,
        alignment_hidden=model.alignment_hidden,
        alignment_features=model.teacher.width,
        dtype=dtype,
    )


def init_params(config: ml_collections.ConfigDict, key: jax.Array, abstract: bool = False):
    """Random params of the DetailFlow model (`abstract=True`: ShapeDtypeStructs only)."""
    model = model_from_config(config)
    m = config.model
    n = m.num_latent_tokens
    images = jnp.zeros((1, m.image_size, m.image_size, 3), jnp.float32)
    ranks = jnp.zeros((1, n), jnp.int32)
    grid = m.image_size // m.decoder.patch_size

    def init(k):
        variables = model.init(k, images, 0, ranks, n, grid)
        return nn.unbox(variables["params"])

    return jax.eval_shape(init, key) if abstract else jax.jit(init)(key)


class DetailFlowTokenizer(api.Tokenizer):
    """DetailFlow behind the common `Tokenizer` interface.

      tok = load_tokenizer(DIR)
      indices = tok.encode(images)                  # int32 [B, N]
      coarse = tok.decode(indices, num_tokens=16)   # [B, R(16)->48, 48, 3]
      full = tok.reconstruct(images)                # all N tokens at full resolution

    Decoders are compiled once per output resolution (batch shape aside); the prefix length
    is a traced mask over the code slots of that resolution (`decoder_slots`).
    """

    def __init__(self, config: ml_collections.ConfigDict, params: Any):
        super().__init__(config, params)
        self.model = model_from_config(config)
        self.resolutions = ResolutionMap.from_config(config.model)
        self.num_tokens = config.model.num_latent_tokens
        model = self.model
        self._encode = jax.jit(
            lambda p, x: model.apply({"params": p}, x, method=DetailFlow.encode).indices
        )
        self._decode = jax.jit(
            lambda p, idx, n, grid: model.apply(
                {"params": p}, idx, n, grid, method=DetailFlow.decode_indices
            ),
            static_argnums=3,
        )
        self._correct = jax.jit(
            lambda p, x, noise_idx, ranks: model.apply(
                {"params": p}, x, noise_idx, ranks, method=DetailFlow.self_correction
            ).indices
        )

    def prepare(self, images: Any) -> jax.Array:
        """Validates [B, R, R, 3] images (uint8 or [-1, 1] floats) -> float32 in [-1, 1]."""
        m = self.config.model
        images = api.prepare_images(images, m.encoder.patch_size)
        if images.shape[1:3] != (m.image_size, m.image_size):
            raise ValueError(
                f"DetailFlow encodes {m.image_size}x{m.image_size} images, got "
                f"{images.shape[1]}x{images.shape[2]}; resize or center-crop to {m.image_size}."
            )
        return images

    def encode(self, images: Any) -> jax.Array:
        """[B, R, R, 3] uint8 or [-1, 1] floats -> int32 [B, N] indices, coarse to fine."""
        return self._encode(self.params, self.prepare(images))

    def encode_self_correction(self, images: Any, noise_idx: int, seed: int = 0) -> jax.Array:
        """The (B, N, 3) index stack clean / input / label of spec 3 (code extraction).

        The perturbed token (noise_idx < causal_num) or group gets random top-k neighbours
        drawn from `jax.random.PRNGKey(seed)`.
        """
        m = self.config.model
        single = 0 <= noise_idx < m.causal_num
        group = noise_idx % m.group_size == 0 and m.causal_num <= noise_idx < self.num_tokens
        if not (single or group):
            raise ValueError(
                f"noise_idx must be in [0, {m.causal_num}) or a group start < {self.num_tokens}"
                f" (a multiple of {m.group_size}), got {noise_idx}"
            )
        images = self.prepare(images)
        ranks = draw_neighbour_ranks(
            jax.random.PRNGKey(seed), (images.shape[0], self.num_tokens),
            m.neighbour_top_k,
        )
        return self._correct(self.params, images, noise_idx, ranks)

    def decode(self, indices: Any, num_tokens: int | None = None, resolution: int | None = None):
        """Token indices -> float32 [B, S, S, 3], clipped to [-1, 1] (`DetailFlow.decode`,
        like the original decoder, is unclamped).

        Args:
          indices: int [B, L], L <= N (a prefix of the coarse-to-fine sequence).
          num_tokens: decode the first num_tokens (default L).
          resolution: output size S (a multiple of the decoder patch size); default R(n)
            rounded up to a multiple of the patch size, the size the model was trained at.
        """
        indices = np.asarray(indices)
        if indices.ndim != 2 or not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(f"indices must be integers shaped [B, L], got {indices.dtype} "
                             f"{indices.shape}")
        length = indices.shape[1]
        if not 1 <= length <= self.num_tokens:
            raise ValueError(f"expected 1..{self.num_tokens} tokens per image, got {length}")
        indices = api.check_indices(indices, self.config.model.codebook_size)
        num_tokens = length if num_tokens is None else int(num_tokens)
        if not 1 <= num_tokens <= length:
            raise ValueError(f"num_tokens must be in [1, {length}], got {num_tokens}")
        patch = self.config.model.decoder.patch_size
        if resolution is None:
            resolution = self.resolutions.output_resolution(num_tokens)
        if resolution <= 0 or resolution % patch:
            raise ValueError(f"resolution must be a positive multiple of {patch}, got {resolution}")
        slots = self.decoder_slots(num_tokens, resolution)
        padded = np.zeros((indices.shape[0], slots), np.int32)
        padded[:, :min(length, slots)] = indices[:, :slots]
        images = self._decode(self.params, padded, num_tokens, resolution // patch)
        return jnp.clip(images, -1.0, 1.0)

    def decoder_slots(self, num_tokens: int, resolution: int) -> int:
        """How many code slots the decoder takes for a prefix of num_tokens at `resolution`:
        the longest prefix whose trained resolution is `resolution` (so that coarse decodes do
        not attend over up to N - n masked slots), else all N. A function of the resolution
        alone in the first case, so still one compiled decoder per output size."""
        longest = max((n for n in range(1, self.num_tokens + 1)
                       if self.resolutions.output_resolution(n) == resolution), default=0)
        return longest if num_tokens <= longest else self.num_tokens

    def reconstruct(self, images: Any, num_tokens: int | None = None, resolution: int | None = None):
        """Encode, then decode the first num_tokens (default N) at R(num_tokens)."""
        return self.decode(self.encode(images), num_tokens=num_tokens, resolution=resolution)
