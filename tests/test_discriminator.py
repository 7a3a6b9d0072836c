"""The discriminator heads against PyTorch (torch.nn.utils.spectral_norm, BatchNorm1d in train
mode, circular Conv1d): logits, power-iteration vectors and running statistics over two
consecutive forwards; the parameter count; the importer of spec 8's `discriminator` keys."""

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(__file__))
from reference import detailflow_discriminator_torch as R  # noqa: E402

from tokenizers_jax.convert import discriminator as convert  # noqa: E402
from tokenizers_jax.convert.common import ConversionError  # noqa: E402
from tokenizers_jax.models import discriminator as disc  # noqa: E402

C, L, B = 16, 12, 3  # channels, patch tokens, batch


def activations(seed):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(B, L + 1, C)).astype(np.float32) for _ in range(5)]


@pytest.fixture(scope="module")
def torch_heads():
    torch.manual_seed(0)
    return R.randomize_batch_norms(R.DiscriminatorHeads(channels=C).train())


@pytest.fixture(scope="module")
def apply():
    """(variables, activations, update) -> (logits, new state), compiled once per `update`."""
    heads = disc.DiscriminatorHeads()
    return jax.jit(lambda variables, acts, update: heads.apply(
        variables, acts, update, mutable=list(disc.STATE_COLLECTIONS)), static_argnums=2)


def test_two_forwards_match_torch(torch_heads, apply):
    """Logits, u, v and running statistics after each of two consecutive training forwards."""
    initial = {k: v.clone() for k, v in torch_heads.state_dict().items()}
    variables = convert.discriminator_variables_from_torch(initial, channels=C)
    params = variables["params"]
    state = {k: variables[k] for k in disc.STATE_COLLECTIONS}
    for call in range(2):
        acts = activations(call)
        with torch.no_grad():
            expected = torch_heads([torch.from_numpy(a) for a in acts]).numpy()
        logits, state = apply({"params": params, **state}, acts, True)
        assert logits.shape == (B, 5 * L) and logits.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(logits), expected, atol=2e-5, rtol=1e-5)
        ours = convert.discriminator_variables_to_torch({"params": params, **state})
        for key, value in torch_heads.state_dict().items():
            if key.endswith(("weight_u", "weight_v", "running_mean", "running_var")):
                np.testing.assert_allclose(ours[key], value.numpy(), atol=2e-5, err_msg=key)
            elif key.endswith("num_batches_tracked"):
                assert ours[key] == value.item() == 7 + call + 1
    # The state moved (guards the comparisons above).
    moved = torch_heads.state_dict()
    assert np.abs(moved["heads.0.1.fn.0.weight_v"].numpy()
                  - initial["heads.0.1.fn.0.weight_v"].numpy()).max() > 1e-3
    assert np.abs(moved["heads.4.0.1.running_var"].numpy()
                  - initial["heads.4.0.1.running_var"].numpy()).max() > 1e-3


def test_gradients_match_torch():
    """Head-parameter gradients (through sigma = u . W v) and input gradients (one head)."""
    torch.manual_seed(1)
    reference = R.DiscriminatorHeads(channels=C, num_heads=1).train()
    reference = R.randomize_batch_norms(reference, seed=1)
    heads = disc.DiscriminatorHeads(num_heads=1)
    variables = convert.discriminator_variables_from_torch(reference.state_dict(), heads, C)
    state = {k: variables[k] for k in disc.STATE_COLLECTIONS}
    acts = activations(2)[:1]

    def loss(params, acts):
        logits, _ = heads.apply({"params": params, **state}, acts, True,
                                mutable=list(disc.STATE_COLLECTIONS))
        return jnp.mean(jnp.sin(logits))

    grads, act_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], acts)
    torch_acts = [torch.from_numpy(a).requires_grad_() for a in acts]
    torch.mean(torch.sin(reference(torch_acts))).backward()
    named = dict(reference.named_parameters())
    ours = convert.discriminator_variables_to_torch(
        {"params": grads, **jax.tree.map(np.asarray, state)}, num_heads=1)
    for key in ("heads.0.1.fn.0.weight_orig", "heads.0.0.0.bias", "heads.0.0.1.weight",
                "heads.0.2.weight_orig"):
        np.testing.assert_allclose(ours[key], named[key].grad.numpy(), atol=1e-5, err_msg=key)
    np.testing.assert_allclose(np.asarray(act_grads[0]), torch_acts[0].grad.numpy(), atol=1e-6)


