"""The bf16 compute path (model.dtype=bfloat16, fp32 params, norms, softmax and logits) agrees
with fp32 on the same weights, on the tiny configs.

Tolerance: bf16 keeps 8 mantissa bits (a relative rounding of 2^-9 per operation); through
the tiny trunks the largest difference measured is about 1e-2 of the output's scale (FlowMo
1.0-1.3e-2, DetailFlow 0.9-1.3e-2), so max|bf16 - fp32| / max|fp32| must stay under 3e-2,
and be above 1e-4 (bf16 really ran).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tokenizers_jax.config_file import load_config
from tokenizers_jax.models import detailflow, flowmo

TOLERANCE = 3e-2


def relative_difference(bf16, fp32) -> float:
    bf16, fp32 = np.asarray(bf16, np.float64), np.asarray(fp32, np.float64)
    return float(np.max(np.abs(bf16 - fp32)) / np.max(np.abs(fp32)))


def check(bf16, fp32):
    assert bf16.dtype == jnp.float32  # outputs stay fp32
    assert 1e-4 < relative_difference(bf16, fp32) < TOLERANCE


def in_bfloat16(config):
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.dtype = "bfloat16"
    return config


def images(size: int) -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)


def test_flowmo_bfloat16_forward_agrees_with_fp32():
    config = load_config("configs/flowmo.py:tiny")
    x = images(config.model.image_size)
    model = flowmo.build_model(config)
    leaves, tree = jax.tree.flatten(flowmo.abstract_params(model))
    rng = np.random.default_rng(1)  # random weights everywhere, the modulation gates too
    params = jax.tree.unflatten(tree, [jnp.asarray(rng.normal(size=leaf.shape)
                                                   / np.sqrt(leaf.shape[0]), jnp.float32)
                                       for leaf in leaves])
    times = jnp.asarray([0.2, 0.9])
    forward = jax.jit(lambda m, p: m.apply({"params": p}, x, times), static_argnums=0)
    check(forward(flowmo.build_model(in_bfloat16(config)), params), forward(model, params))


def test_detailflow_bfloat16_encoder_and_decoder_agree_with_fp32():
    config = load_config("configs/detailflow.py:tiny")
    x = images(config.model.image_size)
    params = detailflow.init_params(config, jax.random.PRNGKey(0))
    fp32 = detailflow.DetailFlowTokenizer(config, params)
    bf16 = detailflow.DetailFlowTokenizer(in_bfloat16(config), params)
    latents = jax.jit(lambda m: m.apply({"params": params}, x,
                                        method=lambda d, x: d.quant_conv(d.encoder(x)).astype(
                                            jnp.float32)), static_argnums=0)
    check(latents(bf16.model), latents(fp32.model))
    n = config.model.num_latent_tokens
    indices = np.random.default_rng(2).integers(0, config.model.codebook_size, (2, n), np.int32)
    grid = config.model.image_size // config.model.decoder.patch_size
    check(bf16._decode(params, indices, n, grid), fp32._decode(params, indices, n, grid))  # pylint: disable=protected-access
