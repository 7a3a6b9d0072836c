"""Convert Hugging Face SigLIP2 so400m vision weights (safetensors) into a `SiglipViT` model
directory: the DetailFlow first-token teacher, and the source of the encoder's first layers.

  python -m tokenizers_jax.convert siglip2 \
      --checkpoint siglip2-so400m-patch16-naflex/model.safetensors \
      --config configs/detailflow.py:df16 --output converted/siglip2_so400m

Only `vision_model.*` is used; the text tower, the logit scale/bias and the vision MAP head
(`vision_model.head.*`, which DetailFlow removes) are dropped. The tower shape comes from
`model.teacher` of the config. Use `encoder_params_from_siglip2` to initialise a DetailFlow
encoder from the result.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np

from tokenizers_jax.convert import common
from tokenizers_jax.convert.common import Rule

VISION_PREFIX = "vision_model"
# Keys of a full SigLIP2 checkpoint that a vision tower knowingly drops.
DROPPED_PREFIXES = ("text_model.", "logit_scale", "logit_bias", f"{VISION_PREFIX}.head.")


def vit_rules(
    torch_prefix: str, flax_prefix: str, depth: int, patch_embedding: bool = True
) -> dict[str, Rule]:
    """Rules for an HF `Siglip2VisionTransformer` (no head) -> `SiglipViT` params.

    Args:
      torch_prefix: e.g. "vision_model" or "encoder.visual_model".
      flax_prefix: e.g. "" or "encoder/vit".
      depth: number of encoder layers.
      patch_embedding: whether the tower has `embeddings.patch_embedding`.
    """
    src = torch_prefix + "."
    dst = f"{flax_prefix}/" if flax_prefix else ""
    rules = {f"{src}embeddings.position_embedding.weight": Rule(f"{dst}position_embedding")}
    if patch_embedding:
        rules.update(common.linear_rules(f"{src}embeddings.patch_embedding",
                                         f"{dst}patch_embedding"))
    for i in range(depth):
        layer, target = f"{src}encoder.layers.{i}", f"{dst}layers_{i}"
        for norm in ("layer_norm1", "layer_norm2"):
            rules.update(common.layer_norm_rules(f"{layer}.{norm}", f"{target}/{norm}"))
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            rules.update(common.linear_rules(f"{layer}.self_attn.{proj}",
                                             f"{target}/self_attn/{proj}"))
        for fc in ("fc1", "fc2"):
            rules.update(common.linear_rules(f"{layer}.mlp.{fc}", f"{target}/mlp/{fc}"))
    rules.update(common.layer_norm_rules(f"{src}post_layernorm", f"{dst}post_layernorm"))
    return rules


def siglip2_config(tower: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config of a SigLIP2 tower model directory (`model.name = "siglip2"`)."""
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(tower.to_dict())
    config.model.name = "siglip2"
    return config


def abstract_vit_params(tower: ml_collections.ConfigDict) -> Any:
    """ShapeDtypeStructs of a `SiglipViT` described by a config section."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import flax.linen as nn  # pylint: disable=import-outside-toplevel

    from tokenizers_jax.models.siglip import vit_from_config  # pylint: disable=import-outside-toplevel

    vit = vit_from_config(tower)
    size = tower.patch_size * tower.position_grid
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    return jax.eval_shape(
        lambda key: nn.unbox(vit.init(key, images)["params"]), jax.random.PRNGKey(0)
    )


def convert_vision_state_dict(
    state_dict: common.StateDict, tower: ml_collections.ConfigDict
) -> dict:
    """An HF SigLIP2 state dict (or its `vision_model.*` part) -> `SiglipViT` params.

    Raises:
      ConversionError: if the vision keys do not match `tower` exactly (e.g. a different
        depth or width).
    """
    rules = vit_rules(VISION_PREFIX, "", tower.depth)
    return common.torch_to_flax(
        state_dict, rules, abstract_vit_params(tower),
        ignore=lambda key: key.startswith(DROPPED_PREFIXES), what="SigLIP2 checkpoint",
    )


def encoder_params_from_siglip2(siglip_params: Any, depth: int) -> dict:
    """The DetailFlow encoder tower (`encoder/vit`) from SigLIP2 params: its patch embedding,
    position table, first `depth` layers and post LayerNorm (spec 1.1)."""
    available = sum(1 for name in siglip_params if name.startswith("layers_"))
    if depth > available:
        raise ValueError(f"the SigLIP2 tower has {available} layers, {depth} requested")
    keep = {"patch_embedding", "position_embedding", "post_layernorm"}
    keep |= {f"layers_{i}" for i in range(depth)}
    return {name: value for name, value in siglip_params.items() if name in keep}


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a safetensors file into numpy arrays."""
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: download model.safetensors of "
            "google/siglip2-so400m-patch16-naflex from the Hugging Face hub"
        )
    return load_file(path)


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True, help="SigLIP2 model.safetensors")
    parser.add_argument("--config", default="configs/detailflow.py:df16",
                        help="config file[:variant] whose model.teacher gives the tower shape")
    parser.add_argument("--output", required=True, help="new model directory")


def main(args):
    from tokenizers_jax import exported  # pylint: disable=import-outside-toplevel
    from tokenizers_jax.config_file import load_config  # pylint: disable=import-outside-toplevel

    tower = load_config(args.config).model.teacher
    params = convert_vision_state_dict(load_safetensors(args.checkpoint), tower)
    exported.save_model_dir(args.output, siglip2_config(tower), params)
    print(f"wrote SigLIP2 tower ({tower.depth} layers, width {tower.width}) to {args.output}")
