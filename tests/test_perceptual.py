"""The Flax perceptual networks against PyTorch references on random weights, and loading."""

import logging

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_perceptual_reference as ref  # noqa: E402

from tokenizers_jax.convert.inception import inception_params_from_torch  # noqa: E402
from tokenizers_jax.convert.lpips import installed_lin_checkpoint, lpips_params_from_torch  # noqa: E402
from tokenizers_jax.convert.resnet50 import resnet50_params_from_torch  # noqa: E402
from tokenizers_jax.convert.torch_cnn import save_converted  # noqa: E402
from tokenizers_jax.perceptual import common, inception, lpips, resnet, vgg  # noqa: E402


def nchw(images: np.ndarray) -> "torch.Tensor":
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def assert_close(ours, reference, rtol=1e-4):
    """Elementwise, relative to the reference's overall scale (deep nets, fp32)."""
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=rtol, atol=rtol * np.abs(reference).max())


def images(shape, seed, low=-1.0, high=1.0):
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


@pytest.fixture(scope="module")
def torch_lpips():
    torch.manual_seed(0)
    model = ref.LPIPSVGG().eval()
    with torch.no_grad():  # real heads are non-negative; small positive random ones otherwise
        for k in range(5):
            getattr(model, f"lin{k}").model[1].weight.uniform_(0.0, 0.1)
    return model


def split_lpips_state_dict(model):
    state = model.state_dict()
    vgg16 = {k: v for k, v in state.items() if k.startswith("features.")}
    lin = {k: v for k, v in state.items() if k.startswith("lin")}
    return vgg16, lin


def test_vgg16_features_match_torch(torch_lpips):
    x = images((2, 64, 64, 3), 0)
    params = lpips_params_from_torch(*split_lpips_state_dict(torch_lpips))
    ours = vgg.VGG16Features().apply({"params": params["vgg"]}, x)
    with torch.no_grad():
        taps = torch_lpips.taps(nchw(x))
    assert list(ours) == list(vgg.LAYER_NAMES)
    for name, tap in zip(vgg.LAYER_NAMES, taps):
        assert_close(ours[name], tap.permute(0, 2, 3, 1).numpy())


def test_lpips_matches_torch(torch_lpips):
    x = images((2, 64, 64, 3), 1)
    y = np.clip(x + images((2, 64, 64, 3), 2, -0.3, 0.3), -1, 1)
    params = lpips_params_from_torch(*split_lpips_state_dict(torch_lpips))
    ours = jax.jit(lpips.lpips_distance)(params, x, y)
    with torch.no_grad():
        expected = torch_lpips(nchw(x), nchw(y)).numpy()
    assert ours.shape == (2,) and np.all(expected > 0)
    assert_close(ours, expected, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(lpips.lpips_distance(params, x, x)), 0.0)


class _FixedDropout(torch.nn.Module):
    """torch's training-mode Dropout(0.5) with a given keep mask: x * mask / 0.5."""

    def __init__(self, keep):
        super().__init__()
        self.keep = keep

    def forward(self, x):
        return x * self.keep / 0.5


def test_lpips_training_dropout_matches_torch_with_the_same_masks(torch_lpips):
    """Training mode (DetailFlow's generator loss): each head's squared difference is dropped
    elementwise and doubled before its 1x1 conv, with the masks of `dropout_keep`."""
    x = images((2, 32, 32, 3), 5)
    y = np.clip(x + images((2, 32, 32, 3), 6, -0.3, 0.3), -1, 1)
    params = lpips_params_from_torch(*split_lpips_state_dict(torch_lpips))
    key = jax.random.key(3)
    ours = jax.jit(lpips.lpips_distance)(params, x, y, key)
    model = ref.LPIPSVGG().eval()
    model.load_state_dict(torch_lpips.state_dict())
    with torch.no_grad():
        for k, tap in enumerate(model.taps(nchw(x))):
            shape = (2, tap.shape[2], tap.shape[3], tap.shape[1])  # NHWC, as ours
            keep = np.asarray(lpips.dropout_keep(key, k, shape), np.float32)
            getattr(model, f"lin{k}").model[0] = _FixedDropout(nchw(keep))
        expected = model(nchw(x), nchw(y)).numpy()
    assert_close(ours, expected, rtol=1e-5)
    eval_mode = lpips.lpips_distance(params, x, y)
    assert np.all(np.abs(np.asarray(ours) - np.asarray(eval_mode)) > 1e-6 * np.asarray(eval_mode))


