"""Tests of components/ingestion.py (what is written for each record, the report) and the
Beam ImageExampleGen (components/example_gen.py, components/ingestion_beam.py)."""

import io
import os

os.environ["TF_USE_LEGACY_KERAS"] = "0"  # tfx.v1 would hand Keras 2 to child processes

import numpy as np
import pytest
from fixtures import images as fx
from PIL import Image

from byol_tf import checks, config as config_lib, data as data_lib, sources
from byol_tfx.components import ingestion

LABELLED = checks.Rules(labelled=True, num_classes=10)


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def candidate(data, label=1, record_id="record"):
    return sources.Candidate("train", 0, record_id, label, data=data)


def ingest(data, label=1, max_image_side=None):
    return ingestion.ingest_record(candidate(data, label), LABELLED, max_image_side)


# ------------------------------------------------------------------ per-record outcomes


def test_clean_png_and_jpeg_are_kept_byte_for_byte():
    for data in (fx.png(0), fx.jpeg(0), fx.gray_png(0)):
        result = ingest(data)
        assert result.status == "ok" and result.image == data
        assert (result.split, result.label, result.height, result.width) == ("train", 1, fx.SIDE, fx.SIDE)


def test_a_large_jpeg_stays_at_full_resolution():
    data = fx.encode(fx.smooth(300, 400), "JPEG")
    result = ingest(data)
    assert result.status == "ok" and result.image == data and (result.height, result.width) == (300, 400)


def test_max_image_side_shrinks_keeping_the_aspect_ratio():
    jpeg = fx.encode(fx.smooth(300, 400), "JPEG")
    result = ingest(jpeg, max_image_side=100)
    assert (result.status, result.resized_from, result.height, result.width) == ("resized", (300, 400), 75, 100)
    assert result.image.startswith(b"\xff\xd8\xff") and decode(result.image).shape == (75, 100, 3)
    # A PNG stays lossless, and is exactly the library's capped image.
    png = fx.encode(fx.smooth(30, 40))
    result = ingest(png, max_image_side=20)
    assert result.image.startswith(b"\x89PNG") and (result.height, result.width) == (15, 20)
    expected = checks.cap_image_side(checks.decode_image(png), 20).numpy()
    np.testing.assert_array_equal(decode(result.image), expected)
    assert ingest(png, max_image_side=40).status == "ok"


@pytest.mark.parametrize("name", sorted(fx.BAD_FILES))
def test_every_kind_of_file_gets_its_outcome(tmp_path, name):
    folder = fx.add_bad_files(str(tmp_path))
    with open(os.path.join(folder, name), "rb") as stream:
        data = stream.read()
    status, what = fx.BAD_FILES[name]
    label = None if name == "stray.png" else 1
    if name.endswith(".txt") or name == "stray.png":
        # Reading decides these (extension, no class folder): the rule sees them as such.
        reason = sources.NOT_AN_IMAGE if name.endswith(".txt") else sources.MISSING_LABEL
        result = ingestion.ingest_record(
            sources.Candidate("train", -1, name, label, reason=reason, detail="listing"), LABELLED
        )
    else:
        result = ingest(data, label)
    assert result.status == status
    if status == "dropped":
        assert result.drop_reason == what and result.image is None
    elif status == "converted":
        assert result.converted_from == what
        # Lossless: the written PNG holds exactly the pixels every reader decodes from the original.
        assert result.image.startswith(b"\x89PNG")
        np.testing.assert_array_equal(decode(result.image), checks.decode_image(data).numpy())
    else:
        assert result.image == data


def test_stored_form_names_what_needs_re_encoding():
    assert ingestion.stored_form(fx.png(0), "PNG") is None
    assert ingestion.stored_form(fx.gray_png(0), "PNG") is None
    assert ingestion.stored_form(fx.rgba_png(0), "PNG") == "RGBA"
    assert ingestion.stored_form(fx.gray16_png(0), "PNG") == "I;16"
    assert ingestion.stored_form(fx.encode(fx.pixels(0, (4, 4, 3), np.uint16).astype(np.uint16)[..., 0]), "PNG") == "I;16"
    assert ingestion.stored_form(fx.palette_png(0), "PNG") == "P"
    assert ingestion.stored_form(fx.cmyk_jpeg(0), "JPEG") == "CMYK"
    assert ingestion.stored_form(fx.jpeg(0), "JPEG") is None
    assert ingestion.stored_form(fx.animated_gif(0), "GIF") == "GIF"


