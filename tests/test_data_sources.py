"""Image sources: built-in sample photos, image folders (with bad files), TFDS array_record."""

import io
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from tokenizers_jax.data import ImageFolderSource, SamplePhotosSource, TfdsImageSource
from tokenizers_jax.data import sample_photos


def test_sample_photo_splits_are_disjoint_colour_photos():
    assert not set(sample_photos.TRAIN_PHOTOS) & set(sample_photos.EVAL_PHOTOS)
    train_pixels = {sample_photos.load_photo(n).tobytes() for n in sample_photos.TRAIN_PHOTOS}
    for name in sample_photos.EVAL_PHOTOS:
        photo = sample_photos.load_photo(name)
        assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[-1] == 3
        assert np.abs(photo[..., 0].astype(int) - photo[..., 1]).mean() > 1  # not grayscale
        assert photo.tobytes() not in train_pixels


def test_sample_photo_crops_are_deterministic_given_the_seed():
    source = SamplePhotosSource("train", crops_per_photo=3, min_crop_fraction=0.5, seed=7)
    assert len(source) == 3 * len(sample_photos.TRAIN_PHOTOS)
    again = SamplePhotosSource("train", crops_per_photo=3, min_crop_fraction=0.5, seed=7)
    other = SamplePhotosSource("train", crops_per_photo=3, min_crop_fraction=0.5, seed=8)
    for index in (0, 5, 20):
        crop = source[index]
        photo = sample_photos.load_photo(source.photos[index % len(source.photos)])
        assert crop.shape[0] == crop.shape[1] >= 0.5 * min(photo.shape[:2]) - 1
        assert crop.dtype == np.uint8 and crop.shape[-1] == 3
        np.testing.assert_array_equal(crop, again[index])
    assert any(source[i].tobytes() != other[i].tobytes() for i in range(3))
    with pytest.raises(IndexError):
        source[len(source)]


def _write(path, mode, size, fmt):
    colour = {"RGB": (200, 30, 10), "L": 128, "RGBA": (10, 200, 30, 100), "P": 3}[mode]
    Image.new(mode, size, colour).save(path, format=fmt)


@pytest.fixture
def image_folder(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    _write(tmp_path / "a_rgb.jpg", "RGB", (40, 30), "JPEG")
    _write(tmp_path / "sub" / "b_gray.png", "L", (24, 36), "PNG")
    _write(tmp_path / "sub" / "c_rgba.png", "RGBA", (32, 32), "PNG")
    _write(tmp_path / "sub" / "deeper" / "d_palette.png", "P", (20, 20), "PNG")
    _write(tmp_path / "e_tiny.webp", "RGB", (6, 4), "WEBP")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg at all")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_text("ignored")
    return tmp_path


def test_image_folder_skips_bad_files_and_converts_to_rgb(image_folder, caplog):
    with caplog.at_level(logging.WARNING):
        source = ImageFolderSource(str(image_folder))
    assert len(source.skipped) == 2
    assert sorted(p.rsplit("/", 1)[-1] for p in source.skipped) == ["corrupt.jpg", "notes.txt"]
    assert "skipped 2" in caplog.text and "corrupt.jpg" in caplog.text
    names = [p.rsplit("/", 1)[-1] for p in source.paths]
    assert names == ["a_rgb.jpg", "e_tiny.webp", "b_gray.png", "c_rgba.png", "d_palette.png"]
    for index in range(len(source)):
        image = source[index]
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    assert source[0].shape == (30, 40, 3)
    np.testing.assert_array_equal(source[2][0, 0], [128, 128, 128])  # gray -> RGB
    np.testing.assert_array_equal(source[3][0, 0], [10, 200, 30])  # RGBA -> RGB


def test_image_folder_skips_a_file_corrupt_past_its_header(image_folder):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buffer, format="JPEG"
    )
    jpeg = buffer.getvalue()
    (image_folder / "a_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    source = ImageFolderSource(str(image_folder))
    assert len(source.skipped) == 2 and source.paths[1].endswith("a_truncated.jpg")
    np.testing.assert_array_equal(source[1], source[2])  # replaced by the next image
    assert len(source.skipped) == 3 and source.skipped[-1].endswith("a_truncated.jpg")


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderSource(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no JPEG, PNG or WebP images"):
        ImageFolderSource(str(tmp_path))
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"1 files found, none readable"):
        ImageFolderSource(str(tmp_path))


def test_tfds_source_reads_mock_imagenet():
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=6):
        source = TfdsImageSource("imagenet2012", "validation")
        assert len(source) == 6
        image = source[3]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3


def test_tfds_source_makes_grayscale_rgb():
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=2):
        image = TfdsImageSource("mnist", "test")[0]
    assert image.shape == (28, 28, 3)
    np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_unprepared_imagenet_says_how_to_prepare_it(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        TfdsImageSource("imagenet2012", "train", data_dir=str(tmp_path))
    message = str(error.value)
    assert f"{tmp_path}/downloads/manual" in message
    assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
    assert f"tfds build imagenet2012 --data_dir={tmp_path} --file_format=array_record" in message


def test_sources_label_their_images(tmp_path):
    photos = SamplePhotosSource("train", crops_per_photo=2, min_crop_fraction=0.5, seed=0)
    assert photos.label_names[:2] == ("astronaut", "coffee") and len(photos.label_names) == 7
    image, label = photos.read_labelled(9)
    assert label == 2 and photos.label_names[label] == "hubble_deep_field"
    np.testing.assert_array_equal(image, photos[9])

    for name in ("top.png", "dog/a.png", "dog/deep/b.png", "cat/c.png", "cat/d.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        _write(tmp_path / name, "RGB", (8, 8), "PNG")
    (tmp_path / "cat" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # corrupt data
    folder = ImageFolderSource(str(tmp_path))
    assert folder.label_names == (".", "cat", "dog")
    # Sorted: cat/d (c.png is unreadable at scan time), dog/a, dog/deep/b, top.
    assert [folder.read_labelled(i)[1] for i in range(len(folder))] == [1, 2, 2, 0]


def test_image_folder_label_follows_the_image_that_replaces_a_corrupt_one(tmp_path):
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    Image.fromarray(noise).save(buffer, format="JPEG")
    for name in ("a/x.jpg", "b/y.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    jpeg = buffer.getvalue()
    (tmp_path / "a" / "x.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # corrupt past the header
    _write(tmp_path / "b" / "y.jpg", "RGB", (8, 8), "JPEG")
    folder = ImageFolderSource(str(tmp_path))
    assert len(folder) == 2
    image, label = folder.read_labelled(0)
    assert label == 1 and image.shape == (8, 8, 3)


def test_tfds_source_reads_labels():
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=3):
        source = TfdsImageSource("imagenet2012", "train")
        image, label = source.read_labelled(1)
        assert len(source.label_names) == 1000 and source.label_names[0] == "n01440764"
    assert image.ndim == 3 and 0 <= label < 1000
