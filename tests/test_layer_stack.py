"""Scanned (stacked) and unrolled FlowMo blocks: the layout conversion, the same numbers on the
same weights, and every reader of params (importer, model directory, init_from, fixed norms)
accepting either layout."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tokenizers_jax import exported, layer_stack
from tokenizers_jax.config_file import load_config
from tokenizers_jax.convert import flowmo as convert_flowmo
from tokenizers_jax.models import flowmo
from tokenizers_jax.tasks.flowmo import FlowMoTask
from tokenizers_jax.training import checkpoint, optimizer
from conftest import small_flowmo_config


def test_match_layout_stacks_unstacks_and_keeps_a_matching_tree():
    rng = np.random.default_rng(0)
    unrolled = {"trunk": {**{f"blk_{i}": {"w": rng.normal(size=(2, 3)), "b": rng.normal(size=3)}
                             for i in range(3)}, "head": rng.normal(size=4)}}
    target = {"trunk": {"blk_scan": {"w": np.zeros((3, 2, 3)), "b": np.zeros((3, 3))},
                        "head": None}}
    stacked = layer_stack.match_layout(unrolled, target)
    assert stacked["trunk"]["blk_scan"]["w"].shape == (3, 2, 3)
    np.testing.assert_array_equal(stacked["trunk"]["blk_scan"]["b"][2],
                                  unrolled["trunk"]["blk_2"]["b"])
    assert stacked["trunk"]["head"] is unrolled["trunk"]["head"]
    back = layer_stack.match_layout(stacked, unrolled)
    jax.tree.map(np.testing.assert_array_equal, back, unrolled)
    assert layer_stack.match_layout(unrolled, unrolled) is unrolled  # nothing to convert
    with pytest.raises(ValueError, match="3 blocks, the target 2"):
        layer_stack.match_layout(stacked, {"trunk": {"blk_0": {}, "blk_1": {}, "head": None}})
    with pytest.raises(KeyError, match="'other'"):
        layer_stack.match_layout(unrolled, {"trunk": {"other": None}})


def test_match_layout_of_abstract_leaves_moves_their_shardings():
    mesh = jax.make_mesh((1,), ("fsdp",))
    leaf = jax.ShapeDtypeStruct((4, 6), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None)))
    stacked = layer_stack.match_layout({"b_0": leaf, "b_1": leaf}, {"b_scan": None})["b_scan"]
    assert stacked.shape == (2, 4, 6) and stacked.sharding.spec == P(None, "fsdp", None)
    unstacked = layer_stack.match_layout({"b_scan": stacked}, {"b_0": None, "b_1": None})
    assert unstacked["b_1"].shape == (4, 6) and unstacked["b_1"].sharding.spec == P("fsdp", None)


def _configs():
    unrolled = small_flowmo_config()
    unrolled.model.encoder.depth = 2
    unrolled.model.decoder.depth = 2
    scanned = ml_collections.ConfigDict(unrolled.to_dict())
    scanned.model.update(scan_layers=True, remat=True)  # with the remat policy, as lo/hi
    return unrolled, scanned


@pytest.fixture(scope="module")
def pair():
    """(unrolled config, scanned config, unrolled params: every value random, gates too)."""
    unrolled, scanned = _configs()
    abstract = flowmo.abstract_params(flowmo.build_model(unrolled))
    leaves, tree = jax.tree.flatten(abstract)
    rng = np.random.default_rng(1)
    params = jax.tree.unflatten(tree, [jnp.asarray(rng.normal(size=x.shape) * 0.2, jnp.float32)
                                       for x in leaves])
    return unrolled, scanned, params


def _scanned(pair):
    unrolled, scanned, params = pair
    scan_model = flowmo.build_model(scanned)
    return scan_model, layer_stack.match_layout(params, flowmo.abstract_params(scan_model))


IMAGES = np.random.default_rng(2).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)


def test_scanned_model_gives_the_unrolled_outputs(pair):
    unrolled, _, params = pair
    scan_model, scan_params = _scanned(pair)
    assert scan_params["decoder"]["double_blocks_scan"]["img_attn"]["qkv"]["kernel"].shape[0] == 2
    forward = jax.jit(lambda m, p, x: m.apply({"params": p}, x, jnp.asarray([0.3, 0.8])),
                      static_argnums=0)
    np.testing.assert_allclose(forward(scan_model, scan_params, IMAGES),
                               forward(flowmo.build_model(unrolled), params, IMAGES),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_scanned_model_gives_the_unrolled_gradients_and_samples(pair):
    unrolled, _, params = pair
    model = flowmo.build_model(unrolled)
    scan_model, scan_params = _scanned(pair)

    def loss_and_grads(m, p):
        loss = lambda p: flowmo.training_loss(m, p, IMAGES, jax.random.key(3), unrolled)[0]
        return jax.jit(jax.value_and_grad(loss))(p)

    (loss, grads), (scan_loss, scan_grads) = (loss_and_grads(model, params),
                                              loss_and_grads(scan_model, scan_params))
    np.testing.assert_allclose(scan_loss, loss, rtol=1e-6)
    scan_grads = layer_stack.match_layout(scan_grads, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 scan_grads, grads)
    sample = lambda m, p: flowmo.reconstruct(m, p, IMAGES, jax.random.key(4), unrolled)
    np.testing.assert_allclose(jax.jit(sample, static_argnums=0)(scan_model, scan_params),
                               jax.jit(sample, static_argnums=0)(model, params),
                               rtol=1e-5, atol=1e-5)


def test_importer_model_dir_and_init_from_read_either_layout(pair, tmp_path):
    unrolled, scanned, params = pair
    state_dict = convert_flowmo.params_to_state_dict(params, unrolled)
    scan_params = convert_flowmo.state_dict_to_params(state_dict, scanned)
    assert "double_blocks_scan" in scan_params["encoder"]
    back = convert_flowmo.params_to_state_dict(scan_params, scanned)  # the original's layout
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)

    exported.save_model_dir(tmp_path / "model", unrolled, params)
    images = np.random.default_rng(5).integers(0, 256, (2, 16, 16, 3), np.uint8)
    reference = flowmo.FlowMoTokenizer(unrolled, params).encode(images)
    loaded = flowmo.FlowMoTokenizer(scanned, exported.load_params(tmp_path / "model"))
    assert "double_blocks_scan" in loaded.params["decoder"]
    np.testing.assert_array_equal(loaded.encode(images), reference)

    # A workdir checkpoint written unrolled, restored into a scanned run (init_from).
    with ocp.StandardCheckpointer() as saver:
        saver.save(tmp_path / "run" / "checkpoints" / "3" / "params", params)
    abstract = flowmo.abstract_params(flowmo.build_model(scanned))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored = checkpoint.restore_params(str(tmp_path / "run"), abstract,
                                         jax.tree.map(lambda _: device, abstract))
    jax.tree.map(np.testing.assert_array_equal, restored,
                 layer_stack.match_layout(params, abstract))


def test_fixed_initial_norms_hold_per_block_when_stacked():
    config = load_config("configs/flowmo.py:lo")
    with config.unlocked():
        config.loss.perceptual = "none"
        config.model.scan_layers = True
    task = FlowMoTask(config)
    abstract = flowmo.abstract_params(task.model)
    mask = task.fixed_norm_mask(abstract)
    selected = [leaf for leaf, chosen in zip(jax.tree.leaves(abstract), jax.tree.leaves(mask))
                if chosen]
    assert sum(leaf.shape[0] for leaf in selected) == 240  # the same 240 matrices as unrolled

    rng = np.random.default_rng(6)
    params = {"double_blocks_scan": {"kernel": jnp.asarray(rng.normal(size=(3, 4, 5)))},
              "kernel": jnp.asarray(rng.normal(size=(4, 5)))}
    norms = optimizer.frobenius_norms(params)
    assert norms["double_blocks_scan"]["kernel"].shape == (3,) and norms["kernel"].shape == ()
    moved = {"double_blocks_scan": {"kernel": params["double_blocks_scan"]["kernel"]
                                    * jnp.asarray([2.0, 3.0, 5.0])[:, None, None]},
             "kernel": 4.0 * params["kernel"]}
    fixed = optimizer.renormalize(moved, norms, jax.tree.map(lambda _: True, params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), fixed, params)
