"""DetailFlow's class-conditional generator (spec 6): LlamaGen's GPT with the PAR-style group
layout (`models.group_layout`: sequence, block mask, 2D RoPE), and `DetailFlowGenerator`, its
`api.Generator`.

  model = model_from_config(config)                      # configs/detailflow_ar.py
  params = init_params(config, key)
  logits = model.apply({"params": params}, labels, tokens[:, :N - g], deterministic=False,
                       rngs={"dropout": key})           # training: fp32 [B, N, V]

Sampling (`models.group_decoding`) draws the first c tokens one by one, then g tokens per
forward pass; its cached sampler computes every position once with `GPT.decode_step`.

Parameters carry logical axis names (layers.py); the Flax names follow the original's keys
(`layers_i/attention/wqkv`, `layers_i/feed_forward/w1`, ...), so the importer
(`convert.detailflow_gpt`) is a table of renames.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tokenizers_jax import api, layers, sampling
from tokenizers_jax.layers import EMBED, HEADS, MLP, VOCAB, Dense, RMSNorm
from tokenizers_jax.models import group_decoding
from tokenizers_jax.models.group_layout import (
    attention_mask,
    input_slots,
    rope_angles,
    sequence_length,
)
from tokenizers_jax.training import sharding

Dtype = Any

NAME = "detailflow_ar"  # config.model.name


class KVCache(NamedTuple):
    """One layer's keys and values for every position: [B, N, H, head_dim] each."""

    keys: jax.Array
    values: jax.Array


# --------------------------------------------------------------------------- modules


def _normal(std: float) -> layers.Initializer:
    return nn.initializers.normal(std)


