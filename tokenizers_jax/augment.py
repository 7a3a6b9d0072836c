"""DiffAugment (Zhao et al. 2020) as DetailFlow's discriminator uses it (spec 5).

A policy such as 'color,translation,cutout_0.2' lists sub-policies applied in order:

  color        brightness x + (r - 0.5), saturation (x - m_c) * 2r + m_c (m_c: mean over
               channels), contrast (x - m) * (r + 0.5) + m (m: mean over the image), each r
               ~ U[0, 1) per sample;
  translation  a shift of up to +-int(0.125 * size + 0.5) pixels per axis, per sample,
               filling with zeros;
  cutout_f     a zeroed square of side int(f * size + 0.5) centred at a random pixel, per
               sample, clipped at the borders.

Each sub-policy is switched on or off for the whole batch by one coin with P(on) =
`probability` (0.5 for the normal policy, 1.0 for the strong one of consistency
regularisation). Everything is a pure function of an explicit key and traced (the coins are
`jnp.where`s), so one compiled step serves every draw. The draws are a separate pytree
(`AugmentDraws`) so tests and replays can inject them. Images are NHWC; compute is fp32.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

SUB_POLICIES = ("color", "translation", "cutout")


@dataclasses.dataclass(frozen=True)
class AugmentPolicy:
    """Which sub-policies run, their sizes, and each one's batch-level probability.

    Attributes:
      color: brightness, saturation and contrast.
      translation: random shifts of up to `translation_ratio` of the size.
      cutout: side of the cut square as a fraction of the size (0 = off).
      probability: P(a sub-policy is applied to the batch).
    """

    color: bool = False
    translation: bool = False
    cutout: float = 0.0
    translation_ratio: float = 0.125
    probability: float = 1.0

    @classmethod
    def parse(cls, policy: str, probability: float) -> "AugmentPolicy":
        """'color,translation,cutout_0.2' -> AugmentPolicy (the original's policy strings)."""
        fields = {}
        for name in filter(None, (part.strip() for part in policy.split(","))):
            base, _, argument = name.partition("_")
            if base not in SUB_POLICIES or (argument and base != "cutout"):
                raise ValueError(f"unknown DiffAugment sub-policy {name!r} in {policy!r}; use "
                                 "'color', 'translation' and 'cutout' or 'cutout_<fraction>'")
            fields[base] = float(argument or 0.5) if base == "cutout" else True
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"DiffAugment probability must be in [0, 1], got {probability}")
        return cls(**fields, probability=probability)


# Spec 5: the discriminator's inputs, and the strong variant for consistency regularisation.
NORMAL = AugmentPolicy.parse("color,translation,cutout_0.2", probability=0.5)
STRONG = AugmentPolicy.parse("color,translation,cutout_0.5", probability=1.0)


class AugmentDraws(NamedTuple):
    """The random numbers of one DiffAugment call (B = batch size)."""

    apply_color: jax.Array  # [] bool, the batch-level coins
    apply_translation: jax.Array
    apply_cutout: jax.Array
    brightness: jax.Array  # [B] U[0, 1)
    saturation: jax.Array  # [B] U[0, 1)
    contrast: jax.Array  # [B] U[0, 1)
    shift: jax.Array  # [B, 2] int32 (rows, columns)
    cutout_center: jax.Array  # [B, 2] int32 (row, column)


def translation_limit(size: int, ratio: float) -> int:
    """The largest shift along an axis of `size` pixels: int(size * ratio + 0.5)."""
    return int(size * ratio + 0.5)


def cutout_size(size: int, fraction: float) -> int:
    """The side of the cut square along an axis of `size` pixels: int(size * fraction + 0.5)."""
    return int(size * fraction + 0.5)


