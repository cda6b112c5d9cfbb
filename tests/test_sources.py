"""Tests of byol_tf/sources.py: listing, splits, units, record reading and key conventions."""

import dataclasses
import os

import numpy as np
import pytest
from fixtures import images as fx

from byol_tf import sources
from byol_tf.config import DataConfig


def candidates(cfg):
    plan = sources.plan(cfg)
    return plan, [c for unit in plan.units for c in sources.read_unit(unit, cfg, plan.keys)]


# ------------------------------------------------------------------------- splits


def test_holdout_is_the_tail_of_a_seeded_permutation():
    cfg = DataConfig(source="folder", path="x", holdout_examples=3, seed=5)
    order = np.random.default_rng(5).permutation(10)
    np.testing.assert_array_equal(sources.split_positions(cfg, "test", 10), order[-3:])
    np.testing.assert_array_equal(sources.split_positions(cfg, "train", 10), order[:-3])
    with pytest.raises(ValueError, match="data.holdout_examples: 3 held-out examples leave none"):
        sources.split_positions(cfg, "train", 3)
    with pytest.raises(ValueError, match="data.holdout_examples: is 0"):
        sources.split_positions(dataclasses.replace(cfg, holdout_examples=0), "test", 10)


def test_max_examples_samples_listed_sources_and_cuts_streams():
    listed = DataConfig(source="folder", path="x", holdout_examples=2, max_examples=6, seed=1)
    order = np.random.default_rng(1).permutation(20)[:6]
    np.testing.assert_array_equal(sources.split_positions(listed, "test", 20), order[-2:])
    stream = DataConfig(source="tfrecord", path="x", holdout_examples=2, max_examples=6, seed=1)
    positions = np.concatenate([sources.split_positions(stream, s, 20) for s in ("train", "test")])
    assert sorted(positions) == list(range(6))  # the first 6 records, shuffled and split
    with_eval = dataclasses.replace(stream, eval_split="y")
    np.testing.assert_array_equal(sources.split_positions(with_eval, "test", 20), np.arange(6))
    assert sources.stream_of(with_eval, "test") == "test" and sources.stream_of(stream, "test") == "train"


# ------------------------------------------------------------------------- folders


def test_folder_listing_order_labels_and_the_files_it_reports(tmp_path):
    folder = str(tmp_path)
    for name in ("b/2.png", "b/1.jpg", "a/x.PNG", "a/deep/y.webp", "a/notes.txt", "stray.png"):
        fx.write(os.path.join(folder, name), fx.png(0))
    listing = sources.list_folder(folder)
    assert listing.class_names == ("a", "b") and listing.labelled
    relative = [os.path.relpath(path, folder) for path in listing.files]
    # Class by class; within one, a folder's own files before its sub-folders', each sorted.
    assert relative == ["a/x.PNG", "a/deep/y.webp", "b/1.jpg", "b/2.png"]
    assert listing.labels.tolist() == [0, 0, 1, 1]
    others = {os.path.relpath(path, folder): reason for path, reason, _ in listing.others}
    assert others == {"a/notes.txt": sources.NOT_AN_IMAGE, "stray.png": sources.MISSING_LABEL}
    # A held-out folder takes the training class ids; an unknown class is an error.
    fx.write(os.path.join(folder + "_eval", "b", "z.png"), fx.png(1))
    assert sources.list_folder(folder + "_eval", "data.eval_split", ("a", "b")).labels.tolist() == [1]
    fx.write(os.path.join(folder + "_bad", "c", "z.png"), fx.png(1))
    with pytest.raises(ValueError, match=r"data.eval_split: class folders \['c'\]"):
        sources.list_folder(folder + "_bad", "data.eval_split", ("a", "b"))


