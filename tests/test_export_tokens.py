"""Token export (FlowMo LFQ codes, DetailFlow ten-crop self-correction stacks) and its reader.

Tiny random-init tokenizers written as model directories; 14 built-in photo crops in shards
of 4, encoded once per module and shared.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import tokenizers_jax
from tokenizers_jax import exported, token_export
from tokenizers_jax.config_file import load_config
from tokenizers_jax.data import make_eval_iterator, make_source, make_train_iterator, tokens
from tokenizers_jax.data.transforms import adm_center_crop, flowmo_eval, ten_crop
from tokenizers_jax.detailflow_resolution import draw_noise_index
from tokenizers_jax.models import detailflow, flowmo

from conftest import small_flowmo_config
from test_detailflow import get_config as detailflow_config, random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PHOTOS = 7
NUM_EXAMPLES = 2 * NUM_PHOTOS  # crops_per_photo = 2
PER_SHARD = 4  # -> 4 shards: 4, 4, 4, 2


def export_config(**export):
    config = load_config(os.path.join(ROOT, "configs", "export_tokens.py:photos"))
    config.unlock()
    config.data.crops_per_photo = 2
    config.export.update({"examples_per_shard": PER_SHARD, "batch_size": 4, **export})
    return config


def shard_files(directory):
    return sorted(f for f in os.listdir(directory) if f.endswith(".array_record"))


def shard_bytes(directory):
    return {f: open(os.path.join(directory, f), "rb").read() for f in shard_files(directory)}


def records(directory):
    source = tokens.TokenSource(directory)
    return [tokens.decode_record(source._records[i]) for i in range(len(source))]


@pytest.fixture(scope="module")
def flowmo_dir(tmp_path_factory):
    config = small_flowmo_config()
    params = random_params(flowmo.abstract_params(flowmo.build_model(config)))
    directory = tmp_path_factory.mktemp("flowmo_model")
    exported.save_model_dir(directory, config, params)
    return str(directory)


@pytest.fixture(scope="module")
def detailflow_dir(tmp_path_factory):
    config = detailflow_config("tiny")
    config.unlock()
    config.model.encoder.depth = config.model.decoder.depth = 1
    params = random_params(detailflow.init_params(config, jax.random.PRNGKey(0), abstract=True))
    directory = tmp_path_factory.mktemp("detailflow_model")
    exported.save_model_dir(directory, config, params)
    return str(directory)


@pytest.fixture(scope="module")
def flowmo_export(flowmo_dir, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("flowmo_tokens"))
    manifest = token_export.export_tokens(flowmo_dir, export_config(hflip=True), output)
    return output, manifest


@pytest.fixture(scope="module")
def detailflow_export(detailflow_dir, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("detailflow_tokens"))
    manifest = token_export.export_tokens(detailflow_dir, export_config(seed=3), output)
    return output, manifest


@pytest.fixture(scope="module")
def photos():
    return make_source(export_config().data, "train", seed=0)


def test_flowmo_export_reads_back_as_a_direct_encode(flowmo_dir, flowmo_export, photos):
    output, manifest = flowmo_export
    tokenizer = tokenizers_jax.load_tokenizer(flowmo_dir)
    length = tokenizer.model.config.tokens_per_image
    assert manifest["kind"] == "flowmo_lfq" and manifest["num_examples"] == NUM_EXAMPLES
    assert manifest["token_shape"] == [2, length] and manifest["views"] == ["image", "mirrored"]
    assert manifest["codebook_size"] == 2**tokenizer.model.config.codebook_size_for_entropy
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["path"] == flowmo_dir
    assert shard_files(output) == [tokens.shard_name(s, 4) for s in range(4)]
    assert [s["num_examples"] for s in manifest["shards"]] == [4, 4, 4, 2]
    crops = np.stack([flowmo_eval(photos[i], 16) for i in range(NUM_EXAMPLES)])
    expected = np.stack([tokenizer.encode(crops), tokenizer.encode(crops[:, :, ::-1])], axis=1)
    stored = records(output)
    assert [r["index"] for r in stored] == list(range(NUM_EXAMPLES))
    assert all(r["tokens"].dtype == np.uint16 for r in stored)
    np.testing.assert_array_equal(np.stack([r["tokens"] for r in stored]), expected)
    assert not np.array_equal(expected[:, 0], expected[:, 1])  # the mirror is another view


def test_labels_follow_the_photo_convention(flowmo_export):
    output, manifest = flowmo_export
    names = ["astronaut", "coffee", "hubble_deep_field", "ihc", "motorcycle_left",
             "motorcycle_right", "retina"]
    assert manifest["label_names"] == names and manifest["num_classes"] == NUM_PHOTOS
    with open(os.path.join(output, tokens.LABELS_FILE)) as f:
        assert f.read().splitlines() == names
    assert [r["label"] for r in records(output)] == [i % NUM_PHOTOS for i in range(NUM_EXAMPLES)]


def test_detailflow_export_is_the_ten_crop_self_correction(detailflow_dir, detailflow_export,
                                                           photos):
    output, manifest = detailflow_export
    tokenizer = tokenizers_jax.load_tokenizer(detailflow_dir)
    n = tokenizer.num_tokens
    assert manifest["kind"] == "detailflow_self_correction"
    assert manifest["token_shape"] == [10, n, 3] and manifest["canonical_view"] == 4
    assert manifest["channels"] == ["clean", "input", "label"]
    assert manifest["views"][4] == "center" and manifest["views"][5] == "mirrored_top_left"
    stored = records(output)
    noise = [r["noise_idx"] for r in stored]
    for index, record in enumerate(stored):
        # One noise index per image: drawn from default_rng((seed, index)) with p = 1, t = N.
        rng = np.random.default_rng((3, index))
        assert record["noise_idx"] == draw_noise_index(tokenizer.resolutions, rng, n, 1.0)
        assert record["neighbour_seed"] == int(rng.integers(2**31))
    assert len(set(noise)) > 3  # it varies between images
    for index in (0, 5, 13):
        record = stored[index]
        crops = ten_crop(adm_center_crop(photos[index], int(1.1 * 32)), 32)
        expected = tokenizer.encode_self_correction(crops, record["noise_idx"],
                                                    seed=record["neighbour_seed"])
        np.testing.assert_array_equal(record["tokens"], expected)
        # Every crop's stack is consistent with the image's single noise index.
        start = record["noise_idx"]
        end = start + tokenizer.resolutions.noise_count(start)
        t = record["tokens"]
        np.testing.assert_array_equal(t[:, :start, 1], t[:, :start, 0])
        np.testing.assert_array_equal(t[:, :end, 2], t[:, :end, 0])
        np.testing.assert_array_equal(t[:, end:, 1], t[:, end:, 2])


def test_a_crash_leaves_no_partial_shard_and_the_resume_equals_an_uninterrupted_export(
        flowmo_dir, flowmo_export, tmp_path, monkeypatch):
    output = str(tmp_path / "tokens")
    writes = []
    encode_record = tokens.encode_record

    class Crash(Exception):
        pass

    def crash_in_shard_2(*args, **kwargs):
        writes.append(args[0])
        if len(writes) == 2 * PER_SHARD + 2:
            raise Crash
        return encode_record(*args, **kwargs)

    monkeypatch.setattr(tokens, "encode_record", crash_in_shard_2)
    with pytest.raises(Crash):
        token_export.export_tokens(flowmo_dir, export_config(hflip=True), output)
    assert shard_files(output) == [tokens.shard_name(s, 4) for s in (0, 1)]
    assert os.path.exists(os.path.join(output, tokens.shard_name(2, 4) + ".tmp"))
    with pytest.raises(FileNotFoundError, match="is not finished"):
        tokens.TokenSource(output)
    finished = {f: os.stat(os.path.join(output, f)) for f in shard_files(output)}

    writes.clear()
    monkeypatch.setattr(tokens, "encode_record", lambda *a, **k: (writes.append(a[0]),
                                                                  encode_record(*a, **k))[1])
    manifest = token_export.export_tokens(flowmo_dir, export_config(hflip=True), output)
    assert writes == list(range(2 * PER_SHARD, NUM_EXAMPLES))  # shards 0 and 1 were skipped
    for name, stat in finished.items():
        again = os.stat(os.path.join(output, name))
        assert (again.st_ino, again.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert not [f for f in os.listdir(output) if f.endswith(".tmp")]
    assert shard_bytes(output) == shard_bytes(flowmo_export[0])
    assert manifest["shards"] == flowmo_export[1]["shards"]
    # A finished export returns at once, without encoding.
    writes.clear()
    assert token_export.export_tokens(flowmo_dir, export_config(hflip=True), output) == manifest
    assert writes == []


def test_processes_encode_disjoint_shards_and_the_manifest_waits_for_all(
        flowmo_dir, flowmo_export, tmp_path):
    output = str(tmp_path / "tokens")
    config = export_config(hflip=True)
    with pytest.raises(RuntimeError, match="2 of 4 shards .* are missing"):
        token_export.export_tokens(flowmo_dir, config, output, process_index=0, process_count=2)
    assert shard_files(output) == [tokens.shard_name(s, 4) for s in (0, 2)]
    assert token_export.export_tokens(flowmo_dir, config, output, process_index=1,
                                      process_count=2) is None
    assert not os.path.exists(os.path.join(output, tokens.MANIFEST_FILE))
    manifest = token_export.export_tokens(flowmo_dir, config, output, process_index=0,
                                          process_count=2)
    assert manifest["num_examples"] == NUM_EXAMPLES
    assert shard_bytes(output) == shard_bytes(flowmo_export[0])


def test_resuming_with_other_settings_is_refused(flowmo_dir, flowmo_export, tmp_path):
    output, _ = flowmo_export
    with pytest.raises(ValueError, match=r"differ in export\.hflip.*choose a new --output"):
        token_export.export_tokens(flowmo_dir, export_config(hflip=False), output)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="is not empty"):
        token_export.export_tokens(flowmo_dir, export_config(), str(tmp_path))
    with pytest.raises(KeyError, match="Did you mean \"hflip\""):  # a typo in a field
        token_export.resolve_config(export_config(hflp=True))


def test_export_from_an_image_folder_labels_by_subdirectory(flowmo_dir, photos, tmp_path):
    from PIL import Image

    for i, name in enumerate(["dog/a.png", "cat/b.png", "dog/deep/c.png", "top.png"]):
        os.makedirs(os.path.dirname(tmp_path / "images" / name), exist_ok=True)
        Image.fromarray(photos[i]).save(tmp_path / "images" / name)
    config = export_config(hflip=True)
    # Every image (no evaluation hold-out), so that each label appears.
    config.data.update(name="image_folder", path=str(tmp_path / "images"), holdout_every=0)
    manifest = token_export.export_tokens(flowmo_dir, config, str(tmp_path / "tokens"))
    assert manifest["label_names"] == [".", "cat", "dog"]
    # Sorted paths: cat/b, dog/a, dog/deep/c, top.
    assert [r["label"] for r in records(str(tmp_path / "tokens"))] == [1, 2, 2, 0]


def test_export_of_an_image_folder_train_split_leaves_out_the_held_out_images(
        flowmo_dir, photos, tmp_path):
    from PIL import Image

    for i, name in enumerate(["dog/a.png", "cat/b.png", "dog/deep/c.png", "top.png"]):
        os.makedirs(os.path.dirname(tmp_path / "images" / name), exist_ok=True)
        Image.fromarray(photos[i]).save(tmp_path / "images" / name)
    config = export_config()
    config.data.update(name="image_folder", path=str(tmp_path / "images"), holdout_every=2)
    manifest = token_export.export_tokens(flowmo_dir, config, str(tmp_path / "tokens"))
    # Sorted paths: cat/b (held out), dog/a, dog/deep/c (held out), top; labels of the whole tree.
    assert manifest["label_names"] == [".", "cat", "dog"]
    assert [r["label"] for r in records(str(tmp_path / "tokens"))] == [2, 0]


def test_training_reader_draws_one_view_per_access_and_resumes_exactly(detailflow_export,
                                                                       tmp_path):
    # A copy of the DetailFlow export whose view v of example i is filled with 10 * i + v.
    source_dir, manifest = detailflow_export
    output = tmp_path / "tokens"
    output.mkdir()
    (output / tokens.MANIFEST_FILE).write_text(json.dumps(manifest))
    shape = manifest["token_shape"]
    from array_record.python.array_record_module import ArrayRecordWriter

    index = 0
    for shard in manifest["shards"]:
        writer = ArrayRecordWriter(str(output / shard["file"]), "group_size:1")
        for _ in range(shard["num_examples"]):
            views = np.broadcast_to((10 * index + np.arange(10))[:, None, None], shape)
            writer.write(tokens.encode_record(index, index % NUM_PHOTOS, views.astype(np.uint16)))
            index += 1
        writer.close()
    data = export_config().data
    data.update(name="tokens", path=str(output), read_threads=1)

    def epochs(iterator, count):
        batches = [next(iterator) for _ in range(count)]
        assert all(b["tokens"].dtype == np.int32 and b["label"].dtype == np.int32
                   for b in batches)
        assert batches[0]["tokens"].shape == (NUM_EXAMPLES, *shape[1:])
        codes = np.stack([b["tokens"][:, 0, 0] for b in batches])  # [epochs, examples]
        for b in batches:
            np.testing.assert_array_equal(b["tokens"], np.broadcast_to(
                b["tokens"][:, :1, :1], b["tokens"].shape))  # one view, whole
            np.testing.assert_array_equal(b["label"], (b["tokens"][:, 0, 0] // 10) % NUM_PHOTOS)
        return codes

    codes = epochs(make_train_iterator(data, global_batch_size=NUM_EXAMPLES, seed=1), 6)
    for epoch in codes:
        assert sorted(epoch // 10) == list(range(NUM_EXAMPLES))  # every example once per epoch
    views = codes % 10  # [epochs, examples]: the view drawn at each access
    by_example = views[np.arange(6)[:, None], np.argsort(codes // 10, axis=1)]
    assert len(set(views.ravel())) == 10  # all ten crops get drawn
    assert all(len(set(by_example[:, i])) > 1 for i in range(NUM_EXAMPLES))
    np.testing.assert_array_equal(
        epochs(make_train_iterator(data, global_batch_size=NUM_EXAMPLES, seed=1), 6), codes)
    assert not np.array_equal(
        epochs(make_train_iterator(data, global_batch_size=NUM_EXAMPLES, seed=2), 6), codes)

    iterator = make_train_iterator(data, global_batch_size=NUM_EXAMPLES, seed=1)
    epochs(iterator, 2)
    resumed = make_train_iterator(data, global_batch_size=NUM_EXAMPLES, seed=1)
    resumed.set_state(iterator.get_state())
    np.testing.assert_array_equal(epochs(resumed, 4), codes[2:])

    halves = [next(make_train_iterator(data, global_batch_size=NUM_EXAMPLES, seed=1,
                                       process_index=p, process_count=2)) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["tokens"][:, 0, 0] for h in halves]),
                                  codes[0])


def test_eval_reader_yields_the_centre_crop_with_padding(detailflow_export):
    output, manifest = detailflow_export
    data = export_config().data
    data.update(name="tokens", path=output, read_threads=1)
    batches = list(make_eval_iterator(data, global_batch_size=4))
    assert len(batches) == 4
    tokens_, mask = (np.concatenate([b[k] for b in batches]) for k in ("tokens", "mask"))
    assert mask.tolist() == [True] * NUM_EXAMPLES + [False] * 2
    stored = records(output)
    np.testing.assert_array_equal(tokens_[:NUM_EXAMPLES], [r["tokens"][4] for r in stored])
    assert not tokens_[NUM_EXAMPLES:].any()


def test_reader_errors_name_the_problem(detailflow_export, tmp_path):
    output, manifest = detailflow_export
    with pytest.raises(FileNotFoundError, match="is not a token export"):
        tokens.TokenSource(str(tmp_path))
    data = export_config().data
    data.name = "tokens"
    with pytest.raises(ValueError, match="needs data.path"):
        make_source(data, "train")
    tokens.check_manifest(manifest, tokens_per_image=16, codebook_size=64, num_classes=1000)
    with pytest.raises(ValueError, match=r"tokens_per_image is 16 but the GPT config expects "
                                         r"128; codebook_size is 64 but .* expects 8192"):
        tokens.check_manifest(manifest, tokens_per_image=128, codebook_size=8192,
                              where="the GPT config")
    with pytest.raises(ValueError, match="it has 7 classes but the training config has only 5"):
        tokens.check_manifest(manifest, num_classes=5)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / tokens.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError, match="lacks 4 shard"):
        tokens.TokenSource(str(broken))


@pytest.mark.slow
def test_cli_on_two_devices_and_another_batch_size_writes_the_same_export(
        flowmo_dir, flowmo_export, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")

    def cli(output, batch_size):
        command = [sys.executable, "-m", "tokenizers_jax.export_tokens",
                   f"--tokenizer={flowmo_dir}", "--config=configs/export_tokens.py:photos",
                   f"--output={output}", "--config.data.crops_per_photo=2",
                   f"--config.export.examples_per_shard={PER_SHARD}",
                   f"--config.export.batch_size={batch_size}", "--config.export.hflip=True"]
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)

    result = cli(tmp_path / "tokens", batch_size=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 devices" in result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["num_examples"] == NUM_EXAMPLES and summary["token_shape"] == [2, 16]
    assert shard_bytes(tmp_path / "tokens") == shard_bytes(flowmo_export[0])

    bad = cli(tmp_path / "other", batch_size=3)
    assert bad.returncode == 1
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: export.batch_size=3 must be a multiple of this process's 2 devices")


@pytest.mark.slow
def test_two_processes_share_the_shards_of_one_export(flowmo_dir, flowmo_export, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    command = [sys.executable, "-m", "tokenizers_jax.export_tokens", f"--tokenizer={flowmo_dir}",
               "--config=configs/export_tokens.py:photos", f"--output={tmp_path / 'tokens'}",
               "--config.data.crops_per_photo=2", f"--config.export.examples_per_shard={PER_SHARD}",
               "--config.export.batch_size=4", "--config.export.hflip=True",
               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    processes = [subprocess.Popen(command + [f"--process_id={i}"], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, "\n".join(err[-2000:] for _, err in outputs)
    assert "2 of its 2 shards" in outputs[0][1] and "2 of its 2 shards" in outputs[1][1]
    summaries = [[line for line in out.splitlines() if line.startswith("{")] for out, _ in outputs]
    assert len(summaries[0]) == 1 and not summaries[1]  # process 0 reports the result
    assert shard_bytes(tmp_path / "tokens") == shard_bytes(flowmo_export[0])
