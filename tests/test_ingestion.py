"""Tests of components/ingestion.py (per-record decisions) and ImageExampleGen."""

import io
import json
import os

os.environ["TF_USE_LEGACY_KERAS"] = "0"  # tfx.v1 would hand Keras 2 to child processes

import numpy as np
import pytest
from fixtures import images as fx
from PIL import Image

from byol_tfx.components import ingestion


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def check(data, label=1, image_size=fx.SIDE, num_classes=10):
    return ingestion.check_image("record", data, label, image_size=image_size, num_classes=num_classes)


# ------------------------------------------------------------------ per-record decisions


def test_clean_png_is_kept_byte_for_byte():
    data = fx.png(0)
    result = check(data)
    assert result.status == "ok" and result.image == data
    assert (result.label, result.height, result.width) == (1, fx.SIDE, fx.SIDE)


def test_clean_jpeg_is_kept_byte_for_byte():
    data = fx.jpeg(0)
    assert check(data).image == data


def test_zero_byte_file_is_dropped():
    result = check(b"")
    assert (result.status, result.drop_reason) == ("dropped", ingestion.EMPTY_FILE)
    assert result.image is None


@pytest.mark.parametrize("encoded", [fx.jpeg(1, (32, 32, 3)), fx.png(1, (32, 32, 3))], ids=["jpeg", "png"])
def test_truncated_image_is_corrupt(encoded):
    result = check(fx.truncated(encoded))
    assert result.drop_reason == ingestion.CORRUPT_IMAGE
    assert "truncated" in result.detail or "broken" in result.detail.lower()


def test_non_image_bytes_are_dropped():
    result = check(b"<html>not an image</html>")
    assert result.drop_reason == ingestion.NOT_AN_IMAGE


def test_rgba_is_converted_to_rgb_dropping_alpha():
    array = fx.pixels(4, (fx.SIDE, fx.SIDE, 4))
    result = check(fx.encode(array))
    assert (result.status, result.converted_from) == ("converted", "RGBA")
    decoded = decode(result.image)
    assert decoded.shape == (fx.SIDE, fx.SIDE, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, array[..., :3])


def test_16_bit_grayscale_is_scaled_to_8_bit_rgb():
    array = fx.pixels(5, (fx.SIDE, fx.SIDE), np.uint16)
    array[0, 0], array[0, 1] = 0, 65535
    result = check(fx.encode(array))
    assert result.converted_from == "I;16"
    decoded = decode(result.image)
    assert decoded.shape == (fx.SIDE, fx.SIDE, 3) and decoded.dtype == np.uint8
    expected = np.round(array / 257.0).astype(np.uint8)  # not clipped at 255 as Pillow would
    np.testing.assert_array_equal(decoded[..., 0], expected)
    np.testing.assert_array_equal(decoded[..., 2], expected)
    assert decoded[0, 0, 0] == 0 and decoded[0, 1, 0] == 255


def test_grayscale_is_converted_to_three_equal_channels():
    array = fx.pixels(6, (fx.SIDE, fx.SIDE))
    result = check(fx.encode(array))
    assert result.converted_from == "L"
    decoded = decode(result.image)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[..., channel], array)


def test_odd_size_is_resized_keeping_aspect_and_cropping_the_centre():
    result = check(fx.jpeg(7, (13, 21, 3)))
    assert (result.status, result.resized_from) == ("resized", (13, 21))
    assert decode(result.image).shape == (fx.SIDE, fx.SIDE, 3)
    assert (result.height, result.width) == (fx.SIDE, fx.SIDE)
    # A left half black and right half white image keeps its boundary in the centre.
    halves = np.zeros((20, 40, 3), np.uint8)
    halves[:, 20:] = 255
    cropped = ingestion.resize_and_center_crop(halves, 10)
    assert cropped.shape == (10, 10, 3)
    assert cropped[:, :3].max() < 30 and cropped[:, -3:].min() > 225


def test_image_size_zero_keeps_the_size():
    result = check(fx.png(8, (13, 21, 3)), image_size=0)
    assert result.status == "ok" and (result.height, result.width) == (13, 21)


