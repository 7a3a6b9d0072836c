"""A random-access source over a directory tree of JPEG, PNG and WebP images.

Files are found recursively (hidden files excluded) and sorted by relative path, so every
process sees the same order. Files that are not JPEG/PNG/WebP images (by content, not by
extension) are skipped when the folder is scanned; files whose header is fine but whose data
are corrupt (e.g. truncated) are skipped when read, replaced by the next readable image. Both
kinds are counted in `skipped` and reported with a logged warning; neither is fatal.

Labels (for class-conditional models on exported tokens), ImageNet-folder style: an image's
class is the first directory of its path below the root (`root/<class>/.../image.jpg`);
images directly in the root form the class ".". `label_names` are the classes sorted, and an
image's label is its class's position in that list.

A folder can be split into a training part and a held-out part for evaluation
(`holdout_every=N`): every N-th readable image in sorted order is held out, so the split is
deterministic and spread over the whole tree. Both parts keep the labels of the whole folder.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

# PIL format names accepted; MPO is the JPEG variant written by many cameras.
IMAGE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP"})
# Errors PIL raises on unreadable or corrupt files.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_LOGGED_PATHS = 5


def read_rgb(path) -> np.ndarray:
    """Decodes an image file (path or file object) to RGB; grayscale, palette, RGBA -> RGB.

    Returns:
      uint8 [H, W, 3].
    """
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _is_image(path: str) -> bool:
    """Whether the file's header is a JPEG/PNG/WebP image (reads the header only)."""
    try:
        with Image.open(path) as image:
            return image.format in IMAGE_FORMATS
    except DECODE_ERRORS:
        return False


def _list_files(root: str) -> list[str]:
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        files.extend(os.path.join(directory, n) for n in names if not n.startswith("."))
    return sorted(files, key=lambda p: os.path.relpath(p, root))


def _class_name(relative_path: str) -> str:
    """The first directory of a path relative to the root; "." for files in the root."""
    head, _, rest = relative_path.partition(os.sep)
    return head if rest else "."


class ImageFolderSource:
    """Random access to the images under `root`: item i is uint8 [H, W, 3] RGB.

    Args:
      root: the directory.
      scan_threads: threads reading file headers while scanning.
      holdout_every: N > 0 holds out every N-th readable image (sorted order, from the first).
      part: "all" images, the "train" part (without the held-out ones), or the "holdout" part.
    Attributes:
      root: the directory.
      paths: the readable image files of the part, sorted.
      labels: the label of each path; label_names: the classes (of the whole folder), sorted.
      skipped: files skipped as unreadable (at scan time, plus any found corrupt when read
        in this process).
    """

    def __init__(self, root: str, scan_threads: int = 16, holdout_every: int = 0,
                 part: str = "all"):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist or is not a directory")
        if part not in ("all", "train", "holdout") or (part != "all" and holdout_every <= 0):
            raise ValueError(f"part must be 'all', or 'train' / 'holdout' with holdout_every > 0; "
                             f"got part={part!r}, holdout_every={holdout_every}")
        self.root = root
        files = _list_files(root)
        with concurrent.futures.ThreadPoolExecutor(scan_threads) as pool:
            readable = list(pool.map(_is_image, files))
        self.paths = [f for f, ok in zip(files, readable) if ok]
        classes = [_class_name(os.path.relpath(p, root)) for p in self.paths]
        self.label_names = tuple(sorted(set(classes)))
        label_of = {name: label for label, name in enumerate(self.label_names)}
        self.labels = [label_of[name] for name in classes]
        self.skipped: list[str] = []
        self._corrupt: set[str] = set()
        self._report_skipped([f for f, ok in zip(files, readable) if not ok])
        if not self.paths:
            raise ValueError(
                f"image folder {root!r} contains no JPEG, PNG or WebP images "
                f"({len(files)} files found, none readable)"
            )
        if part != "all":
            total = len(self.paths)
            keep = [(i % holdout_every == 0) == (part == "holdout") for i in range(total)]
            self.paths = [p for p, k in zip(self.paths, keep) if k]
            self.labels = [label for label, k in zip(self.labels, keep) if k]
            if not self.paths:
                raise ValueError(
                    f"image folder {root!r} has {total} image(s): holding out every "
                    f"{holdout_every}-th (data.holdout_every) leaves none to train on; add "
                    "images, set data.eval_path to a separate folder, or data.holdout_every=0")

    def _report_skipped(self, paths: list[str]) -> None:
        if not paths:
            return
        self.skipped.extend(paths)
        logger.warning(
            "image folder %s: skipped %d unreadable or non-image file(s) (%d in total so far), "
            "e.g. %s", self.root, len(paths), len(self.skipped), paths[:_LOGGED_PATHS],
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        """uint8 [H, W, 3]; a corrupt file is skipped for the next readable one (in order)."""
        return self.read_labelled(index)[0]

    def read_labelled(self, index: int) -> tuple[np.ndarray, int]:
        """(uint8 [H, W, 3], label) of the image read (after skipping corrupt files)."""
        for offset in range(len(self.paths)):
            position = (index + offset) % len(self.paths)
            path = self.paths[position]
            if path in self._corrupt:
                continue
            try:
                return read_rgb(path), self.labels[position]
            except DECODE_ERRORS:
                self._corrupt.add(path)
                self._report_skipped([path])
        raise ValueError(f"image folder {self.root!r}: no image could be decoded")

    def __repr__(self) -> str:
        return (
            f"ImageFolderSource({self.root!r}, {len(self.paths)} images, "
            f"{len(self.skipped)} skipped)"
        )
