"""Per-model image transforms on the host: uint8 HWC RGB in, uint8 [size, size, 3] out.

A transform is chosen by name (`data.transform` in the config) from `TRANSFORMS`. Each has a
random training variant and a deterministic evaluation variant. FlowMo's (spec 5) is
torchvision's `Resize(size)` (short side, PIL bilinear with antialiasing) followed by
`RandomCrop(size)` for training or `CenterCrop(size)` for evaluation; no flips.

DetailFlow's code extraction (spec 6.2, used by the token export) takes ADM's square centre
crop (`adm_center_crop`) at 1.1x the image size and then torchvision's `TenCrop` (`ten_crop`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from PIL import Image


def resize_short_side(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes so the short side is `size`, as torchvision `T.Resize(size)` on a PIL image.

    The long side becomes `int(size * long / short)` (truncated); PIL's bilinear filter is
    antialiased on downscales. Images smaller than `size` are scaled up.

    Args:
      image: uint8 [H, W, 3].
    Returns:
      uint8 [size, W', 3] or [H', size, 3].
    """
    height, width = image.shape[:2]
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_width, new_height = (size, new_long) if width <= height else (new_long, size)
    if (new_height, new_width) == (height, width):
        return image
    resized = Image.fromarray(image).resize((new_width, new_height), Image.Resampling.BILINEAR)
    return np.asarray(resized)


def _check_crop(image: np.ndarray, size: int) -> tuple[int, int]:
    height, width = image.shape[:2]
    if height < size or width < size:
        raise ValueError(f"cannot crop {size}x{size} from an image of {height}x{width}")
    return height, width


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly placed crop, as torchvision `RandomCrop`. [H, W, 3] -> [size, size, 3]."""
    height, width = _check_crop(image, size)
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return image[top : top + size, left : left + size]


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central crop, rounded as torchvision `CenterCrop`. [H, W, 3] -> [size, size, 3]."""
    height, width = _check_crop(image, size)
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image[top : top + size, left : left + size]


def flowmo_train(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """FlowMo training: resize short side to `size`, random crop. [H, W, 3] -> [size, size, 3]."""
    return np.ascontiguousarray(random_crop(resize_short_side(image, size), size, rng))


def flowmo_eval(image: np.ndarray, size: int) -> np.ndarray:
    """FlowMo evaluation: resize short side to `size`, centre crop. [H, W, 3] -> [size, size, 3]."""
    return np.ascontiguousarray(center_crop(resize_short_side(image, size), size))


def adm_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """ADM's square centre crop (guided-diffusion `center_crop_arr`) on a PIL image.

    Halves the image with a box filter while its short side is at least 2 * size, resizes
    (PIL bicubic) so the short side is `size` (each side round(side * scale), Python rounding),
    then crops the centre, offsets floored.

    Args:
      image: uint8 [H, W, 3].
    Returns:
      uint8 [size, size, 3].
    """
    pil = Image.fromarray(image)
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(side // 2 for side in pil.size), Image.Resampling.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(round(side * scale) for side in pil.size), Image.Resampling.BICUBIC)
    resized = np.asarray(pil)
    top = (resized.shape[0] - size) // 2
    left = (resized.shape[1] - size) // 2
    return resized[top : top + size, left : left + size]


def five_crop(image: np.ndarray, size: int) -> list[np.ndarray]:
    """torchvision `FiveCrop` order: top-left, top-right, bottom-left, bottom-right, centre."""
    height, width = _check_crop(image, size)
    corners = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size)]
    crops = [image[top : top + size, left : left + size] for top, left in corners]
    return crops + [center_crop(image, size)]


def ten_crop(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision `TenCrop` (horizontal flip): the five crops, then the five of the mirrored
    image (so crop 5 is the mirrored top-right corner). [H, W, 3] -> [10, size, size, 3]."""
    return np.stack(five_crop(image, size) + five_crop(image[:, ::-1], size))


@dataclasses.dataclass(frozen=True)
class Transform:
    """A model's training (random) and evaluation (deterministic) image transforms."""

    train: Callable[[np.ndarray, int, np.random.Generator], np.ndarray]
    eval: Callable[[np.ndarray, int], np.ndarray]


TRANSFORMS: dict[str, Transform] = {
    "flowmo": Transform(train=flowmo_train, eval=flowmo_eval),
}


def get_transform(name: str) -> Transform:
    """Looks up a transform by its config name."""
    if name not in TRANSFORMS:
        raise ValueError(f"unknown data transform {name!r}; choose one of {sorted(TRANSFORMS)}")
    return TRANSFORMS[name]
