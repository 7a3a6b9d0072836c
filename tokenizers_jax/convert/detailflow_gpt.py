"""Import a released DetailFlow GPT (the class-conditional generator) into a model directory.

  python -m tokenizers_jax.convert detailflow_gpt --checkpoint GPT.pt \
      --config configs/detailflow_ar.py:df16 --output converted/detailflow16_gpt_l [--raw] \
      [--model-args RUN/config.json]

The files are `torch.save` dicts {model, optimizer, steps, args, scheduler, ema} written by the
original's `train_c2i.py` (github.com/ByteFlow-AI/DetailFlow). The `ema` weights are imported
by default, as the original's evaluation loads them; `--raw` imports `model`. Strict: every key
of spec 8 with its shape, nothing else.

What no tensor shape reveals is checked against the run's ModelArgs `config.json` (the
original reads it two directories above the .pt file, where it is looked for by default):
block_size, group_size, causal_num, cls_token_num, vocab_size, num_classes, dim, n_layer,
n_head. Without that file the group size, vocabulary, class count and widths are still checked
from the tensor shapes, the head count from the pickled `args.gpt_model`, and the block size is
reported as unchecked.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from tokenizers_jax import exported
from tokenizers_jax.config_file import load_config
from tokenizers_jax.convert import common
from tokenizers_jax.convert.common import ConversionError, Rule, select_weights
from tokenizers_jax.models import gpt

EMA_KEY = "ema"
RAW_KEY = "model"
# LlamaGen's model names -> (depth, heads, width) (`GPT_models` of the original).
GPT_SIZES = {"GPT-B": (12, 12, 768), "GPT-L": (24, 16, 1024), "GPT-XL": (36, 20, 1280),
             "GPT-XXL": (48, 24, 1536), "GPT-XXXL": (48, 40, 2560)}
HINT = ("; use the config of the checkpoint's variant (configs/detailflow_ar.py:df16 / df32 / "
        "df64 for 128 / 256 / 512 tokens)")


def conversion_rules(config: ml_collections.ConfigDict) -> dict[str, Rule]:
    """PyTorch key -> Flax parameter, for every tensor of the original's state dict."""
    rules = {
        "tok_embeddings.weight": Rule("tok_embeddings"),
        "cls_embedding.embedding_table.weight": Rule("cls_embedding"),
        "spe_tok_embeddings.special_embeddings.weight": Rule("spe_embeddings"),
        "norm.weight": Rule("norm/scale"),
    }
    rules.update(common.linear_rules("output", "output", bias=False))
    for i in range(config.model.depth):
        torch_layer, flax_layer = f"layers.{i}", f"layers_{i}"
        for name in ("wqkv", "wo"):
            rules.update(common.linear_rules(f"{torch_layer}.attention.{name}",
                                             f"{flax_layer}/attention/{name}", bias=False))
        for name in ("w1", "w2", "w3"):
            rules.update(common.linear_rules(f"{torch_layer}.feed_forward.{name}",
                                             f"{flax_layer}/feed_forward/{name}", bias=False))
        for name in ("attention_norm", "ffn_norm"):
            rules[f"{torch_layer}.{name}.weight"] = Rule(f"{flax_layer}/{name}/scale")
    return rules


def select_state_dict(checkpoint: Mapping[str, Any], use_ema: bool = True) -> Mapping[str, Any]:
    """The weights to import from a loaded checkpoint file (EMA unless `use_ema` is False)."""
    return select_weights(checkpoint, what="DetailFlow GPT",
                          wanted=EMA_KEY if use_ema else RAW_KEY, entries=(EMA_KEY, RAW_KEY),
                          bare_prefix="tok_embeddings.",
                          other_option="--raw" if use_ema else "the default (EMA)")


def _rows(state_dict: Mapping[str, Any], key: str) -> int | None:
    return int(np.shape(state_dict[key])[0]) if key in state_dict else None


def check_shapes(state_dict: Mapping[str, Any], config: ml_collections.ConfigDict):
    """Names the layout the tensor shapes reveal when it disagrees with the config (before the
    strict conversion, whose shape errors would not say which setting differs)."""
    m = config.model
    placeholders = _rows(state_dict, "spe_tok_embeddings.special_embeddings.weight")
    classes = _rows(state_dict, "cls_embedding.embedding_table.weight")
    found = {
        "group size": (None if placeholders is None else placeholders + 1, m.group_size,
                       "group_size"),
        "vocabulary": (_rows(state_dict, "tok_embeddings.weight"), m.vocab_size, "vocab_size"),
        "class count": (None if classes is None else classes - 1, m.num_classes, "num_classes"),
        "width": (None if "norm.weight" not in state_dict else
                  int(np.shape(state_dict["norm.weight"])[0]), m.width, "width"),
        "depth": (len({k.split(".")[1] for k in state_dict if k.startswith("layers.")}) or None,
                  m.depth, "depth"),
    }
    problems = [f"{what} {theirs} (config model.{field}={ours})"
                for what, (theirs, ours, field) in found.items()
                if theirs is not None and theirs != ours]
    if problems:
        raise ConversionError("the checkpoint's " + ", ".join(problems) + HINT)


