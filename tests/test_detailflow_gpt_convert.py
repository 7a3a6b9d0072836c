"""The DetailFlow GPT importer: spec 8's key names and shapes, a round trip through a real
torch.save file whose args hold ruamel.yaml scalars, refusals as one-line CLI errors, and the
safe loader shared with the other importers."""

import argparse
import json
import os
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fake_ruamel  # noqa: E402
from test_detailflow_convert import torch_shapes  # noqa: E402
from test_gpt import CONFIG_FILE, random_params  # noqa: E402

from tokenizers_jax import cli, exported  # noqa: E402
from tokenizers_jax.config_file import load_config  # noqa: E402
from tokenizers_jax.convert import __main__ as convert_cli  # noqa: E402
from tokenizers_jax.convert import common  # noqa: E402
from tokenizers_jax.convert import detailflow as convert_tokenizer  # noqa: E402
from tokenizers_jax.convert import detailflow_gpt as convert  # noqa: E402
from tokenizers_jax.convert.common import ConversionError  # noqa: E402
from tokenizers_jax.models import gpt  # noqa: E402


def spec8_gpt_keys(depth=24, width=1024, mlp=2816, vocab=8192, classes=1000, group=8):
    """Spec 8's GPT-L state dict (DetailFlow-16)."""
    keys = {"cls_embedding.embedding_table.weight": (classes + 1, width),
            "tok_embeddings.weight": (vocab, width), "norm.weight": (width,),
            "output.weight": (vocab, width),
            "spe_tok_embeddings.special_embeddings.weight": (group - 1, width)}
    for i in range(depth):
        layer = f"layers.{i}"
        keys[f"{layer}.attention.wqkv.weight"] = (3 * width, width)
        keys[f"{layer}.attention.wo.weight"] = (width, width)
        keys[f"{layer}.feed_forward.w1.weight"] = keys[f"{layer}.feed_forward.w3.weight"] = \
            (mlp, width)
        keys[f"{layer}.feed_forward.w2.weight"] = (width, mlp)
        keys[f"{layer}.attention_norm.weight"] = keys[f"{layer}.ffn_norm.weight"] = (width,)
    return keys


def test_spec8_key_names_and_shapes():
    config = load_config(f"{CONFIG_FILE}:df16")
    abstract = gpt.init_params(config, jax.random.PRNGKey(0), abstract=True)
    assert torch_shapes(convert.conversion_rules(config), abstract) == spec8_gpt_keys()


def tiny_model_args(**overrides):
    """The run's ModelArgs config.json as the original writes it (tiny sizes)."""
    values = dict(dim=32, n_layer=2, n_head=2, n_kv_head=None, multiple_of=32, vocab_size=64,
                  block_size=16, group_size=4, causal_num=None, cls_token_num=1,
                  num_classes=10, model_type="c2i", norm_eps=1e-5, rope_base=10000)
    values.update(overrides)
    return values


def to_torch(state_dict):
    return {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}


@pytest.fixture(scope="module")
def tiny_weights():
    config = load_config(f"{CONFIG_FILE}:tiny")
    ema, raw = random_params(config, seed=1), random_params(config, seed=2)
    return (config, ema, raw, convert.params_to_state_dict(ema, config),
            convert.params_to_state_dict(raw, config))


def write_run(directory, ema_sd, raw_sd, monkeypatch, model_args=None, **args):
    """RUN/checkpoints/0000010.pt (+ RUN/config.json) as train_c2i.py writes them, with
    ruamel scalars in `args` (the yaml values)."""
    with monkeypatch.context() as patch:
        yaml = fake_ruamel.install(patch)
        namespace = argparse.Namespace(
            gpt_model="GPT-tiny", gpt_type="c2i", num_classes=10, cls_token_num=1,
            lr=yaml.ScalarFloat(1e-4, width=4, prec=1), dropout_p=yaml.ScalarFloat(0.1),
            epochs=yaml.ScalarInt(300, width=3), ckpt_every=yaml.HexInt(4096),
            ema=yaml.ScalarBoolean(1), results_dir=yaml.DoubleQuotedScalarString("logs/ar"),
            betas=[yaml.ScalarFloat(0.9), yaml.ScalarFloat(0.95)], correction_prob=0.3)
        vars(namespace).update(args)
        (directory / "checkpoints").mkdir(parents=True)
        path = directory / "checkpoints" / "0000010.pt"
        torch.save({"model": to_torch(raw_sd), "optimizer": {"state": {}, "param_groups": []},
                    "steps": 10, "args": namespace, "scheduler": {"last_epoch": 10},
                    "ema": to_torch(ema_sd)}, path)
    if model_args is not None:
        (directory / "config.json").write_text(json.dumps(model_args))
    return path


def convert_args(path, out, *extra):
    return ["detailflow_gpt", "--checkpoint", str(path), "--config", f"{CONFIG_FILE}:tiny",
            "--output", str(out), *extra]


