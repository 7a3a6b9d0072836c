"""grain input pipelines: per-process batches of uint8 images for training and evaluation.

Batches are laid out so that the global batch does not depend on the number of processes:
global batch j is examples [j * G, (j + 1) * G) of the (shuffled) example sequence, and
process p receives its slice [j * G + p * L, j * G + (p + 1) * L), L = G / process_count.
Concatenating the local batches in process order gives the global batch.

Training shuffles globally with a fresh order every epoch (no shuffle buffer; the original
FlowMo samples with replacement per GPU), repeats forever, and is exactly resumable. Save its state in an orbax checkpoint beside the train
state with grain's handler args, as a composite item:

    import grain, orbax.checkpoint as ocp
    train_iter = make_train_iterator(config.data, global_batch_size=batch_size)
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iterator=grain.checkpoint.CheckpointSave(train_iter)))
    ...
    train_iter = make_train_iterator(config.data, global_batch_size=batch_size)  # same config
    manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data_iterator=grain.checkpoint.CheckpointRestore(train_iter)))
    # train_iter now yields exactly the batches that followed the save.

Each process writes its own small JSON state file (named by `jax.process_index()`).
`train_iter.get_state()` / `set_state()` do the same in memory.

Exported tokens (`data.name = "tokens"`, `data.path` = a token export; see `data.tokens`) go
through the same shuffling, batching and process layout, with one of each example's views
drawn at random per access instead of the image transform: batches are
{"tokens": int32 [L, *token_shape], "label": int32 [L]} (evaluation: the canonical view, plus
"mask").
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Iterator

import grain
import jax
from absl import flags
import ml_collections
import numpy as np

from tokenizers_jax.data import sample_photos, tokens
from tokenizers_jax.data.image_folder import ImageFolderSource
from tokenizers_jax.data.tfds_source import TfdsImageSource
from tokenizers_jax.data.transforms import get_transform

Batch = dict[str, np.ndarray]
logger = logging.getLogger(__name__)


def _sample_photos_source(config: ml_collections.ConfigDict, split: str, seed: int):
    if split == "train":
        return sample_photos.SamplePhotosSource(
            "train", config.crops_per_photo, config.min_crop_fraction, seed
        )
    return sample_photos.SamplePhotosSource(
        "eval", config.eval_crops_per_photo, config.min_crop_fraction, sample_photos.EVAL_SEED
    )


def _image_folder_source(config: ml_collections.ConfigDict, split: str, seed: int):
    """data.path trains; data.eval_path evaluates, else a held-out part of data.path."""
    del seed
    if not config.path:
        raise ValueError("data.name='image_folder' needs data.path (a directory of images)")
    if config.eval_path:
        return ImageFolderSource(config.path if split == "train" else config.eval_path)
    if config.holdout_every <= 0:
        if split == "eval":
            logger.warning("image_folder: evaluating on the training images of %s "
                           "(data.eval_path is unset and data.holdout_every=0)", config.path)
        return ImageFolderSource(config.path)
    source = ImageFolderSource(config.path, holdout_every=config.holdout_every,
                               part="train" if split == "train" else "holdout")
    if split == "eval":
        logger.info("image_folder: evaluating on %d images of %s held out from training (every "
                    "%d-th, data.holdout_every)", len(source), config.path, config.holdout_every)
    return source


def _imagenet_source(config: ml_collections.ConfigDict, split: str, seed: int):
    del seed
    tfds_split = config.train_split if split == "train" else config.eval_split
    return TfdsImageSource("imagenet2012", tfds_split, config.data_dir or None)


def _tokens_source(config: ml_collections.ConfigDict, split: str, seed: int):
    del seed
    path = config.path if split == "train" else config.eval_path or config.path
    if not path:
        raise ValueError("data.name='tokens' needs data.path (a directory written by "
                         "python -m tokenizers_jax.export_tokens)")
    return tokens.TokenSource(path)


# Source builders by `data.name`: (config, "train" | "eval", seed) -> random-access source of
# uint8 [H, W, 3] images ("tokens": of exported token examples).
SOURCES: dict[str, Callable[[ml_collections.ConfigDict, str, int], Any]] = {
    "sample_photos": _sample_photos_source,
    "image_folder": _image_folder_source,
    "imagenet2012": _imagenet_source,
    "tokens": _tokens_source,
}
# Sources whose items are token examples rather than images.
TOKEN_SOURCES = frozenset({"tokens"})


def make_source(config: ml_collections.ConfigDict, split: str, seed: int = 0):
    """The random-access image source of `config.name` for split "train" or "eval"."""
    if config.name not in SOURCES:
        raise ValueError(f"unknown data.name {config.name!r}; choose one of {sorted(SOURCES)}")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return SOURCES[config.name](config, split, seed)


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """The per-process batch; the global batch must divide evenly over the processes."""
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} does not divide evenly over "
            f"{process_count} processes"
        )
    return global_batch_size // process_count


@dataclasses.dataclass(frozen=True)
class _TrainExample:
    """image, rng -> {"image": uint8 [S, S, 3]} with the model's random train transform."""

    transform: Callable[[np.ndarray, int, np.random.Generator], np.ndarray]
    image_size: int

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> Batch:
        return {"image": self.transform(image, self.image_size, rng)}