@pytest.mark.parametrize(
    "label, reason",
    [(None, "missing_label"), (-1, "missing_label"), (10, "label_out_of_range"), (-3, "label_out_of_range"), (9, None)],
)
def test_labels_missing_or_out_of_range_are_dropped(label, reason):
    result = check(fx.png(0), label=label, num_classes=10)
    assert result.drop_reason == reason


def test_labels_without_num_classes_accept_any_non_negative_label():
    assert check(fx.png(0), label=12345, num_classes=None).kept
    assert check(fx.png(0), label=-2, num_classes=None).drop_reason == ingestion.LABEL_OUT_OF_RANGE


def test_arrays_from_the_library_sources():
    def array_check(array, label=0):
        return ingestion.check_array("a", array, label, image_size=fx.SIDE, num_classes=10)

    rgb = fx.pixels(0)
    result = array_check(rgb)
    assert result.status == "ok"
    np.testing.assert_array_equal(decode(result.image), rgb)
    assert array_check(fx.pixels(0, (fx.SIDE, fx.SIDE, 1))).converted_from == "L"
    assert array_check(fx.pixels(0, (fx.SIDE, fx.SIDE), np.uint16)).converted_from == "uint16"
    assert array_check(rgb.astype(np.float32)).drop_reason == ingestion.BAD_ARRAY
    assert array_check(np.zeros((4,), np.uint8)).drop_reason == ingestion.BAD_ARRAY
    assert array_check(rgb, label=11).drop_reason == ingestion.LABEL_OUT_OF_RANGE


def test_report_counts_and_the_bad_fraction_gate():
    report = ingestion.IngestionReport()
    for _ in range(98):
        report.add("train", check(fx.png(0)))
    report.add("eval", check(fx.png(0)))
    report.add("train", check(b""))
    assert report.bad_fraction == pytest.approx(0.01)
    report.check(max_bad_fraction=0.01)  # exactly at the limit passes
    report.add("eval", check(fx.rgba_png(0)))
    report.add("eval", check(fx.png(0), label=None))
    summary = report.to_dict()
    assert summary["splits"]["train"]["dropped_by_reason"] == {"empty_file": 1}
    assert summary["splits"]["eval"]["converted_from"] == {"RGBA": 1}
    assert summary["total"]["dropped"] == 2 and summary["total"]["total"] == 102
    with pytest.raises(ingestion.IngestionError, match=r"dropped 2 of 102 records .*empty_file=1, missing_label=1"):
        report.check(max_bad_fraction=0.01)


def test_holdout_split_is_byol_tf_data_rule():
    splits = ingestion.holdout_split(10, 3, seed=0)
    order = np.random.default_rng(0).permutation(10)
    assert sorted(splits["eval"]) == sorted(order[-3:])
    assert sorted(splits["train"]) == sorted(order[:-3])
    with pytest.raises(ingestion.IngestionError, match="leaves none"):
        ingestion.holdout_split(3, 3, seed=0)


# ------------------------------------------------------------------ the component

from byol_tfx.components import example_gen  # noqa: E402 -- after the pure tests' imports, for reading order


COMPONENT_PARAMETERS = ("max_bad_fraction", "num_shards", "source_fingerprint")


def run_example_gen(tmp_path, image_size=fx.SIDE, **settings):
    """Calls ImageExampleGen's function with fresh output artifacts, as the executor does.

    `settings` are fields of the config's data section, or component parameters.
    """
    from tfx.types import standard_artifacts

    parameters = {key: settings.pop(key) for key in COMPONENT_PARAMETERS if key in settings}
    parameters["config"] = fx.config_json(image_size=image_size, **settings)

    examples = standard_artifacts.Examples()
    examples.uri = str(tmp_path / "examples")
    report = example_gen.IngestionReport()
    report.uri = str(tmp_path / "report")
    os.makedirs(report.uri, exist_ok=True)
    example_gen.ImageExampleGen.test_call(examples=examples, report=report, **parameters)
    return examples, report


def read_report(report):
    with open(os.path.join(report.uri, example_gen.REPORT_FILE)) as stream:
        return json.load(stream)