def test_arrays_of_the_embedded_sources_are_written_as_png():
    rgb = fx.pixels(0)
    result = ingestion.ingest_record(sources.Candidate("test", 3, "mnist5k:3", 4, array=rgb), LABELLED)
    assert (result.status, result.split, result.label) == ("ok", "eval", 4)
    np.testing.assert_array_equal(decode(result.image), rgb)


def test_report_counts_and_the_bad_fraction_gate():
    report = ingestion.IngestionReport()
    for _ in range(98):
        report.add_result(ingest(fx.png(0)))
    report.add_result(ingestion.ingest_record(sources.Candidate("test", 0, "e", 1, data=fx.png(0)), LABELLED))
    report.add_result(ingest(b""))
    assert report.bad_fraction == pytest.approx(0.01)
    report.check(max_bad_fraction=0.01)  # exactly at the limit passes
    report.add_result(ingestion.ingest_record(sources.Candidate("test", 1, "r", 1, data=fx.rgba_png(0)), LABELLED))
    report.add_result(ingest(fx.png(0), label=None))
    summary = report.to_dict()
    assert summary["splits"]["train"]["dropped_by_reason"] == {"empty_file": 1, "missing_label": 1}
    assert summary["splits"]["eval"]["converted_from"] == {"RGBA": 1}
    assert summary["total"]["dropped"] == 2 and summary["total"]["total"] == 102
    with pytest.raises(ingestion.IngestionError, match=r"dropped 2 of 102 records .*empty_file=1, missing_label=1"):
        report.check(max_bad_fraction=0.01)
    # The same report rebuilt from counters (what Beam hands back).
    counters = {f"{split}/{name}": n for split, counts in report.counts.items() for name, n in counts.items()}
    rebuilt = ingestion.IngestionReport.from_counters(counters, report.first_dropped())
    assert rebuilt.to_dict() == summary


# ------------------------------------------------------------------ the Beam component

from fixtures.example_gen import read_report, run_example_gen  # noqa: E402 -- the component's tests

from byol_tfx.components import example_gen  # noqa: E402


def split_records(examples, split):
    return fx.read_examples(os.path.join(examples.uri, f"Split-{split}", "*"))


def check_folder_outcome(folder, examples, report):
    """The report and the written records of `fx.add_bad_files` over a clean 3 x 8 folder."""
    summary = read_report(report)
    total = summary["total"]
    assert total["total"] == 3 * 8 + len(fx.BAD_FILES)
    assert total["dropped_by_reason"] == fx.dropped_by_reason()
    converted = {}
    for split in ("train", "eval"):
        converted.update(summary["splits"][split]["converted_from"])
    assert converted == {what: 1 for status, what in fx.BAD_FILES.values() if status == "converted"}
    dropped = {os.path.relpath(d["record"], folder): d["reason"] for d in summary["first_dropped_records"]}
    assert dropped == {name: what for name, (status, what) in fx.BAD_FILES.items() if status == "dropped"}
    written = 0
    for split in ("train", "eval"):
        records = split_records(examples, split)
        assert len(records) == summary["splits"][split]["written"]
        written += len(records)
        for record in records:
            assert set(record) == {"image", "label", "height", "width"} and 0 <= record["label"] < 3
            assert decode(record["image"]).shape[:2] == (record["height"], record["width"])
    assert written == total["written"] == total["total"] - total["dropped"]
    # Full resolution: the 3000 x 2000 JPEG went through as it was.
    sizes = {(r["height"], r["width"]) for split in ("train", "eval") for r in split_records(examples, split)}
    assert fx.LARGE_SHAPE[:2] in sizes and (1, 1) in sizes
    return summary