def _linear(features: int, axes: tuple[str, str], dtype: Dtype, name: str) -> Dense:
    """A bias-free nn.Linear with the original's N(0, 0.02) init."""
    return Dense(features, use_bias=False, kernel_axes=axes, dtype=dtype,
                 kernel_init=_normal(0.02), name=name)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases, then FFN dropout (LlamaGen `FeedForward`)."""

    hidden: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:  # [B, L, D]
        gate = _linear(self.hidden, (EMBED, MLP), self.dtype, "w1")(x)
        h = nn.silu(gate) * _linear(self.hidden, (EMBED, MLP), self.dtype, "w3")(x)
        out = _linear(x.shape[-1], (MLP, EMBED), self.dtype, "w2")(h)
        return nn.Dropout(self.dropout)(out, deterministic=deterministic)


class Attention(nn.Module):
    """Fused wqkv (output columns [q | k | v], heads contiguous), 2D RoPE, wo, residual dropout.

    With a `cache`, the keys and values of these queries are written at positions
    start..start+Q-1 of the preallocated cache and the queries attend over all its N
    positions (the mask hides the ones not written yet).
    """

    num_heads: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, angles, keep, mask, deterministic: bool,
                 cache: KVCache | None = None, start: jax.Array | int = 0):
        """x: [B, Q, D]; angles: [Q, head_dim // 2]; keep: [Q] (0 zeroes the cls row's q and
        k); mask: bool [Q, K] with K = Q, or N with a cache. Returns ([B, Q, D], cache)."""
        b, length, width = x.shape
        head_dim = width // self.num_heads
        qkv = _linear(3 * width, (EMBED, HEADS), self.dtype, "wqkv")(x).reshape(
            b, length, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        keep = keep[None, :, None, None].astype(x.dtype)
        q = layers.apply_rope(q, angles) * keep
        k = layers.apply_rope(k, angles) * keep
        if cache is not None:
            def write(table, new):
                return jax.lax.dynamic_update_slice(table, new.astype(table.dtype),
                                                    (0, start, 0, 0))

            cache = KVCache(write(cache.keys, k), write(cache.values, v))
            k, v = cache.keys, cache.values
        out = layers.attention(q, k, v, head_dim**-0.5, mask, self.attention_impl)
        out = _linear(width, (HEADS, EMBED), self.dtype, "wo")(out.reshape(b, length, width))
        return nn.Dropout(self.dropout)(out, deterministic=deterministic), cache


class Block(nn.Module):
    """h = x + attention(RMSNorm(x)); h + feed_forward(RMSNorm(h)) (pre-norm, eps 1e-5)."""

    num_heads: int
    mlp_dim: int
    norm_eps: float = 1e-5
    resid_dropout: float = 0.0
    ffn_dropout: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, angles, keep, mask, deterministic: bool,
                 cache: KVCache | None = None, start: jax.Array | int = 0):
        attention = Attention(self.num_heads, self.resid_dropout, self.dtype,
                              self.attention_impl, name="attention")
        out, cache = attention(RMSNorm(self.norm_eps, name="attention_norm")(x), angles, keep,
                               mask, deterministic, cache, start)
        h = x + out
        ffn = SwiGLU(self.mlp_dim, self.ffn_dropout, self.dtype, name="feed_forward")
        return h + ffn(RMSNorm(self.norm_eps, name="ffn_norm")(h), deterministic), cache


class GPT(nn.Module):
    """LlamaGen GPT with DetailFlow's group layout (spec 6.1-6.2); see the module docstring.

    Attributes:
      vocab_size: V, the tokenizer's codebook size.
      num_classes: class labels 0..num_classes-1; label num_classes is the null class (CFG).
      num_tokens: N, tokens per image (the original's block_size).
      group_size, causal_num: g and c of the layout.
      width, depth, num_heads, mlp_dim: the transformer (GPT-L: 1024, 24, 16, 2816).
      token_dropout, resid_dropout, ffn_dropout: dropout rates of the input embeddings
        (elementwise, cls and placeholders included), after wo, after w2.
      class_dropout: probability of replacing a label by the null class in training.
      dtype: compute dtype (params fp32; norms, RoPE, softmax and logits fp32).
    """

    vocab_size: int
    num_classes: int
    num_tokens: int
    group_size: int
    causal_num: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    token_dropout: float = 0.0
    resid_dropout: float = 0.0
    ffn_dropout: float = 0.0
    class_dropout: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    def setup(self):
        g, c, n = self.group_size, self.causal_num, self.num_tokens
        if g < 1 or n % g or c % g or not 0 < c < n:
            raise ValueError(f"num_tokens ({n}) and causal_num ({c}) must be multiples of "
                             f"group_size ({g}), with 0 < causal_num < num_tokens")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by {self.num_heads} heads")

        def table(name, rows, init, axes=(VOCAB, EMBED)):
            return self.param(name, nn.with_logical_partitioning(init, axes), (rows, self.width))

        self.tok_embeddings = table("tok_embeddings", self.vocab_size, _normal(0.02))
        self.cls_embedding = table("cls_embedding", self.num_classes + 1, _normal(0.02))
        # Created after the original's initialize_weights: PyTorch's N(0, 1) Embedding init.
        self.spe_embeddings = table("spe_embeddings", g - 1, _normal(1.0), (None, EMBED))
        self.layers = [
            Block(self.num_heads, self.mlp_dim, self.norm_eps, self.resid_dropout,
                  self.ffn_dropout, self.dtype, self.attention_impl, name=f"layers_{i}")
            for i in range(self.depth)
        ]
        self.norm = RMSNorm(self.norm_eps)
        self.output = Dense(self.vocab_size, use_bias=False, kernel_axes=(EMBED, VOCAB),
                            dtype=self.dtype, kernel_init=nn.initializers.zeros)
        self.token_drop = nn.Dropout(self.token_dropout)

    # --- pieces --------------------------------------------------------------------------

    def drop_labels(self, labels: jax.Array, deterministic: bool) -> jax.Array:
        """Training label drop: each label becomes the null class with prob. class_dropout."""
        if deterministic or self.class_dropout == 0:
            return labels
        drop = jax.random.uniform(self.make_rng("dropout"), labels.shape) < self.class_dropout
        return jnp.where(drop, self.num_classes, labels)

    def embed(self, labels: jax.Array, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """Input embeddings at `positions` of the sequence built from `tokens`.

        Args:
          labels: int [B] (num_classes = null).
          tokens: int [B, T]: t_0..t_{T-1}; only the ones the positions hold are read.
          positions: int [Q] (may be traced).
        Returns:
          [B, Q, width] in the compute dtype.
        """
        token_slot, placeholder = input_slots(positions, self.group_size, self.causal_num)
        if tokens.shape[1]:
            token_ids = jnp.take(tokens, jnp.clip(token_slot, 0, tokens.shape[1] - 1), axis=1)
        else:  # [cls] alone
            token_ids = jnp.zeros((labels.shape[0], token_slot.shape[0]), jnp.int32)
        x = jnp.take(self.tok_embeddings, token_ids, axis=0)  # [B, Q, D]
        cls = jnp.take(self.cls_embedding, labels, axis=0)[:, None]  # [B, 1, D]
        x = jnp.where((jnp.asarray(positions) == 0)[None, :, None], cls, x)
        if self.group_size > 1:
            spe = jnp.take(self.spe_embeddings, jnp.clip(placeholder, 0, self.group_size - 2),
                           axis=0)
            x = jnp.where((placeholder >= 0)[None, :, None], spe[None], x)
        return x.astype(self.dtype)

    def transform(self, x: jax.Array, positions: jax.Array, num_keys: int, deterministic: bool,
                  caches: list[KVCache] | None = None, start: jax.Array | int = 0):
        """The blocks and the final RMSNorm over queries at `positions`.

        Without caches the keys are the queries themselves (positions 0..L-1); with caches,
        all N cached positions. Returns ([B, Q, width], updated caches or None).
        """
        head_dim = self.width // self.num_heads
        table = rope_angles(self.num_tokens, self.group_size, head_dim, self.rope_base)
        angles = jnp.take(jnp.asarray(table), positions, axis=0)
        keep = jnp.asarray(positions) > 0
        mask = attention_mask(positions, num_keys, self.group_size, self.causal_num)
        updated = []
        for i, block in enumerate(self.layers):
            x, cache = block(x, angles, keep, mask, deterministic,
                             None if caches is None else caches[i], start)
            updated.append(cache)
        return self.norm(x), (None if caches is None else updated)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[B, Q, width] -> fp32 logits [B, Q, V]."""
        return self.output(hidden).astype(jnp.float32)

    # --- entry points ----------------------------------------------------------------------

    def __call__(self, labels: jax.Array, tokens: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        """The original's forward: logits over the sequence built from a token prefix.

        Training passes the first N - g tokens and gets the logits of all N targets
        (spec 6.2); the full-recompute sampler passes any prefix it has drawn.

        Args:
          labels: int [B] class labels (num_classes = null).
          tokens: int [B, T], T <= N - g.
          deterministic: False for training: token/residual/FFN dropout and label drop, from
            the "dropout" rng (`rngs={"dropout": key}`).
        Returns:
          fp32 [B, L, V] with L = `sequence_length(T, g, c)`; position p predicts t_p.
        """
        num_inputs = tokens.shape[1]
        if num_inputs > self.num_tokens - self.group_size:
            raise ValueError(f"at most num_tokens - group_size = "
                             f"{self.num_tokens - self.group_size} input tokens, got {num_inputs}")
        length = sequence_length(num_inputs, self.group_size, self.causal_num)
        positions = jnp.arange(length)
        x = self.embed(self.drop_labels(labels, deterministic), tokens, positions)
        x = self.token_drop(x, deterministic=deterministic)
        hidden, _ = self.transform(x, positions, length, deterministic)
        return self.logits(hidden)

    def decode_step(self, labels: jax.Array, tokens: jax.Array, start: jax.Array | int,
                    num_queries: int, caches: list[KVCache]):
        """One cached forward pass over positions start..start+num_queries-1 (inference).

        Args:
          labels: int [B].
          tokens: int [B, N] (slots not drawn yet are ignored: no query position reads them).
          start: first query position (may be traced); num_queries: static Q (1 or g).
          caches: `init_cache(B)` or the caches returned by the previous steps.
        Returns:
          (fp32 logits [B, Q, V] predicting tokens start..start+Q-1, updated caches).
        """
        positions = start + jnp.arange(num_queries)
        x = self.embed(labels, tokens, positions)
        hidden, caches = self.transform(x, positions, self.num_tokens, True, caches, start)
        return self.logits(hidden), caches

    def init_cache(self, batch_size: int) -> list[KVCache]:
        """Zeroed caches for `decode_step`: per layer [B, N, heads, head_dim] (compute dtype)."""
        shape = (batch_size, self.num_tokens, self.num_heads, self.width // self.num_heads)
        return [KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))
                for _ in range(self.depth)]

    def dummy_inputs(self, batch_size: int = 1) -> tuple[jax.Array, jax.Array]:
        """(labels, tokens) for `init`: the training shapes [B] and [B, N - g]."""
        return (jnp.zeros((batch_size,), jnp.int32),
                jnp.zeros((batch_size, self.num_tokens - self.group_size), jnp.int32))


# --------------------------------------------------------------------------- construction


def model_from_config(config: ml_collections.ConfigDict) -> GPT:
    """The `GPT` of a configs/detailflow_ar.py config."""
    m = config.model
    if m.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"model.dtype must be float32 or bfloat16, got {m.dtype!r}")
    return GPT(
        vocab_size=m.vocab_size, num_classes=m.num_classes, num_tokens=m.num_tokens,
        group_size=m.group_size, causal_num=m.causal_num, width=m.width, depth=m.depth,
        num_heads=m.num_heads, mlp_dim=m.mlp_dim, rope_base=m.rope_base, norm_eps=m.norm_eps,
        token_dropout=m.token_dropout, resid_dropout=m.resid_dropout, ffn_dropout=m.ffn_dropout,
        class_dropout=m.class_dropout, dtype=jnp.dtype(m.dtype),
        attention_impl=None if m.attention_impl == "xla" else m.attention_impl,
    )