def test_hidden_files_and_folders_are_neither_images_nor_classes(tmp_path, caplog):
    folder = str(tmp_path)
    for name in ("a/1.png", "a/.DS_Store", "a/._1.png", "a/.ipynb_checkpoints/1-checkpoint.png",
                 ".ipynb_checkpoints/x.png", ".DS_Store", "b/deep/2.png"):
        fx.write(os.path.join(folder, name), fx.png(0))
    os.makedirs(os.path.join(folder, "c"))
    with caplog.at_level("WARNING", logger="byol_tf.sources"):
        listing = sources.list_folder(folder)
    assert listing.class_names == ("a", "b", "c")
    assert [os.path.relpath(p, folder) for p in listing.files] == ["a/1.png", "b/deep/2.png"]
    assert listing.labels.tolist() == [0, 1] and listing.others == ()
    # An empty class folder keeps its id, and is named.
    assert "class folders ['c'] of" in caplog.text and "have no images" in caplog.text


def test_unlabelled_folder_and_errors_name_the_field(tmp_path):
    fx.write(str(tmp_path / "flat" / "a.png"), fx.png(0))
    listing = sources.list_folder(str(tmp_path / "flat"))
    assert listing.labels.tolist() == [-1] and not listing.labelled
    with pytest.raises(ValueError, match="data.path: folder .* does not exist"):
        sources.list_folder(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "empty" / "class_a")
    with pytest.raises(ValueError, match="data.path: folder .* has no images"):
        sources.list_folder(str(tmp_path / "empty"))


def test_folder_units_read_every_used_position_once(tmp_path):
    folder = fx.clean_folder(str(tmp_path / "images"), classes=3, per_class=5)
    fx.write(os.path.join(folder, "class_1", "readme.txt"), b"hi")
    cfg = DataConfig(source="folder", path=folder, holdout_examples=4, max_examples=12, seed=2)
    plan, read = candidates(cfg)
    assert plan.stream_records == {"train": 15} and plan.labelled and plan.num_classes == 3
    listing = sources.list_folder(folder)
    for split in ("train", "test"):
        positions = sorted(c.position for c in read if c.split == split and c.position >= 0)
        assert positions == sorted(sources.split_positions(cfg, split, 15))
    by_position = {c.position: c for c in read if c.position >= 0}
    for position, c in by_position.items():
        assert c.record_id == listing.files[position] and c.label == listing.labels[position]
        assert c.data == open(listing.files[position], "rb").read()
    assert [c.reason for c in read if c.position < 0] == [sources.NOT_AN_IMAGE]
    assert plan.records == len(read) == 13
    # Units travel between processes as JSON.
    assert all(sources.Unit.from_json(unit.to_json()) == unit for unit in plan.units)


# ----------------------------------------------------------------------- TFRecords


def test_tfrecord_positions_follow_sorted_files_then_records(tmp_path):
    first = [fx.tf_example(fx.png(i), i) for i in range(3)]
    second = [fx.tf_example(fx.png(10 + i), 10 + i) for i in range(4)]
    fx.write_tfrecord(str(tmp_path / "b.tfrecord"), second, gzip=True)
    fx.write_tfrecord(str(tmp_path / "a.tfrecord"), first)
    cfg = DataConfig(source="tfrecord", path=str(tmp_path / "*.tfrecord"), holdout_examples=0)
    plan, read = candidates(cfg)
    assert [count.records for count in plan.files["train"]] == [3, 4]
    assert [(c.position, c.label) for c in read] == [(0, 0), (1, 1), (2, 2), (3, 10), (4, 11), (5, 12), (6, 13)]
    assert read[3].record_id.endswith("b.tfrecord:0")
    # max_examples: the first records of the stream; the rest is never counted.
    capped, read = candidates(dataclasses.replace(cfg, max_examples=4))
    assert [count.records for count in capped.files["train"]] == [3, 1]
    assert [c.position for c in read] == [0, 1, 2, 3]


