"""FlowMo importer: the 608 keys of spec 9, strictness, variant detection, .pth round trip."""

import jax
import numpy as np
import pytest
import torch

import tokenizers_jax
from tokenizers_jax.config_file import load_config
from tokenizers_jax.convert import __main__ as convert_cli
from tokenizers_jax.convert import flowmo as convert_flowmo
from tokenizers_jax.convert.common import ConversionError
from tokenizers_jax.models import flowmo

from conftest import small_flowmo_config
from reference.flowmo_layout import spec_state_dict_shapes


def zero_state_dict(shapes):
    """Zero-stride arrays: full-size shapes without allocating memory."""
    return {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}


@pytest.mark.parametrize("variant,ctx,count", [("lo", 18, 945_374_085), ("hi", 56, 945_520_081)])
def test_release_layout_converts_fully(variant, ctx, count):
    shapes = spec_state_dict_shapes(ctx)
    assert len(shapes) == 608 and sum(int(np.prod(s)) for s in shapes.values()) == count
    params = convert_flowmo.state_dict_to_params(
        zero_state_dict(shapes), load_config(f"configs/flowmo.py:{variant}"))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == count
    qkv = params["decoder"]["double_blocks_3"]["img_attn"]["qkv"]["kernel"]
    assert qkv.shape == (1152, 3456)


def test_wrong_variant_is_refused_naming_the_file_variant():
    hi_weights = zero_state_dict(spec_state_dict_shapes(56))
    with pytest.raises(ConversionError, match=r"checkpoint is hi .*configs/flowmo.py:hi"):
        convert_flowmo.state_dict_to_params(hi_weights, load_config("configs/flowmo.py:lo"))


@pytest.fixture(scope="module")
def small_release():
    config = small_flowmo_config()
    model = flowmo.build_model(config)
    rng = np.random.default_rng(0)  # every value distinct, so any misplaced tensor shows
    params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32),
                          flowmo.abstract_params(model))
    return config, params, convert_flowmo.params_to_state_dict(params, config)


def test_strictness_names_missing_extra_and_misshaped_keys(small_release):
    config, _, state_dict = small_release
    missing = dict(state_dict)
    del missing["decoder.double_blocks.0.txt_attn.norm.key_norm.scale"]
    with pytest.raises(ConversionError, match=r"missing.*txt_attn.norm.key_norm.scale"):
        convert_flowmo.state_dict_to_params(missing, config)
    extra = {**state_dict, "decoder.double_blocks.0.img_attn.bias_extra": np.zeros(3)}
    with pytest.raises(ConversionError, match=r"unexpected.*bias_extra"):
        convert_flowmo.state_dict_to_params(extra, config)
    misshaped = dict(state_dict)
    misshaped["encoder.img_in.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ConversionError, match=r"mis-shaped.*encoder.img_in.weight"):
        convert_flowmo.state_dict_to_params(misshaped, config)


def test_torch_layouts_are_transposed(small_release):
    config, params, state_dict = small_release
    weight = state_dict["decoder.double_blocks.0.img_mlp.0.weight"]
    kernel = params["decoder"]["double_blocks_0"]["img_mlp"]["fc1"]["kernel"]
    np.testing.assert_array_equal(weight, np.asarray(kernel).T)
    scale = state_dict["encoder.double_blocks.0.txt_attn.norm.query_norm.scale"]
    np.testing.assert_array_equal(
        scale, params["encoder"]["double_blocks_0"]["txt_attn"]["norm"]["query_norm"]["scale"])


def test_pth_round_trip_through_the_cli_and_load_tokenizer(small_release, tmp_path):
    config, params, state_dict = small_release
    raw = {k: torch.from_numpy(np.asarray(v) * 2) for k, v in state_dict.items()}
    ema = {k: torch.from_numpy(np.asarray(v).copy()) for k, v in state_dict.items()}
    path = tmp_path / "flowmo_small.pth"
    torch.save({"total_steps": 10, "model_ema_state_dict": ema, "model_state_dict": raw}, path)
    config_file = tmp_path / "small_config.py"
    config_file.write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom conftest import small_flowmo_config\n"
        "def get_config(arg=None):\n    return small_flowmo_config()\n"
        % str(__import__("pathlib").Path(__file__).parent))
    out = tmp_path / "converted"
    assert convert_cli.main(["flowmo", "--checkpoint", str(path), "--config", str(config_file),
                             "--output", str(out)]) == 0
    tok = tokenizers_jax.load_tokenizer(out)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), tok.params, params)
    back = convert_flowmo.params_to_state_dict(tok.params, config)
    assert set(back) == set(state_dict)
    for key, value in back.items():
        np.testing.assert_array_equal(value, state_dict[key])
    # --raw imports model_state_dict; an existing output is never overwritten
    raw_out = tmp_path / "converted_raw"
    convert_cli.main(["flowmo", "--checkpoint", str(path), "--config", str(config_file),
                      "--output", str(raw_out), "--raw"])
    raw_params = tokenizers_jax.load_tokenizer(raw_out).params
    np.testing.assert_array_equal(raw_params["encoder"]["img_in"]["bias"],
                                  2 * np.asarray(params["encoder"]["img_in"]["bias"]))
    with pytest.raises(FileExistsError, match="already holds a model"):
        convert_cli.main(["flowmo", "--checkpoint", str(path), "--config", str(config_file),
                          "--output", str(out)])


def test_checkpoint_selection_errors():
    with pytest.raises(ConversionError, match="not a FlowMo checkpoint"):
        convert_flowmo.select_state_dict({"model": {}, "optimizer": {}})
    with pytest.raises(ConversionError, match="--raw"):
        convert_flowmo.select_state_dict({"model_state_dict": {}})
