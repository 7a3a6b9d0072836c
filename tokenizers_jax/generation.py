"""Chunked, resumable class-conditional sampling into the ADM evaluator's .npz format.

    gen = tokenizers_jax.load_generator("converted/df16_gpt_l", tokenizer="converted/df16")
    path = generate_samples(gen, "samples/df16", num_samples=50_000, seed=0,
                            sampling=dict(cfg=1.45))        # -> samples/df16/samples.npz

Labels: sample i has class classes[i % len(classes)] (all classes by default), so 50,000
samples of 1000 classes are 50 per class and every run of 1000 consecutive samples holds each
class once, as the BT (bytedance/1d-tokenizer) sampler orders them. The ADM evaluator's
Inception Score splits the samples into consecutive parts of 5000, so this order matters.

Randomness: sample i comes from `generator.generate_images(labels, seed, first_index)` with
its own key fold_in(PRNGKey(seed), i) (the `api.Generator` contract), so the samples depend
neither on the batch size nor on how a run was interrupted.

Layout of the output directory OUT:
  settings.json       what is generated (generator and tokenizer configs and parameter
                      fingerprints, num_samples, classes, seed, sampling overrides); once
                      samples exist, a rerun with other settings is refused. The batch size
                      may change.
  chunks/chunk_<first>_<end>.npz   images uint8 [n, H, W, 3] and labels [n] of samples
                      first..end-1, written under a .tmp name and renamed when complete, so a
                      restart keeps every finished chunk and redoes only the missing samples.
  samples.npz         when all chunks are there: arr_0 uint8 [N, H, W, 3], arr_1 int32 [N]
                      (the ADM sample-batch format); the chunks are then deleted.
  grid.png            the first samples: a column per class (up to 16 columns), up to 8 rows.

Pixels: float [-1, 1] -> `api.to_uint8`, round(127.5 (x + 1)) clipped. The original DetailFlow
sampler writes clamp(127.5 x + 128, 0, 255) truncated to uint8 (spec detailflow.md 6.3), and
floor(127.5 x + 128) = floor(127.5 (x + 1) + 0.5) is rounding half up: the same values except
exactly at ties, where `np.round` rounds half to even. We keep one conversion for the library.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Any, Sequence

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from tokenizers_jax import adm_npz, api
from tokenizers_jax.token_export import json_differences, write_json_atomically
from tokenizers_jax.training.writer import image_grid

SETTINGS_FILE = "settings.json"
SAMPLES_FILE = "samples.npz"
GRID_FILE = "grid.png"
CHUNK_DIR = "chunks"
_CHUNK_NAME = re.compile(r"chunk_(\d+)_(\d+)\.npz")
GRID_MAX_COLUMNS, GRID_MAX_ROWS = 16, 8


def class_labels(num_samples: int, classes: Sequence[int]) -> np.ndarray:
    """int32 [num_samples]: sample i has class classes[i % len(classes)]."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if len(classes) == 0:
        raise ValueError("no classes to sample")
    classes = np.asarray(classes, np.int32)
    return classes[np.arange(num_samples) % len(classes)]


def params_fingerprint(params: Any) -> str:
    """A digest of every parameter's path, shape, dtype and bytes (identifies a checkpoint)."""
    digest = hashlib.blake2b(digest_size=16)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        array = np.asarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{array.shape}:{array.dtype}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def sample_settings(generator: api.Generator, num_samples: int, classes: Sequence[int],
                    seed: int, sampling: dict[str, Any]) -> dict[str, Any]:
    """What a run generates; a resumed run must agree on all of it."""
    try:
        json.dumps(sampling)
    except TypeError as e:
        raise TypeError(f"sampling overrides must be numbers, strings or booleans: {e}") from e
    settings = dict(
        num_samples=num_samples, classes=[int(c) for c in classes], seed=seed,
        sampling=sampling,
        generator=dict(config=generator.config.to_dict(),
                       params=params_fingerprint(generator.params)),
        tokenizer=dict(config=generator.tokenizer.config.to_dict(),
                       params=params_fingerprint(generator.tokenizer.params)),
    )
    return json.loads(json.dumps(settings))  # tuples -> lists, as read back