def test_folder_with_every_kind_of_bad_record_same_counts_as_byol_tf_train(tmp_path):
    folder = fx.add_bad_files(fx.clean_folder(str(tmp_path / "images")))
    examples, report = run_example_gen(tmp_path, source="folder", path=folder, holdout_examples=6, max_bad_fraction=0.5)

    # Laid out as TFX's ExampleGen does, so StatisticsGen and the Trainer read it.
    assert examples.split_names == '["train", "eval"]'
    assert examples.get_string_custom_property("file_format") == "tfrecords_gzip"
    assert examples.get_string_custom_property("payload_format") == "FORMAT_TF_EXAMPLE"
    for split in ("train", "eval"):
        assert os.listdir(os.path.join(examples.uri, f"Split-{split}")) == ["data_tfrecord-00000-of-00001.gz"]
    summary = check_folder_outcome(folder, examples, report)
    assert summary["splits"]["eval"]["total"] == 6
    assert report.get_int_custom_property("dropped") == summary["total"]["dropped"]
    assert report.get_float_custom_property("bad_fraction") == pytest.approx(summary["bad_fraction"])

    # byol-tf train's check of the same folder: the same drops, per reason and by name.
    cfg = config_lib.DataConfig(source="folder", path=folder, holdout_examples=6, max_bad_fraction=0.5)
    library = checks.run_check(cfg).report
    assert library.reasons() == summary["total"]["dropped_by_reason"]
    assert library.totals()["total"] == summary["total"]["total"]
    assert [d["record"] for d in library.first_dropped()] == [d["record"] for d in summary["first_dropped_records"]]


def test_too_many_bad_records_fail_the_run_in_one_line_naming_the_counts(tmp_path):
    folder = fx.add_bad_files(fx.clean_folder(str(tmp_path / "images")))
    with pytest.raises(ingestion.IngestionError) as error:
        run_example_gen(tmp_path, source="folder", path=folder, holdout_examples=6)
    message = str(error.value)
    assert "\n" not in message
    assert "dropped 7 of 39 records" in message and "max_bad_fraction=1.00%" in message
    assert "corrupt_image=2" in message and "empty_file=1" in message and "not_an_image=3" in message
    # The report is written before failing, and the error says where.
    report_path = os.path.join(str(tmp_path / "report"), example_gen.REPORT_FILE)
    assert report_path in message and os.path.isfile(report_path)
    # The runtime parameter wins over data.max_bad_fraction.
    run_example_gen(tmp_path / "again", source="folder", path=folder, holdout_examples=6, parameters={"max_bad_fraction": 0.2})


def test_tfrecords_with_common_keys_and_bad_records_need_no_setting(tmp_path):
    def example(image=None, label=None):
        return fx.tf_example(image, label, image_key="image/encoded", label_key="image/class/label")

    good = [example(fx.jpeg(i, (10 + i, 12, 3)), i % 3) for i in range(12)]
    bad = [
        example(fx.png(0)),  # no label
        example(fx.png(0), 7),  # num_classes is 3
        example(label=1),  # no image
        example(b"GIF89a-but-not-really", 1),
        b"\x00\x01 not a tf.Example",
    ]
    fx.write_tfrecord(str(tmp_path / "records" / "part-0.tfrecord"), good + bad)
    # A gzip file cut in half: its records before the cut are read, the rest counts as one.
    whole = fx.write_tfrecord(str(tmp_path / "scratch" / "cut.gz"), good[:4], gzip=True)
    with open(whole, "rb") as stream:
        fx.write(str(tmp_path / "records" / "part-1.tfrecord"), fx.truncated(stream.read()))

    settings = dict(source="tfrecord", path=str(tmp_path / "records" / "*"), holdout_examples=4, num_classes=3,
                    max_bad_fraction=0.5)
    examples, report = run_example_gen(tmp_path, **settings)
    summary = read_report(report)
    expected = {
        "corrupt_image": 1,
        "unparseable_record": 1,
        "corrupt_tfrecord_file": 1,
        "missing_image": 1,
        "missing_label": 1,
        "label_out_of_range": 1,
    }
    assert summary["total"]["dropped_by_reason"] == expected
    assert 12 <= summary["total"]["written"] == summary["total"]["total"] - 6 < 16
    assert summary["splits"]["eval"]["total"] == 4
    # Written with ImageExampleGen's own keys, the original JPEG bytes at their size.
    records = split_records(examples, "train") + split_records(examples, "eval")
    assert {(r["height"], r["width"]) for r in records} <= {(10 + i, 12) for i in range(12)}
    # byol-tf train reads the same records (same keys, same checks, same split).
    cfg = config_lib.DataConfig(**settings)
    assert checks.run_check(cfg).report.reasons() == expected
    for split, library_split in (("train", "train"), ("eval", "test")):
        ours = sorted(checks.decode_image(r["image"]).numpy().tobytes() for r in split_records(examples, split))
        theirs = sorted(e["image"].tobytes() for e in data_lib.load_split(cfg, library_split).as_numpy_iterator())
        assert ours == theirs


