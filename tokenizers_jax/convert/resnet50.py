"""Convert torchvision's ResNet-50 IMAGENET1K_V1 weights (resnet50-0676ba61.pth).

  python -m tokenizers_jax.convert resnet50 --checkpoint resnet50-0676ba61.pth \
      --output ~/.cache/tokenizers_jax/resnet50
"""

from __future__ import annotations

import argparse
import re

from tokenizers_jax.convert.common import Rule, StateDict, load_torch_file, torch_to_flax
from tokenizers_jax.convert.torch_cnn import (
    abstract_params,
    is_batch_norm_counter,
    rules_from_template,
    save_converted,
)
from tokenizers_jax.perceptual import resnet


def _torch_module(path: str) -> str:
    """'layer1_0/downsample_1' -> 'layer1.0.downsample.1'."""
    path = re.sub(r"(layer\d|downsample)_(\d+)", r"\1.\2", path)
    return path.replace("/", ".")


def resnet50_rules() -> dict[str, Rule]:
    """torch key -> Rule for every ResNet-50 tensor (BN running stats included)."""
    return rules_from_template(abstract_params(resnet.init_resnet50_params), _torch_module)


def resnet50_params_from_torch(state_dict: StateDict) -> dict:
    """torchvision resnet50 state dict -> ResNet50 params (ConversionError on any mismatch)."""
    return torch_to_flax(
        state_dict,
        resnet50_rules(),
        abstract_params(resnet.init_resnet50_params),
        ignore=is_batch_norm_counter,
        what="ResNet-50 checkpoint",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help=f"torchvision {resnet.CHECKPOINT_FILE}")
    parser.add_argument("--output", required=True, help="new model directory")


def main(args: argparse.Namespace) -> None:
    params = resnet50_params_from_torch(load_torch_file(args.checkpoint))
    save_converted(args.output, resnet.NAME, params, checkpoint=args.checkpoint)