def test_round_trip_through_torch_save(tmp_path, monkeypatch, tiny_weights, capsys):
    config, ema, raw, ema_sd, raw_sd = tiny_weights
    path = write_run(tmp_path / "run", ema_sd, raw_sd, monkeypatch, tiny_model_args())
    assert "ruamel.yaml.scalarfloat" not in sys.modules  # loading must not need ruamel
    # The safe loader maps ruamel's scalars to the builtins they stand for.
    args = common.load_torch_file(path)["args"]
    assert type(args.lr) is float and args.lr == 1e-4 and type(args.dropout_p) is float
    assert type(args.epochs) is int and args.epochs == 300 and args.ckpt_every == 4096
    assert args.ema is True and type(args.results_dir) is str and args.results_dir == "logs/ar"
    assert [type(b) for b in args.betas] == [float, float] and args.betas == [0.9, 0.95]

    assert convert_cli.main(convert_args(path, tmp_path / "ema")) == 0
    assert "(EMA weights); block size checked" in capsys.readouterr().out
    assert convert_cli.main(convert_args(path, tmp_path / "raw", "--raw")) == 0
    for name, expected in (("ema", ema), ("raw", raw)):
        loaded = exported.load_params(tmp_path / name)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                     loaded, expected)
        assert exported.load_config(tmp_path / name).model.name == gpt.NAME
    # Back to the original's names and layouts.
    back = convert.params_to_state_dict(exported.load_params(tmp_path / "ema"), config)
    assert set(back) == set(ema_sd)
    for key, value in ema_sd.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def _edit(state_dict, key, rows):
    edited = dict(state_dict)
    edited[key] = np.zeros((rows, *np.shape(state_dict[key])[1:]), np.float32)
    return edited


@pytest.mark.parametrize("case,message", [
    ("group", "checkpoint's group size 5 (config model.group_size=4)"),
    ("vocabulary", "checkpoint's vocabulary 128 (config model.vocab_size=64)"),
    ("classes", "checkpoint's class count 20 (config model.num_classes=10)"),
    ("block", "config.json has block_size=32 (config model.num_tokens=16)"),
    ("heads", "trained with gpt_model=GPT-L (depth, heads, width (24, 16, 1024)"),
])
def test_refusals_are_one_line_errors(tmp_path, monkeypatch, tiny_weights, capsys, case,
                                      message):
    _, _, _, ema_sd, raw_sd = tiny_weights
    model_args, args = tiny_model_args(), {}
    if case == "group":
        ema_sd = _edit(ema_sd, "spe_tok_embeddings.special_embeddings.weight", 4)
    elif case == "vocabulary":
        ema_sd = _edit(_edit(ema_sd, "tok_embeddings.weight", 128), "output.weight", 128)
    elif case == "classes":
        ema_sd = _edit(ema_sd, "cls_embedding.embedding_table.weight", 21)
    elif case == "block":
        model_args["block_size"] = 32
    else:
        args["gpt_model"] = "GPT-L"
    path = write_run(tmp_path / "run", ema_sd, raw_sd, monkeypatch, model_args, **args)
    monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)
    status = cli.call(convert_cli.main, convert_args(path, tmp_path / "out"))
    err = capsys.readouterr().err
    assert status == cli.EXIT_FAILURE
    assert err.startswith("error: ") and message in err.splitlines()[0], err
    assert "Traceback" not in err and len(err.splitlines()) == 2  # the message + how to see more
    assert not (tmp_path / "out").exists()


def test_block_size_unchecked_without_model_args(tmp_path, monkeypatch, tiny_weights, capsys):
    _, _, _, ema_sd, raw_sd = tiny_weights
    path = write_run(tmp_path / "run", ema_sd, raw_sd, monkeypatch)
    assert convert_cli.main(convert_args(path, tmp_path / "out")) == 0
    assert "block size not checked" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="--model-args"):
        convert_cli.main(convert_args(path, tmp_path / "out2", "--model-args",
                                      str(tmp_path / "missing.json")))


def test_import_is_strict(tiny_weights):
    config, _, _, ema_sd, _ = tiny_weights
    missing = dict(ema_sd)
    missing.pop("layers.1.feed_forward.w3.weight")
    with pytest.raises(ConversionError, match="missing.*layers.1.feed_forward.w3.weight"):
        convert.state_dict_to_params(missing, config)
    with pytest.raises(ConversionError, match="unexpected.*freqs_cis"):
        convert.state_dict_to_params({**ema_sd, "freqs_cis": np.zeros((17, 8, 2))}, config)
    with pytest.raises(ConversionError, match="mis-shaped.*layers.0.attention.wqkv"):
        convert.state_dict_to_params({**ema_sd, "layers.0.attention.wqkv.weight":
                                      np.zeros((96, 16), np.float32)}, config)
    assert convert.select_state_dict({"model": 1, "ema": 2}) == 2
    assert convert.select_state_dict({"model": 1, "ema": 2}, use_ema=False) == 1
    with pytest.raises(ConversionError, match="no 'ema'.*--raw"):
        convert.select_state_dict({"model": {}})
    with pytest.raises(ConversionError, match="not a DetailFlow GPT"):
        convert.select_state_dict({"weights": {}})


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_loader_runs_no_pickled_code(tmp_path):
    marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "args": _Exploit(marker)}, path)
    with pytest.raises(ConversionError, match=r"not read safely \(os.makedirs\)"):
        common.load_torch_file(path)
    assert not os.path.exists(marker)


def test_tokenizer_args_checks(tmp_path, monkeypatch):
    """The tokenizer importer reads ruamel-typed args and checks what no shape reveals."""
    config = load_config("configs/detailflow.py:tiny")
    with monkeypatch.context() as patch:
        yaml = fake_ruamel.install(patch)
        args = argparse.Namespace(group_size=4, causal_num=None, codebook_l2_norm=True,
                                  causal_encoder=True,
                                  degradation_power=yaml.ScalarFloat(1.5, width=3))
        torch.save({"model": {}, "args": args}, tmp_path / "128.pt")
    args = common.load_torch_file(tmp_path / "128.pt")["args"]
    convert_tokenizer.check_args(args, config)
    for field, value, message in (("degradation_power", 2.0, "degradation_power=2.0"),
                                  ("codebook_l2_norm", False, "codebook_l2_norm=False"),
                                  ("causal_encoder", False, "causal_encoder=False")):
        bad = argparse.Namespace(**{**vars(args), field: value})
        with pytest.raises(ConversionError, match=message):
            convert_tokenizer.check_args(bad, config)
