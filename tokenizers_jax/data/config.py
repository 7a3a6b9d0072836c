"""The data config (`config.data`): which images, how they are transformed and loaded."""

from __future__ import annotations

import ml_collections


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults: built-in sample photos with FlowMo's transform at 256 px.

    Fields:
      name: "sample_photos" (built in, nothing to download), "image_folder" (`path`),
        "imagenet2012" (TFDS array_record in `data_dir`) or "tokens" (a token export in
        `path`, written by `python -m tokenizers_jax.export_tokens`; see `data.tokens`).
      image_size: side of the square crops, pixels.
      transform: per-model transform, see `transforms.TRANSFORMS` ("flowmo", "adm").
      path: image_folder: directory tree of training images; tokens: the export directory.
      eval_path: image_folder / tokens: the evaluation images / export; "" evaluates on `path`
        (image_folder: on a part of it held out from training, see `holdout_every`).
      holdout_every: image_folder without eval_path: every N-th image of `path` (sorted by
        relative path) is held out for evaluation and never trained on (default 100: 1%);
        0 trains and evaluates on all of `path` (with a warning).
      data_dir: imagenet2012: TFDS data directory; "" for $TFDS_DATA_DIR or ~/tensorflow_datasets.
      train_split / eval_split: imagenet2012: TFDS splits, slicing allowed ("validation[:10%]").
      num_eval_examples: evaluate on the first N examples of the eval set; 0 for all.
      crops_per_photo: sample_photos: training crops per photo per epoch (7 photos).
      eval_crops_per_photo: sample_photos: fixed evaluation crops per held-out photo (2 photos).
      min_crop_fraction: sample_photos: smallest crop side / photo short side, in (0, 1].
      worker_count: grain worker processes; 0 loads in the training process.
      read_threads: threads reading and transforming batches, per process; as many batches are
        buffered ahead.
      seed: seeds the training shuffle (a fresh order every epoch) and random crops.
    """
    return ml_collections.ConfigDict(
        dict(
            name="sample_photos",
            image_size=256,
            transform="flowmo",
            path="",
            eval_path="",
            holdout_every=100,
            data_dir="",
            train_split="train",
            eval_split="validation",
            num_eval_examples=0,
            crops_per_photo=1000,
            eval_crops_per_photo=8,
            min_crop_fraction=0.25,
            worker_count=0,
            read_threads=4,
            seed=0,
        )
    )