@dataclasses.dataclass(frozen=True)
class _EvalExample:
    """index -> {"image": uint8 [S, S, 3], "mask": bool}; indices past the data are padding."""

    source: Any
    num_examples: int
    transform: Callable[[np.ndarray, int], np.ndarray]
    image_size: int

    def __call__(self, index: int) -> Batch:
        if index < self.num_examples:
            image = self.transform(self.source[index], self.image_size)
            return {"image": image, "mask": np.bool_(True)}
        padding = np.zeros((self.image_size, self.image_size, 3), np.uint8)
        return {"image": padding, "mask": np.bool_(False)}


def _process_iterator(
    batches: grain.MapDataset, config: ml_collections.ConfigDict, process_index: int,
    process_count: int,
) -> grain.DatasetIterator:
    """Takes every process_count-th local batch from process_index on, loaded by grain."""
    read_options = grain.ReadOptions(
        num_threads=config.read_threads, prefetch_buffer_size=config.read_threads
    )
    dataset = batches[process_index::process_count].to_iter_dataset(read_options)
    if config.worker_count > 0:
        if not flags.FLAGS.is_parsed():
            # grain's worker processes read its absl flags, which outside absl.app (notebooks,
            # tests) are unparsed and raise (google/grain#1355); their defaults are fine.
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
    return iter(dataset)


def _resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def make_train_iterator(
    config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """An endless, shuffled, checkpointable iterator of this process's training batches.

    Args:
      config: the data config (`default_data_config()`).
      global_batch_size: examples per step over all processes.
      seed: shuffle and crop seed; None for `config.seed`.
      process_index / process_count: None for jax.process_index() / jax.process_count().
    Returns:
      A grain iterator (with get_state/set_state) of {"image": uint8 [L, S, S, 3]}, with
      L = global_batch_size / process_count and S = config.image_size; for exported tokens
      {"tokens": int32 [L, *token_shape], "label": int32 [L]}.
    """
    seed = config.seed if seed is None else seed
    process_index, process_count = _resolve_processes(process_index, process_count)
    batch_size = local_batch_size(global_batch_size, process_count)
    if config.name in TOKEN_SOURCES:
        example = tokens.RandomView()
    else:
        example = _TrainExample(get_transform(config.transform).train, config.image_size)
    batches = (
        grain.MapDataset.source(make_source(config, "train", seed))
        .seed(seed)
        .shuffle()
        .repeat()
        .random_map(example)
        .batch(batch_size, drop_remainder=True)
    )
    return _process_iterator(batches, config, process_index, process_count)


def make_eval_iterator(
    config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[Batch]:
    """One deterministic, in-order pass over the evaluation set, for this process.

    The set (its first `config.num_eval_examples` examples, or all) is padded to a whole
    number of global batches, so every process yields the same number of batches; padding
    examples are zero images with mask False.

    Returns:
      An iterator of {"image": uint8 [L, S, S, 3], "mask": bool [L]}; for exported tokens
      {"tokens": int32 [L, *token_shape], "label": int32 [L], "mask": bool [L]} of each
      example's canonical view.
    """
    process_index, process_count = _resolve_processes(process_index, process_count)
    batch_size = local_batch_size(global_batch_size, process_count)
    source = make_source(config, "eval")
    num_examples = len(source)
    if config.num_eval_examples > 0:
        num_examples = min(num_examples, config.num_eval_examples)
    num_padded = -(-num_examples // global_batch_size) * global_batch_size
    if config.name in TOKEN_SOURCES:
        example = tokens.eval_view(source, num_examples)
    else:
        transform = get_transform(config.transform).eval
        example = _EvalExample(source, num_examples, transform, config.image_size)
    batches = grain.MapDataset.range(num_padded).map(example).batch(batch_size)
    return _process_iterator(batches, config, process_index, process_count)
