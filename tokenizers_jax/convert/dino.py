"""Convert DINO ViT-S/16 (`dino_deitsmall16_pretrain.pth`, facebookresearch/dino) into the
frozen trunk of DetailFlow's discriminator.

  python -m tokenizers_jax.convert dino --checkpoint dino_deitsmall16_pretrain.pth \
      --output ~/.cache/tokenizers_jax/dino_vits16

The file is the bare backbone state dict with timm `VisionTransformer` names: cls_token,
pos_embed, patch_embed.proj.{weight,bias}, blocks.{i}.{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}.{weight,bias}, norm.{weight,bias}. Strict: every key must be there with
its shape; only the final `norm.*`, which the discriminator never reads, is dropped (its
shape is still checked). Full DINO training checkpoints are accepted through their
`teacher` backbone (keys `backbone.*`, optionally with a `module.` prefix).
"""

from __future__ import annotations

import argparse
from typing import Any, Mapping

import jax
import numpy as np

from tokenizers_jax.convert import common
from tokenizers_jax.convert.common import ConversionError, Rule, Transform, squeeze_leading
from tokenizers_jax.convert.torch_cnn import save_converted
from tokenizers_jax.models import dino

FINAL_NORM = ("norm.weight", "norm.bias")


def patch_embedding_transform(patch_size: int, channels: int = 3) -> Transform:
    """Conv2d weight [D, C, p, p] <-> Dense kernel [p * p * C, D] in `layers.patchify` order."""
    p, c = patch_size, channels
    return Transform(
        lambda a: np.transpose(a, (2, 3, 1, 0)).reshape(p * p * c, a.shape[0]),
        lambda a: np.transpose(a.reshape(p, p, c, a.shape[-1]), (3, 2, 0, 1)),
    )


def dino_rules(vit: dino.DinoViT) -> dict[str, Rule]:
    """timm VisionTransformer key -> `DinoViT` parameter (the final norm excluded)."""
    rules = {
        "cls_token": Rule("cls_token", squeeze_leading(2)),  # (1, 1, D) -> (D,)
        "pos_embed": Rule("pos_embed", squeeze_leading(1)),  # (1, L, D) -> (L, D)
        "patch_embed.proj.weight": Rule("patch_embed/kernel",
                                        patch_embedding_transform(vit.patch_size)),
        "patch_embed.proj.bias": Rule("patch_embed/bias"),
    }
    for i in range(vit.depth):
        block = f"blocks.{i}"
        for norm in ("norm1", "norm2"):
            rules.update(common.layer_norm_rules(f"{block}.{norm}", f"blocks_{i}/{norm}"))
        for torch_name, flax_name in (("attn.qkv", "attn/qkv"), ("attn.proj", "attn/proj"),
                                      ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")):
            rules.update(common.linear_rules(f"{block}.{torch_name}", f"blocks_{i}/{flax_name}"))
    return rules


def backbone_state_dict(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The backbone weights of a DINO file: the bare state dict, or a training checkpoint's
    `teacher` backbone."""
    if "pos_embed" in checkpoint:
        return checkpoint
    if "teacher" in checkpoint:
        teacher = checkpoint["teacher"]
        backbone = {}
        for key, value in teacher.items():
            key = key.removeprefix("module.")
            if key.startswith("backbone."):
                backbone[key.removeprefix("backbone.")] = value
        if backbone:
            return backbone
    raise ConversionError(
        f"not a DINO ViT checkpoint: no 'pos_embed' (found keys {sorted(checkpoint)[:8]}); "
        f"expected {dino.CHECKPOINT_FILE} from {dino.CHECKPOINT_URL}")


def dino_params_from_torch(state_dict: Mapping[str, Any], vit: dino.DinoViT | None = None) -> dict:
    """A DINO ViT-S/16 state dict -> `DinoViT` params.

    Raises:
      ConversionError: naming missing, unexpected or mis-shaped keys.
    """
    vit = dino.DinoViT() if vit is None else vit
    for key in FINAL_NORM:
        if key not in state_dict or tuple(np.shape(state_dict[key])) != (vit.width,):
            raise ConversionError(f"the DINO checkpoint's {key} is missing or not ({vit.width},)")
    template = jax.eval_shape(lambda k: dino.init_dino_params(k, vit), jax.random.key(0))
    return common.torch_to_flax(state_dict, dino_rules(vit), template,
                                ignore=lambda key: key in FINAL_NORM, what="DINO checkpoint")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help=dino.CHECKPOINT_FILE)
    parser.add_argument("--output", required=True, help="new model directory")


def main(args: argparse.Namespace) -> None:
    state_dict = backbone_state_dict(common.load_torch_file(args.checkpoint))
    save_converted(args.output, dino.NAME, dino_params_from_torch(state_dict),
                   checkpoint=args.checkpoint)
