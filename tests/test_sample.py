"""`python -m tokenizers_jax.sample`: samples, grid, resume, and one-line errors."""

import json
import os
import re

import numpy as np
import pytest

from tokenizers_jax import cli, sample

import generation_fixtures as fixtures


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return dict(tokenizer=fixtures.tiny_detailflow(root / "detailflow"),
                generator=fixtures.save_generator(root / "generator"),
                wrong_codebook=fixtures.save_generator(root / "wrong", codebook_size=32))


def run(argv, capsys):
    status = cli.call(sample.main, argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_sample_writes_npz_and_grid_and_resumes(model_dirs, tmp_path, monkeypatch, capsys):
    fixtures.register(monkeypatch)
    output = str(tmp_path / "out")
    argv = ["--generator", model_dirs["generator"], "--tokenizer", model_dirs["tokenizer"],
            "--num-samples", "5", "--classes", "1,3", "--cfg", "1.5",
            "--sampling", "temperature=0.5", "--seed", "2", "--batch-size", "4",
            "--output", output]
    status, out, _ = run(argv, capsys)
    assert status == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary == dict(samples=os.path.join(output, "samples.npz"),
                           grid=os.path.join(output, "grid.png"), shape=[5, 32, 32, 3])
    with np.load(summary["samples"]) as samples:
        np.testing.assert_array_equal(samples["arr_1"], [1, 3, 1, 3, 1])
        images = samples["arr_0"]
    with open(os.path.join(output, "settings.json")) as f:
        settings = json.load(f)
    assert settings["sampling"] == {"cfg": 1.5, "temperature": 0.5} and settings["seed"] == 2
    assert run(argv, capsys)[0] == 0  # finished: nothing to do
    with np.load(summary["samples"]) as samples:
        np.testing.assert_array_equal(samples["arr_0"], images)
    status, _, err = run(argv[:-1] + [str(tmp_path / "cooler")] + ["--sampling", "temperature=9"],
                         capsys)
    assert status == 1 and "a --sampling field is given twice" in err


@pytest.mark.parametrize("dirs,extra,message", [
    ({}, ["--classes", "1,9"], r"class labels must lie in \[0, 4\), got values in \[1, 9\]"),
    ({}, ["--sampling", "topk=5"], r"unknown sampling settings \['topk'\]"),
    ({}, ["--sampling", "cfg=2"], "give the guidance scale once"),
    ({"--generator": "wrong_codebook"}, [],
     "the tokenizer's codebook has 64 entries; the generator's 32"),
    ({"--tokenizer": None}, [], "does not say which tokenizer decodes its tokens"),
])
def test_bad_input_is_one_line(model_dirs, tmp_path, monkeypatch, capsys, dirs, extra, message):
    fixtures.register(monkeypatch)
    flags = {"--generator": "generator", "--tokenizer": "tokenizer", **dirs}
    argv = [x for flag, name in flags.items() if name for x in (flag, model_dirs[name])]
    argv += ["--num-samples", "4", "--cfg", "1.5", "--output", str(tmp_path / "out"), *extra]
    status, _, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert status == 1 and len(lines) == 2 and re.search(message, lines[0]), err
    assert lines[0].startswith("error: ") and "--verbose" in lines[1]
    assert not os.path.exists(tmp_path / "out" / "chunks")


def test_bad_class_list_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--generator", "G", "--num-samples", "4", "--classes", "a,b",
                     "--output", "O"])
    assert exit_info.value.code == 2
    assert "expected 'all' or comma-separated class ids" in capsys.readouterr().err
