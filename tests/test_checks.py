"""Tests of byol_tf/checks.py: the per-record rule, the report, the cached check pass, and
what `byol-tf train` / `eval` and `fit` users see of bad data."""

import glob
import io
import os

import numpy as np
import pytest
import tensorflow as tf
from fixtures import images as fx
from PIL import Image

from byol_tf import checks, cli, config, data, sources
from byol_tf.config import DataConfig

LABELLED = checks.Rules(labelled=True, num_classes=3)
SMOKE = "configs/smoke.yaml"


def decide(data_bytes, label=1, rules=LABELLED):
    return checks.check_candidate(sources.Candidate("train", 0, "r", label, data=data_bytes), rules)


def bad_folder(tmp_path):
    return fx.add_bad_files(fx.clean_folder(str(tmp_path / "images")))


# ------------------------------------------------------------------------ the rule


@pytest.mark.parametrize("name", sorted(n for n in fx.BAD_FILES if not n.endswith(".txt") and n != "stray.png"))
def test_each_kind_of_file(tmp_path, name):
    folder = fx.add_bad_files(str(tmp_path))
    with open(os.path.join(folder, name), "rb") as stream:
        content = stream.read()
    status, what = fx.BAD_FILES[name]
    decision = decide(content)
    if status == "dropped":
        assert decision.reason == what and decision.pixels is None
    else:
        # Converted, not dropped: 8-bit RGB at the file's own size.
        assert decision.kept and decision.pixels.dtype == np.uint8 and decision.pixels.shape[-1] == 3
    if name == "class_1/large.jpg":
        assert decision.pixels.shape == fx.LARGE_SHAPE
    if name == "class_0/one_pixel.png":
        assert decision.pixels.shape == (1, 1, 3)


def test_conversions_match_independent_expectations():
    rgba = fx.pixels(4, (fx.SIDE, fx.SIDE, 4))
    np.testing.assert_array_equal(decide(fx.encode(rgba)).pixels, rgba[..., :3])  # alpha dropped
    gray = fx.pixels(6, (fx.SIDE, fx.SIDE))
    np.testing.assert_array_equal(decide(fx.encode(gray)).pixels, np.repeat(gray[..., None], 3, -1))
    deep = fx.pixels(5, (fx.SIDE, fx.SIDE), np.uint16)
    deep[0, :3] = (0, 65535, 3 * 256 + 200)
    expected = (deep >> 8).astype(np.uint8)  # 16 -> 8 bits: the high byte
    np.testing.assert_array_equal(decide(fx.encode(deep)).pixels[..., 0], expected)
    first_frame = np.asarray(Image.open(io.BytesIO(fx.animated_gif(11))).convert("RGB"))
    np.testing.assert_array_equal(decide(fx.animated_gif(11)).pixels, first_frame)


def test_raw_pixels_are_not_an_image_and_say_what_is_read():
    decision = decide(fx.pixels(0).tobytes())
    assert decision.reason == sources.NOT_AN_IMAGE
    assert decision.detail.endswith("not an encoded JPEG, PNG, GIF, BMP or WebP")
    truncated = decide(fx.truncated(fx.png(2, (32, 32, 3))))
    # The decoder's words, without TensorFlow's function and op names.
    assert truncated.reason == sources.CORRUPT_IMAGE and truncated.detail.startswith("PNG: ")
    assert "{{" not in truncated.detail and "[Op:" not in truncated.detail


def test_label_rules():
    png = fx.png(0)
    assert decide(png, label=None).reason == sources.MISSING_LABEL
    assert decide(png, label=None, rules=checks.Rules(labelled=False)).kept  # an unlabelled source
    assert decide(png, label=3).reason == sources.LABEL_OUT_OF_RANGE
    assert "label 3 is outside [0, 2]" in decide(png, label=3).detail
    assert decide(png, label=-2, rules=checks.Rules()).reason == sources.LABEL_OUT_OF_RANGE
    assert decide(png, label=12345, rules=checks.Rules()).kept
    # An empty file is empty whatever its label.
    assert decide(b"", label=None).reason == sources.EMPTY_FILE


