"""FlowMo transforms: torchvision Resize / RandomCrop / CenterCrop semantics on PIL images."""

import numpy as np
import pytest
from PIL import Image

from tokenizers_jax.data import transforms


def _image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "height, width, size, expected_hw",
    [
        (300, 451, 256, (256, 384)),  # landscape downscale: long = int(256 * 451 / 300)
        (451, 300, 256, (384, 256)),  # portrait
        (20, 30, 64, (64, 96)),  # smaller than the crop: scaled up
        (33, 33, 16, (16, 16)),
    ],
)
def test_resize_short_side_matches_pil_bilinear(height, width, size, expected_hw):
    image = _image(height, width)
    resized = transforms.resize_short_side(image, size)
    expected = np.asarray(
        Image.fromarray(image).resize(expected_hw[::-1], Image.Resampling.BILINEAR)
    )
    assert resized.dtype == np.uint8
    np.testing.assert_array_equal(resized, expected)


def test_resize_short_side_keeps_image_already_at_size():
    image = _image(32, 50)
    assert transforms.resize_short_side(image, 32) is image


def test_center_crop_rounds_like_torchvision():
    image = np.arange(5 * 8 * 3, dtype=np.uint8).reshape(5, 8, 3)
    # torchvision: top = int(round((5 - 2) / 2)) = 2, left = int(round((8 - 2) / 2)) = 3.
    np.testing.assert_array_equal(transforms.center_crop(image, 2), image[2:4, 3:5])


def test_random_crop_is_seeded_and_in_bounds():
    image = _image(40, 60)
    crop_a = transforms.random_crop(image, 32, np.random.default_rng(1))
    crop_b = transforms.random_crop(image, 32, np.random.default_rng(1))
    np.testing.assert_array_equal(crop_a, crop_b)
    assert crop_a.shape == (32, 32, 3)
    with pytest.raises(ValueError, match="cannot crop 64x64"):
        transforms.random_crop(image, 64, np.random.default_rng(0))


def test_flowmo_transforms_give_square_uint8():
    flowmo = transforms.get_transform("flowmo")
    image = _image(30, 70)
    train = flowmo.train(image, 24, np.random.default_rng(0))
    evaluation = flowmo.eval(image, 24)
    assert train.shape == evaluation.shape == (24, 24, 3)
    assert train.dtype == evaluation.dtype == np.uint8
    expected_eval = transforms.center_crop(transforms.resize_short_side(image, 24), 24)
    np.testing.assert_array_equal(evaluation, expected_eval)


def test_unknown_transform_is_an_error():
    with pytest.raises(ValueError, match="unknown data transform 'adm'"):
        transforms.get_transform("adm")
