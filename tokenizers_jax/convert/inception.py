"""Convert pytorch-fid's FID Inception weights (pt_inception-2015-12-05-6726825d.pth).

  python -m tokenizers_jax.convert inception --checkpoint pt_inception-2015-12-05-6726825d.pth \
      --output ~/.cache/tokenizers_jax/inception_fid

Every tensor is kept, the 1008-way `fc` classifier included (the Inception Score uses its
weight; see `perceptual.inception`).
"""

from __future__ import annotations

import argparse

from tokenizers_jax.convert.common import Rule, StateDict, load_torch_file, torch_to_flax
from tokenizers_jax.convert.torch_cnn import (
    abstract_params,
    is_batch_norm_counter,
    rules_from_template,
    save_converted,
)
from tokenizers_jax.perceptual import inception


def inception_rules() -> dict[str, Rule]:
    """torch key -> Rule; Flax module paths are the torch ones with '/' for '.'."""
    return rules_from_template(abstract_params(inception.init_inception_params))


def inception_params_from_torch(state_dict: StateDict) -> dict:
    """pytorch-fid Inception state dict -> FIDInceptionV3 params (ConversionError on mismatch)."""
    return torch_to_flax(
        state_dict,
        inception_rules(),
        abstract_params(inception.init_inception_params),
        ignore=is_batch_norm_counter,
        what="FID Inception checkpoint",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help=f"pytorch-fid {inception.CHECKPOINT_FILE}"
    )
    parser.add_argument("--output", required=True, help="new model directory")


def main(args: argparse.Namespace) -> None:
    params = inception_params_from_torch(load_torch_file(args.checkpoint))
    save_converted(args.output, inception.NAME, params, checkpoint=args.checkpoint)