def check_settings(output_dir: str, settings: dict[str, Any]):
    """Writes the settings of a new output directory, or refuses those of another run.

    Settings protect samples: a directory without any (a run that failed before its first
    chunk) takes the new settings.
    """
    path = os.path.join(output_dir, SETTINGS_FILE)
    if not os.path.isfile(path):
        if os.path.isdir(output_dir) and os.listdir(output_dir):
            raise FileExistsError(f"{output_dir} is not empty and holds no {SETTINGS_FILE}; "
                                  "choose a new output directory")
        os.makedirs(output_dir, exist_ok=True)
        write_json_atomically(path, settings)
        return
    with open(path) as f:
        differences = json_differences(json.load(f), settings)
    if not differences:
        return
    chunk_dir = os.path.join(output_dir, CHUNK_DIR)
    has_samples = os.path.isfile(os.path.join(output_dir, SAMPLES_FILE)) or (
        os.path.isdir(chunk_dir) and any(map(_CHUNK_NAME.fullmatch, os.listdir(chunk_dir))))
    if not has_samples:
        write_json_atomically(path, settings)
        return
    raise ValueError(
        f"{output_dir} holds samples of other settings (they differ in "
        f"{', '.join(differences)}); resume with the same generator, tokenizer and settings, "
        "or choose a new output directory")


def check_sampling(generator: api.Generator, sampling: dict[str, Any]):
    """Raises ValueError for overrides that are not fields of the generator's `sampler`."""
    known = generator.config.get("sampler")
    unknown = sorted(set(sampling) - set(known or ())) if known is not None else []
    if unknown:
        raise ValueError(f"unknown sampling settings {unknown} for {generator.config.model.name};"
                         f" its sampler has {sorted(known)}")


def _finished_chunks(chunk_dir: str, num_samples: int) -> list[tuple[int, int, str]]:
    """(first, end, path) of the complete chunks, sorted; leftover .tmp files are removed."""
    chunks = []
    for name in sorted(os.listdir(chunk_dir)):
        match = _CHUNK_NAME.fullmatch(name)
        if match:
            chunks.append((int(match[1]), int(match[2]), os.path.join(chunk_dir, name)))
        elif name.endswith(".tmp"):
            os.remove(os.path.join(chunk_dir, name))  # cut short by an interruption
    chunks.sort()
    for (_, end, path), (first, _, _) in zip(chunks, chunks[1:]):
        if first < end:
            raise RuntimeError(f"overlapping sample chunks in {chunk_dir} ({path}); remove "
                               "the directory's chunks and sample again")
    if chunks and chunks[-1][1] > num_samples:
        raise RuntimeError(f"{chunks[-1][2]} lies beyond the {num_samples} samples")
    return chunks


def _missing_ranges(chunks: list[tuple[int, int, str]], num_samples: int
                    ) -> list[tuple[int, int]]:
    ranges, position = [], 0
    for first, end, _ in chunks + [(num_samples, num_samples, "")]:
        if position < first:
            ranges.append((position, first))
        position = max(position, end)
    return ranges


def _generate_chunk(generator: api.Generator, labels: np.ndarray, first: int, end: int,
                    batch_size: int, seed: int, sampling: dict[str, Any]) -> np.ndarray:
    """uint8 [end - first, H, W, 3]; the batch is padded to `batch_size` (one compiled
    shape); the padding's samples are drawn with their own keys and dropped."""
    batch = labels[first:end]
    padded = np.concatenate([batch, np.full(batch_size - len(batch), batch[-1], np.int32)])
    images = generator.generate_images(padded, seed=seed, first_index=first, **sampling)
    return api.to_uint8(images[:len(batch)])


