"""Metrics against skimage / numpy / scipy / torch computations."""

import jax
import numpy as np
import pytest
from scipy import linalg
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from tokenizers_jax import metrics


def noisy_pair(shape, noise, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.uniform(size=shape)
    b = np.clip(a + noise * rng.standard_normal(shape), 0, 1)
    return a.astype(np.float32), b.astype(np.float32)


def smooth_bright_pair(size=48, seed=0):
    """Near-flat images around 0.9: tiny variances, where fp32 cancellation would show."""
    x = np.linspace(0, 1, size)
    image = 0.9 + 0.05 * np.sin(6 * x)[:, None, None] * np.cos(4 * x)[None, :, None]
    image = np.broadcast_to(image, (size, size, 3))
    other = image + 1e-3 * np.random.default_rng(seed).standard_normal(image.shape)
    return image[None].astype(np.float32), other[None].astype(np.float32)


@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_psnr_matches_skimage(data_range):
    a, b = noisy_pair((3, 20, 17, 3), 0.1)
    a, b = a * data_range, b * data_range
    expected = [peak_signal_noise_ratio(x, y, data_range=data_range) for x, y in zip(a, b)]
    np.testing.assert_allclose(metrics.psnr(a, b, data_range), expected, rtol=1e-5)


def test_batch_psnr_compat_is_one_psnr_over_the_truncated_batch():
    a, b = noisy_pair((5, 16, 16, 3), 0.05, seed=1)
    torch = pytest.importorskip("torch")

    def original(x):  # the evaluator's `(img01 * 255).to(uint8)`, then / 255 in fp32
        return ((torch.from_numpy(x) * 255).to(torch.uint8).float() / 255).numpy()

    expected = peak_signal_noise_ratio(original(a), original(b))  # data_range 1 for floats
    np.testing.assert_allclose(metrics.batch_psnr_compat(a, b), expected, rtol=1e-5)
    per_image_mean = np.mean(metrics.psnr(original(a), original(b)))
    assert abs(float(metrics.batch_psnr_compat(a, b)) - per_image_mean) > 1e-3


def test_uint8_truncate_matches_torch_and_the_95_shifted_levels():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).uniform(size=(1000,)).astype(np.float32)
    expected = (torch.from_numpy(x) * 255).to(torch.uint8).float() / 255
    np.testing.assert_array_equal(metrics.uint8_truncate(x), expected.numpy())
    # uint8 k -> k / 127.5 - 1 (float64, stored fp32) -> (x + 1) / 2 -> truncation: spec section 8.
    levels = np.arange(256)
    images11 = (levels / 127.5 - 1).astype(np.float32)
    back = np.asarray(metrics.uint8_truncate((images11 + 1) / 2)) * 255
    shifted = np.round(back).astype(int) != levels
    assert shifted.sum() == 95 and np.all(np.round(back[shifted]) == levels[shifted] - 1)


@pytest.mark.parametrize("data_range", [1.0, 2.0])
def test_ssim_matches_skimage(data_range):
    a, b = noisy_pair((3, 30, 23, 3), 0.1, seed=3)
    a, b = a * data_range, b * data_range
    expected = [
        structural_similarity(x, y, data_range=data_range, channel_axis=-1)
        for x, y in zip(a.astype(np.float64), b.astype(np.float64))
    ]
    np.testing.assert_allclose(metrics.ssim(a, b, data_range), expected, atol=1e-5)


def test_ssim_near_flat_images_and_identity():
    a, b = smooth_bright_pair()
    expected = structural_similarity(
        a[0].astype(np.float64), b[0].astype(np.float64), data_range=1.0, channel_axis=-1
    )
    np.testing.assert_allclose(metrics.ssim(a, b, 1.0), [expected], atol=1e-5)
    np.testing.assert_allclose(metrics.ssim(a, a, 1.0), [1.0], atol=1e-6)


