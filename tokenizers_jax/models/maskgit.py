"""MaskGIT on FlowMo tokens (maskgit.md): the token layout, MaskBit's bidirectional
transformer (LFQBert) and the `Generator` front end.

    gen = tokenizers_jax.load_generator("runs/maskgit_tiny")   # tokenizer from its token export
    indices = gen.generate([0, 3], seed=0)        # FlowMo indices [B, code_length * fh]
    images = gen.decode(indices, seed=0)          # FlowMo's own sampler, per-sample noise

Token layout (section 1). FlowMo's LFQ gives each of its `code_length` = P tokens F = fh * fg
bits and exports P * fh codeword indices of fg bits: index n = t * fh + j holds the strided
channels {g * fh + j} of token t (`quantizers.lfq`). MaskGIT sees P positions x S = fh splits
of fg bits (FlowMo-Lo: 256 x 2 x 9 bits, codebook 512 per split):
  model.grouping = "strided"     split j of position t = FlowMo index t * fh + j (FlowMo's own
                                 even/odd grouping for Lo; a reshape);
  model.grouping = "contiguous"  split j holds channels j * fg .. j * fg + fg - 1 (MaskBit's
                                 low/high halves of an 18-bit index).
Both are little-endian; `flowmo_to_maskgit` and `maskgit_to_flowmo` are exact inverses.

Transformer (section 2, MaskBit LFQBert): the bits of every split as +-1 (a masked split is
all zeros) concatenated per position -> Linear(S * fg -> D); the class embedding (num_classes
+ 1 rows, the last the null label) appended as position P; learned positions [P + 1, D];
LayerNorm (eps 1e-12) and dropout; `depth` post-LN BERT blocks (attention with dropout on
the attention probabilities and on its output, then an exact-GELU MLP with dropout, each
added to its input and LayerNormed); head Linear, GELU, LayerNorm, Linear(D -> S * 2**fg);
logits [B, P, S, 2**fg] of the P image positions, in fp32. Inits as MaskBit's: Linear and
embedding weights N(0, 0.02) (torch's trunc_normal_ truncates at +-2 absolute, i.e. never at
std 0.02), biases 0, the fused qkv projection xavier-uniform (torch MultiheadAttention's own
init, which MaskBit's init leaves alone).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tokenizers_jax import api
from tokenizers_jax.layers import EMBED, HEADS, IO, MLP, VOCAB, Dense, LayerNorm
from tokenizers_jax.models import maskgit_sampler
from tokenizers_jax.models.params import abstract_params, init_params  # noqa: F401 (API)
from tokenizers_jax.quantizers import lfq
from tokenizers_jax.sampling import sample_keys

Params = Any
GROUPINGS = ("strided", "contiguous")
# Streams of a sample's key (sampling.sample_keys): its decoding steps and its FlowMo noise.
SAMPLING_STREAM, DECODING_STREAM = 0, 1
LAYER_NORM_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class MaskGITConfig:
    """The `model` section of a MaskGIT config (see configs/maskgit.py)."""

    num_positions: int  # P: FlowMo's code_length
    splits: int  # S: sub-tokens per position (FlowMo's fh = context_dim / fg)
    bits_per_split: int  # fg: bits per sub-token (FlowMo's codebook_size_for_entropy)
    num_classes: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_dim: int
    grouping: str = "strided"
    dropout: float = 0.1
    dtype: str = "float32"

    def __post_init__(self):
        if self.grouping not in GROUPINGS:
            raise ValueError(f"model.grouping={self.grouping!r}; choose one of {GROUPINGS}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by "
                             f"model.num_heads={self.num_heads}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if min(self.num_positions, self.splits, self.bits_per_split, self.num_classes) < 1:
            raise ValueError("model.num_positions, splits, bits_per_split and num_classes must "
                             "be positive")

    @classmethod
    def from_config(cls, model: ml_collections.ConfigDict | Mapping) -> "MaskGITConfig":
        fields = dict(model)
        if fields.pop("name", "maskgit") != "maskgit":
            raise ValueError(f"not a MaskGIT config: model.name={model['name']!r}")
        return cls(**fields)

    @property
    def codebook_size(self) -> int:
        """K = 2**fg, the vocabulary of one split; the mask id is K."""
        return 2**self.bits_per_split

    @property
    def num_units(self) -> int:
        """N = P * S maskable sub-tokens per image (= FlowMo's tokens_per_image)."""
        return self.num_positions * self.splits


# --- token layout ------------------------------------------------------------------------------


def _bits_to_index(positive: jax.Array) -> jax.Array:
    """bool [..., fg] -> int32 little-endian index."""
    return jnp.sum(positive.astype(jnp.int32) << jnp.arange(positive.shape[-1], dtype=jnp.int32),
                   axis=-1)


def flowmo_to_maskgit(indices: jax.Array, config: MaskGITConfig) -> jax.Array:
    """FlowMo codeword indices [B, P * S] -> MaskGIT tokens [B, P, S] (`config.grouping`)."""
    batch = indices.shape[0]
    indices = jnp.asarray(indices, jnp.int32)
    if config.grouping == "strided":
        return indices.reshape(batch, config.num_positions, config.splits)
    codes = lfq.indices_to_codes(indices, config.bits_per_split, config.num_positions)  # [B, P, F]
    halves = codes.reshape(batch, config.num_positions, config.splits, config.bits_per_split)
    return _bits_to_index(halves > 0)


def maskgit_to_flowmo(tokens: jax.Array, config: MaskGITConfig) -> jax.Array:
    """Inverse of `flowmo_to_maskgit`: [B, P, S] -> FlowMo indices [B, P * S] (int32)."""
    batch = tokens.shape[0]
    tokens = jnp.asarray(tokens, jnp.int32)
    if config.grouping == "strided":
        return tokens.reshape(batch, config.num_units)
    codes = lfq.index_bits(tokens, config.bits_per_split).reshape(
        batch, config.num_positions, config.splits * config.bits_per_split)  # [B, P, F]
    return lfq.codes_to_indices(codes, config.bits_per_split)


def check_flowmo_model(config: MaskGITConfig, flowmo_model: Mapping[str, Any],
                       what: str) -> None:
    """Raises ValueError naming every mismatch unless `flowmo_model` (a FlowMo `model` config
    section) makes the tokens this MaskGIT models; `what` names the FlowMo in the message."""
    name = flowmo_model.get("name")
    if name != "flowmo":
        raise ValueError(f"{what} is a {name!r} model; MaskGIT generates FlowMo tokens (load a "
                         "FlowMo tokenizer)")
    expected = dict(code_length=config.num_positions,
                    context_dim=config.splits * config.bits_per_split,
                    codebook_size_for_entropy=config.bits_per_split)
    problems = [f"{field} is {flowmo_model[field]} but the MaskGIT config needs {value}"
                for field, value in expected.items() if flowmo_model[field] != value]
    if problems:
        raise ValueError(f"{what} does not make this MaskGIT's tokens: {'; '.join(problems)} "
                         "(model.num_positions, splits, bits_per_split). Use the FlowMo the "
                         "tokens were exported with, or a MaskGIT config of its sizes.")


# --- the transformer ---------------------------------------------------------------------------

_normal = nn.initializers.normal(0.02)


def _zero_bias(fan_in: int):
    del fan_in
    return nn.initializers.zeros


class BertBlock(nn.Module):
    """Post-LN block: x = LN(x + drop(MHA(x))); x = LN(x + drop(MLP(x)))."""

    num_heads: int
    mlp_dim: int
    dropout: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:  # [B, L, D]
        b, length, width = x.shape
        head_dim = width // self.num_heads
        dense = functools.partial(Dense, dtype=self.dtype, kernel_init=_normal,
                                  bias_init=_zero_bias)
        dropout = lambda y: nn.Dropout(self.dropout)(y, deterministic)
        qkv = dense(3 * width, kernel_axes=(EMBED, HEADS), name="qkv",
                    kernel_init=nn.initializers.xavier_uniform())(x)
        q, k, v = jnp.split(qkv.reshape(b, length, 3 * self.num_heads, head_dim), 3, axis=2)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits * head_dim**-0.5, axis=-1)
        probs = dropout(probs)
        attended = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
        attended = dense(width, kernel_axes=(HEADS, EMBED), name="out")(
            attended.reshape(b, length, width))
        x = LayerNorm(LAYER_NORM_EPS, name="attention_norm")(x + dropout(attended))
        hidden = nn.gelu(dense(self.mlp_dim, kernel_axes=(EMBED, MLP), name="fc1")(x),
                         approximate=False)
        hidden = dense(width, kernel_axes=(MLP, EMBED), name="fc2")(hidden)
        return LayerNorm(LAYER_NORM_EPS, name="mlp_norm")(x + dropout(hidden))


