"""DetailFlow against a PyTorch re-statement of the original forward (fp32, tiny config).

The reference (`tokenizers_jax/torch_reference/detailflow.py`) follows the original code path
by path on a state dict with the original key names (spec 1, 3, 4, 8): HF SigLIP2 layers with
an additive finfo.min mask built like `create_attn_mask_for_x_z`, F.interpolate(bilinear,
antialias) position tables, the VQ with F.normalize and topk, and `encode_image`'s two passes.
Our params go through `params_to_state_dict`, so the importer's layouts are checked too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from test_detailflow import images, tiny, tiny_functions  # noqa: E402

from tokenizers_jax.convert import detailflow as convert  # noqa: E402
from tokenizers_jax.convert.siglip2 import abstract_vit_params  # noqa: E402
from tokenizers_jax.models import detailflow as df  # noqa: E402
from tokenizers_jax.torch_reference.detailflow import Reference  # noqa: E402


def close(ours, theirs, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def setup():
    config, params = tiny()
    teacher_params = jax.tree.map(
        lambda s: jnp.asarray(np.random.RandomState(3).randn(*s.shape) * 0.1, jnp.float32),
        abstract_vit_params(config.model.teacher))
    state_dict = convert.params_to_state_dict(params, config, teacher_params)
    x = images(2, seed=5)
    x_float = x.astype(np.float32) / 127.5 - 1
    return config, params, teacher_params, Reference(state_dict, config), x, x_float


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_encode_matches(setup):
    config, params, _, ref, x, x_float = setup
    tok = df.DetailFlowTokenizer(config, params)
    model = tok.model
    latents = jax.jit(lambda x: model.apply({"params": params}, x,
                                            method=lambda m, x: m.quant_conv(m.encoder(x))))(
        jnp.asarray(x_float))
    with torch.no_grad():
        ref_latents = ref.encoder(nchw(x_float))
        _, ref_idx, _, _ = ref.quantize(ref_latents)
    close(latents, ref_latents)
    np.testing.assert_array_equal(np.asarray(tok.encode(x)), ref_idx.numpy())


@pytest.mark.parametrize("t", [1, 4, 8, 16])
def test_prefix_decode_matches(setup, t):
    config, params, _, ref, x, x_float = setup
    tok = df.DetailFlowTokenizer(config, params)
    idx = np.array(tok.encode(x))
    size = tok.resolutions.output_resolution(t)
    ours = tok._decode(params, idx, t, size // 8)
    with torch.no_grad():
        emb = F.normalize(ref.sd["quantize.embedding.weight"], dim=-1)
        theirs = ref.decode(emb[torch.from_numpy(idx).long()], t, size)
    close(jnp.transpose(ours, (0, 3, 1, 2)), theirs)


@pytest.mark.parametrize("noise_idx", [0, 3, 8])
def test_self_correction_matches(setup, noise_idx):
    config, params, _, ref, x, x_float = setup
    ranks = np.random.RandomState(noise_idx).randint(0, config.model.neighbour_top_k, (2, 16))
    correct = tiny_functions()[0]  # the same tiny params
    out = correct(jnp.asarray(x_float), noise_idx, jnp.asarray(ranks, jnp.int32))
    with torch.no_grad():
        quant, stack = ref.encode_image(nchw(x_float), noise_idx, torch.from_numpy(ranks))
    np.testing.assert_array_equal(np.asarray(out.indices), stack.numpy())
    close(out.quant, quant)


def test_alignment_target_matches(setup):
    config, _, teacher_params, ref, _, x_float = setup
    teacher = df.teacher_from_config(config)
    ours = jax.jit(lambda p, x: df.alignment_target(teacher, p, x))(
        teacher_params, jnp.asarray(x_float))
    with torch.no_grad():
        close(ours, ref.teacher_target(nchw(x_float)))


def test_decode_at_other_grid_resizes_positions_like_torch(setup):
    """Grids 1..4 exercise the antialiased downscale of the 4x4 table (and 5 an upscale)."""
    config, params, _, ref, x, _ = setup
    tok = df.DetailFlowTokenizer(config, params)
    idx = np.array(tok.encode(x))
    for grid in (1, 3, 5):
        ours = tok._decode(params, idx, 16, grid)
        with torch.no_grad():
            emb = F.normalize(ref.sd["quantize.embedding.weight"], dim=-1)
            theirs = ref.decode(emb[torch.from_numpy(idx).long()], 16, grid * 8)
        close(jnp.transpose(ours, (0, 3, 1, 2)), theirs)


def test_public_decode_attends_over_the_slots_of_its_resolution_only(setup):
    """Coarse prefixes decode from fewer code slots (`decoder_slots`), with the same numbers."""
    config, params, _, ref, x, _ = setup
    tok = df.DetailFlowTokenizer(config, params)
    idx = np.array(tok.encode(x))
    res = tok.resolutions
    t = 2
    size = res.output_resolution(t)
    slots = tok.decoder_slots(t, size)
    assert t <= slots < config.model.num_latent_tokens
    assert res.output_resolution(slots) == size and res.output_resolution(slots + 1) > size
    assert tok.decoder_slots(16, size) == 16  # a prefix longer than the bucket: every slot
    with torch.no_grad():
        emb = F.normalize(ref.sd["quantize.embedding.weight"], dim=-1)
        theirs = ref.decode(emb[torch.from_numpy(idx).long()], t, size).clamp(-1, 1)
    close(jnp.transpose(tok.decode(idx, num_tokens=t), (0, 3, 1, 2)), theirs)