def draw_augment(
    key: jax.Array, policy: AugmentPolicy, batch_size: int, height: int, width: int
) -> AugmentDraws:
    """All random numbers of one call (drawn whether or not the policy uses them).

    One uniform draw feeds everything (integers are floor(u * count), uniform up to float
    rounding), which keeps this cheap to compile.
    """
    coin_key, sample_key = jax.random.split(key)
    coins = jax.random.uniform(coin_key, (3,)) < policy.probability
    u = jax.random.uniform(sample_key, (batch_size, 7))

    def integers(u, low, count):  # uniform on {low, ..., low + count - 1}, per column
        count = jnp.asarray(count)
        return (low + jnp.minimum(jnp.floor(u * count), count - 1)).astype(jnp.int32)

    limits = [translation_limit(size, policy.translation_ratio) for size in (height, width)]
    sides = [cutout_size(size, policy.cutout) for size in (height, width)]
    # The original draws centres from [0, size + 1 - side % 2): odd squares centre on a pixel.
    centre_counts = [height + 1 - sides[0] % 2, width + 1 - sides[1] % 2]
    return AugmentDraws(
        apply_color=coins[0], apply_translation=coins[1], apply_cutout=coins[2],
        brightness=u[:, 0], saturation=u[:, 1], contrast=u[:, 2],
        shift=integers(u[:, 3:5], -jnp.asarray(limits), [2 * m + 1 for m in limits]),
        cutout_center=integers(u[:, 5:7], 0, centre_counts),
    )


def _per_sample(values: jax.Array) -> jax.Array:  # [B] -> [B, 1, 1, 1]
    return values[:, None, None, None]


def brightness(images: jax.Array, draws: jax.Array) -> jax.Array:
    """x + (r - 0.5). images [B, H, W, C], draws [B] in [0, 1)."""
    return images + (_per_sample(draws) - 0.5)


def saturation(images: jax.Array, draws: jax.Array) -> jax.Array:
    """(x - mean over channels) * 2r + mean over channels."""
    mean = images.mean(axis=-1, keepdims=True)
    return (images - mean) * (_per_sample(draws) * 2) + mean


def contrast(images: jax.Array, draws: jax.Array) -> jax.Array:
    """(x - mean over the image) * (r + 0.5) + mean over the image."""
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    return (images - mean) * (_per_sample(draws) + 0.5) + mean


def translate(images: jax.Array, shift: jax.Array) -> jax.Array:
    """out[b, i, j] = x[b, i + dy_b, j + dx_b], zero outside. shift: [B, 2] (dy, dx)."""
    _, height, width, _ = images.shape
    rows = jnp.arange(height)[None, :] + shift[:, :1]  # [B, H]
    cols = jnp.arange(width)[None, :] + shift[:, 1:]  # [B, W]
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None]
    out = jnp.take_along_axis(images, jnp.clip(rows, 0, height - 1)[:, :, None, None], axis=1)
    out = jnp.take_along_axis(out, jnp.clip(cols, 0, width - 1)[:, None, :, None], axis=2)
    return out * inside[..., None]


def cutout(images: jax.Array, center: jax.Array, fraction: float) -> jax.Array:
    """Zeroes a square of side int(fraction * size + 0.5) per sample, clipped at the borders.

    The square covers rows [c_y - side // 2, c_y - side // 2 + side) (and likewise columns).
    center: [B, 2] (row, column) from `draw_augment`.
    """
    _, height, width, _ = images.shape
    sides = (cutout_size(height, fraction), cutout_size(width, fraction))

    def outside(size, side, c):  # [B, size]: True where the square does not cover
        start = c[:, None] - side // 2
        index = jnp.arange(size)[None, :]
        return (index < start) | (index >= start + side)

    keep_rows = outside(height, sides[0], center[:, 0])  # [B, H]
    keep_cols = outside(width, sides[1], center[:, 1])  # [B, W]
    keep = keep_rows[:, :, None] | keep_cols[:, None, :]
    return images * keep[..., None].astype(images.dtype)


def apply_augment(images: jax.Array, draws: AugmentDraws, policy: AugmentPolicy) -> jax.Array:
    """DiffAugment with given draws: [B, H, W, C] -> [B, H, W, C] fp32."""
    x = jnp.asarray(images, jnp.float32)
    if policy.color:
        colored = contrast(saturation(brightness(x, draws.brightness), draws.saturation),
                           draws.contrast)
        x = jnp.where(draws.apply_color, colored, x)
    if policy.translation:
        x = jnp.where(draws.apply_translation, translate(x, draws.shift), x)
    if policy.cutout > 0:
        x = jnp.where(draws.apply_cutout, cutout(x, draws.cutout_center, policy.cutout), x)
    return x


def diff_augment(key: jax.Array, images: jax.Array, policy: AugmentPolicy = NORMAL) -> jax.Array:
    """DiffAugment of a batch: [B, H, W, C] -> [B, H, W, C] fp32, differentiable in `images`."""
    batch_size, height, width, _ = images.shape
    return apply_augment(images, draw_augment(key, policy, batch_size, height, width), policy)
