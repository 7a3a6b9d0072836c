"""DetailFlow and SigLIP2 importers: the exact key names and shapes of spec 8, strictness, and
round trips through a real torch.save file and a real safetensors file."""

import argparse

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_detailflow import CONFIG_FILE, get_config, images, random_params, tiny  # noqa: E402

from tokenizers_jax import api, exported  # noqa: E402
from tokenizers_jax.convert import __main__ as convert_cli  # noqa: E402
from tokenizers_jax.convert import detailflow as convert  # noqa: E402
from tokenizers_jax.convert import siglip2  # noqa: E402
from tokenizers_jax.convert.common import ConversionError, flax_to_torch  # noqa: E402
from tokenizers_jax.models import detailflow as df  # noqa: E402


def vit_keys(prefix, depth, width, mlp, patch_embedding=True, positions=256):
    keys = {f"{prefix}.embeddings.position_embedding.weight": (positions, width)}
    if patch_embedding:
        keys[f"{prefix}.embeddings.patch_embedding.weight"] = (width, 768)
        keys[f"{prefix}.embeddings.patch_embedding.bias"] = (width,)
    for i in range(depth):
        layer = f"{prefix}.encoder.layers.{i}"
        for norm in ("layer_norm1", "layer_norm2"):
            keys[f"{layer}.{norm}.weight"] = keys[f"{layer}.{norm}.bias"] = (width,)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            keys[f"{layer}.self_attn.{proj}.weight"] = (width, width)
            keys[f"{layer}.self_attn.{proj}.bias"] = (width,)
        keys[f"{layer}.mlp.fc1.weight"], keys[f"{layer}.mlp.fc1.bias"] = (mlp, width), (mlp,)
        keys[f"{layer}.mlp.fc2.weight"], keys[f"{layer}.mlp.fc2.bias"] = (width, mlp), (width,)
    keys[f"{prefix}.post_layernorm.weight"] = keys[f"{prefix}.post_layernorm.bias"] = (width,)
    return keys


def spec8_model_keys(n=128):
    """Spec 8's `model` keys of DetailFlow-16 (teacher and usage buffer apart)."""
    keys = {
        "encoder.latent_pos_embed": (1, n, 1152), "encoder.latent_tokens": (1, n, 1152),
        "encoder.refined_tokens": (1, n, 1152),
        "decoder.latent_pos_embed": (1, n, 768), "decoder.mask_token": (1, 1, 768),
        "decoder.to_pixel.model.weight": (768, 768), "decoder.to_pixel.model.bias": (768,),
        "quant_conv.weight": (8, 1152), "quant_conv.bias": (8,),
        "post_quant_conv.weight": (768, 8), "post_quant_conv.bias": (768,),
        "refine_conv.weight": (1152, 8), "refine_conv.bias": (1152,),
        "global_token_proj.0.weight": (1024, 8), "global_token_proj.0.bias": (1024,),
        "global_token_proj.2.weight": (1024, 1024), "global_token_proj.2.bias": (1024,),
        "global_token_proj.4.weight": (1152, 1024), "global_token_proj.4.bias": (1152,),
        "quantize.embedding.weight": (8192, 8),
    }
    keys.update(vit_keys("encoder.visual_model", 12, 1152, 4304))
    keys.update(vit_keys("decoder.visual_model", 12, 768, 3072, patch_embedding=False))
    return keys


def torch_shapes(rules, abstract):
    """torch key -> the torch shape our parameter maps back to."""
    flat = {"/".join(p.key for p in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    return {key: rule.transform.inverse(np.empty(flat[rule.target].shape, np.float32)).shape
            for key, rule in rules.items()}


def test_spec8_key_names_and_shapes():
    config = get_config("df16")
    abstract = df.init_params(config, jax.random.PRNGKey(0), abstract=True)
    assert torch_shapes(convert.conversion_rules(config), abstract) == spec8_model_keys()
    teacher = torch_shapes(convert.teacher_rules(config),
                           siglip2.abstract_vit_params(config.model.teacher))
    assert teacher == vit_keys("repa_model.visual_model", 27, 1152, 4304)


def tiny_checkpoint(teacher=True, seed=4):
    config, params = tiny()
    teacher_params = random_params(siglip2.abstract_vit_params(config.model.teacher), seed)
    state_dict = convert.params_to_state_dict(params, config, teacher_params if teacher else None)
    return config, params, teacher_params, state_dict


def test_round_trip_through_torch_save(tmp_path):
    config, params, teacher_params, state_dict = tiny_checkpoint()
    state_dict["quantize.codebook_used"] = np.arange(65536, dtype=np.float32) % 64
    path = tmp_path / "128.pt"
    torch.save({
        "model": {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
        "discriminator": {"heads.0.0.0.weight_orig": torch.zeros(3, 3, 1)},
        "optimizer_disc": {"state": {}, "param_groups": []},
        "steps": 1000,
        "args": argparse.Namespace(group_size=4, causal_num=None, num_latent_tokens=16),
    }, path)
    out = tmp_path / "converted"
    assert convert_cli.main(["detailflow", "--checkpoint", str(path), "--config",
                             f"{CONFIG_FILE}:tiny", "--output", str(out), "--teacher"]) == 0
    tok = api.load_tokenizer(out)
    assert isinstance(tok, df.DetailFlowTokenizer)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 tok.params, params)
    # The codebook is kept un-normalised, as in the file.
    norms = np.linalg.norm(np.asarray(tok.params["quantize"]["codebook"]), axis=-1)
    assert not np.allclose(norms, 1.0)
    loaded_teacher = exported.load_params(out / convert.TEACHER_DIR)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 loaded_teacher, teacher_params)
    assert exported.load_config(out / convert.TEACHER_DIR).model.depth == 2
    # Back to the original names: identical tensors, usage buffer written as zeros.
    exported_sd = convert.params_to_state_dict(tok.params, config, loaded_teacher)
    assert set(exported_sd) == set(state_dict)
    for key, value in state_dict.items():
        if key != "quantize.codebook_used":
            np.testing.assert_array_equal(exported_sd[key], np.asarray(value), err_msg=key)
    assert not exported_sd["quantize.codebook_used"].any()
    # Converted weights tokenize like the in-memory params.
    np.testing.assert_array_equal(np.asarray(tok.encode(images())),
                                  np.asarray(df.DetailFlowTokenizer(config, params)
                                             .encode(images())))


def test_teacher_dropped_for_inference():
    config, params, _, state_dict = tiny_checkpoint()
    converted, teacher = convert.state_dict_to_params(state_dict, config)
    assert teacher is None
    assert "teacher" not in converted and set(converted) == set(params)


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.pop("decoder.mask_token"), "missing"),
    (lambda sd: sd.update({"decoder.extra.weight": np.zeros(3)}), "unexpected"),
    (lambda sd: sd.update({"quant_conv.weight": np.zeros((8, 65))}), "mis-shaped"),
    (lambda sd: sd.update({"quantize.codebook_used": np.zeros(10)}), "codebook_used"),
    (lambda sd: sd.pop("repa_model.visual_model.post_layernorm.bias"), "teacher"),
])
def test_import_is_strict(edit, message):
    config, _, _, state_dict = tiny_checkpoint()
    edit(state_dict)
    with pytest.raises(ConversionError, match=message):
        convert.state_dict_to_params(state_dict, config, teacher=True)


