"""The public entry points: `load_tokenizer(DIR)`, `load_generator(DIR)` and the interfaces
every tokenizer and every generator share.

    tok = tokenizers_jax.load_tokenizer("converted/flowmo_lo")
    indices = tok.encode(images)            # images: uint8 [B, H, W, 3] or float in [-1, 1]
    recon = tok.decode(indices, seed=0)     # float32 [B, H, W, 3] in [-1, 1]
    recon = tok.reconstruct(images)         # encode + decode
    tokenizers_jax.to_uint8(recon)          # for saving / viewing

    gen = tokenizers_jax.load_generator("converted/detailflow16_gpt_l",
                                        tokenizer="converted/detailflow16")
    indices = gen.generate([207, 360], seed=0)         # class labels -> token indices
    images = gen.generate_images([207, 360], seed=0)   # ... decoded by the tokenizer
"""

from __future__ import annotations

import abc
import importlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tokenizers_jax import exported

# model.name -> "module:class" implementing `Tokenizer`.
TOKENIZERS = {
    "flowmo": "tokenizers_jax.models.flowmo:FlowMoTokenizer",
    "detailflow": "tokenizers_jax.models.detailflow:DetailFlowTokenizer",
}

# model.name -> "module:class" implementing `Generator`.
GENERATORS = {
    "detailflow_ar": "tokenizers_jax.models.gpt:DetailFlowGenerator",
    "maskgit": "tokenizers_jax.models.maskgit:MaskGITGenerator",
}


class Tokenizer(abc.ABC):
    """Images <-> discrete token indices.

    Images are NHWC, RGB: uint8 in [0, 255] or floating point in [-1, 1]. Outputs are
    float32 in [-1, 1].
    """

    def __init__(self, config: ml_collections.ConfigDict, params: Any):
        self.config = config
        self.params = params

    @abc.abstractmethod
    def encode(self, images: Any) -> jax.Array:
        """[B, H, W, 3] images -> int32 token indices."""

    @abc.abstractmethod
    def decode(self, indices: Any, **kwargs) -> jax.Array:
        """Token indices -> float32 [B, H, W, 3] images in [-1, 1]."""

    def reconstruct(self, images: Any, **kwargs) -> jax.Array:
        """encode then decode: float32 [B, H, W, 3] in [-1, 1]."""
        return self.decode(self.encode(images), **kwargs)


def prepare_images(images: Any, multiple_of: int) -> jax.Array:
    """Validates user images and maps them to float32 in [-1, 1].

    Args:
      images: uint8 [B, H, W, 3] in [0, 255], or floating point [B, H, W, 3] in [-1, 1].
      multiple_of: H and W must be multiples of this (the patch size).
    Returns:
      float32 [B, H, W, 3] in [-1, 1].
    Raises:
      ValueError / TypeError naming the problem and the fix.
    """
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        images = np.asarray(images)
    shape, dtype = tuple(images.shape), np.dtype(images.dtype)
    if len(shape) != 4 or shape[-1] != 3:
        hint = ""
        if len(shape) == 3 and shape[-1] == 3:
            hint = " For a single image add a batch axis: images[None]."
        elif len(shape) == 4 and shape[1] == 3:
            hint = " This looks channels-first: transpose with images.transpose(0, 2, 3, 1)."
        raise ValueError(f"expected RGB images shaped [B, H, W, 3], got shape {shape}.{hint}")
    if shape[0] == 0:
        raise ValueError(f"empty batch: images has shape {shape}; pass at least one image.")
    height, width = shape[1:3]
    if height % multiple_of or width % multiple_of:
        raise ValueError(
            f"image size {height}x{width} is not divisible by the patch size {multiple_of}; "
            f"crop or resize to a multiple of {multiple_of}."
        )
    if dtype == np.uint8:
        return jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    if not np.issubdtype(dtype, np.floating) and dtype != jnp.bfloat16:
        raise TypeError(
            f"images must be uint8 in [0, 255] or floating point in [-1, 1], got dtype {dtype}."
        )
    images = jnp.asarray(images, jnp.float32)
    low, high = float(jnp.min(images)), float(jnp.max(images))
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError("images contain NaN or infinite values.")
    if low < -1.0 - 1e-3 or high > 1.0 + 1e-3:
        hint = " They look like [0, 255]: pass uint8, or x / 127.5 - 1." if high > 2 else ""
        raise ValueError(
            f"float images must lie in [-1, 1], got values in [{low:.3g}, {high:.3g}].{hint}"
            " Images in [0, 1] map with 2 * x - 1."
        )
    return jnp.clip(images, -1.0, 1.0)


def check_indices(indices: Any, vocabulary_size: int) -> np.ndarray:
    """Validates user token indices: integers [B, L], B >= 1, values in [0, vocabulary_size).

    Returns:
      int32 numpy [B, L].
    Raises:
      ValueError / TypeError naming the problem.
    """
    indices = np.asarray(indices)
    if indices.ndim != 2:
        raise ValueError(f"expected indices shaped [B, L], got shape {indices.shape}")
    if not np.issubdtype(indices.dtype, np.integer):
        raise TypeError(f"indices must be integers, got {indices.dtype}")
    if indices.shape[0] == 0:
        raise ValueError(f"empty batch: indices has shape {indices.shape}; pass at least one row")
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= vocabulary_size:
        raise ValueError(f"indices must lie in [0, {vocabulary_size}) (the codebook size), got "
                         f"values in [{low}, {high}]")
    return indices.astype(np.int32)