def test_folder_with_every_kind_of_bad_record(tmp_path):
    folder = fx.add_bad_files(fx.clean_folder(str(tmp_path / "images")))
    examples, report = run_example_gen(
        tmp_path, source="folder", path=folder, holdout_examples=6, image_size=fx.SIDE, max_bad_fraction=0.5
    )

    # Laid out as TFX's ExampleGen does, so StatisticsGen and the Trainer read it.
    assert examples.split_names == '["train", "eval"]'
    assert examples.get_string_custom_property("file_format") == "tfrecords_gzip"
    assert examples.get_string_custom_property("payload_format") == "FORMAT_TF_EXAMPLE"
    for split in ("train", "eval"):
        assert os.listdir(os.path.join(examples.uri, f"Split-{split}")) == ["data_tfrecord-00000-of-00001.gz"]

    summary = read_report(report)
    total = summary["total"]
    expected_reasons = {}
    for status, reason in fx.BAD_FILES.values():
        if status == "dropped":
            expected_reasons[reason] = expected_reasons.get(reason, 0) + 1
    assert total["total"] == 3 * 8 + len(fx.BAD_FILES)
    assert total["dropped_by_reason"] == expected_reasons
    assert total["dropped"] == sum(expected_reasons.values())
    assert total["converted"] == 3 and total["resized"] == 1
    converted = {}
    for split in ("train", "eval"):
        converted.update(summary["splits"][split]["converted_from"])
    assert converted == {"RGBA": 1, "I;16": 1, "L": 1}
    assert summary["splits"]["eval"]["total"] == 6
    assert report.get_int_custom_property("dropped") == total["dropped"]
    assert report.get_float_custom_property("bad_fraction") == pytest.approx(summary["bad_fraction"])
    dropped = {os.path.relpath(d["record"], folder): d["reason"] for d in summary["first_dropped_records"]}
    assert dropped == {name: reason for name, (status, reason) in fx.BAD_FILES.items() if status == "dropped"}

    written = 0
    for split in ("train", "eval"):
        records = fx.read_examples(os.path.join(examples.uri, f"Split-{split}", "*"))
        assert len(records) == summary["splits"][split]["written"]
        written += len(records)
        for record in records:
            assert set(record) == {"image", "label", "height", "width"}
            assert decode(record["image"]).shape == (fx.SIDE, fx.SIDE, 3)
            assert 0 <= record["label"] < 3
    assert written == total["written"] == total["total"] - total["dropped"]


def test_too_many_bad_records_fail_the_run_naming_the_counts(tmp_path):
    folder = fx.add_bad_files(fx.clean_folder(str(tmp_path / "images")))
    with pytest.raises(ingestion.IngestionError) as error:
        run_example_gen(tmp_path, source="folder", path=folder, holdout_examples=6, image_size=fx.SIDE)
    message = str(error.value)
    assert "dropped 6 of 34 records" in message and "max_bad_fraction=1.00%" in message
    assert "corrupt_image=2" in message and "empty_file=1" in message and "not_an_image=2" in message
    # The report is written before failing, and the error says where.
    assert os.path.join(str(tmp_path / "report"), example_gen.REPORT_FILE) in message
    assert os.path.isfile(os.path.join(str(tmp_path / "report"), example_gen.REPORT_FILE))


def test_tfrecord_source_with_bad_records(tmp_path):
    good = [fx.tf_example(fx.png(i), label=i % 3) for i in range(12)]
    bad = [
        fx.tf_example(fx.png(0)),  # no label
        fx.tf_example(fx.png(0), label=7),  # num_classes is 3
        fx.tf_example(label=1),  # no image
        fx.tf_example(b"GIF89a-but-not-really", label=1),
        b"\x00\x01 not a tf.Example",
    ]
    fx.write_tfrecord(str(tmp_path / "records" / "part-0.tfrecord"), good + bad)
    # A gzip file cut in half: one counted record, then reading moves on.
    whole = fx.write_tfrecord(str(tmp_path / "scratch" / "cut.gz"), good[:4], gzip=True)
    with open(whole, "rb") as stream:
        fx.write(str(tmp_path / "records" / "part-1.tfrecord"), fx.truncated(stream.read()))

    examples, report = run_example_gen(
        tmp_path,
        source="tfrecord",
        path=str(tmp_path / "records" / "*"),
        holdout_examples=4,
        num_classes=3,
        image_size=fx.SIDE,
        max_bad_fraction=0.5,
    )
    total = read_report(report)["total"]
    assert total["dropped_by_reason"] == {
        "not_an_image": 1,
        "unparseable_record": 1,
        "corrupt_tfrecord_file": 1,
        "missing_image": 1,
        "missing_label": 1,
        "label_out_of_range": 1,
    }
    # The cut file's records before the cut are read and kept; the rest counts as one.
    assert 12 < total["written"] == total["total"] - 6 < 16
    eval_records = fx.read_examples(os.path.join(examples.uri, "Split-eval", "*"))
    assert read_report(report)["splits"]["eval"]["total"] == 4 and len(eval_records) <= 4