class MaskGIT(nn.Module):
    """tokens [B, P, S] (mask id K = masked), labels [B] (num_classes = null) -> logits
    [B, P, S, K] fp32."""

    config: MaskGITConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, labels: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        c = self.config
        dtype = jnp.dtype(c.dtype)
        batch = tokens.shape[0]
        dense = functools.partial(Dense, dtype=dtype, kernel_init=_normal, bias_init=_zero_bias)
        bits = lfq.index_bits(tokens, c.bits_per_split)  # [B, P, S, fg] +-1
        bits = jnp.where((tokens == c.codebook_size)[..., None], 0.0, bits)
        bits = bits.reshape(batch, c.num_positions, c.splits * c.bits_per_split)
        x = dense(c.hidden_size, kernel_axes=(IO, EMBED), name="input_proj")(bits)
        class_embedding = self.param("class_embedding",
                                     nn.with_logical_partitioning(_normal, (VOCAB, EMBED)),
                                     (c.num_classes + 1, c.hidden_size))
        positions = self.param("position_embedding",
                               nn.with_logical_partitioning(_normal, (None, EMBED)),
                               (c.num_positions + 1, c.hidden_size))
        x = jnp.concatenate([x, class_embedding[labels][:, None].astype(dtype)], axis=1)
        x = LayerNorm(LAYER_NORM_EPS, name="embedding_norm")(x + positions.astype(dtype))
        x = nn.Dropout(c.dropout)(x, deterministic)
        for i in range(c.depth):
            x = BertBlock(c.num_heads, c.mlp_dim, c.dropout, dtype, name=f"block_{i}")(
                x, deterministic)
        x = nn.gelu(dense(c.hidden_size, kernel_axes=(EMBED, MLP), name="head_dense")(x),
                    approximate=False)
        x = LayerNorm(LAYER_NORM_EPS, name="head_norm")(x)
        logits = dense(c.splits * c.codebook_size, kernel_axes=(EMBED, VOCAB),
                       dtype=jnp.float32, name="predict")(x[:, :c.num_positions])  # fp32
        return logits.reshape(batch, c.num_positions, c.splits, c.codebook_size)

    def dummy_inputs(self, batch_size: int = 1) -> tuple[jax.Array, jax.Array]:
        c = self.config
        return (jnp.zeros((batch_size, c.num_positions, c.splits), jnp.int32),
                jnp.zeros((batch_size,), jnp.int32))