def test_parameter_count_and_shapes():
    variables = jax.eval_shape(lambda k: nn.unbox(disc.init_discriminator_variables(k)),
                               jax.random.key(0))
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"]))
    assert count == 7_386_245  # spec 1.4: DINO-disc heads
    logits = jax.eval_shape(
        lambda v, a: disc.DiscriminatorHeads().apply(v, a, mutable=list(disc.STATE_COLLECTIONS)),
        variables, [jax.ShapeDtypeStruct((2, 197, 384), jnp.float32)] * 5)[0]
    assert logits.shape == (2, 980)
    head = variables["spectral"]["heads_2"]
    assert head["conv_res"]["v"].shape == (3456,) and head["conv_out"]["u"].shape == (1,)
    bf16 = jax.eval_shape(
        lambda v, a: disc.DiscriminatorHeads(dtype=jnp.bfloat16).apply(
            v, a, mutable=list(disc.STATE_COLLECTIONS)),
        variables, [jax.ShapeDtypeStruct((2, 197, 384), jnp.bfloat16)] * 5)
    assert bf16[0].dtype == jnp.float32  # logits stay fp32 under bf16 compute
    assert jax.tree.map(lambda a: a.dtype, bf16[1]) == jax.tree.map(
        lambda a: a.dtype, {k: variables[k] for k in disc.STATE_COLLECTIONS})


def test_logical_axis_names_on_every_param():
    boxed = jax.eval_shape(lambda k: disc.init_discriminator_variables(k), jax.random.key(0))
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)


def test_initial_state_is_torchs_and_update_false_keeps_it():
    """Fresh u, v are unit vectors and the running statistics 0 / 1 / 0 batches (no update at
    init); update=False runs no power iteration and updates no statistics, update=True does."""
    x = jnp.asarray(activations(3)[0]) + 1.0
    collections = list(disc.STATE_COLLECTIONS)
    unchanged = lambda new, old: all(jax.tree.leaves(jax.tree.map(
        lambda a, b: bool(np.array_equal(a, b)), new, {k: old[k] for k in new})))
    for module in (disc.SpectralConv1d(C, 9), disc.TrainBatchNorm()):
        variables = module.init(jax.random.key(0), x, True)
        if "spectral" in variables:
            u, v = variables["spectral"]["u"], variables["spectral"]["v"]
            assert u.shape == (C,) and v.shape == (C * 9,)
            assert abs(float(jnp.linalg.norm(u)) - 1) < 1e-6
            assert abs(float(jnp.linalg.norm(v)) - 1) < 1e-6
        else:
            stats = variables["batch_stats"]
            np.testing.assert_array_equal(stats["mean"], 0)
            np.testing.assert_array_equal(stats["var"], 1)
            assert int(stats["num_batches_tracked"]) == 0
        _, kept = module.apply(variables, x, False, mutable=collections)
        _, moved = module.apply(variables, x, True, mutable=collections)
        assert unchanged(kept, variables) and not unchanged(moved, variables)


# --- importer: spec 8's `discriminator` keys at full size ----------------------------------


