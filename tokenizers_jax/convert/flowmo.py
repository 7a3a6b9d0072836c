"""Import the released FlowMo weights (flowmo_lo.pth / flowmo_hi.pth) into a model directory.

  python -m tokenizers_jax.convert flowmo --checkpoint flowmo_lo.pth \
      --config configs/flowmo.py:lo --output converted/flowmo_lo [--raw]

The files come from the FlowMo release (github.com/kylesargent/FlowMo, README "Pretrained
models"). They are `torch.save` dicts holding `model_ema_state_dict` (used by default, as the
original evaluator does) and `model_state_dict` (raw weights, `--raw`).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Mapping

import ml_collections
import numpy as np

from tokenizers_jax import exported, layer_stack
from tokenizers_jax.config_file import load_config
from tokenizers_jax.convert.common import ConversionError, Rule, flax_to_torch, linear_rules
from tokenizers_jax.convert.common import load_torch_file, select_weights, torch_to_flax
from tokenizers_jax.models import flowmo

EMA_KEY = "model_ema_state_dict"
RAW_KEY = "model_state_dict"
# context_dim -> released variant, to name the file's variant in errors.
KNOWN_VARIANTS = {18: "lo (FlowMo-Lo)", 56: "hi (FlowMo-Hi)"}


def _trunk_rules(torch_prefix: str, flax_prefix: str, depth: int) -> dict[str, Rule]:
    rules = {}
    for name in ("time_in.in_layer", "time_in.out_layer"):
        rules.update(linear_rules(f"{torch_prefix}.{name}", f"{flax_prefix}/{name.replace('.', '/')}"))
    rules.update(linear_rules(f"{torch_prefix}.img_in", f"{flax_prefix}/img_in"))
    rules.update(linear_rules(f"{torch_prefix}.txt_in", f"{flax_prefix}/txt_in"))
    for i in range(depth):
        t_block, f_block = f"{torch_prefix}.double_blocks.{i}", f"{flax_prefix}/double_blocks_{i}"
        for s in ("img", "txt"):
            rules.update(linear_rules(f"{t_block}.{s}_mod.lin", f"{f_block}/{s}_mod/lin"))
            rules.update(linear_rules(f"{t_block}.{s}_attn.qkv", f"{f_block}/{s}_attn/qkv"))
            rules.update(linear_rules(f"{t_block}.{s}_attn.proj", f"{f_block}/{s}_attn/proj"))
            for norm in ("query_norm", "key_norm"):
                rules[f"{t_block}.{s}_attn.norm.{norm}.scale"] = Rule(
                    f"{f_block}/{s}_attn/norm/{norm}/scale")
            rules.update(linear_rules(f"{t_block}.{s}_mlp.0", f"{f_block}/{s}_mlp/fc1"))
            rules.update(linear_rules(f"{t_block}.{s}_mlp.2", f"{f_block}/{s}_mlp/fc2"))
    for s in ("img", "txt"):
        layer_t, layer_f = f"{torch_prefix}.final_layer_{s}", f"{flax_prefix}/final_layer_{s}"
        rules.update(linear_rules(f"{layer_t}.linear", f"{layer_f}/linear"))
        rules.update(linear_rules(f"{layer_t}.adaLN_modulation.1", f"{layer_f}/adaLN_modulation"))
    return rules


def conversion_rules(model_config: flowmo.FlowMoConfig) -> dict[str, Rule]:
    """PyTorch key -> Flax parameter, for every one of the original's tensors."""
    return {
        **_trunk_rules("encoder", "encoder", model_config.encoder.depth),
        **_trunk_rules("decoder", "decoder", model_config.decoder.depth),
    }


def _check_variant(state_dict: Mapping[str, Any], model_config: flowmo.FlowMoConfig):
    """Refuses a checkpoint of another variant, naming the variant the file is."""
    key = "encoder.txt_in.weight"
    if key not in state_dict:
        return  # the strict conversion reports the missing key
    file_ctx = int(np.shape(state_dict[key])[1])
    if file_ctx != model_config.context_dim:
        file_variant = KNOWN_VARIANTS.get(file_ctx, f"a variant with context_dim {file_ctx}")
        raise ConversionError(
            f"this checkpoint is {file_variant}, but the config has "
            f"model.context_dim={model_config.context_dim}; use the matching config, e.g. "
            f"--config configs/flowmo.py:{file_variant.split()[0]}"
        )


def select_state_dict(checkpoint: Mapping[str, Any], use_ema: bool = True) -> Mapping[str, Any]:
    """The weights to import from a loaded checkpoint file (EMA unless `use_ema` is False)."""
    return select_weights(checkpoint, what="FlowMo", wanted=EMA_KEY if use_ema else RAW_KEY,
                          entries=(EMA_KEY, RAW_KEY), bare_prefix="encoder.",
                          other_option="--raw" if use_ema else "the default (EMA)")


def state_dict_to_params(state_dict: Mapping[str, Any],
                         config: ml_collections.ConfigDict) -> dict:
    """In-memory conversion: a FlowMo state dict (torch or numpy arrays) -> our params, in the
    config's layout (blocks stacked if `model.scan_layers`)."""
    model = flowmo.build_model(config)
    _check_variant(state_dict, model.config)
    unrolled = flowmo.FlowMo(dataclasses.replace(model.config, scan_layers=False))
    params = torch_to_flax(state_dict, conversion_rules(model.config),
                           flowmo.abstract_params(unrolled), what="FlowMo checkpoint")
    return layer_stack.match_layout(params, flowmo.abstract_params(model))


def params_to_state_dict(params: Any, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """Our params (either layout) -> a state dict with the original's key names and layouts."""
    model_config = flowmo.build_model(config).config
    unrolled = flowmo.FlowMo(dataclasses.replace(model_config, scan_layers=False))
    params = layer_stack.match_layout(params, flowmo.abstract_params(unrolled))
    return flax_to_torch(params, conversion_rules(model_config))


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--checkpoint", required=True, help="flowmo_lo.pth or flowmo_hi.pth")
    parser.add_argument("--config", required=True, help="e.g. configs/flowmo.py:lo")
    parser.add_argument("--output", required=True, help="new model directory to write")
    parser.add_argument("--raw", action="store_true",
                        help="import the raw weights (model_state_dict) instead of the EMA")


def main(args: argparse.Namespace):
    config = load_config(args.config)
    state_dict = select_state_dict(load_torch_file(args.checkpoint), use_ema=not args.raw)
    params = state_dict_to_params(state_dict, config)
    exported.save_model_dir(args.output, config, params)
    count = sum(int(np.prod(np.shape(v))) for v in state_dict.values())
    print(f"wrote {args.output}: {len(state_dict)} tensors, {count:,} parameters "
          f"({'raw' if args.raw else 'EMA'} weights)")