def test_the_decoder_and_the_cap_are_the_same_eagerly_and_in_tf_data():
    encoded = [fx.png(0, (30, 40, 3)), fx.cmyk_jpeg(1), fx.gray16_png(2), fx.encode(fx.smooth(200, 100), "JPEG")]
    dataset = tf.data.Dataset.from_tensor_slices(encoded).map(lambda e: checks.cap_image_side(checks.decode_image(e), 64))
    for graph, data_bytes in zip(dataset.as_numpy_iterator(), encoded):
        eager = checks.cap_image_side(checks.decode_image(data_bytes), 64).numpy()
        np.testing.assert_array_equal(graph, eager)
    assert [image.shape for image in dataset.as_numpy_iterator()] == [(30, 40, 3), (8, 8, 3), (8, 8, 3), (64, 32, 3)]
    large = checks.cap_image_side(np.zeros((2000, 3000, 3), np.uint8), 512)
    assert large.shape == (341, 512, 3)  # the aspect ratio kept, rounded
    assert checks.cap_image_side(np.zeros((5, 5, 3), np.uint8), None).shape == (5, 5, 3)


# ------------------------------------------------------------------------- report


def report_of(*entries):
    report = checks.CheckReport()
    for split, reason, name in entries:
        candidate = sources.Candidate(split, 0, name, 1, data=b"x")
        report.add(split, checks.Decision(candidate, reason, "why" if reason else ""))
    return report


def test_report_gate_at_and_above_the_limit():
    report = report_of(*[("train", None, f"ok{i}") for i in range(99)], ("test", sources.EMPTY_FILE, "e"))
    report.enforce(0.01)  # exactly at the limit passes
    report.merge(report_of(("train", sources.CORRUPT_IMAGE, "c")))
    with pytest.raises(checks.BadDataError) as error:
        report.enforce(0.01, where="data.path")
    message = str(error.value)
    assert message.startswith("data.path: dropped 2 of 101 records (1.98%), more than data.max_bad_fraction=1.00%")
    assert "empty_file=1, corrupt_image=1" in message and "First: c (corrupt_image: why); e (empty_file: why)" in message
    assert "\n" not in message
    everything = report_of(("train", sources.EMPTY_FILE, "e"))
    with pytest.raises(checks.BadDataError, match="every record was dropped"):
        everything.enforce(1.0)


def test_first_dropped_records_do_not_depend_on_the_order_of_merging():
    parts = [report_of(("train", sources.EMPTY_FILE, f"f{i:03d}")) for i in range(120)]
    forward, backward = checks.CheckReport(), checks.CheckReport()
    for part in parts:
        forward.merge(part)
    for part in reversed(parts):
        backward.merge(part)
    assert forward.first_dropped() == backward.first_dropped()
    assert [d["record"] for d in forward.first_dropped()] == [f"f{i:03d}" for i in range(checks.FIRST_DROPPED)]
    again = checks.CheckReport.from_dict(forward.to_dict())
    assert again.to_dict() == forward.to_dict() and again.reasons() == {"empty_file": 120}


# -------------------------------------------------------------------- the check pass


def test_the_check_pass_is_cached_by_fingerprint(tmp_path, monkeypatch):
    folder = bad_folder(tmp_path)
    cfg = DataConfig(source="folder", path=folder, holdout_examples=6, max_bad_fraction=0.5,
                     check_cache_dir=str(tmp_path / "cache"))
    first = checks.check_source(cfg)
    assert first.report.reasons() == fx.dropped_by_reason()
    assert len(glob.glob(str(tmp_path / "cache" / "checks" / "*.json"))) == 1
    # A new process (memo forgotten) reads the cache instead of decoding the images again.
    checks.clear_memo()
    monkeypatch.setattr(checks, "run_check", lambda *a, **k: pytest.fail("the cached check was not used"))
    again = checks.check_source(cfg)
    assert again.dropped == first.dropped and again.report.to_dict() == first.report.to_dict()
    # A changed file is a new fingerprint: checked afresh.
    fx.write(os.path.join(folder, "class_2", "new.png"), fx.png(77))
    sources.clear_caches()
    checks.clear_memo()
    with pytest.raises(pytest.fail.Exception, match="the cached check was not used"):
        checks.check_source(cfg)