def check_model_args(model_args: Mapping[str, Any], config: ml_collections.ConfigDict):
    """Checks the run's ModelArgs (its config.json) against the config."""
    m = config.model
    causal = model_args.get("causal_num")
    group = model_args.get("group_size")
    expected = {
        "block_size": (model_args.get("block_size"), m.num_tokens, "num_tokens"),
        "group_size": (group, m.group_size, "group_size"),
        "causal_num": (group if causal is None else causal, m.causal_num, "causal_num"),
        "vocab_size": (model_args.get("vocab_size"), m.vocab_size, "vocab_size"),
        "num_classes": (model_args.get("num_classes"), m.num_classes, "num_classes"),
        "dim": (model_args.get("dim"), m.width, "width"),
        "n_layer": (model_args.get("n_layer"), m.depth, "depth"),
        "n_head": (model_args.get("n_head"), m.num_heads, "num_heads"),
    }
    problems = [f"{name}={theirs} (config model.{field}={ours})"
                for name, (theirs, ours, field) in expected.items()
                if theirs is not None and theirs != ours]
    if model_args.get("cls_token_num", 1) != 1:
        problems.append(f"cls_token_num={model_args['cls_token_num']} (only 1 is supported)")
    if model_args.get("model_type", "c2i") != "c2i":
        problems.append(f"model_type={model_args['model_type']!r} (only 'c2i' is supported)")
    if problems:
        raise ConversionError("the checkpoint's config.json has " + ", ".join(problems) + HINT)


def check_args(args: Any, config: ml_collections.ConfigDict):
    """Checks the pickled training `args`: the GPT size (its head count shows in no tensor),
    the class count, one class token, class-conditional."""
    if args is None:
        return
    values = vars(args) if hasattr(args, "__dict__") else dict(args)
    m = config.model
    problems = []
    size = GPT_SIZES.get(values.get("gpt_model"))
    if size is not None and size != (m.depth, m.num_heads, m.width):
        problems.append(f"gpt_model={values['gpt_model']} (depth, heads, width {size}; config "
                        f"{(m.depth, m.num_heads, m.width)})")
    if values.get("num_classes") not in (None, m.num_classes):
        problems.append(f"num_classes={values['num_classes']} (config model.num_classes="
                        f"{m.num_classes})")
    if values.get("cls_token_num", 1) != 1:
        problems.append(f"cls_token_num={values['cls_token_num']} (only 1 is supported)")
    if values.get("gpt_type", "c2i") != "c2i":
        problems.append(f"gpt_type={values['gpt_type']!r} (only 'c2i' is supported)")
    if problems:
        raise ConversionError("the checkpoint was trained with " + ", ".join(problems) + HINT)


def read_model_args(path: str | None, checkpoint_path: str) -> dict | None:
    """The run's ModelArgs: `path`, or else RUN/config.json for RUN/checkpoints/x.pt (where the
    original's loader reads it) when that file holds ModelArgs (a block_size); None if absent."""
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--model-args file not found: {path}")
        with open(path) as f:
            return json.load(f)
    beside = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_path))),
                          "config.json")
    if not os.path.isfile(beside):
        return None
    with open(beside) as f:
        try:
            values = json.load(f)
        except json.JSONDecodeError:
            return None
    return values if isinstance(values, dict) and "block_size" in values else None


def state_dict_to_params(state_dict: Mapping[str, Any], config: ml_collections.ConfigDict
                         ) -> dict:
    """A GPT state dict (torch or numpy arrays) -> our params, strictly."""
    check_shapes(state_dict, config)
    return common.torch_to_flax(state_dict, conversion_rules(config),
                                gpt.init_params(config, jax.random.PRNGKey(0), abstract=True),
                                what="DetailFlow GPT checkpoint")


def params_to_state_dict(params: Any, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """Our params -> a state dict with the original's names and layouts."""
    return common.flax_to_torch(params, conversion_rules(config))


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--checkpoint", required=True, help="the GPT checkpoint (.pt)")
    parser.add_argument("--config", required=True, help="e.g. configs/detailflow_ar.py:df16")
    parser.add_argument("--output", required=True, help="new model directory to write")
    parser.add_argument("--raw", action="store_true",
                        help="import the raw weights ('model') instead of the EMA ('ema')")
    parser.add_argument("--model-args", default=None,
                        help="the run's ModelArgs config.json (default: two directories above "
                             "the checkpoint, where the original looks)")


def main(args: argparse.Namespace):
    config = load_config(args.config)
    if config.model.get("name") != gpt.NAME:
        raise ConversionError(f"{args.config} is not a DetailFlow AR config (model.name "
                              f"{config.model.get('name')!r}); use configs/detailflow_ar.py")
    checkpoint = common.load_torch_file(args.checkpoint)
    model_args = read_model_args(args.model_args, args.checkpoint)
    if model_args is None:
        block_size_note = ("block size not checked: no ModelArgs config.json two directories "
                           "above the checkpoint (pass --model-args)")
    else:
        check_model_args(model_args, config)
        block_size_note = "block size checked against the run's config.json"
    check_args(checkpoint.get("args"), config)
    state_dict = select_state_dict(checkpoint, use_ema=not args.raw)
    params = state_dict_to_params(state_dict, config)
    exported.save_model_dir(args.output, config, params)
    count = sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(params))
    print(f"wrote {args.output}: {len(state_dict)} tensors, {count:,} parameters "
          f"({'raw' if args.raw else 'EMA'} weights); {block_size_note}")