def test_mnist5k_eval_split_is_byol_tf_data_test_split(tmp_path):
    from byol_tf import config as config_lib, data as data_lib

    examples, report = run_example_gen(
        tmp_path, source="mnist5k", max_examples=60, holdout_examples=20, seed=3, image_size=28
    )
    cfg = config_lib.DataConfig(source="mnist5k", max_examples=60, holdout_examples=20, seed=3)
    for split, library_split in (("train", "train"), ("eval", "test")):
        images, labels = data_lib.load_arrays(cfg, library_split)
        records = fx.read_examples(os.path.join(examples.uri, f"Split-{split}", "*"))
        assert [r["label"] for r in records] == labels.tolist()
        np.testing.assert_array_equal(np.stack([decode(r["image"]) for r in records]), images)
    summary = read_report(report)
    assert summary["total"] == {
        "total": 60, "written": 60, "ok": 60, "converted": 0, "resized": 0, "dropped": 0, "dropped_by_reason": {}
    }
    assert summary["settings"]["num_classes_used"] == 10


def test_component_parameters_and_outputs_are_declared():
    spec = example_gen.ImageExampleGen.SPEC_CLASS
    assert set(spec.OUTPUTS) == {"examples", "report"}
    # One config parameter; only the runtime-tunable knob and the cache key besides it.
    assert set(spec.PARAMETERS) == {"config", "max_bad_fraction", "num_shards", "source_fingerprint"}
    assert example_gen.IngestionReport.TYPE_NAME == "byol_tf.IngestionReport"


def test_source_fingerprint_changes_with_the_files(tmp_path):
    folder = fx.clean_folder(str(tmp_path / "images"), classes=2, per_class=2)
    before = ingestion.source_fingerprint("folder", folder)
    assert before == ingestion.source_fingerprint("folder", folder) and len(before) == 16
    fx.write(os.path.join(folder, "class_1", "new.png"), fx.png(99))
    assert ingestion.source_fingerprint("folder", folder) != before
    assert ingestion.source_fingerprint("mnist5k") == ""


def test_folder_with_a_held_out_folder_uses_the_training_class_ids(tmp_path):
    train = fx.clean_folder(str(tmp_path / "train"), classes=3, per_class=4)
    held_out = str(tmp_path / "held_out")
    fx.write(os.path.join(held_out, "class_2", "a.png"), fx.png(50))
    fx.write(os.path.join(held_out, "class_2", "b.png"), fx.png(51))
    examples, report = run_example_gen(tmp_path, source="folder", path=train, eval_split=held_out, image_size=fx.SIDE)
    eval_records = fx.read_examples(os.path.join(examples.uri, "Split-eval", "*"))
    assert [record["label"] for record in eval_records] == [2, 2]
    assert read_report(report)["splits"]["train"]["written"] == 12


def test_folder_split_is_byol_tf_data_split(tmp_path):
    from byol_tf import config as config_lib, data as data_lib

    folder = fx.clean_folder(str(tmp_path / "images"), classes=3, per_class=5)
    examples, _ = run_example_gen(tmp_path, source="folder", path=folder, holdout_examples=4, seed=1)
    cfg = config_lib.DataConfig(source="folder", path=folder, holdout_examples=4, seed=1)
    for split, library_split in (("train", "train"), ("eval", "test")):
        images, labels = data_lib.load_arrays(cfg, library_split)
        records = fx.read_examples(os.path.join(examples.uri, f"Split-{split}", "*"))
        # Ingestion reads each split in file order, the library in shuffled order.
        ours = sorted((r["label"], decode(r["image"]).tobytes()) for r in records)
        theirs = sorted((int(label), image.tobytes()) for image, label in zip(images, labels))
        assert ours == theirs