def test_dropped_records_are_skipped_and_the_splits_keep_their_positions(tmp_path):
    folder = bad_folder(tmp_path)
    cfg = DataConfig(source="folder", path=folder, holdout_examples=6, max_bad_fraction=0.5)
    check = checks.check_source(cfg)
    listing = sources.list_folder(folder)
    bad = {os.path.join(folder, n) for n, (status, _) in fx.BAD_FILES.items() if status == "dropped"}
    for split in ("train", "test"):
        all_positions = sources.split_positions(cfg, split, len(listing.files))
        kept = check.kept_positions(cfg, split)
        assert list(kept) == [p for p in all_positions if listing.files[p] not in bad]
        assert data.num_examples(cfg, split) == len(kept)
    images = list(data.load_split(cfg, "train").as_numpy_iterator())
    assert len(images) == data.num_examples(cfg, "train")
    assert fx.LARGE_SHAPE in {e["image"].shape for e in images} | {
        e["image"].shape for e in data.load_split(cfg, "test").as_numpy_iterator()
    }


# ------------------------------------------------------------------- entry points


def test_fit_users_get_one_clear_error_above_the_limit(tmp_path):
    cfg = config.load(SMOKE, ["data.source=folder", f"data.path={bad_folder(tmp_path)}", "data.holdout_examples=6"])
    with pytest.raises(checks.BadDataError, match=r"^data.path: dropped 7 of 39 records"):
        data.make_pretraining_dataset(cfg)


def test_byol_tf_train_and_eval_stop_in_one_line_naming_the_counts(tmp_path, capsys):
    folder = bad_folder(tmp_path)
    settings = ["--set", "data.source=folder", "--set", f"data.path={folder}", "--set", "data.holdout_examples=6"]
    assert cli.main(["train", "--config", SMOKE, "--run-dir", str(tmp_path / "run"), *settings]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("byol-tf train: error: data.path: dropped 7 of 39 records (17.95%)")
    assert "empty_file=1, not_an_image=3, corrupt_image=2, missing_label=1" in err[-1]
    assert not any("Traceback" in line for line in err)
    encoder = str(tmp_path / "encoder.keras")
    from byol_tf import networks

    networks.build_encoder(config.load(SMOKE).network, 28).save(encoder)
    assert cli.main(["eval", "--encoder", encoder, "--config", SMOKE, *settings]) == 2
    assert "byol-tf eval: error: data.path: dropped 7 of 39 records" in capsys.readouterr().err


@pytest.mark.slow
def test_byol_tf_train_skips_bad_files_below_the_limit_and_trains(tmp_path, capsys):
    folder = bad_folder(tmp_path)
    code = cli.main(
        ["train", "--config", SMOKE, "--run-dir", str(tmp_path / "run"), "--no-eval", "--set", "train.verbose=0",
         "--set", "data.source=folder", "--set", f"data.path={folder}", "--set", "data.holdout_examples=6",
         "--set", "data.max_bad_fraction=0.2", "--set", "data.batch_size=8", "--set", "data.cache=false"]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "skipping" in captured.err and "truncated.jpg (corrupt_image" in captured.err
    assert os.path.isfile(tmp_path / "run" / "encoder.keras")


@pytest.mark.slow
def test_byol_tf_train_on_tfrecords_with_the_common_keys_needs_no_setting(tmp_path, capsys):
    records = fx.coloured_records(str(tmp_path / "records"))
    code = cli.main(
        ["train", "--config", SMOKE, "--run-dir", str(tmp_path / "run"), "--set", "train.verbose=0",
         "--set", "data.source=tfrecord", "--set", f"data.path={records}",
         "--set", "data.holdout_examples=12", "--set", "data.batch_size=12", "--set", "evaluation.linear_epochs=2"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "36 train / 12 test images, 3 classes" in out