def test_lpips_gradient_matches_torch(torch_lpips):
    """The loss is differentiated w.r.t. the reconstruction in training."""
    x, y = images((1, 32, 32, 3), 10), images((1, 32, 32, 3), 11)
    params = lpips_params_from_torch(*split_lpips_state_dict(torch_lpips))
    ours = jax.grad(lambda image: lpips.lpips_distance(params, image, y).sum())(x)
    x_torch = nchw(x).requires_grad_(True)
    torch_lpips(x_torch, nchw(y)).sum().backward()
    assert np.all(np.isfinite(ours))
    assert_close(ours, x_torch.grad.permute(0, 2, 3, 1).numpy())


@pytest.mark.skipif(
    installed_lin_checkpoint() is None,
    reason="lpips package not installed (pip install lpips --no-deps)",
)
def test_lpips_real_heads(torch_lpips):
    """The released v0.1 heads load into the torch reference (names, shapes) and convert."""
    heads = torch.load(installed_lin_checkpoint(), map_location="cpu", weights_only=True)
    model = ref.LPIPSVGG().eval()
    model.load_state_dict({**torch_lpips.state_dict(), **heads})
    params = lpips_params_from_torch(*split_lpips_state_dict(model))
    np.testing.assert_array_equal(
        params["lin2"]["kernel"][0, 0, :, 0], heads["lin2.model.1.weight"][0, :, 0, 0].numpy()
    )
    x, y = images((1, 32, 32, 3), 3), images((1, 32, 32, 3), 4)
    with torch.no_grad():
        assert_close(lpips.lpips_distance(params, x, y), model(nchw(x), nchw(y)).numpy(), 1e-5)


@pytest.fixture(scope="module")
def torch_resnet():
    torch.manual_seed(1)
    return ref.randomize_batch_norms(ref.ResNet50(), seed=1)


def test_resnet50_matches_torch(torch_resnet):
    x = images((2, 64, 64, 3), 5, -2.0, 2.0)
    params = resnet50_params_from_torch(torch_resnet.state_dict())
    ours = jax.jit(resnet.ResNet50().apply)({"params": params}, x)
    with torch.no_grad():
        assert_close(ours, torch_resnet(nchw(x)).numpy())


def test_resnet_logit_mse_matches_torch_pipeline(torch_resnet):
    """[-1, 1] -> [0, 1] -> antialiased bilinear resize to 224 -> ImageNet norm -> logits MSE."""
    x, y = images((1, 48, 40, 3), 6), images((1, 48, 40, 3), 7)
    params = resnet50_params_from_torch(torch_resnet.state_dict())
    mean = torch.tensor(resnet.IMAGENET_MEAN)[None, :, None, None]
    std = torch.tensor(resnet.IMAGENET_STD)[None, :, None, None]

    def torch_logits(images11):
        images01 = (nchw(images11) + 1) / 2
        images01 = torch.nn.functional.interpolate(
            images01, size=(224, 224), mode="bilinear", align_corners=False, antialias=True
        )
        return torch_resnet((images01 - mean) / std)

    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(torch_logits(x), torch_logits(y)).item()
    ours = float(jax.jit(resnet.resnet_logit_mse)(params, x, y))
    assert expected > 0
    np.testing.assert_allclose(ours, expected, rtol=1e-4)


@pytest.fixture(scope="module")
def torch_inception():
    torch.manual_seed(2)
    return ref.randomize_batch_norms(ref.FIDInceptionV3(), seed=2)


