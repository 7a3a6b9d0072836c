"""Evaluation entry point: reconstruction metrics (rFID, PSNR, SSIM, LPIPS, codebook usage).

    python -m tokenizers_jax.evaluate --config=configs/flowmo.py:lo --checkpoint=DIR \
        [--workdir=OUT] [--config.eval.batch_size=40 --config.data.num_eval_examples=10000 ...]
    python -m tokenizers_jax.evaluate --config=configs/flowmo.py:lo --checkpoint=TRAIN_WORKDIR \
        --continuous [--poll_seconds=60] [--max_checkpoints=N]

DIR is a model directory (`python -m tokenizers_jax.convert ...`) or a training workdir (its
latest EMA params, or --step). The model section comes from the checkpoint; the evaluation
set, sampler and eval settings from --config. Results go to OUT (default DIR/eval); see
`tokenizers_jax.evaluation`. On several processes add --distributed (or the explicit flags).
Errors and exit statuses follow `tokenizers_jax.cli`.
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from tokenizers_jax import cli, distributed, evaluation

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<model>.py[:variant]",
                                          lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "model directory or training workdir")
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (default CHECKPOINT/eval)")
_STEP = flags.DEFINE_integer("step", None, "training workdir step (default: the latest)")
_CONTINUOUS = flags.DEFINE_bool("continuous", False,
                                "watch a training workdir; evaluate each new checkpoint once")
_POLL_SECONDS = flags.DEFINE_float("poll_seconds", 60.0, "--continuous: seconds between polls")
_MAX_CHECKPOINTS = flags.DEFINE_integer(
    "max_checkpoints", 0, "--continuous: stop after this many evaluations (0: when the "
    "workdir's final step, train.num_steps, has been evaluated)")
flags.adopt_module_key_flags(distributed)
flags.adopt_module_key_flags(cli)
flags.mark_flags_as_required(["config", "checkpoint"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONTINUOUS.value and _STEP.value is not None:
        raise app.UsageError("--step and --continuous exclude each other")
    distributed.initialize_from_flags()
    output_dir = _WORKDIR.value or os.path.join(_CHECKPOINT.value, "eval")
    if _CONTINUOUS.value:
        evaluation.evaluate_continuously(_CONFIG.value, _CHECKPOINT.value, output_dir,
                                         _POLL_SECONDS.value, _MAX_CHECKPOINTS.value)
    else:
        evaluation.evaluate(_CONFIG.value, _CHECKPOINT.value, output_dir, _STEP.value)


if __name__ == "__main__":
    cli.run(main)
