"""The DINO ViT-S/16 trunk and its input mapping against a PyTorch re-statement of timm's
VisionTransformer (tests/reference/detailflow_discriminator_torch.py), and `convert dino`
with the exact key names and shapes of dino_deitsmall16_pretrain.pth."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(__file__))
from reference import detailflow_discriminator_torch as R  # noqa: E402

from tokenizers_jax.convert import __main__ as convert_cli  # noqa: E402
from tokenizers_jax.convert import dino as convert  # noqa: E402
from tokenizers_jax.convert.common import ConversionError, flax_to_torch  # noqa: E402
from tokenizers_jax.models import dino  # noqa: E402

TINY = dict(width=32, depth=3, num_heads=2, mlp_dim=128, patch_size=8, image_size=32,
            feature_blocks=(0, 2))


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    reference = R.DinoTrunk(dim=32, depth=3, num_heads=2, patch_size=8, img_size=32,
                            key_depths=(0, 2)).eval()
    with torch.no_grad():  # non-trivial LayerNorms
        for name, p in reference.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    vit = dino.DinoViT(**TINY)
    params = convert.dino_params_from_torch(reference.state_dict(), vit)
    return reference, jax.jit(vit.apply), params


def test_trunk_activations_match_torch(tiny_pair):
    reference, apply, params = tiny_pair
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    ours = apply({"params": params}, images)
    with torch.no_grad():
        expected = reference(nchw(images))
    assert len(ours) == 3 and ours[0].shape == (2, 17, 32) and ours[0].dtype == jnp.float32
    for a, b in zip(ours, expected):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=2e-5, rtol=1e-5)
    # The embedding output is not the block output (guards the comparison).
    assert np.abs(np.asarray(ours[0]) - np.asarray(ours[1])).max() > 0.1


def test_zeroing_the_key_bias_changes_nothing(tiny_pair):
    """The original zeroes each qkv's key bias; the softmax cancels it (module docstring)."""
    _, apply, params = tiny_pair
    images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    zeroed = jax.tree.map(np.copy, params)
    for i in range(3):
        zeroed[f"blocks_{i}"]["attn"]["qkv"]["bias"][32:64] = 0  # the key third
    assert np.abs(params["blocks_0"]["attn"]["qkv"]["bias"][32:64]).max() > 0.01
    for a, b in zip(apply({"params": params}, images), apply({"params": zeroed}, images)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("size,crop", [(256, None), (256, (5, 30)), (240, (16, 0)),
                                       (176, None), (224, None), (16, None)])
def test_input_mapping_matches_torch(size, crop):
    """area for 256 / 240 -> 224, bicubic for 176 / 16 -> 224, or a crop at a given place."""
    images = np.random.default_rng(2).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    choice = dino.DinoCrop(jnp.array(crop is not None), *jnp.array(crop or (0, 0)))
    ours = np.asarray(dino.map_dino_input(images, choice))
    expected = R.dino_input(nchw(images), crop=crop).permute(0, 2, 3, 1).numpy()
    assert ours.shape == (2, 224, 224, 3)
    np.testing.assert_allclose(ours, expected, atol=2e-5)


def test_crop_choices_follow_the_key():
    draw = jax.jit(jax.vmap(lambda k: dino.draw_dino_crop(k, 256, 240)))
    crops = draw(jax.random.split(jax.random.key(0), 2000))
    assert abs(float(np.mean(crops.use_crop)) - 0.5) < 0.05
    assert np.asarray(crops.top).min() == 0 and np.asarray(crops.top).max() == 32
    assert np.asarray(crops.left).min() == 0 and np.asarray(crops.left).max() == 16
    small = dino.draw_dino_crop(jax.random.key(1), 256, 224)  # W = 224: never a crop
    assert not bool(small.use_crop)


# --- convert dino: the exact names and shapes of dino_deitsmall16_pretrain.pth --------------


def vits16_shapes():
    shapes = {"cls_token": (1, 1, 384), "pos_embed": (1, 197, 384),
              "patch_embed.proj.weight": (384, 3, 16, 16), "patch_embed.proj.bias": (384,),
              "norm.weight": (384,), "norm.bias": (384,)}
    for i in range(12):
        b = f"blocks.{i}"
        for norm in ("norm1", "norm2"):
            shapes[f"{b}.{norm}.weight"] = shapes[f"{b}.{norm}.bias"] = (384,)
        shapes.update({f"{b}.attn.qkv.weight": (1152, 384), f"{b}.attn.qkv.bias": (1152,),
                       f"{b}.attn.proj.weight": (384, 384), f"{b}.attn.proj.bias": (384,),
                       f"{b}.mlp.fc1.weight": (1536, 384), f"{b}.mlp.fc1.bias": (1536,),
                       f"{b}.mlp.fc2.weight": (384, 1536), f"{b}.mlp.fc2.bias": (384,)})
    return shapes


@pytest.fixture(scope="module")
def vits16_state_dict():
    rng = np.random.default_rng(3)
    return {k: torch.from_numpy(rng.normal(size=s).astype(np.float32))
            for k, s in vits16_shapes().items()}


def test_vits16_conversion_is_strict_and_round_trips(vits16_state_dict):
    params = convert.dino_params_from_torch(vits16_state_dict)
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    assert count == 21_664_896  # ViT-S/16 without a head (21,665,664) less its final norm (768)
    back = flax_to_torch(params, convert.dino_rules(dino.DinoViT()))
    assert set(back) == set(vits16_state_dict) - {"norm.weight", "norm.bias"}
    for key, value in back.items():
        np.testing.assert_array_equal(value, vits16_state_dict[key].numpy())

    broken = dict(vits16_state_dict)
    del broken["blocks.11.mlp.fc2.bias"]
    with pytest.raises(ConversionError, match="missing.*blocks.11.mlp.fc2.bias"):
        convert.dino_params_from_torch(broken)
    with pytest.raises(ConversionError, match="unexpected.*head.weight"):
        convert.dino_params_from_torch({**vits16_state_dict, "head.weight": torch.zeros(3)})
    with pytest.raises(ConversionError, match="mis-shaped.*pos_embed"):
        convert.dino_params_from_torch({**vits16_state_dict, "pos_embed": torch.zeros(1, 50, 384)})
    with pytest.raises(ConversionError, match="norm.weight"):
        convert.dino_params_from_torch({k: v for k, v in vits16_state_dict.items()
                                        if k != "norm.weight"})


def test_convert_cli_writes_a_loadable_model_dir(vits16_state_dict, tmp_path):
    path = tmp_path / dino.CHECKPOINT_FILE
    # A DINO training checkpoint layout: the teacher's `module.backbone.*` (+ its head).
    teacher = {f"module.backbone.{k}": v for k, v in vits16_state_dict.items()}
    teacher["module.head.last_layer.weight"] = torch.zeros(4, 4)
    torch.save({"teacher": teacher, "epoch": 3}, path)
    assert convert_cli.main(["dino", "--checkpoint", str(path), "--output",
                             str(tmp_path / "out")]) == 0
    loaded = dino.load_dino_params(tmp_path / "out")
    np.testing.assert_array_equal(np.asarray(loaded["pos_embed"]),
                                  vits16_state_dict["pos_embed"][0].numpy())
    with pytest.raises(ConversionError, match="not a DINO ViT checkpoint"):
        convert.backbone_state_dict({"model": {}})
    with pytest.raises(FileNotFoundError, match="convert dino"):
        dino.load_dino_params(tmp_path / "missing")


def test_logical_axis_names_and_bf16_compute():
    import flax.linen as nn

    vit = dino.DinoViT(**{**TINY, "dtype": jnp.bfloat16})
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    boxed = jax.eval_shape(vit.init, jax.random.key(0), images)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
    features = jax.eval_shape(vit.apply, {"params": nn.unbox(boxed)}, images)
    assert all(f.dtype == jnp.float32 and f.shape == (2, 17, 32) for f in features)
