"""The public entry point: `load_tokenizer(DIR)` and the interface every tokenizer shares.

    tok = tokenizers_jax.load_tokenizer("converted/flowmo_lo")
    indices = tok.encode(images)            # images: uint8 [B, H, W, 3] or float in [-1, 1]
    recon = tok.decode(indices, seed=0)     # float32 [B, H, W, 3] in [-1, 1]
    recon = tok.reconstruct(images)         # encode + decode
    tokenizers_jax.to_uint8(recon)          # for saving / viewing
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


def tokenizer_class(name: str) -> type[Tokenizer]:
    if name not in TOKENIZERS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(TOKENIZERS)}")
    module_name, class_name = TOKENIZERS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer from a model directory (written by `python -m tokenizers_jax.convert`)
    or a training workdir (its latest checkpoint's EMA params)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no such directory: {directory}")
    if exported.is_model_dir(directory):
        config = exported.load_config(directory)
        params = exported.load_params(directory)
    else:
        from tokenizers_jax.training import checkpoint  # pylint: disable=import-outside-toplevel

        config, params = checkpoint.load_for_inference(directory)
    return tokenizer_class(config.model.name)(config, params)