def test_checkpoint_selection_and_args():
    config, _, _, state_dict = tiny_checkpoint(teacher=False)
    assert convert.select_state_dict({"model": state_dict}) is state_dict
    assert convert.select_state_dict(state_dict) is state_dict
    with pytest.raises(ConversionError, match="ema"):
        convert.select_state_dict({"model": state_dict}, use_ema=True)
    with pytest.raises(ConversionError, match="not a DetailFlow"):
        convert.select_state_dict({"weights": {}})
    convert.check_args(argparse.Namespace(group_size=4, causal_num=None), config)
    with pytest.raises(ConversionError, match="group_size=8"):
        convert.check_args(argparse.Namespace(group_size=8, causal_num=None), config)
    with pytest.raises(ConversionError, match="causal_num=8"):
        convert.check_args(argparse.Namespace(group_size=4, causal_num=8), config)


def test_siglip2_safetensors(tmp_path):
    from safetensors.numpy import save_file

    config, _, teacher_params, _ = tiny_checkpoint()
    tower = config.model.teacher
    rules = siglip2.vit_rules("vision_model", "", tower.depth)
    vision = {k: np.ascontiguousarray(v) for k, v in flax_to_torch(teacher_params, rules).items()}
    extras = {
        "text_model.embeddings.token_embedding.weight": np.zeros((10, 64), np.float32),
        "logit_scale": np.zeros((1,), np.float32), "logit_bias": np.zeros((1,), np.float32),
        "vision_model.head.probe": np.zeros((1, 1, 64), np.float32),
        "vision_model.head.attention.in_proj_weight": np.zeros((192, 64), np.float32),
    }
    path = tmp_path / "model.safetensors"
    save_file({**vision, **extras}, str(path))
    out = tmp_path / "siglip2"
    assert convert_cli.main(["siglip2", "--checkpoint", str(path), "--config",
                             f"{CONFIG_FILE}:tiny", "--output", str(out)]) == 0
    loaded = exported.load_params(out)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 loaded, teacher_params)
    assert exported.load_config(out).model.name == "siglip2"
    # The encoder takes the embeddings, the first layers and the post LayerNorm.
    encoder_vit = siglip2.encoder_params_from_siglip2(loaded, depth=1)
    assert set(encoder_vit) == {"patch_embedding", "position_embedding", "post_layernorm",
                                "layers_0"}
    with pytest.raises(ValueError, match="2 layers"):
        siglip2.encoder_params_from_siglip2(loaded, depth=3)
    # Strict on the vision tower: a missing layer tensor or an unknown vision key fails.
    broken = dict(vision)
    broken.pop("vision_model.encoder.layers.1.mlp.fc2.bias")
    with pytest.raises(ConversionError, match="missing"):
        siglip2.convert_vision_state_dict(broken, tower)
    with pytest.raises(ConversionError, match="unexpected"):
        siglip2.convert_vision_state_dict({**vision, "vision_model.extra": np.zeros(1)}, tower)


def test_siglip2_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="siglip2-so400m"):
        siglip2.load_safetensors(tmp_path / "nope.safetensors")


def test_encoder_initialised_from_siglip2_df16():
    """so400m's first 12 layers fill the df16 encoder tower exactly (names and shapes)."""
    config = get_config("df16")
    encoder_vit = df.init_params(config, jax.random.PRNGKey(0), abstract=True)["encoder"]["vit"]
    so400m = siglip2.abstract_vit_params(config.model.teacher)
    initial = siglip2.encoder_params_from_siglip2(so400m, config.model.encoder.depth)
    shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
    assert shapes(initial) == shapes(encoder_vit)
