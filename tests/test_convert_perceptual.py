"""Importers of the perceptual networks: key names/shapes, round trips, strictness, the CLI."""

import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")

import torch_perceptual_reference as ref  # noqa: E402

from tokenizers_jax.convert import __main__ as convert_cli  # noqa: E402
from tokenizers_jax.convert import inception as convert_inception  # noqa: E402
from tokenizers_jax.convert import lpips as convert_lpips  # noqa: E402
from tokenizers_jax.convert import resnet50 as convert_resnet50  # noqa: E402
from tokenizers_jax.convert.common import ConversionError, flax_to_torch  # noqa: E402
from tokenizers_jax.convert.torch_cnn import abstract_params  # noqa: E402
from tokenizers_jax.perceptual import inception, lpips, resnet  # noqa: E402


def numpy_state(module: "torch.nn.Module") -> dict:
    return {k: v.numpy() for k, v in module.state_dict().items()}


def lpips_state_dicts():
    """(torchvision vgg16 state dict, lpips heads). The real classifier (~120M parameters) is
    dropped by the converter, so tiny tensors stand in for it under its real key names."""
    state = numpy_state(ref.LPIPSVGG())
    vgg16 = {k: v for k, v in state.items() if k.startswith("features.")}
    vgg16.update(
        {
            f"classifier.{i}.{p}": np.zeros(2, np.float32)
            for i in (0, 3, 6)
            for p in ("weight", "bias")
        }
    )
    return vgg16, {k: v for k, v in state.items() if k.startswith("lin")}


# Keys and shapes of the released files (from the torchvision / pytorch-fid architectures),
# checked independently of the reference modules above.
RELEASED_SHAPES = {
    "resnet50": {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer3.5.bn3.running_var": (1024,),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "fc.weight": (1000, 2048),
        "fc.bias": (1000,),
    },
    "inception": {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_3.conv.weight": (192, 192, 7, 1),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.bn.running_mean": (192,),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    },
    "lpips": {
        "features.0.weight": (64, 3, 3, 3),
        "features.28.weight": (512, 512, 3, 3),
        "lin0.model.1.weight": (1, 64, 1, 1),
        "lin4.model.1.weight": (1, 512, 1, 1),
    },
}
# Published parameter counts (torchvision docs: resnet50 25,557,032; vgg16 138,357,544 of which
# `features` 14,714,688; inception_v3 27,161,264 of which 3,326,696 AuxLogits and 2,049,000 fc,
# whose 1000 classes are 1008 in pytorch-fid's: 2048 * 1008 + 1008). BatchNorm running
# statistics are buffers and not counted.
PUBLISHED_COUNTS = {"resnet50": 25_557_032, "inception": 21_785_568 + 2048 * 1008 + 1008,
                    "lpips": 14_714_688 + 1472}
RULES = {
    "resnet50": convert_resnet50.resnet50_rules,
    "inception": convert_inception.inception_rules,
    "lpips": convert_lpips.lpips_rules,
}
INITS = {
    "resnet50": resnet.init_resnet50_params,
    "inception": inception.init_inception_params,
    "lpips": lpips.init_lpips_params,
}


@pytest.mark.parametrize("network", sorted(RULES))
def test_rules_have_released_names_and_counts(network):
    rules = RULES[network]()
    flat = {
        "/".join(k): v
        for k, v in traverse_util.flatten_dict(abstract_params(INITS[network])).items()
    }
    for key, shape in RELEASED_SHAPES[network].items():
        rule = rules[key]
        assert rule.transform.inverse(np.zeros(flat[rule.target].shape)).shape == shape, key
    counted = sum(
        int(np.prod(flat[rule.target].shape))
        for key, rule in rules.items()
        if not key.endswith(("running_mean", "running_var"))
    )
    assert counted == PUBLISHED_COUNTS[network]


def test_reference_modules_have_released_key_counts():
    """torchvision's resnet50 state dict has 320 entries (53 BatchNorms with 5 each)."""
    assert len(ref.ResNet50().state_dict()) == 320
    assert len(ref.FIDInceptionV3().state_dict()) == 94 * 6 + 2


@pytest.mark.parametrize("network", ["resnet50", "inception"])
def test_round_trip(network):
    model = {"resnet50": ref.ResNet50, "inception": ref.FIDInceptionV3}[network]()
    state = numpy_state(ref.randomize_batch_norms(model))
    convert = {
        "resnet50": convert_resnet50.resnet50_params_from_torch,
        "inception": convert_inception.inception_params_from_torch,
    }[network]
    back = flax_to_torch(convert(state), RULES[network]())
    dropped = {k for k in state if k.endswith("num_batches_tracked")}
    assert set(back) == set(state) - dropped
    for key, value in back.items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)


def test_lpips_round_trip():
    vgg16, heads = lpips_state_dicts()
    params = convert_lpips.lpips_params_from_torch(vgg16, heads)
    assert params["vgg"]["features_0"]["kernel"].shape == (3, 3, 3, 64)
    assert params["lin1"]["kernel"].shape == (1, 1, 128, 1)
    back = flax_to_torch(params, convert_lpips.lpips_rules())
    expected = {**{k: v for k, v in vgg16.items() if not k.startswith("classifier.")}, **heads}
    assert set(back) == set(expected)
    for key, value in back.items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)