def test_metrics_jit():
    a, b = noisy_pair((2, 16, 16, 3), 0.1)
    np.testing.assert_allclose(jax.jit(metrics.ssim)(a, b), metrics.ssim(a, b), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(metrics.psnr)(a, b), metrics.psnr(a, b), rtol=1e-6)


def correlated_features(n, dim, seed):
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    return rng.standard_normal((n, dim)) @ mixing + rng.uniform(0, 1, dim)


def test_feature_stats_streaming_and_merge_match_np_cov():
    features = correlated_features(500, 16, seed=0).astype(np.float32)
    host_a, host_b = metrics.FeatureStats(16), metrics.FeatureStats(16)
    for chunk in np.array_split(features[:300], 7):
        host_a.update(chunk)
    host_b.update(jax.numpy.asarray(features[300:]))
    mean, cov = host_a.merge(host_b).mean_cov()
    reference = features.astype(np.float64)
    np.testing.assert_allclose(mean, reference.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(reference, rowvar=False), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="expected features"):
        host_a.update(features[:, :8])


def fid_by_eigenvalues(mu1, s1, mu2, s2):
    """tr sqrt(s1 s2) = sum of sqrt(eigenvalues of s1^1/2 s2 s1^1/2) (symmetric PSD)."""
    values, vectors = np.linalg.eigh(s1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    trace_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)))
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt


def test_frechet_distance_matches_direct_computation():
    stats = []
    for seed, shift in ((1, 0.0), (2, 0.3)):
        accumulator = metrics.FeatureStats(32)
        accumulator.update(correlated_features(400, 32, seed) + shift)
        stats.append(accumulator.mean_cov())
    (mu1, s1), (mu2, s2) = stats
    fid = metrics.frechet_distance(mu1, s1, mu2, s2)
    np.testing.assert_allclose(fid, fid_by_eigenvalues(mu1, s1, mu2, s2), rtol=1e-6)
    assert fid > 1.0
    assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-6


