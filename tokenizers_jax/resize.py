"""Image resizes with PyTorch's semantics (`torch.nn.functional.interpolate`).

All functions take channels-last arrays [..., H, W, C] and compute in fp32.

`area` (adaptive average pooling) and `bicubic` (A = -0.75, align_corners=False, border
indices clamped) are separable linear maps: each is a per-axis [out, in] matrix built on the
host in float64 (`resize_matrix`) and applied with one einsum per axis at the highest matmul
precision (`apply_resize_matrices`). Compositions are matrix products, so DetailFlow's
degraded target (area down to R(t), bicubic up to out_res; spec 2) is one [out_res, in]
matrix per axis (`degrade_matrix`); it can be passed into a jitted step as a traced array,
so only out_res, not t, is a static shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BICUBIC_A = -0.75  # torch's cubic convolution coefficient (jax.image's 'cubic' uses -0.5)


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


def area_matrix(in_size: int, out_size: int) -> np.ndarray:
    """`F.interpolate(mode="area")` (= `adaptive_avg_pool`) along one axis: [out, in] float64.

    Output i averages inputs [floor(i * in / out), ceil((i + 1) * in / out)), which also
    covers non-integer ratios (256 -> 44) and upscales.
    """
    _check_sizes(in_size, out_size)
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -(-((i + 1) * in_size) // out_size)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def _fused_multiply_add(a, b, c) -> np.ndarray:
    """float32 a * b + c rounded once, as the fused multiply-adds in torch's compiled kernels."""
    return (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32)


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """torch's `get_cubic_upsample_coefficients` in float32, step for step (with the compiler's
    multiply-add fusion): the weights of taps -1, 0, 1, 2 at fractional offsets t. [n] -> [n, 4].
    """
    f32, fma = np.float32, _fused_multiply_add
    a = f32(BICUBIC_A)

    def near(x):  # |x| <= 1: ((a + 2) x - (a + 3)) x^2 + 1
        return fma(fma(a + f32(2), x, -(a + f32(3))) * x, x, f32(1))

    def far(x):  # 1 < |x| < 2: ((a x - 5a) x + 8a) x - 4a
        return fma(fma(fma(a, x, -f32(5) * a), x, f32(8) * a), x, -f32(4) * a)

    opposite = f32(1) - t
    return np.stack([far(t + f32(1)), near(t), near(opposite), far(opposite + f32(1))], axis=-1)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """`F.interpolate(mode="bicubic", align_corners=False)` along one axis: [out, in] float64.

    Source coordinate (i + 0.5) * in / out - 0.5 (not clamped at 0, as torch's cubic path),
    four taps around its floor with A = -0.75, tap indices clamped to [0, in - 1]. No
    antialiasing (torch's default), so a downscale aliases exactly as torch's does.
    """
    _check_sizes(in_size, out_size)
    # Coordinates and weights in float32 as torch computes them for float images: in float64
    # the outputs would differ from torch's by up to ~3e-5 (256 -> 44).
    scale = np.float32(in_size) / np.float32(out_size)
    source = _fused_multiply_add(scale, np.arange(out_size) + 0.5, -0.5)
    floor = np.floor(source)
    weights = _cubic_weights(source - floor)  # [out, 4]
    taps = np.clip(floor[:, None].astype(np.int64) + np.arange(-1, 3), 0, in_size - 1)
    matrix = np.zeros((out_size, in_size))
    np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
    return matrix


RESIZE_MATRICES = {"area": area_matrix, "bicubic": bicubic_matrix}


def resize_matrix(in_size: int, out_size: int, method: str) -> np.ndarray:
    """The [out, in] float64 matrix of a torch resize `method` ("area" or "bicubic")."""
    if method not in RESIZE_MATRICES:
        raise ValueError(f"unknown resize method {method!r}; choose one of {sorted(RESIZE_MATRICES)}")
    return RESIZE_MATRICES[method](in_size, out_size)


def _check_sizes(in_size: int, out_size: int):
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")


def apply_resize_matrices(images: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """out[..., o, p, c] = sum_{h, w} rows[o, h] images[..., h, w, c] cols[p, w], in fp32.

    Args:
      images: [..., H, W, C].
      rows: [out_h, H]; cols: [out_w, W] (numpy constants or traced arrays).
    Returns:
      [..., out_h, out_w, C] fp32.
    """
    images = jnp.asarray(images, jnp.float32)
    rows = jnp.asarray(rows, jnp.float32)
    cols = jnp.asarray(cols, jnp.float32)
    highest = jax.lax.Precision.HIGHEST
    out = jnp.einsum("oh,...hwc->...owc", rows, images, precision=highest)
    return jnp.einsum("pw,...owc->...opc", cols, out, precision=highest)


def _resize(images: jax.Array, size: tuple[int, int], method: str) -> jax.Array:
    height, width = images.shape[-3:-1]
    if (height, width) == tuple(size):
        return jnp.asarray(images, jnp.float32)
    return apply_resize_matrices(
        images, resize_matrix(height, size[0], method), resize_matrix(width, size[1], method)
    )


def resize_area(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """`F.interpolate(mode="area")`: [..., H, W, C] -> [..., out_h, out_w, C] fp32."""
    return _resize(images, size, "area")


def resize_bicubic(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """`F.interpolate(mode="bicubic", align_corners=False)`: [..., H, W, C] -> [..., h, w, C]."""
    return _resize(images, size, "bicubic")


def degrade_matrix(in_size: int, low_size: int, out_size: int) -> np.ndarray:
    """DetailFlow's degradation along one axis (spec 2): area in -> low, then bicubic
    low -> out (skipped when low == out, as the original does). [out, in] float64.

    Stack these for the allowed prefix lengths of one out_res bucket to get a table that a
    jitted step indexes with a traced t.
    """
    down = area_matrix(in_size, low_size)
    if low_size == out_size:
        return down
    return bicubic_matrix(low_size, out_size) @ down


def degrade(images: jax.Array, low_size: int, out_size: int) -> jax.Array:
    """The degraded target: each axis area-resized to `low_size`, then bicubic to `out_size`.

    [..., H, W, C] -> [..., out_size, out_size, C] fp32.
    """
    height, width = images.shape[-3:-1]
    return apply_resize_matrices(
        images, degrade_matrix(height, low_size, out_size), degrade_matrix(width, low_size, out_size)
    )