def init_params(config: ml_collections.ConfigDict, key: jax.Array, abstract: bool = False):
    """Random params (unboxed; `abstract=True`: ShapeDtypeStructs only).

    A training task wanting the boxed (logically partitioned) tree calls
    `model.init(key, *model.dummy_inputs(1))["params"]` itself.
    """
    model = model_from_config(config)

    def init(k):
        return nn.unbox(model.init(k, *model.dummy_inputs(1))["params"])

    return jax.eval_shape(init, key) if abstract else jax.jit(init)(key)


def check_tokenizer_model(model: ml_collections.ConfigDict, tokenizer_model: Any,
                          what: str) -> None:
    """Raises ValueError naming every mismatch unless a tokenizer's `model` config section
    (a ConfigDict or dict) makes the tokens this GPT config models; `what` names the
    tokenizer in the message."""
    t = tokenizer_model
    if t.get("name") != "detailflow":
        raise ValueError(f"the DetailFlow generator needs a DetailFlow tokenizer, got a "
                         f"{t.get('name')!r} tokenizer ({what})")
    pairs = (("codebook size", t["codebook_size"], "vocabulary", model.vocab_size),
             ("tokens per image", t["num_latent_tokens"], "tokens", model.num_tokens),
             ("group size", t["group_size"], "group size", model.group_size))
    problems = [f"{name} {theirs} (generator {ours_name} {ours})"
                for name, theirs, ours_name, ours in pairs if theirs != ours]
    if problems:
        raise ValueError(f"{what} does not fit this generator: its " + ", ".join(problems)
                         + "; pair a DetailFlow tokenizer with the GPT config of its sizes "
                         "(DetailFlow-16/32/64 with df16/df32/df64)")


