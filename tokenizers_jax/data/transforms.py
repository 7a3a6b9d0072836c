"""Per-model image transforms on the host: uint8 HWC RGB in, uint8 [size, size, 3] out.

A transform is chosen by name (`data.transform` in the config) from `TRANSFORMS`. Each has a
random training variant and a deterministic evaluation variant. FlowMo's (spec 5) is
torchvision's `Resize(size)` (short side, PIL bilinear with antialiasing) followed by
`RandomCrop(size)` for training or `CenterCrop(size)` for evaluation; no flips.
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
