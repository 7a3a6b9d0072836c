"""The resizes against `torch.nn.functional.interpolate` (bilinear, area, bicubic)."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tokenizers_jax.resize import (  # noqa: E402
    apply_resize_matrices,
    degrade,
    degrade_matrix,
    resize_area,
    resize_bicubic,
    resize_bilinear,
)

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


# --- area (adaptive average pooling) and bicubic (A = -0.75) --------------------------------

MATRIX_SIZES = [
    ((256, 256), (44, 44)),  # DetailFlow R(16): non-integer area ratio
    ((256, 256), (224, 224)),  # DINO input, downscale
    ((44, 44), (48, 48)),  # DetailFlow R(16) -> out_res 48
    ((16, 16), (224, 224)),  # DINO input, large upscale
    ((9, 13), (5, 20)),  # down in H, up in W, odd sizes
    ((7, 7), (3, 3)),  # small non-integer downscale (bicubic aliases like torch's)
]


def torch_interpolate(images: np.ndarray, size, mode: str) -> np.ndarray:
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
    kwargs = {} if mode == "area" else {"align_corners": False}
    out = torch.nn.functional.interpolate(nchw, size=size, mode=mode, **kwargs)
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("mode,resize", [("area", resize_area), ("bicubic", resize_bicubic)])
@pytest.mark.parametrize("in_size,out_size", MATRIX_SIZES)
def test_area_and_bicubic_match_torch(mode, resize, in_size, out_size):
    images = np.random.default_rng(3).uniform(-1, 1, (2, *in_size, 3)).astype(np.float32)
    ours = np.asarray(resize(images, out_size))
    assert ours.shape == (2, *out_size, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, torch_interpolate(images, out_size, mode), atol=2e-6)


def test_area_is_not_bilinear_and_bicubic_is_not_jax_cubic():
    """Guards the test above: the two modes differ from their near neighbours."""
    images = np.random.default_rng(4).uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
    area = np.asarray(resize_area(images, (44, 44)))
    assert np.abs(area - np.asarray(resize_bilinear(images, (44, 44), True))).max() > 0.05
    small = images[:, :12, :12]
    ours = np.asarray(resize_bicubic(small, (40, 40)))
    jax_cubic = np.asarray(jax.image.resize(small, (1, 40, 40, 3), "cubic"))
    assert np.abs(ours - jax_cubic).max() > 0.01


@pytest.mark.parametrize("low,out", [(1, 16), (6, 16), (44, 48), (128, 128), (251, 256)])
def test_degrade_matches_the_two_torch_calls(low, out):
    """Spec 2: area 256 -> R(t), then bicubic R(t) -> out_res (skipped when equal)."""
    images = np.random.default_rng(5).uniform(-1, 1, (2, 256, 256, 3)).astype(np.float32)
    expected = torch_interpolate(images, (low, low), "area")
    if low != out:
        expected = torch_interpolate(expected, (out, out), "bicubic")
    ours = np.asarray(degrade(images, low, out))
    np.testing.assert_allclose(ours, expected, atol=5e-6)


def test_degrade_matrix_can_be_traced():
    """One compiled function serves every R(t) of an out_res bucket: the matrix is an input."""
    images = np.random.default_rng(6).uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
    table = np.stack([degrade_matrix(64, low, 16) for low in (3, 9, 16)]).astype(np.float32)
    calls = []

    @jax.jit
    def step(images, matrix):
        calls.append(1)
        return apply_resize_matrices(images, matrix, matrix)

    for index, low in enumerate((3, 9, 16)):
        out = np.asarray(step(images, table[index]))
        np.testing.assert_allclose(out, np.asarray(degrade(images, low, 16)), atol=1e-6)
    assert len(calls) == 1
