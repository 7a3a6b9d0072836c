"""Convert LPIPS-VGG16 v0.1: torchvision's vgg16-397923af.pth (the `features` trunk; the
classifier is dropped) plus the LPIPS linear heads lpips/weights/v0.1/vgg.pth.

  python -m tokenizers_jax.convert lpips --checkpoint vgg16-397923af.pth \
      --lin-checkpoint vgg.pth --output ~/.cache/tokenizers_jax/lpips_vgg

Without --lin-checkpoint the heads are read from an installed `lpips` package
(`pip install lpips --no-deps` is enough; the package itself is never imported).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re

from tokenizers_jax.convert.common import (
    ConversionError,
    Rule,
    StateDict,
    load_torch_file,
    torch_to_flax,
)
from tokenizers_jax.convert.torch_cnn import abstract_params, rules_from_template, save_converted
from tokenizers_jax.perceptual import lpips

# Flax 'vgg/features_N' <- torch 'features.N'; Flax 'linK' <- lpips 'linK.model.1'
# (index 0 of each head's Sequential is its Dropout).
_RENAMES = ((r"^vgg/features_(\d+)$", r"features.\1"), (r"^(lin\d)$", r"\1.model.1"))


def _torch_module(path: str) -> str:
    for pattern, replacement in _RENAMES:
        if re.match(pattern, path):
            return re.sub(pattern, replacement, path)
    raise ValueError(f"unexpected LPIPS module {path}")


def lpips_rules() -> dict[str, Rule]:
    """torch key (vgg16 `features.*` and lpips `lin*.model.1.weight`) -> Rule."""
    return rules_from_template(abstract_params(lpips.init_lpips_params), _torch_module)


def lpips_params_from_torch(vgg16_state_dict: StateDict, lin_state_dict: StateDict) -> dict:
    """torchvision vgg16 state dict + LPIPS v0.1 vgg heads -> LPIPS params.

    Raises:
      ConversionError: naming missing, unexpected or mis-shaped keys.
    """
    overlap = sorted(set(vgg16_state_dict) & set(lin_state_dict))
    if overlap:
        raise ConversionError(f"keys in both the VGG16 and the heads checkpoint: {overlap[:5]}")
    return torch_to_flax(
        {**vgg16_state_dict, **lin_state_dict},
        lpips_rules(),
        abstract_params(lpips.init_lpips_params),
        ignore=lambda key: key.startswith("classifier."),
        what="VGG16 + LPIPS heads checkpoints",
    )


def installed_lin_checkpoint() -> str | None:
    """lpips/weights/v0.1/vgg.pth of an installed `lpips` package, found without importing it."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "v0.1", "vgg.pth")
    return path if os.path.isfile(path) else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help=f"torchvision {lpips.VGG16_FILE}")
    parser.add_argument(
        "--lin-checkpoint",
        help="LPIPS v0.1 heads lpips/weights/v0.1/vgg.pth (default: the installed lpips package's)",
    )
    parser.add_argument("--output", required=True, help="new model directory")


def main(args: argparse.Namespace) -> None:
    lin_checkpoint = args.lin_checkpoint or installed_lin_checkpoint()
    if lin_checkpoint is None:
        raise FileNotFoundError(
            f"pass --lin-checkpoint vgg.pth (from {lpips.LIN_URL}) or "
            "`pip install lpips --no-deps` so its bundled heads can be found"
        )
    params = lpips_params_from_torch(
        load_torch_file(args.checkpoint), load_torch_file(lin_checkpoint)
    )
    save_converted(
        args.output, lpips.NAME, params, checkpoint=args.checkpoint, lin_checkpoint=lin_checkpoint
    )
