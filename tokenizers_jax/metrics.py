"""Evaluation metrics: PSNR, SSIM, FID statistics and distance, codebook usage, bits per pixel,
and the generation metrics of the ADM evaluator: Inception Score, precision and recall.

Per-image metrics are JAX (jit-able, fp32) on NHWC images. FID statistics accumulate on the
host in float64 numpy, like pytorch-fid. sFID is `frechet_distance` on the spatial features
(`perceptual.inception.inception_outputs`).

FlowMo's evaluator (spec flowmo.md section 8) has two quirks, reproduced by
`batch_psnr_compat` and `uint8_truncate`; use `psnr`/`ssim` for the per-image metrics and the
compat versions only to compare with the paper's numbers.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg, special

# ---- PSNR / SSIM -------------------------------------------------------------------------------

_UINT8_LEVELS = np.arange(256, dtype=np.float32) / np.float32(255)  # k / 255 in fp32, as torch


def psnr(a: jax.Array, b: jax.Array, data_range: float = 1.0) -> jax.Array:
    """Per-image PSNR, as skimage `peak_signal_noise_ratio(a[i], b[i], data_range=...)`.

    Args:
      a, b: [B, H, W, C] images.
      data_range: max - min of the value range (1.0 for [0, 1], 255 for uint8 values).
    Returns:
      [B] in dB (inf for identical images).
    """
    diff = jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)
    mse = jnp.mean(diff**2, axis=(1, 2, 3))
    return 10.0 * jnp.log10(data_range**2 / mse)


def uint8_truncate(images01: jax.Array) -> jax.Array:
    """FlowMo's `(img01 * 255).to(uint8) / 255`: truncates (not rounds) to the uint8 grid.

    Computed in fp32 like the original, so a ground truth that went uint8 -> [-1, 1] -> [0, 1]
    loses one level on 95 of the 256 values. Values are clipped to [0, 1] first (torch's cast of
    out-of-range floats is undefined). [..., C] -> [..., C] float32 multiples of 1/255.
    """
    scaled = jnp.clip(jnp.asarray(images01, jnp.float32), 0.0, 1.0) * 255.0
    # A table, not `/ 255`: XLA turns division by a constant into an inexact reciprocal multiply.
    return jnp.asarray(_UINT8_LEVELS)[jnp.floor(scaled).astype(jnp.int32)]


def batch_psnr_compat(images01: jax.Array, reconstructions01: jax.Array) -> jax.Array:
    """FlowMo-evaluator PSNR (compatibility only): one PSNR over the whole batch.

    The original computes `peak_signal_noise_ratio` on the whole uint8-truncated batch
    (data_range 1) and reports its mean over batches of 5 images: the mean over batches of
    10 log10(1 / MSE_batch), not a per-image mean, so it depends on the batch size. Call this
    on consecutive batches of 5 (in val-set order) and average to reproduce the paper's PSNR.

    Args:
      images01, reconstructions01: [B, H, W, C] in [0, 1] (B = 5 in the original).
    Returns:
      A scalar in dB.
    """
    diff = uint8_truncate(images01) - uint8_truncate(reconstructions01)
    return 10.0 * jnp.log10(1.0 / jnp.mean(diff**2))


def ssim(a: jax.Array, b: jax.Array, data_range: float = 1.0, win_size: int = 7) -> jax.Array:
    """Per-image SSIM, as skimage `structural_similarity(a[i], b[i], data_range=...,
    channel_axis=-1)` with its defaults: uniform win_size x win_size window, K1 0.01, K2 0.03,
    sample covariance (N / (N - 1)), mean over the map without a (win_size - 1) / 2 border
    (exactly the positions whose window fits, so no padding is needed), then over channels.

    Args:
      a, b: [B, H, W, C] images, H, W >= win_size.
    Returns:
      [B].
    """
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    # Variances are shift invariant: centre first so fp32 E[x^2] - E[x]^2 cancels less.
    offset = jnp.mean(a, axis=(1, 2), keepdims=True)
    a_c, b_c = a - offset, b - offset

    def window_mean(x):  # [B, H, W, C] -> [B, H - win + 1, W - win + 1, C]
        return nn.avg_pool(x, (win_size, win_size), padding="VALID")

    mean_a_c, mean_b_c = window_mean(a_c), window_mean(b_c)
    num = win_size * win_size
    cov_norm = num / (num - 1)
    var_a = cov_norm * (window_mean(a_c * a_c) - mean_a_c**2)
    var_b = cov_norm * (window_mean(b_c * b_c) - mean_b_c**2)
    cov_ab = cov_norm * (window_mean(a_c * b_c) - mean_a_c * mean_b_c)
    mean_a, mean_b = mean_a_c + offset, mean_b_c + offset
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mean_a * mean_b + c1) * (2 * cov_ab + c2)) / (
        (mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2)
    )
    return jnp.mean(ssim_map, axis=(1, 2, 3))


# ---- FID ---------------------------------------------------------------------------------------


class FeatureStats:
    """Streaming float64 mean/covariance of feature vectors (np.cov, rowvar False, ddof 1).

    Each process updates its own; `merge` combines them (e.g. after gathering `count`,
    `sum` and `outer` from every host).
    """

    def __init__(self, dim: int):
        self.count = 0
        self.sum = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def update(self, features) -> None:
        """Adds features [N, dim] (any float dtype, device or host)."""
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or features.shape[1] != self.sum.shape[0]:
            raise ValueError(f"expected features [N, {self.sum.shape[0]}], got {features.shape}")
        self.count += features.shape[0]
        self.sum += features.sum(axis=0)
        self.outer += features.T @ features

    def merge(self, other: FeatureStats) -> FeatureStats:
        """A new accumulator holding the features of both."""
        merged = FeatureStats(self.sum.shape[0])
        merged.count = self.count + other.count
        merged.sum = self.sum + other.sum
        merged.outer = self.outer + other.outer
        return merged

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean [dim], covariance [dim, dim]) in float64; needs at least 2 features."""
        if self.count < 2:
            raise ValueError(f"need at least 2 features for a covariance, have {self.count}")
        mean = self.sum / self.count
        cov = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return mean, cov


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 s2)), as pytorch-fid.

    If sqrtm of the product is not finite (near-singular covariances), `eps` is added to both
    diagonals and it is retried. A complex result is accepted only if its diagonal is real to
    1e-3; its real part is used.
    """
    mu1, mu2 = np.atleast_1d(np.float64(mu1)), np.atleast_1d(np.float64(mu2))
    sigma1, sigma2 = np.atleast_2d(np.float64(sigma1)), np.atleast_2d(np.float64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("the two sets of statistics have different dimensions")
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has an imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ---- Generation: Inception Score, precision and recall (the ADM evaluator's definitions) -------


def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
    """The ADM evaluator's Inception Score (after improved-gan's).

    The rows are cut into consecutive parts of `split_size` (the last may be shorter); each
    part scores exp(mean_i KL(p_i || mean_j p_j)) and the result is the mean over the parts
    (ADM reports no spread). So the order of the samples matters: a part holding few classes
    scores low, which is why class-balanced samples cycle through the classes.

    Args:
      probs: [N, C] class probabilities (softmax of `InceptionOutputs.logits`).
      split_size: rows per part (ADM: 5000).
    Returns:
      The score, in [1, C].
    """
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"expected class probabilities [N, C] with N >= 1, got {probs.shape}")
    if split_size < 1:
        raise ValueError(f"split_size must be positive, got {split_size}")
    scores = []
    for start in range(0, probs.shape[0], split_size):
        part = probs[start:start + split_size]
        kl = special.rel_entr(part, part.mean(axis=0, keepdims=True)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


def _squared_distances(u: jax.Array, v: jax.Array) -> jax.Array:
    """[R, D], [C, D] -> [R, C] squared Euclidean distances, |u|^2 - 2 u.v + |v|^2 clipped at
    0 (the ADM evaluator's formula; it computes it in float16, we in float32)."""
    cross = jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(jnp.sum(u * u, 1)[:, None] - 2 * cross + jnp.sum(v * v, 1)[None], 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_neighbour_distances(rows: jax.Array, features: jax.Array, k: int) -> jax.Array:
    """[R, D] rows of `features` [N, D] -> [R], the (k + 1)-th smallest squared distance to
    `features`: the k-th nearest neighbour, as the row itself is at distance 0."""
    smallest = -jax.lax.top_k(-_squared_distances(rows, features), k + 1)[0]  # [R, k + 1]
    return smallest[:, k]


@jax.jit
def _inside_any_ball(rows: jax.Array, centres: jax.Array, radii: jax.Array) -> jax.Array:
    """[R, D] -> bool [R]: whether each row lies within a ball (centres [C, D], squared radii
    [C]), boundary included."""
    return jnp.any(_squared_distances(rows, centres) <= radii[None], axis=1)


def _by_row_blocks(fn, rows: np.ndarray, block_size: int, *args) -> np.ndarray:
    """fn(rows block [block_size, D], *args) -> [block_size], over `rows` [N, D] in blocks
    (the last one zero-padded, so one compiled shape) -> [N]."""
    rows = np.asarray(rows, np.float32)
    block_size = min(block_size, rows.shape[0])
    outputs = []
    for start in range(0, rows.shape[0], block_size):
        block = rows[start:start + block_size]
        padded = np.zeros((block_size, rows.shape[1]), np.float32)
        padded[:len(block)] = block
        outputs.append(np.asarray(fn(padded, *args))[:len(block)])
    return np.concatenate(outputs)


def manifold_radii(features: np.ndarray, k: int = 3, block_size: int = 1000) -> np.ndarray:
    """The ADM evaluator's manifold estimate: each feature's squared distance to its k-th
    nearest neighbour among `features` (ManifoldEstimator.manifold_radii, nhood_sizes=(k,)).

    Args:
      features: [N, D], N > k.
      block_size: rows per device step ([block_size, N] distances at a time).
    Returns:
      float32 [N] squared radii.
    """
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or features.shape[0] <= k:
        raise ValueError(f"need features [N, D] with N > k = {k}, got {features.shape}")
    on_device = jnp.asarray(features)
    return _by_row_blocks(lambda rows: _kth_neighbour_distances(rows, on_device, k), features,
                          block_size)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3,
                     block_size: int = 1000) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) as the ADM evaluator computes
    them with k = 3: precision is the share of `fake` features inside some ball around a
    `real` feature with its k-NN radius; recall the share of `real` inside the `fake` balls.

    Args:
      real: [N1, D] reference features (ADM: the reference batch's pool_3 activations).
      fake: [N2, D] sample features.
    Returns:
      (precision, recall).
    """
    real, fake = np.asarray(real, np.float32), np.asarray(fake, np.float32)
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"feature dimensions differ: {real.shape} and {fake.shape}")
    real_radii = jnp.asarray(manifold_radii(real, k, block_size))
    fake_radii = jnp.asarray(manifold_radii(fake, k, block_size))
    real_on_device, fake_on_device = jnp.asarray(real), jnp.asarray(fake)
    precision = _by_row_blocks(_inside_any_ball, fake, block_size, real_on_device, real_radii)
    recall = _by_row_blocks(_inside_any_ball, real, block_size, fake_on_device, fake_radii)
    return float(np.mean(precision)), float(np.mean(recall))


# ---- Tokens ------------------------------------------------------------------------------------


class CodebookUsage(NamedTuple):
    fraction_used: jax.Array  # share of the codebook entries that occur at least once
    perplexity: jax.Array  # exp(entropy of the empirical code distribution), in [1, size]


def codebook_usage(indices: jax.Array, codebook_size: int) -> CodebookUsage:
    """Usage statistics of token indices (any shape, values in [0, codebook_size)).

    Builds a histogram of `codebook_size` bins, so it suits codebooks up to a few million.
    """
    return codebook_usage_from_counts(jnp.bincount(jnp.ravel(indices), length=codebook_size))


def codebook_usage_from_counts(counts: jax.Array) -> CodebookUsage:
    """Usage statistics from a histogram of code counts [codebook_size] (e.g. accumulated
    over an evaluation): the fraction of codes used and the perplexity exp(H)."""
    counts = jnp.asarray(counts, jnp.float32)
    probs = counts / jnp.sum(counts)
    entropy = -jnp.sum(jnp.where(counts > 0, probs * jnp.log(jnp.where(counts > 0, probs, 1)), 0))
    return CodebookUsage(jnp.mean(counts > 0), jnp.exp(entropy))


def bits_per_pixel(num_tokens: int, bits_per_token: float, height: int, width: int) -> float:
    """Compression rate: num_tokens * bits_per_token / (height * width).

    bits_per_token is log2(codebook size) for VQ and the number of bits for LFQ.
    """
    return num_tokens * bits_per_token / (height * width)