def to_uint8(images: Any) -> np.ndarray:
    """float images in [-1, 1] -> uint8 [0, 255] (rounded), as a numpy array."""
    images = np.asarray(images, np.float32)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def sample_keys(key: jax.Array, first_index: int, batch_size: int) -> jax.Array:
    """The per-sample keys of the `Generator` rule: [B, 2] with row i =
    fold_in(key, first_index + i); a generator seeded with `seed` passes PRNGKey(seed)."""
    indices = first_index + jnp.arange(batch_size, dtype=jnp.uint32)
    return jax.vmap(lambda index: jax.random.fold_in(key, index))(indices)


class Generator(abc.ABC):
    """Class labels -> token indices of a tokenizer -> images.

    Randomness is per sample: sample i of a call draws from
    `jax.random.fold_in(jax.random.PRNGKey(seed), first_index + i)` (for every step of its
    sampler and for its decoding), so a sample does not depend on the batch it was generated
    in, the batch size or the device count, and a long run split into chunks
    (first_index = 0, B, 2B, ...) gives the samples of one big call.

    Attributes:
      config: the generator's config (`config.model.name` names it).
      params: its params.
      tokenizer: the `Tokenizer` whose indices it generates (decodes them to images).
    """

    def __init__(self, config: ml_collections.ConfigDict, params: Any, tokenizer: Tokenizer):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.check_tokenizer(tokenizer)

    @property
    def num_classes(self) -> int:
        """Class labels are 0..num_classes - 1."""
        return int(self.config.model.num_classes)

    @abc.abstractmethod
    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Raises ValueError, naming the mismatch, unless the generator's tokens fit `tokenizer`
        (model kind, codebook size, tokens per image)."""

    @abc.abstractmethod
    def generate(self, labels: Any, seed: int = 0, first_index: int = 0,
                 **sampling) -> jax.Array:
        """int [B] class labels -> int32 token indices [B, ...] that `decode` accepts.

        `sampling` overrides the config's sampler fields (e.g. cfg, temperature).
        """

    @abc.abstractmethod
    def decode(self, indices: Any, seed: int = 0, first_index: int = 0) -> jax.Array:
        """Token indices from `generate` -> float32 [B, H, W, 3] images in [-1, 1]."""

    def generate_images(self, labels: Any, seed: int = 0, first_index: int = 0,
                        **sampling) -> jax.Array:
        """`generate` then `decode`: float32 [B, H, W, 3] in [-1, 1]."""
        indices = self.generate(labels, seed=seed, first_index=first_index, **sampling)
        return self.decode(indices, seed=seed, first_index=first_index)

    def check_labels(self, labels: Any) -> np.ndarray:
        """Validates class labels: integers [B], B >= 1, in [0, num_classes) -> int32 numpy."""
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.shape[0] == 0:
            raise ValueError(f"expected a non-empty list of class labels, shaped [B], got shape "
                             f"{labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"class labels must be integers, got {labels.dtype}")
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self.num_classes:
            raise ValueError(f"class labels must lie in [0, {self.num_classes}), got values in "
                             f"[{low}, {high}]")
        return labels.astype(np.int32)


def _registered_class(registry: dict[str, str], name: str, what: str) -> type:
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; known: {sorted(registry)}")
    module_name, class_name = registry[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def tokenizer_class(name: str) -> type[Tokenizer]:
    return _registered_class(TOKENIZERS, name, "model")


def generator_class(name: str) -> type[Generator]:
    return _registered_class(GENERATORS, name, "generator")


def load_model_dir_or_workdir(directory: str | os.PathLike
                              ) -> tuple[ml_collections.ConfigDict, Any]:
    """(config, params) of a model directory (written by `python -m tokenizers_jax.convert`)
    or of a training workdir (its latest checkpoint's EMA params)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no such directory: {directory}")
    if exported.is_model_dir(directory):
        return exported.load_config(directory), exported.load_params(directory)
    from tokenizers_jax.training import checkpoint  # pylint: disable=import-outside-toplevel

    return checkpoint.load_for_inference(directory)


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer from a model directory (written by `python -m tokenizers_jax.convert`)
    or a training workdir (its latest checkpoint's EMA params)."""
    config, params = load_model_dir_or_workdir(directory)
    return tokenizer_class(config.model.name)(config, params)


def load_generator(directory: str | os.PathLike,
                   tokenizer: str | os.PathLike | Tokenizer | None = None) -> Generator:
    """Loads a generator from a model directory or a training workdir (EMA params).

    Args:
      tokenizer: the tokenizer its tokens decode with: a `Tokenizer`, or a model directory /
        workdir to load. None: the tokenizer recorded in the generator's training data (the
        manifest of the token export in `config.data.path`), if it still exists.
    """
    config, params = load_model_dir_or_workdir(directory)
    cls = generator_class(config.model.name)
    if tokenizer is None:
        tokenizer = _recorded_tokenizer(config, os.fspath(directory))
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    return cls(config, params, tokenizer)


def _recorded_tokenizer(config: ml_collections.ConfigDict, directory: str) -> str:
    """The tokenizer directory named by the manifest of the generator's token export."""
    from tokenizers_jax.data import tokens  # pylint: disable=import-outside-toplevel

    data = config.get("data")
    path = data.get("path", "") if data is not None and data.get("name") == "tokens" else ""
    recorded = ""
    if path and os.path.isfile(os.path.join(path, tokens.MANIFEST_FILE)):
        recorded = tokens.load_manifest(path)["tokenizer"]["path"]
    if not recorded or not os.path.isdir(recorded):
        where = f" (its training data names {recorded}, which is gone)" if recorded else ""
        raise ValueError(f"the generator in {directory} does not say which tokenizer decodes "
                         f"its tokens{where}; pass tokenizer=DIR (--tokenizer=DIR)")
    return recorded