def spec8_discriminator_shapes():
    shapes = {}
    for i in range(5):
        for conv, (w, v) in {"0.0": ((384, 384, 1), 384), "1.fn.0": ((384, 384, 9), 3456),
                             "2": ((1, 384, 1), 384)}.items():
            p = f"heads.{i}.{conv}"
            shapes.update({f"{p}.weight_orig": w, f"{p}.weight_u": (w[0],),
                           f"{p}.weight_v": (v,), f"{p}.bias": (w[0],)})
        for norm in ("0.1", "1.fn.1"):
            p = f"heads.{i}.{norm}"
            shapes.update({f"{p}.{n}": (384,) for n in
                           ("weight", "bias", "running_mean", "running_var")})
            shapes[f"{p}.num_batches_tracked"] = ()
    return shapes


@pytest.fixture(scope="module")
def release_discriminator():
    """Spec 8's `discriminator` entry at full size, with random values."""
    rng = np.random.default_rng(0)
    state_dict = {}
    for key, shape in spec8_discriminator_shapes().items():
        if key.endswith("num_batches_tracked"):
            state_dict[key] = torch.tensor(40_123, dtype=torch.int64)
        else:
            state_dict[key] = torch.from_numpy(rng.normal(size=shape).astype(np.float32))
    return state_dict


def test_release_discriminator_imports_strictly(release_discriminator):
    state_dict = release_discriminator
    variables = convert.discriminator_variables_from_torch(state_dict)
    counter = variables["batch_stats"]["heads_4"]["norm_res"]["num_batches_tracked"]
    assert counter.dtype == np.int32 and int(counter) == 40_123
    np.testing.assert_array_equal(
        variables["params"]["heads_1"]["conv_res"]["kernel"],
        state_dict["heads.1.1.fn.0.weight_orig"].numpy().transpose(2, 1, 0))
    back = convert.discriminator_variables_to_torch(variables)
    assert set(back) == set(state_dict)
    for key, value in back.items():
        np.testing.assert_array_equal(value, state_dict[key].numpy())

    with pytest.raises(ConversionError, match="missing.*heads.2.1.fn.1.running_var"):
        convert.discriminator_variables_from_torch(
            {k: v for k, v in state_dict.items() if k != "heads.2.1.fn.1.running_var"})
    with pytest.raises(ConversionError, match="mis-shaped.*heads.0.2.weight_v"):
        convert.discriminator_variables_from_torch(
            {**state_dict, "heads.0.2.weight_v": torch.zeros(3456)})
    with pytest.raises(ConversionError, match="unexpected.*heads.5.2.bias"):
        convert.discriminator_variables_from_torch({**state_dict, "heads.5.2.bias": torch.zeros(1)})


def test_convert_detailflow_writes_the_heads_beside_the_tokenizer(release_discriminator, tmp_path):
    from test_detailflow import CONFIG_FILE
    from test_detailflow_convert import tiny_checkpoint

    from tokenizers_jax.convert import __main__ as convert_cli
    from tokenizers_jax.convert import detailflow as convert_detailflow

    _, _, _, state_dict = tiny_checkpoint(teacher=False)
    model = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}
    path = tmp_path / "128.pt"
    torch.save({"model": model, "discriminator": release_discriminator, "steps": 7}, path)
    command = ["detailflow", "--checkpoint", str(path), "--config", f"{CONFIG_FILE}:tiny"]
    assert convert_cli.main(command + ["--output", str(tmp_path / "out"), "--discriminator"]) == 0
    heads_dir = tmp_path / "out" / convert_detailflow.DISCRIMINATOR_DIR
    variables = disc.load_discriminator_variables(heads_dir)
    expected = convert.discriminator_variables_from_torch(release_discriminator)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), variables, expected)

    # A file without the entry is refused before anything is written.
    torch.save({"model": model, "steps": 7}, path)
    with pytest.raises(ConversionError, match="no 'discriminator' entry"):
        convert_cli.main(command + ["--output", str(tmp_path / "none"), "--discriminator"])
    assert not (tmp_path / "none").exists()
    with pytest.raises(ValueError, match="expected 'detailflow_discriminator'"):
        disc.load_discriminator_variables(tmp_path / "out")