def test_fid_inception_trunk_matches_torch(torch_inception):
    """The trunk alone on a small input already in [-1, 1]: 107x107 leaves Mixed_7b/7c a 2x2
    map, so their pool quirks (padding excluded from the average, max pool) are visible.
    With all outputs: sFID's spatial features are Mixed_6d's first 7 channels (its branch1x1,
    the TF graph's mixed_6/conv) in NHWC order, and the logits are fc without its bias."""
    x01 = images((2, 107, 107, 3), 8, 0.0, 1.0)
    params = inception_params_from_torch(torch_inception.state_dict())
    outputs = jax.jit(inception.FIDInceptionV3(all_outputs=True).apply)({"params": params},
                                                                         2 * x01 - 1)
    branch1x1 = []  # torchvision's Mixed_6d.branch1x1 (conv, BN, ReLU): TF mixed_6/conv
    hook = torch_inception.Mixed_6d.branch1x1.register_forward_hook(
        lambda module, inputs, output: branch1x1.append(output))
    with torch.no_grad():
        expected = torch_inception(nchw(x01), resize=False)
    hook.remove()
    assert outputs.pool.shape == (2, inception.FEATURE_DIM)
    assert_close(outputs.pool, expected.numpy())
    spatial = branch1x1[0][:, :inception.SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(2, -1)
    assert outputs.spatial.shape == (2, 5 * 5 * 7)  # 107 -> 5x5 after Mixed_6a
    assert_close(outputs.spatial, spatial.numpy())
    logits = expected @ torch_inception.fc.weight.detach().T  # no bias, as the ADM evaluator
    assert outputs.logits.shape == (2, inception.NUM_CLASSES)
    assert_close(outputs.logits, logits.numpy())
    assert not np.allclose(torch_inception.fc.bias.detach().numpy(), 0)


def test_fid_inception_features_pipeline(torch_inception):
    """[0, 1] images of any size -> resize to 299 -> 2x-1 -> features, as pytorch-fid."""
    x01 = images((1, 40, 56, 3), 9, 0.0, 1.0)
    params = inception_params_from_torch(torch_inception.state_dict())
    ours = jax.jit(inception.inception_features)(params, x01)
    with torch.no_grad():
        assert_close(ours, torch_inception(nchw(x01)).numpy())


NETWORKS = [
    (
        lpips.load_lpips_params,
        lpips.NAME,
        [
            "vgg16-397923af.pth",
            "https://download.pytorch.org/models/vgg16-397923af.pth",
            "vgg.pth",
            "lpips/weights/v0.1/vgg.pth",
            "python -m tokenizers_jax.convert lpips --checkpoint",
        ],
    ),
    (
        resnet.load_resnet50_params,
        resnet.NAME,
        [
            "resnet50-0676ba61.pth",
            "https://download.pytorch.org/models/resnet50-0676ba61.pth",
            "python -m tokenizers_jax.convert resnet50 --checkpoint",
        ],
    ),
    (
        inception.load_inception_params,
        inception.NAME,
        [
            "pt_inception-2015-12-05-6726825d.pth",
            "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
            "pt_inception-2015-12-05-6726825d.pth",
            "python -m tokenizers_jax.convert inception --checkpoint",
        ],
    ),
]


@pytest.mark.parametrize("load,name,expected", NETWORKS, ids=[n[1] for n in NETWORKS])
def test_missing_weights_say_what_to_download(load, name, expected, tmp_path, monkeypatch):
    monkeypatch.setenv(common.WEIGHTS_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        load()
    message = str(error.value)
    for text in expected + [f"--output {tmp_path / name}"]:
        assert text in message, f"{text!r} missing from:\n{message}"


def test_default_weights_dir(monkeypatch):
    monkeypatch.delenv(common.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HOME", "/home/someone")
    assert common.default_weights_dir("resnet50") == "/home/someone/.cache/tokenizers_jax/resnet50"
    monkeypatch.setenv(common.WEIGHTS_ENV, "/weights")
    assert common.default_weights_dir("resnet50") == "/weights/resnet50"


def test_random_init_warns_loudly_and_has_non_negative_lpips_heads(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        params = lpips.load_lpips_params(tmp_path / "absent", allow_random_init=True)
    assert "MEANINGLESS" in caplog.text and "RANDOMLY INITIALISED" in caplog.text
    assert "python -m tokenizers_jax.convert lpips" in caplog.text
    shapes = jax.tree.map(np.shape, params)
    assert shapes["vgg"]["features_28"]["kernel"] == (3, 3, 512, 512)
    # The distance sums head-weighted squared differences: heads >= 0, like the trained ones,
    # keep random-init LPIPS >= 0 (arbitrary-sign heads gave negative distances).
    for k in range(5):
        kernel = np.asarray(params[f"lin{k}"]["kernel"])
        assert (kernel >= 0).all() and kernel.std() > 0, k


def test_load_converted_model_dir(torch_resnet, tmp_path):
    params = resnet50_params_from_torch(torch_resnet.state_dict())
    save_converted(tmp_path / "r50", resnet.NAME, params, checkpoint="resnet50-0676ba61.pth")
    loaded = resnet.load_resnet50_params(tmp_path / "r50")
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    with pytest.raises(ValueError, match="holds model 'resnet50', expected 'inception_fid'"):
        inception.load_inception_params(tmp_path / "r50")
