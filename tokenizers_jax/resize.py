"""Image resizes with PyTorch's semantics (`torch.nn.functional.interpolate`).

All functions take channels-last arrays [..., H, W, C] and compute in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def resize_bilinear(images: jax.Array, size: tuple[int, int], antialias: bool) -> jax.Array:
    """Bilinear resize matching `F.interpolate(mode="bilinear", align_corners=False)`.

    With `antialias=True` a downscale uses a triangle filter stretched by the scale factor
    (torch's `antialias=True`); upscales are plain bilinear either way.

    Args:
      images: [..., H, W, C].
      size: (out_h, out_w).
    Returns:
      [..., out_h, out_w, C] fp32.
    """
    images = jnp.asarray(images, jnp.float32)
    out_shape = (*images.shape[:-3], size[0], size[1], images.shape[-1])
    if tuple(images.shape[-3:-1]) == tuple(size):
        return images
    return jax.image.resize(images, out_shape, method="linear", antialias=antialias)