def test_frechet_distance_fallback_and_imaginary_check(monkeypatch):
    mu, sigma = np.zeros(3), np.diag([1.0, 2.0, 3.0])
    calls, sqrtm = [], linalg.sqrtm

    def sqrtm_failing_once(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else sqrtm(matrix)

    monkeypatch.setattr(metrics.linalg, "sqrtm", sqrtm_failing_once)
    fid = metrics.frechet_distance(mu, sigma, mu, sigma, eps=1e-2)
    np.testing.assert_allclose(calls[1], (sigma + 1e-2 * np.eye(3)) @ (sigma + 1e-2 * np.eye(3)))
    np.testing.assert_allclose(fid, 2 * np.trace(sigma) - 2 * (np.trace(sigma) + 3e-2), rtol=1e-9)

    monkeypatch.setattr(metrics.linalg, "sqrtm", lambda m: m + 0.5j * np.eye(len(m)))
    with pytest.raises(ValueError, match="imaginary component"):
        metrics.frechet_distance(mu, sigma, mu, sigma)


def test_codebook_usage():
    indices = np.array([[0, 0, 1, 1], [2, 2, 3, 3]])  # 4 of 8 codes, uniformly
    usage = metrics.codebook_usage(indices, 8)
    np.testing.assert_allclose(usage.fraction_used, 0.5)
    np.testing.assert_allclose(usage.perplexity, 4.0, rtol=1e-6)
    skewed = np.array([0] * 6 + [1, 2])
    probs = np.array([6, 1, 1]) / 8
    usage = jax.jit(metrics.codebook_usage, static_argnums=1)(skewed, 16)
    np.testing.assert_allclose(usage.fraction_used, 3 / 16)
    np.testing.assert_allclose(usage.perplexity, np.exp(-np.sum(probs * np.log(probs))), rtol=1e-6)
    from_counts = metrics.codebook_usage_from_counts(np.bincount(skewed, minlength=16))
    np.testing.assert_allclose(from_counts.perplexity, usage.perplexity, rtol=1e-6)
    np.testing.assert_allclose(from_counts.fraction_used, 3 / 16)


def test_bits_per_pixel():
    # FlowMo-Lo: 256 tokens x 18 bits on 256x256 images; DetailFlow: 128 tokens, 8192 codes.
    assert metrics.bits_per_pixel(256, 18, 256, 256) == pytest.approx(256 * 18 / 65536)
    assert metrics.bits_per_pixel(128, np.log2(8192), 256, 256) == pytest.approx(128 * 13 / 65536)


# ---- Generation metrics: independent re-statements of the ADM evaluator's definitions ---------


def random_probs(shape, seed=0, sharpness=3.0):
    logits = sharpness * np.random.default_rng(seed).standard_normal(shape)
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def test_inception_score_matches_the_entropy_identity_per_split():
    """exp(mean_i KL(p_i || m)) = exp(H(m) - mean_i H(p_i)) on each consecutive part, then the
    mean over parts; the last part is shorter (23 = 10 + 10 + 3)."""
    from scipy.stats import entropy

    probs = random_probs((23, 7))
    expected = []
    for part in (probs[:10], probs[10:20], probs[20:]):
        expected.append(np.exp(entropy(part.mean(axis=0)) - np.mean(entropy(part, axis=1))))
    np.testing.assert_allclose(metrics.inception_score(probs, split_size=10), np.mean(expected),
                               rtol=1e-10)
    whole = np.exp(entropy(probs.mean(axis=0)) - np.mean(entropy(probs, axis=1)))
    np.testing.assert_allclose(metrics.inception_score(probs, split_size=5000), whole, rtol=1e-10)


def test_inception_score_extremes_and_the_order_of_samples():
    confident = np.eye(5)[np.arange(20) % 5]  # each class equally often, certain predictions
    assert metrics.inception_score(confident, split_size=10) == pytest.approx(5.0)
    assert metrics.inception_score(np.full((8, 5), 0.2)) == pytest.approx(1.0)
    # Sorted by class, a part of 4 sees at most 2 classes: the score drops.
    sorted_by_class = np.eye(5)[np.sort(np.arange(20) % 5)]
    assert metrics.inception_score(sorted_by_class, split_size=4) <= 2.0 + 1e-9
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        metrics.inception_score(np.zeros((0, 5)))


def brute_force_precision_recall(real, fake, k):
    """The definitions in float64, on full distance matrices."""
    from scipy.spatial.distance import cdist

    real_radii = np.sort(cdist(real, real, "sqeuclidean"), axis=1)[:, k]
    fake_radii = np.sort(cdist(fake, fake, "sqeuclidean"), axis=1)[:, k]
    fake_to_real = cdist(fake, real, "sqeuclidean")  # [N2, N1]
    precision = np.mean(np.any(fake_to_real <= real_radii[None], axis=1))
    recall = np.mean(np.any(fake_to_real.T <= fake_radii[None], axis=1))
    return real_radii, precision, recall


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_match_brute_force(k):
    rng = np.random.default_rng(k)
    real = rng.standard_normal((37, 6)).astype(np.float32)
    fake = (0.7 * rng.standard_normal((53, 6)) + 0.4 * k).astype(np.float32)  # partly overlapping
    radii, precision, recall = brute_force_precision_recall(real.astype(np.float64),
                                                            fake.astype(np.float64), k)
    # Blocks of 16 rows: neither 37 nor 53 is a multiple, so padded blocks are exercised.
    np.testing.assert_allclose(metrics.manifold_radii(real, k, block_size=16), radii, rtol=1e-4)
    got = metrics.precision_recall(real, fake, k, block_size=16)
    assert 0 < precision < 1 and 0 < recall < 1
    assert got == (pytest.approx(precision), pytest.approx(recall))


def test_precision_recall_of_identical_and_disjoint_sets():
    real = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    assert metrics.precision_recall(real, real.copy()) == (1.0, 1.0)
    assert metrics.precision_recall(real, real + 100.0) == (0.0, 0.0)
    with pytest.raises(ValueError, match="N > k = 3"):
        metrics.manifold_radii(real[:3])