def test_common_keys_offset_labels_and_a_record_without_image(tmp_path):
    records = [
        fx.tf_example(fx.png(0), 1, image_key="image/encoded", label_key="image/class/label"),
        fx.tf_example(fx.png(1), 1000, image_key="image/encoded", label_key="image/class/label"),
        fx.tf_example(label=5, image_key="image/encoded", label_key="image/class/label"),
        b"not a tf.Example",
    ]
    fx.write_tfrecord(str(tmp_path / "r.tfrecord"), records)
    cfg = DataConfig(source="tfrecord", path=str(tmp_path / "r.tfrecord"), holdout_examples=0, label_offset=1)
    plan, read = candidates(cfg)
    assert plan.keys == sources.RecordKeys("image/encoded", "image/class/label") and plan.labelled
    assert [c.label for c in read[:2]] == [0, 999]  # stored 1-based, offset by 1
    assert read[2].reason == sources.MISSING_IMAGE and "features: image/class/label" in read[2].detail
    assert read[3].reason == sources.UNPARSEABLE_RECORD


def test_keys_come_from_the_first_records_not_the_first_alone(tmp_path):
    # Record 0 has no label: the source is still labelled, and record 0 dropped as such.
    records = [fx.tf_example(fx.png(0))] + [fx.tf_example(fx.png(i), i % 3) for i in range(1, 6)]
    fx.write_tfrecord(str(tmp_path / "r.tfrecord"), records)
    cfg = DataConfig(source="tfrecord", path=str(tmp_path / "r.tfrecord"), holdout_examples=0)
    plan, read = candidates(cfg)
    assert plan.keys == sources.RecordKeys("image", "label") and plan.labelled
    assert [c.label for c in read] == [None, 1, 2, 0, 1, 2]
    # Labels that first appear after the records the keys come from stop the read in one line.
    late = [fx.tf_example(fx.png(i)) for i in range(sources.KEY_SAMPLE)] + [fx.tf_example(fx.png(0), 4)]
    fx.write_tfrecord(str(tmp_path / "late" / "r.tfrecord"), late)
    cfg = dataclasses.replace(cfg, path=str(tmp_path / "late" / "r.tfrecord"))
    plan = sources.plan(cfg)
    assert plan.keys == sources.RecordKeys("image", None)
    message = r"^data.label_key: records have a label feature 'label' .*set data.label_key: label"
    with pytest.raises(ValueError, match=message):
        [c for unit in plan.units for c in sources.read_unit(unit, cfg, plan.keys)]
    assert [c.label for c in candidates(dataclasses.replace(cfg, label_key="label"))[1]][-2:] == [None, 4]


def test_a_label_is_one_int64_and_anything_else_is_named(tmp_path):
    import tensorflow as tf

    def record(label_feature):
        feature = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[fx.png(0)]))}
        if label_feature is not None:
            feature["label"] = label_feature
        return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()

    fx.write_tfrecord(
        str(tmp_path / "r.tfrecord"),
        [
            record(tf.train.Feature(int64_list=tf.train.Int64List(value=[2]))),
            record(tf.train.Feature(int64_list=tf.train.Int64List(value=[2, 7]))),
            record(tf.train.Feature(float_list=tf.train.FloatList(value=[2.0]))),
            record(tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"cat"]))),
            record(tf.train.Feature(int64_list=tf.train.Int64List(value=[]))),
            record(None),
        ],
    )
    cfg = DataConfig(source="tfrecord", path=str(tmp_path / "r.tfrecord"), holdout_examples=0, label_offset=1)
    _, read = candidates(cfg)
    assert [(c.label, c.reason) for c in read] == [(1, None)] + [(None, sources.MISSING_LABEL)] * 5
    assert read[1].detail == "label feature 'label' holds 2 labels [2, 7], not one"
    assert read[2].detail == "label feature 'label' holds a float_list [2.0], not an int64"
    assert read[3].detail == "label feature 'label' holds a bytes_list [b'cat'], not an int64"
    assert read[4].detail == "no label feature 'label' (features: image, label)"
    assert read[5].detail == "no label feature 'label' (features: image)"
    assert all(c.data == fx.png(0) for c in read)
    # A data.label_key the records lack: each record says so.
    typo = dataclasses.replace(cfg, label_key="lable")
    assert {c.detail for c in candidates(typo)[1]} == {"no label feature 'lable' (features: image, label)",
                                                       "no label feature 'lable' (features: image)"}