# --------------------------------------------------------------------------- generator


class DetailFlowGenerator(api.Generator):
    """The DetailFlow GPT behind the common `Generator` interface.

      gen = load_generator("converted/detailflow16_gpt_l", tokenizer="converted/detailflow16")
      indices = gen.generate([207, 360], seed=0)          # int32 [2, N]
      images = gen.decode(indices)                        # all N tokens at R(N) (256)
      images = gen.generate_images([207], seed=0, cfg=2.0)

    Sampling is the cached parallel group decoding of `models.group_decoding`, compiled once
    per batch size and (top_k, top_p, gradual_cfg); cfg and temperature are traced. The batch
    is split over this process's devices (padded to a multiple of their count), parameters
    replicated. Keyword arguments of `generate` override `config.sampler`: cfg, temperature,
    top_k (0 = off), top_p (1 = off), gradual_cfg. The KV cache holds 4 x depth x N x width
    values per sample (keys and values of its conditional and null rows: 50 MB for GPT-L at
    128 tokens in fp32); choose the batch accordingly.
    """

    def __init__(self, config: ml_collections.ConfigDict, params: Any,
                 tokenizer: api.Tokenizer):
        super().__init__(config, params, tokenizer)
        self.model = model_from_config(config)
        self.mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)),
                                       jax.local_devices())
        self.params = jax.device_put(params, sharding.replicated(self.mesh))
        self._sample = jax.jit(functools.partial(group_decoding.sample_cached, self.model),
                               static_argnames=("top_k", "top_p", "gradual_cfg",
                                                "return_logits"))

    def check_tokenizer(self, tokenizer: api.Tokenizer) -> None:
        check_tokenizer_model(self.config.model, tokenizer.config.model, "the tokenizer")

    def generate(self, labels: Any, seed: int = 0, first_index: int = 0,
                 **sampling_overrides) -> jax.Array:
        """int [B] class labels -> int32 [B, N] token indices (see the class docstring)."""
        labels = self.check_labels(labels)
        settings = group_decoding.SamplerSettings.from_config(
            self.config.sampler, self.config.model.vocab_size, **sampling_overrides)
        count = labels.shape[0]
        shards = sharding.num_batch_shards(self.mesh)
        padded = -(-count // shards) * shards
        batch = sharding.batch_sharding(self.mesh)
        labels = jax.device_put(np.pad(labels, (0, padded - count)), batch)
        keys = jax.device_put(sampling.sample_keys(seed, first_index, padded), batch)
        tokens, _ = self._sample(self.params, labels, keys, settings.cfg, settings.temperature,
                                 top_k=settings.top_k, top_p=settings.top_p,
                                 gradual_cfg=settings.gradual_cfg)
        return tokens[:count]

    def decode(self, indices: Any, seed: int = 0, first_index: int = 0) -> jax.Array:
        """int [B, N] indices -> float32 [B, R, R, 3] in [-1, 1]: the tokenizer decodes all N
        tokens at R(N) (256 for the releases), as the original's evaluation does. The
        DetailFlow decoder is deterministic: seed and first_index are unused."""
        del seed, first_index
        return self.tokenizer.decode(indices)
