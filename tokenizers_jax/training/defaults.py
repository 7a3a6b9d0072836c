"""The config sections every trainable model shares (configs/<model>.py call these).

  add_training_sections(config, train=..., optim=..., ...)   init_from, train, optim,
      checkpoint, mesh, logging, eval (with the evaluation job's fields) and data
  add_evaluation(config.eval)                                 the evaluation job's fields

Fields of the sections (a model adds its own fields to `train` through `train=`):
  init_from           a workdir whose latest raw params start this run, or a model directory
                      (e.g. a converted release); used only when the workdir has no
                      checkpoint of its own.
  train.num_steps     updates to make; batch_size is global (over all devices/processes).
  train.grad_accum_steps  micro-batches per update (accumulated in a lax.scan).
  train.loss_groups   groups per micro-batch with their own batch statistics (e.g. FlowMo's
                      per-GPU LFQ entropy statistics).
  train.ema_decay / ema_every  EMA blended every N updates with decay**N.
  optim               the model's optimizer (training.optimizer.default_optim_config).
  checkpoint          every N updates; keep the last `keep` plus multiples of `keep_every`.
  mesh                device mesh sizes (-1 = the rest) and logical-axis -> mesh-axis rules.
  logging.every       metric/console interval; eval.every: the in-training evaluation.
  data                see tokenizers_jax.data.default_data_config.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

# Logical axis -> mesh axis: FSDP over the model width, everything else replicated.
FSDP_RULES = (("embed", "fsdp"), ("mlp", None), ("heads", None), ("vocab", None),
              ("norm", None), ("io", None))


def add_evaluation(eval_config: ml_collections.ConfigDict):
    """Fields of the evaluation job (tokenizers_jax.evaluation); eval.seed seeds its noise.

    Fields:
      batch_size          global batch (a multiple of the device count; of 5 for the
                          FlowMo batch-PSNR compatibility metric).
      grid_size           originals / reconstructions shown in the PNG grid.
      inception_path / lpips_path  converted FID-Inception / LPIPS-VGG model directories
                          ("" = the default location, see tokenizers_jax.perceptual).
      allow_random_init_networks  random Inception/LPIPS when their weights are absent: rFID
                          and LPIPS become meaningless (smoke tests only; marked in the output).
    The evaluated set is config.data's eval split; data.num_eval_examples subsamples it.
    """
    eval_config.update(dict(batch_size=40, grid_size=8, inception_path="", lpips_path="",
                            allow_random_init_networks=False))


def add_training_sections(config: ml_collections.ConfigDict, *,
                          train: Mapping[str, Any] | None = None,
                          optim: ml_collections.ConfigDict,
                          image_size: int | None = None):
    """Adds init_from, train, optim, checkpoint, mesh, logging, eval and data to `config`.

    Args:
      train: overrides and model-specific additions to the train section.
      optim: the model's optimizer section (`default_optim_config(...)`).
      image_size: data.image_size (default: config.model.image_size).
    """
    # pylint: disable=import-outside-toplevel
    from tokenizers_jax.data import default_data_config

    config.init_from = ""
    config.train = ml_collections.ConfigDict(
        dict(num_steps=100_000, batch_size=128, grad_accum_steps=1, loss_groups=1,
             ema_decay=0.9999, ema_every=1))
    config.train.update(dict(train or {}))
    config.optim = optim
    config.checkpoint = ml_collections.ConfigDict(
        dict(every=5000, keep=2, keep_every=100_000, async_save=True))
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, rules=FSDP_RULES))
    config.logging = ml_collections.ConfigDict(dict(every=100))
    config.eval = ml_collections.ConfigDict(dict(every=5000, num_images=8, use_ema=True, seed=0))
    add_evaluation(config.eval)
    config.data = default_data_config()
    config.data.image_size = config.model.image_size if image_size is None else image_size