def build_model(config: ml_collections.ConfigDict) -> MaskGIT:
    """The MaskGIT module of a full config (its `model` section)."""
    return MaskGIT(MaskGITConfig.from_config(config.model))



# --- sampling ----------------------------------------------------------------------------------


def generate_tokens(model: MaskGIT, params: Params, labels: jax.Array, keys: jax.Array,
                    sampler: maskgit_sampler.SamplerConfig) -> jax.Array:
    """Class labels [B] and per-sample keys [B, 2] (`sampling.sample_keys`) -> FlowMo indices
    [B, P * S] int32, by `maskgit_sampler.sample` on the SAMPLING_STREAM of each key."""
    c = model.config

    def logits_fn(units, labels_):  # [B', N] -> [B', N, K]
        tokens = units.reshape(units.shape[0], c.num_positions, c.splits)
        logits = model.apply({"params": params}, tokens, labels_)
        return logits.reshape(units.shape[0], c.num_units, c.codebook_size)

    stream_keys = jax.vmap(lambda key: jax.random.fold_in(key, SAMPLING_STREAM))(keys)
    units = maskgit_sampler.sample(logits_fn, labels, stream_keys, c.num_units, c.codebook_size,
                                   c.num_classes, sampler)
    return maskgit_to_flowmo(units.reshape(-1, c.num_positions, c.splits), c)


def decoding_noise(keys: jax.Array, image_size: int) -> jax.Array:
    """FlowMo's starting noise z_1 [B, S, S, 3], one draw per sample (DECODING_STREAM)."""
    return jax.vmap(lambda key: jax.random.normal(
        jax.random.fold_in(key, DECODING_STREAM), (image_size, image_size, 3), jnp.float32))(keys)


class MaskGITGenerator(api.Generator):
    """`load_generator` front end: class labels -> FlowMo indices -> FlowMo's decode.

    Sampler fields (config.sampler, see `maskgit_sampler.SamplerConfig`) may be overridden per
    call: gen.generate(labels, seed=0, cfg=3.0, steps=16).
    """

    def __init__(self, config: ml_collections.ConfigDict, params: Params,
                 tokenizer: api.Tokenizer):
        self.model = build_model(config)
        super().__init__(config, params, tokenizer)
        self._generate = jax.jit(functools.partial(generate_tokens, self.model),
                                 static_argnames=("sampler",))

    def check_tokenizer(self, tokenizer: api.Tokenizer) -> None:
        model = tokenizer.config.model
        check_flowmo_model(self.model.config, model,
                           f"the tokenizer ({type(tokenizer).__name__}, model.name "
                           f"{model.get('name')!r})")

    def generate(self, labels: Any, seed: int = 0, first_index: int = 0,
                 **sampling) -> jax.Array:
        """int [B] labels -> int32 FlowMo indices [B, code_length * fh] (tokenizer.decode's)."""
        labels = self.check_labels(labels)
        sampler = maskgit_sampler.SamplerConfig.from_config(self.config.sampler, **sampling)
        keys = sample_keys(seed, first_index, labels.shape[0])
        return self._generate(self.params, jnp.asarray(labels), keys, sampler=sampler)

    def decode(self, indices: Any, seed: int = 0, first_index: int = 0) -> jax.Array:
        """FlowMo indices [B, N] -> images [B, S, S, 3] in [-1, 1] by the tokenizer's `decode`
        (its own sampler), the noise of sample i drawn from its per-sample key."""
        batch = np.shape(indices)[0] if np.ndim(indices) else 0
        if batch == 0:
            raise ValueError(f"expected indices shaped [B, {self.model.config.num_units}] with "
                             f"B >= 1, got shape {np.shape(indices)}")
        keys = sample_keys(seed, first_index, batch)
        noise = decoding_noise(keys, self.tokenizer.model.config.image_size)
        return self.tokenizer.decode(indices, noise=noise)