def test_mnist5k_eval_split_is_byol_tf_data_test_split(tmp_path):
    examples, report = run_example_gen(tmp_path, source="mnist5k", max_examples=60, holdout_examples=20, seed=3)
    cfg = config_lib.DataConfig(source="mnist5k", max_examples=60, holdout_examples=20, seed=3)
    for split, library_split in (("train", "train"), ("eval", "test")):
        images, labels = data_lib.load_arrays(cfg, library_split)
        records = split_records(examples, split)
        ours = sorted((r["label"], decode(r["image"]).tobytes()) for r in records)
        theirs = sorted((int(label), np.repeat(image[..., :1], 3, -1).tobytes()) for image, label in zip(images, labels))
        assert ours == theirs
    summary = read_report(report)
    assert summary["total"] == {
        "total": 60, "written": 60, "ok": 60, "converted": 0, "resized": 0, "dropped": 0, "dropped_by_reason": {}
    }
    assert summary["settings"]["num_classes_used"] == 10


def test_folder_split_is_byol_tf_data_split_and_held_out_folders_use_training_ids(tmp_path):
    folder = fx.clean_folder(str(tmp_path / "images"), classes=3, per_class=5)
    examples, _ = run_example_gen(tmp_path, source="folder", path=folder, holdout_examples=4, seed=1)
    cfg = config_lib.DataConfig(source="folder", path=folder, holdout_examples=4, seed=1)
    for split, library_split in (("train", "train"), ("eval", "test")):
        images, labels = data_lib.load_arrays(cfg, library_split)
        records = split_records(examples, split)
        ours = sorted((r["label"], decode(r["image"]).tobytes()) for r in records)
        theirs = sorted((int(label), image.tobytes()) for image, label in zip(images, labels))
        assert ours == theirs

    held_out = str(tmp_path / "held_out")
    fx.write(os.path.join(held_out, "class_2", "a.png"), fx.png(50))
    fx.write(os.path.join(held_out, "class_2", "b.png"), fx.png(51))
    examples, report = run_example_gen(tmp_path / "two", source="folder", path=folder, eval_split=held_out)
    assert [record["label"] for record in split_records(examples, "eval")] == [2, 2]
    assert read_report(report)["splits"]["train"]["written"] == 15


def test_component_parameters_and_outputs_are_declared():
    spec = example_gen.ImageExampleGen.SPEC_CLASS
    assert set(spec.OUTPUTS) == {"examples", "report"}
    # One config parameter; only the runtime-tunable knob, the file count and the cache key besides it.
    assert set(spec.PARAMETERS) == {"config", "max_bad_fraction", "num_shards", "source_fingerprint"}
    assert example_gen.IngestionReport.TYPE_NAME == "byol_tf.IngestionReport"
    assert example_gen.CONFIG_SECTIONS == ("data",)
    component = example_gen.ImageExampleGen(config=fx.config_json())
    # A Beam component: the pipeline's beam_pipeline_args reach it (DirectRunner or Dataflow).
    assert type(component.executor_spec).__name__ == "BeamExecutorSpec"


@pytest.mark.slow
def test_two_worker_processes_write_the_same_examples(tmp_path):
    folder = fx.add_bad_files(fx.clean_folder(str(tmp_path / "images")))
    examples, report = run_example_gen(
        tmp_path,
        beam_args=["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
        source="folder", path=folder, holdout_examples=6, max_bad_fraction=0.5,
    )
    check_folder_outcome(folder, examples, report)
