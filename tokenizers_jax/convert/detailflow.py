"""Import a released DetailFlow tokenizer (128.pt / 256.pt / 512.pt) into a model directory.

  python -m tokenizers_jax.convert detailflow --checkpoint 128.pt \
      --config configs/detailflow.py:df16 --output converted/detailflow16 [--teacher] [--ema] \
      [--discriminator]

The files are `torch.save` dicts {model, optimizer, discriminator, optimizer_disc, steps,
args, [ema]} from github.com/ByteFlow-AI/DetailFlow (README "Model zoo"). The `model` weights
are imported (`--ema`: the `ema` copy, when the run kept one). Strict: every key of spec 8 must
be there with its shape, except two groups that are handled explicitly:
  - `repa_model.*`, the frozen SigLIP2 so400m teacher (only used by the training loss), is
    dropped unless `--teacher`, which writes it as a separate SigLIP2 model directory
    OUTPUT/teacher (the layout `python -m tokenizers_jax.convert siglip2` writes);
  - `quantize.codebook_used`, a rolling window of recent indices for the usage log, is not a
    parameter and is dropped (zeros are written back on export).
The codebook is stored un-normalised, as in the file; the model normalises it at use.

`--discriminator` also imports the file's `discriminator` entry (the five DINO heads with
their spectral-norm vectors and BatchNorm statistics, strictly; see
`tokenizers_jax.convert.discriminator`) into OUTPUT/discriminator, which
`models.discriminator.load_discriminator_variables` reads, so training can resume from a
release. The frozen DINO trunk comes from `convert dino`.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from tokenizers_jax import exported
from tokenizers_jax.config_file import load_config
from tokenizers_jax.convert import common, discriminator
from tokenizers_jax.convert.common import ConversionError, Rule, select_weights, squeeze_leading
from tokenizers_jax.convert.siglip2 import abstract_vit_params, siglip2_config, vit_rules
from tokenizers_jax.models import detailflow
from tokenizers_jax.models import discriminator as heads_model

TEACHER_PREFIX = "repa_model."
TEACHER_TORCH = "repa_model.visual_model"
USAGE_BUFFER = "quantize.codebook_used"
USAGE_BUFFER_SIZE = 65536
TEACHER_DIR = "teacher"
DISCRIMINATOR_DIR = "discriminator"
# checkpoint args fields that no tensor shape reveals -> config.model field.
CHECKED_ARGS = {"group_size": "group_size", "degradation_power": "degradation_power"}
# args fields that no tensor shape reveals and that this port implements one way only.
FIXED_ARGS = {"codebook_l2_norm": True, "causal_encoder": True}


def conversion_rules(config: ml_collections.ConfigDict) -> dict[str, Rule]:
    """PyTorch key -> Flax parameter for the tokenizer (teacher and usage buffer excluded)."""
    m = config.model
    tokens = squeeze_leading(1)  # (1, N, D) -> (N, D)
    rules = {
        **vit_rules("encoder.visual_model", "encoder/vit", m.encoder.depth),
        **vit_rules("decoder.visual_model", "decoder/vit", m.decoder.depth, patch_embedding=False),
        "encoder.latent_tokens": Rule("encoder/latent_tokens", tokens),
        "encoder.refined_tokens": Rule("encoder/refined_tokens", tokens),
        "encoder.latent_pos_embed": Rule("encoder/latent_pos_embed", tokens),
        "decoder.latent_pos_embed": Rule("decoder/latent_pos_embed", tokens),
        "decoder.mask_token": Rule("decoder/mask_token", squeeze_leading(2)),
        "quantize.embedding.weight": Rule("quantize/codebook"),
    }
    rules.update(common.linear_rules("decoder.to_pixel.model", "decoder/to_pixel"))
    for name in ("quant_conv", "post_quant_conv", "refine_conv"):
        rules.update(common.linear_rules(name, name))
    for index, name in ((0, "fc1"), (2, "fc2"), (4, "fc3")):
        rules.update(common.linear_rules(f"global_token_proj.{index}", f"global_token_proj/{name}"))
    return rules


def teacher_rules(config: ml_collections.ConfigDict) -> dict[str, Rule]:
    """PyTorch key -> teacher `SiglipViT` parameter, for the `repa_model.*` keys."""
    return vit_rules(TEACHER_TORCH, "", config.model.teacher.depth)


def select_state_dict(checkpoint: Mapping[str, Any], use_ema: bool = False) -> Mapping[str, Any]:
    """The weights to import from a loaded checkpoint file (`model`, or `ema` if asked)."""
    return select_weights(checkpoint, what="DetailFlow tokenizer",
                          wanted="ema" if use_ema else "model", entries=("model",),
                          bare_prefix="encoder.", other_option="the default (no --ema)")


def check_args(args: Any, config: ml_collections.ConfigDict):
    """Refuses a checkpoint whose training args disagree with the config on what no tensor
    shape reveals (group size, causal_num, degradation power) or with what the port implements
    (l2-normalised codebook, causal encoder); the strict conversion checks everything else."""
    if args is None:
        return
    m = config.model
    values = vars(args) if hasattr(args, "__dict__") else dict(args)
    problems = [
        f"{field}={values[field]} (config model.{ours}={m[ours]})"
        for field, ours in CHECKED_ARGS.items()
        if values.get(field) is not None and values[field] != m[ours]
    ]
    problems += [f"{field}={values[field]} (this port implements {field}={fixed} only)"
                 for field, fixed in FIXED_ARGS.items()
                 if values.get(field) is not None and values[field] != fixed]
    causal = values.get("causal_num") or values.get("group_size")
    if causal is not None and causal != m.causal_num:
        problems.append(f"causal_num={causal} (config model.causal_num={m.causal_num})")
    if problems:
        raise ConversionError(
            "the checkpoint was trained with " + ", ".join(problems)
            + "; use the matching variant (df16 / df32 / df64 for 128 / 256 / 512 tokens)")


def state_dict_to_params(
    state_dict: Mapping[str, Any], config: ml_collections.ConfigDict, teacher: bool = False
) -> tuple[dict, dict | None]:
    """A DetailFlow `model` state dict -> (tokenizer params, teacher params or None).

    Raises:
      ConversionError: on any missing, unexpected or mis-shaped key. The teacher keys
        (`repa_model.*`) are required when `teacher` is True and dropped otherwise;
        `quantize.codebook_used` is always dropped.
    """
    if USAGE_BUFFER in state_dict and np.shape(state_dict[USAGE_BUFFER]) != (USAGE_BUFFER_SIZE,):
        raise ConversionError(f"{USAGE_BUFFER} has shape {np.shape(state_dict[USAGE_BUFFER])}, "
                              f"expected ({USAGE_BUFFER_SIZE},)")
    params = common.torch_to_flax(
        state_dict, conversion_rules(config),
        detailflow.init_params(config, jax.random.PRNGKey(0), abstract=True),
        ignore=lambda key: key.startswith(TEACHER_PREFIX) or key == USAGE_BUFFER,
        what="DetailFlow checkpoint",
    )
    if not teacher:
        return params, None
    teacher_params = common.torch_to_flax(
        state_dict, teacher_rules(config), abstract_vit_params(config.model.teacher),
        ignore=lambda key: not key.startswith(TEACHER_PREFIX),
        what="DetailFlow checkpoint's teacher (repa_model)",
    )
    return params, teacher_params


def params_to_state_dict(
    params: Any, config: ml_collections.ConfigDict, teacher_params: Any | None = None
) -> dict[str, np.ndarray]:
    """Our params (and optionally the teacher's) -> a state dict with the original's names.

    The usage buffer is written as zeros so the original's strict `load_state_dict` accepts
    it; that strict load also needs the teacher when the run used the alignment loss.
    """
    state_dict = common.flax_to_torch(params, conversion_rules(config))
    state_dict[USAGE_BUFFER] = np.zeros((USAGE_BUFFER_SIZE,), np.float32)
    if teacher_params is not None:
        state_dict.update(common.flax_to_torch(teacher_params, teacher_rules(config)))
    return state_dict


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--checkpoint", required=True, help="128.pt, 256.pt or 512.pt")
    parser.add_argument("--config", required=True, help="e.g. configs/detailflow.py:df16")
    parser.add_argument("--output", required=True, help="new model directory to write")
    parser.add_argument("--teacher", action="store_true",
                        help="also convert the frozen SigLIP2 teacher (repa_model.*) into "
                             "OUTPUT/teacher (needed only for training)")
    parser.add_argument("--ema", action="store_true", help="import the 'ema' weights")
    parser.add_argument("--discriminator", action="store_true",
                        help="also convert the GAN discriminator heads into "
                             "OUTPUT/discriminator (to resume training from the release)")


def select_discriminator(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The `discriminator` state dict of a training checkpoint file."""
    if "discriminator" not in checkpoint:
        raise ConversionError(
            "the checkpoint has no 'discriminator' entry (found "
            f"{sorted(checkpoint)[:8]}); drop --discriminator")
    return checkpoint["discriminator"]


def main(args: argparse.Namespace):
    config = load_config(args.config)
    checkpoint = common.load_torch_file(args.checkpoint)
    if "model" in checkpoint:
        check_args(checkpoint.get("args"), config)
    state_dict = select_state_dict(checkpoint, use_ema=args.ema)
    params, teacher_params = state_dict_to_params(state_dict, config, teacher=args.teacher)
    # Convert everything before writing anything, so a bad entry leaves no partial output.
    heads = None
    if args.discriminator:
        heads = discriminator.discriminator_variables_from_torch(select_discriminator(checkpoint))
    exported.save_model_dir(args.output, config, params)
    count = sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(params))
    print(f"wrote {args.output}: {count:,} tokenizer parameters")
    if teacher_params is not None:
        path = os.path.join(args.output, TEACHER_DIR)
        exported.save_model_dir(path, siglip2_config(config.model.teacher), teacher_params)
        print(f"wrote the teacher to {path}")
    if heads is not None:
        path = os.path.join(args.output, DISCRIMINATOR_DIR)
        heads_config = ml_collections.ConfigDict({"model": {"name": heads_model.NAME}})
        exported.save_model_dir(path, heads_config, heads)
        print(f"wrote the discriminator heads to {path}")
