"""`resize_bilinear` against `torch.nn.functional.interpolate(mode="bilinear")`."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tokenizers_jax.resize import resize_bilinear  # noqa: E402

SIZES = [
    ((256, 256), (224, 224)),  # ResNet-50 loss input
    ((37, 37), (299, 299)),  # Inception input, large upscale
    ((16, 16), (7, 7)),  # non-integer downscale
    ((5, 5), (12, 12)),  # non-integer upscale
    ((37, 20), (16, 41)),  # down in H, up in W
    ((9, 13), (9, 5)),  # one axis unchanged
]


def torch_resize(images: np.ndarray, size, antialias: bool) -> np.ndarray:
    """[B, H, W, C] -> [B, h, w, C] through torch's NCHW interpolate."""
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
    out = torch.nn.functional.interpolate(
        nchw, size=size, mode="bilinear", align_corners=False, antialias=antialias
    )
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("in_size,out_size", SIZES)
def test_matches_torch_interpolate(in_size, out_size, antialias):
    images = np.random.default_rng(0).standard_normal((2, *in_size, 3)).astype(np.float32)
    ours = np.asarray(resize_bilinear(images, out_size, antialias=antialias))
    assert ours.shape == (2, *out_size, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(
        ours, torch_resize(images, out_size, antialias), atol=1e-5, rtol=1e-5
    )


def test_antialias_changes_downscale():
    """The flag is honoured: antialiased and plain downscales differ (guards the test above)."""
    images = np.random.default_rng(1).standard_normal((1, 64, 64, 3)).astype(np.float32)
    plain = np.asarray(resize_bilinear(images, (16, 16), antialias=False))
    smooth = np.asarray(resize_bilinear(images, (16, 16), antialias=True))
    assert np.abs(plain - smooth).max() > 0.1


def test_leading_axes_and_same_size():
    images = np.random.default_rng(2).uniform(size=(2, 3, 10, 12, 1)).astype(np.float32)
    out = np.asarray(resize_bilinear(images, (6, 7), antialias=True))
    expected = torch_resize(images.reshape(6, 10, 12, 1), (6, 7), antialias=True)
    np.testing.assert_allclose(out.reshape(6, 6, 7, 1), expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(resize_bilinear(images, (10, 12), True)), images)