def test_records_without_any_image_feature_fail_in_one_line_listing_the_features(tmp_path):
    fx.write_tfrecord(str(tmp_path / "r.tfrecord"), [fx.tf_example(fx.png(0), 1, image_key="img")])
    cfg = DataConfig(source="tfrecord", path=str(tmp_path / "r.tfrecord"), holdout_examples=0)
    with pytest.raises(ValueError) as error:
        sources.plan(cfg)
    message = str(error.value)
    assert message.startswith("data.image_key:") and "'image' or 'image/encoded'" in message
    assert "its features: img, label" in message and "\n" not in message
    keys = sources.plan(dataclasses.replace(cfg, image_key="img")).keys
    assert keys == sources.RecordKeys("img", "label")


def test_a_damaged_file_keeps_its_records_before_the_damage(tmp_path):
    whole = fx.write_tfrecord(str(tmp_path / "whole.tfrecord"), [fx.tf_example(fx.png(i, (32, 32, 3)), i) for i in range(6)])
    with open(whole, "rb") as stream:
        data = stream.read()
    damaged = bytearray(data)
    damaged[len(data) * 2 // 3] ^= 0xFF  # a flipped bit: the record's checksum fails
    fx.write(str(tmp_path / "cut" / "r.tfrecord"), bytes(damaged))
    cfg = DataConfig(source="tfrecord", path=str(tmp_path / "cut" / "*"), holdout_examples=0)
    plan, read = candidates(cfg)
    (count,) = plan.files["train"]
    assert 0 < count.records < 6 and count.damage
    assert [c.reason for c in read] == [None] * count.records + [sources.CORRUPT_TFRECORD_FILE]
    assert read[-1].position == -1
    # TensorFlow's words, without its function and op names.
    assert read[-1].detail.startswith("DataLossError: corrupted record at") and "{{" not in read[-1].detail
    assert "[Op:" not in read[-1].detail


def test_missing_tfrecords_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="data.path: no TFRecord file matches"):
        sources.plan(DataConfig(source="tfrecord", path=str(tmp_path / "none-*")))
    fx.write(str(tmp_path / "empty" / "r.tfrecord"), b"")
    with pytest.raises(ValueError, match=r"data.path: .* hold no readable record \(1 empty files\)$"):
        sources.plan(DataConfig(source="tfrecord", path=str(tmp_path / "empty" / "*")))
    fx.write(str(tmp_path / "text" / "r.tfrecord"), b"labels were checked by hand\n")
    with pytest.raises(ValueError, match=r"hold no readable record \(the first damage: .*r.tfrecord: DataLossError: corrupted record at 0"):
        sources.plan(DataConfig(source="tfrecord", path=str(tmp_path / "text" / "*")))
    fx.write_tfrecord(str(tmp_path / "a.tfrecord"), [fx.tf_example(fx.png(0), 0)])
    with pytest.raises(ValueError, match="data.eval_split: no TFRecord file matches"):
        sources.plan(DataConfig(source="tfrecord", path=str(tmp_path / "a.tfrecord"), eval_split=str(tmp_path / "b*")))


# ---------------------------------------------------------------------- fingerprint


def test_fingerprint_changes_with_the_files(tmp_path):
    folder = fx.clean_folder(str(tmp_path / "images"), classes=2, per_class=2)
    cfg = DataConfig(source="folder", path=folder)
    before = sources.fingerprint(cfg)
    assert len(before) == 16
    fx.write(os.path.join(folder, "class_1", "new.png"), fx.png(99))
    assert sources.fingerprint(cfg) == before  # taken once per process ...
    sources.clear_caches()
    assert sources.fingerprint(cfg) != before  # ... until forgotten
    assert sources.fingerprint(DataConfig()) == ""