def test_discriminator_logits_end_to_end_match_torch():
    """Input mapping (its crop draw replayed) + tiny trunk + heads, against the torch pieces."""
    from tokenizers_jax.convert import dino as convert_dino
    from tokenizers_jax.models import dino

    torch.manual_seed(2)
    trunk = R.DinoTrunk(dim=C, depth=3, num_heads=2, patch_size=8, img_size=32, key_depths=(0, 2))
    torch_heads = R.randomize_batch_norms(R.DiscriminatorHeads(channels=C, num_heads=3), seed=2)
    vit = dino.DinoViT(width=C, depth=3, num_heads=2, mlp_dim=4 * C, patch_size=8, image_size=32,
                       feature_blocks=(0, 2))
    heads = disc.DiscriminatorHeads(num_heads=3)
    dino_params = convert_dino.dino_params_from_torch(trunk.state_dict(), vit)
    variables = convert.discriminator_variables_from_torch(torch_heads.state_dict(), heads, C)
    state = {k: variables[k] for k in disc.STATE_COLLECTIONS}

    @jax.jit
    def run(images, key):
        def total(images):
            logits, new_state = disc.discriminator_logits(
                variables["params"], state, dino_params, key, images, heads, vit)
            return logits.sum(), (logits, new_state)
        return jax.grad(total, has_aux=True)(images)

    images = np.random.default_rng(5).uniform(-1, 1, (B, 48, 48, 3)).astype(np.float32)
    branches = set()
    for seed in (0, 3):  # the resize (area 48 -> 32) and the crop branch
        key = jax.random.key(seed)
        image_grad, (logits, new_state) = run(images, key)
        crop = dino.draw_dino_crop(key, 48, 48, image_size=32)
        branches.add(bool(crop.use_crop))
        with torch.no_grad():
            x = R.dino_input(torch.from_numpy(images).permute(0, 3, 1, 2), img_size=32,
                             crop=(int(crop.top), int(crop.left)) if crop.use_crop else None)
            expected = torch_heads.train()(trunk(x)).numpy()
        assert logits.shape == (B, 3 * 16)
        np.testing.assert_allclose(np.asarray(logits), expected, atol=5e-5, rtol=1e-5)
    assert branches == {False, True}
    assert np.isfinite(np.asarray(image_grad)).all() and np.abs(np.asarray(image_grad)).sum() > 0
    counter = new_state["batch_stats"]["heads_2"]["norm_res"]["num_batches_tracked"]
    assert int(counter) == 7 + 1  # one update per call, from the given state


SHARDED_BATCH_NORM = r"""
import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P
from tokenizers_jax.models import discriminator as disc
assert jax.device_count() == 8
heads = disc.DiscriminatorHeads(num_heads=1)
variables = nn.unbox(heads.init(jax.random.key(0), [jnp.zeros((8, 13, 16))]))
rng = np.random.default_rng(0)
acts = [jnp.asarray(rng.normal(size=(8, 13, 16)) * (1 + np.arange(8)[:, None, None]), jnp.float32)
        for _ in range(1)]  # per-sample scales: local statistics would differ from global ones
step = jax.jit(lambda v, a: heads.apply(v, a, True, mutable=list(disc.STATE_COLLECTIONS)))
one = step(variables, acts)
mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
sharded = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in acts]
eight = step(variables, sharded)
assert len(eight[0].sharding.device_set) == 8
for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-5)
print("same")
"""


@pytest.mark.slow  # a subprocess with 8 simulated devices (~12 s of CPU)
def test_batch_statistics_are_global_over_a_sharded_batch():
    """SyncBN semantics: a batch sharded over 8 devices gives the 1-device logits and state."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root,
               XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SHARDED_BATCH_NORM], env=env, cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "same" in result.stdout, result.stderr[-3000:]