def _grid(images: np.ndarray, num_classes: int) -> np.ndarray:
    """uint8 [rows * H, columns * W, 3] of the first images: a column per class."""
    columns = min(num_classes, GRID_MAX_COLUMNS, len(images))
    rows = min(GRID_MAX_ROWS, len(images) // columns)
    floats = images[:rows * columns].astype(np.float32) / 127.5 - 1.0
    return image_grid([floats[r * columns:(r + 1) * columns] for r in range(rows)])


def _assemble(output_dir: str, chunks: list[tuple[int, int, str]], labels: np.ndarray,
              num_classes: int):
    """chunks -> grid.png, then samples.npz; then the chunks are deleted."""
    grid_images = []
    for first, _, path in chunks:
        if first >= GRID_MAX_COLUMNS * GRID_MAX_ROWS:
            break
        with np.load(path) as chunk:
            grid_images.append(chunk["images"])
    image_shape = grid_images[0].shape[1:]
    Image.fromarray(_grid(np.concatenate(grid_images), num_classes)).save(
        os.path.join(output_dir, GRID_FILE))

    def pieces():
        for first, end, path in chunks:
            with np.load(path) as chunk:
                images = chunk["images"]
                if not np.array_equal(chunk["labels"], labels[first:end]):
                    raise RuntimeError(f"{path} holds other labels than this run's")
            if images.shape != (end - first, *image_shape):
                raise RuntimeError(f"{path} holds images shaped {images.shape}, expected "
                                   f"{(end - first, *image_shape)}")
            yield images

    num_samples = len(labels)
    adm_npz.write_npz(os.path.join(output_dir, SAMPLES_FILE), {
        "arr_0": ((num_samples, *image_shape), np.uint8, pieces()),
        "arr_1": ((num_samples,), np.int32, [labels]),
    })
    shutil.rmtree(os.path.join(output_dir, CHUNK_DIR))


def generate_samples(generator: api.Generator, output_dir: str, num_samples: int,
                     classes: Sequence[int] | None = None, seed: int = 0, batch_size: int = 64,
                     sampling: dict[str, Any] | None = None, progress: bool = True) -> str:
    """Generates (or finishes generating) class-conditional samples into OUT/samples.npz.

    Args:
      generator: an `api.Generator` (it shards its batches over devices itself).
      output_dir: OUT (created; resumed if it holds a run of the same settings).
      num_samples: N.
      classes: the class ids to cycle through (default all, 0..num_classes - 1).
      seed: the base of every sample's key.
      batch_size: samples per generator call (free to change between resumes).
      sampling: overrides of the generator's sampler fields, passed to `generate` (e.g.
        {"cfg": 1.45}).
      progress: show a progress bar (images/s, ETA).
    Returns:
      The path of OUT/samples.npz.
    """
    if jax.process_count() > 1:
        raise ValueError("sampling runs in one process (on its local devices); start it on one "
                         "host")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    classes = list(range(generator.num_classes)) if classes is None else list(classes)
    labels = class_labels(num_samples, classes)
    generator.check_labels(np.asarray(classes, np.int32))
    sampling = dict(sampling or {})
    check_sampling(generator, sampling)
    output_dir = os.path.abspath(output_dir)
    check_settings(output_dir, sample_settings(generator, num_samples, classes, seed, sampling))
    samples_path = os.path.join(output_dir, SAMPLES_FILE)
    chunk_dir = os.path.join(output_dir, CHUNK_DIR)
    if os.path.isfile(samples_path):
        shutil.rmtree(chunk_dir, ignore_errors=True)  # left by an interrupted clean-up
        return samples_path
    os.makedirs(chunk_dir, exist_ok=True)
    chunks = _finished_chunks(chunk_dir, num_samples)
    done = sum(end - first for first, end, _ in chunks)
    bar = tqdm(total=num_samples, initial=done, unit="img", desc="sampling", disable=not progress,
               dynamic_ncols=True)
    for start, stop in _missing_ranges(chunks, num_samples):
        for first in range(start, stop, batch_size):
            end = min(first + batch_size, stop)
            images = _generate_chunk(generator, labels, first, end, batch_size, seed, sampling)
            path = os.path.join(chunk_dir, f"chunk_{first:08d}_{end:08d}.npz")
            with open(f"{path}.tmp", "wb") as f:
                np.savez(f, images=images, labels=labels[first:end])
            os.replace(f"{path}.tmp", path)
            chunks.append((first, end, path))
            bar.update(end - first)
    bar.close()
    _assemble(output_dir, sorted(chunks), labels, len(classes))
    return samples_path