def test_strictness_names_the_key():
    state = numpy_state(ref.ResNet50())
    convert = convert_resnet50.resnet50_params_from_torch

    missing = {k: v for k, v in state.items() if k != "layer4.2.bn3.running_var"}
    with pytest.raises(ConversionError, match=r"missing.*layer4\.2\.bn3\.running_var"):
        convert(missing)
    with pytest.raises(ConversionError, match=r"unexpected.*layer5\.0\.conv1\.weight"):
        convert({**state, "layer5.0.conv1.weight": np.zeros((1, 1, 1, 1), np.float32)})
    with pytest.raises(ConversionError, match=r"mis-shaped.*fc\.weight.*got \(2048, 10\)"):
        convert({**state, "fc.weight": np.zeros((10, 2048), np.float32)})
    with pytest.raises(ConversionError, match="missing.*Mixed_7c"):
        convert_inception.inception_params_from_torch(
            {
                k: v
                for k, v in numpy_state(ref.FIDInceptionV3()).items()
                if not k.startswith("Mixed_7c.")
            }
        )
    vgg16, heads = lpips_state_dicts()
    with pytest.raises(ConversionError, match=r"missing.*lin3\.model\.1\.weight"):
        convert_lpips.lpips_params_from_torch(
            vgg16, {k: v for k, v in heads.items() if not k.startswith("lin3")}
        )
    with pytest.raises(ConversionError, match="in both"):
        convert_lpips.lpips_params_from_torch(
            vgg16, {**heads, "features.0.bias": heads["lin0.model.1.weight"]}
        )


def test_cli_from_torch_save_files(tmp_path):
    """torch.save files -> `python -m tokenizers_jax.convert ...` -> loadable model dirs."""
    torch.manual_seed(0)
    model = ref.randomize_batch_norms(ref.ResNet50())
    torch.save(model.state_dict(), tmp_path / "resnet50-0676ba61.pth")
    assert (
        convert_cli.main(
            [
                "resnet50",
                "--checkpoint",
                str(tmp_path / "resnet50-0676ba61.pth"),
                "--output",
                str(tmp_path / "resnet50"),
            ]
        )
        == 0
    )
    params = resnet.load_resnet50_params(tmp_path / "resnet50")
    np.testing.assert_array_equal(
        params["layer2_0"]["downsample_1"]["var"], model.layer2[0].downsample[1].running_var.numpy()
    )
    np.testing.assert_array_equal(
        params["conv1"]["kernel"], model.conv1.weight.detach().numpy().transpose(2, 3, 1, 0)
    )

    vgg16, heads = lpips_state_dicts()
    torch.save({k: torch.from_numpy(v) for k, v in vgg16.items()}, tmp_path / "vgg16.pth")
    torch.save({k: torch.from_numpy(v) for k, v in heads.items()}, tmp_path / "vgg.pth")
    convert_cli.main(
        [
            "lpips",
            "--checkpoint",
            str(tmp_path / "vgg16.pth"),
            "--lin-checkpoint",
            str(tmp_path / "vgg.pth"),
            "--output",
            str(tmp_path / "lp"),
        ]
    )
    params = lpips.load_lpips_params(tmp_path / "lp")
    np.testing.assert_array_equal(
        params["lin4"]["kernel"][0, 0, :, 0], heads["lin4.model.1.weight"][0, :, 0, 0]
    )

    inception_model = ref.FIDInceptionV3()
    torch.save(inception_model.state_dict(), tmp_path / "pt_inception.pth")
    convert_cli.main(
        [
            "inception",
            "--checkpoint",
            str(tmp_path / "pt_inception.pth"),
            "--output",
            str(tmp_path / "inc"),
        ]
    )
    params = inception.load_inception_params(tmp_path / "inc")
    np.testing.assert_array_equal(
        params["Mixed_7c"]["branch_pool"]["bn"]["scale"],
        inception_model.Mixed_7c.branch_pool.bn.weight.detach().numpy(),
    )


@pytest.mark.skipif(
    convert_lpips.installed_lin_checkpoint() is None,
    reason="lpips package not installed (pip install lpips --no-deps)",
)
def test_lpips_cli_uses_installed_heads(tmp_path):
    vgg16, _ = lpips_state_dicts()
    torch.save({k: torch.from_numpy(v) for k, v in vgg16.items()}, tmp_path / "vgg16.pth")
    convert_cli.main(
        ["lpips", "--checkpoint", str(tmp_path / "vgg16.pth"), "--output", str(tmp_path / "lp")]
    )
    heads = torch.load(
        convert_lpips.installed_lin_checkpoint(), map_location="cpu", weights_only=True
    )
    params = lpips.load_lpips_params(tmp_path / "lp")
    np.testing.assert_array_equal(
        params["lin0"]["kernel"][0, 0, :, 0], heads["lin0.model.1.weight"][0, :, 0, 0].numpy()
    )


def test_lpips_cli_without_heads_says_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(convert_lpips, "installed_lin_checkpoint", lambda: None)
    with pytest.raises(FileNotFoundError, match="--lin-checkpoint vgg.pth"):
        convert_cli.main(["lpips", "--checkpoint", "vgg16.pth", "--output", str(tmp_path / "lp")])
