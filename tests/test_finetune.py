"""Tests for byol_tf.finetune (the semi-supervised fine-tuning protocol) and `byol-tf eval --protocol finetune`."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from fixtures import models, synthetic

from byol_tf import augment, evaluation, finetune, networks
from byol_tf.config import AugmentConfig, Config, EvaluationConfig, NetworkConfig

# Crops of the whole image, no flips: augmentation that keeps a constant image constant.
WHOLE_IMAGE = dict(linear_crop_scale=(1.0, 1.0), linear_crop_ratio=(1.0, 1.0), linear_flip_prob=0.0)


def _config(image_size=16, **evaluation_overrides):
    settings = dict(finetune_epochs=1, finetune_batch_size=64, finetune_learning_rates=(0.5,), validation_fraction=0.2)
    settings.update(evaluation_overrides)
    return Config(
        augment=AugmentConfig(image_size=image_size),
        network=NetworkConfig(encoder="small_convnet", sync_batchnorm=False),
        evaluation=EvaluationConfig(**settings),
    )


def _dataset(images, labels):
    return tf.data.Dataset.from_tensor_slices({"image": images, "label": np.asarray(labels, np.int64)})


# ------------------------------------------------------------------------- the subset


def test_labelled_count_rounds_half_up_with_one_image_per_class():
    assert finetune.labelled_count(4000, 0.1, 10) == 400
    assert finetune.labelled_count(4000, 0.01, 10) == 40
    assert finetune.labelled_count(50, 0.01, 10) == 10  # round(0.5) would be 0: one per class instead
    assert finetune.labelled_count(250, 0.01, 2) == 3  # 2.5 rounds up, not to the even 2


def test_subset_is_balanced_seeded_nested_and_disjoint_from_validation():
    # Uneven classes: 300, 200, 100, 40 and 10 images.
    labels = np.repeat(np.arange(5), [300, 200, 100, 40, 10])
    labels = labels[np.random.default_rng(0).permutation(len(labels))]
    labelled, validation = finetune.finetuning_split(labels, 0.1, 0.1, seed=3)
    assert len(labelled) == 65 and len(set(labelled)) == 65
    # The validation part is the linear protocols' own, and the subset stays out of it.
    np.testing.assert_array_equal(validation, evaluation.validation_split(labels, 0.1, 3)[1])
    assert not set(labelled) & set(validation)
    # Balanced: 65 over 5 classes is 13 each, but the smallest class has only 10 - 1 = 9
    # images outside validation; the others share the remainder evenly.
    counts = np.bincount(labels[labelled], minlength=5)
    assert counts[4] == 9 and counts[:4].max() - counts[:4].min() <= 1 and counts.sum() == 65
    again, _ = finetune.finetuning_split(labels, 0.1, 0.1, seed=3)
    other, _ = finetune.finetuning_split(labels, 0.1, 0.1, seed=4)
    np.testing.assert_array_equal(labelled, again)
    assert set(other) != set(labelled)
    # One image per class at the smallest fraction; the subsets of one seed are nested.
    tiny, _ = finetune.finetuning_split(labels, 0.001, 0.1, seed=3)
    assert sorted(labels[tiny]) == [0, 1, 2, 3, 4] and set(tiny) <= set(labelled)
    # Fraction 1.0: every training image outside the validation part.
    everything, _ = finetune.finetuning_split(labels, 1.0, 0.1, seed=3)
    np.testing.assert_array_equal(everything, np.setdiff1d(np.arange(len(labels)), validation))
    with pytest.raises(ValueError, match=r"label fraction: 1\.5 is outside the allowed range \(0\.0, 1\.0\]"):
        finetune.finetuning_split(labels, 1.5, 0.1, seed=3)


class Recorder(keras.layers.Layer):
    """Passes images through and logs, at run time, which images it saw and in which mode."""

    log = []

    def call(self, images, training=None):
        # A constant image keeps its value under whole-image crops: the value names it.
        ids = tf.cast(tf.round(tf.reduce_mean(images, axis=[1, 2, 3]) * 255.0), tf.int64)
        mode = tf.constant(bool(training))
        done = tf.py_function(
            lambda seen, mode: Recorder.log.append((bool(mode.numpy()), seen.numpy().tolist())) or np.float32(0),
            [ids, mode],
            tf.float32,
        )
        with tf.control_dependencies([done]):
            return tf.identity(images)


def test_fine_tunes_on_the_subset_scores_validation_and_test_on_their_own_images():
    # Image i is constant at value 5 + 6 i (train) or 2 + 6 i (test): every image is named
    # by its value.
    train_ids, test_ids = 5 + 6 * np.arange(40), 2 + 6 * np.arange(12)
    train_labels, test_labels = np.arange(40) % 4, np.arange(12) % 4

    def images(values):
        return np.broadcast_to(values[:, None, None, None], (len(values), 8, 8, 3)).astype(np.uint8)

    inputs = keras.Input((8, 8, 3))
    encoder = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(Recorder()(inputs)))
    config = _config(image_size=8, finetune_epochs=2, finetune_batch_size=4, **WHOLE_IMAGE)
    Recorder.log = []
    report = finetune.evaluate(
        encoder, config, fractions=[0.25], baselines=False, progress=False,
        arrays=(images(train_ids), train_labels, images(test_ids), test_labels),
    )
    labelled, validation = finetune.finetuning_split(train_labels, 0.25, 0.2, seed=0)
    training = [ids for mode, ids in Recorder.log if mode]
    scoring = [ids for mode, ids in Recorder.log if not mode]
    # Two epochs over the labelled subset, in batches of 4, each epoch in a new order.
    first, second = sum(training[:3], []), sum(training[3:], [])
    assert [len(ids) for ids in training] == [4, 4, 2, 4, 4, 2]
    assert sorted(first) == sorted(second) == sorted(train_ids[labelled].tolist()) and first != second
    # Then the validation part and the test split, in order, in inference mode.
    assert sum(scoring, []) == train_ids[validation].tolist() + test_ids.tolist()
    row = report.rows[0.25]["byol"]
    assert (row["num_labelled"], row["num_validation"], row["num_test"]) == (10, len(validation), 12)


# ------------------------------------------------------------------------ fine-tuning


def test_fine_tuning_trains_a_copy_with_batchnorm_in_training_mode_and_leaves_the_encoder_alone():
    encoder = models.tiny_encoder()
    before = [weight.numpy().copy() for weight in encoder.weights]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(24, models.IMAGE, models.IMAGE, 3), dtype=np.uint8)
    classifier = finetune.fine_tune(
        encoder, _dataset(images, np.arange(24) % 3), 24, 3,
        image_size=models.IMAGE, view=evaluation.linear_view(EvaluationConfig()), epochs=2,
        batch_size=8, base_learning_rate=2.0, seed=0, shuffle_buffer=24,
    )
    for weight, value in zip(encoder.weights, before):
        np.testing.assert_array_equal(weight.numpy(), value, err_msg=weight.path)
    tuned = classifier.get_layer(encoder.name).weights
    assert [weight.path for weight in tuned] == [weight.path for weight in encoder.weights]
    for weight, value in zip(tuned, before):
        # Kernel, gamma and beta trained; the moving statistics moved, which only BatchNorm
        # in training mode does.
        assert np.abs(weight.numpy() - value).max() > 1e-4, weight.path
    head = classifier.get_layer(finetune.HEAD_NAME)
    assert head.kernel.shape == (4, 3) and np.abs(head.kernel.numpy()).max() > 0
    logits = classifier(augment.center_crop_resize(images[:5], models.IMAGE), training=False)
    assert logits.shape == (5, 3)


def test_learning_rate_is_chosen_on_validation_not_test(monkeypatch):
    """The model fine-tuned at 0.3 reads red, at 0.1 green; train says red, test says green.

    Validation (carved from train) must pick 0.3 although the test split would pick 0.1,
    and the chosen model itself is tested: no refit.
    """

    def reader(channel):
        # Class 1 when the channel's mean is above 0.5.
        inputs = keras.Input((16, 16, 3))
        dense = keras.layers.Dense(2)
        model = keras.Model(inputs, dense(keras.layers.GlobalAveragePooling2D()(inputs)))
        kernel = np.zeros((3, 2), np.float32)
        kernel[channel] = [-1.0, 1.0]
        dense.set_weights([kernel, np.array([0.5, -0.5], np.float32)])
        return model

    calls = []

    def fake_fine_tune(encoder, images, num_examples, num_classes, *, base_learning_rate, **kwargs):
        calls.append((num_examples, base_learning_rate))
        return reader(0 if base_learning_rate == 0.3 else 1)

    monkeypatch.setattr(finetune, "fine_tune", fake_fine_tune)
    train_labels, test_labels = np.tile([0, 1], 20), np.tile([0, 1], 5)
    arrays = (synthetic.channel_images(train_labels, 0), train_labels, synthetic.channel_images(test_labels, 1), test_labels)
    config = _config(finetune_learning_rates=(0.1, 0.3), validation_fraction=0.25)
    report = finetune.evaluate(
        synthetic.quadrant_encoder(), config, fractions=[0.5], arrays=arrays, baselines=False, progress=False
    )
    row = report.rows[0.5]["byol"]
    assert row["learning_rate"] == 0.3 and row["sweep"] == {0.1: 0.0, 0.3: 1.0} and row["val_top1"] == 1.0
    assert row["top1"] == 0.0  # the test split would have preferred 0.1
    assert calls == [(20, 0.1), (20, 0.3)]


def test_a_pretrained_encoder_fine_tunes_better_than_random_init_at_the_same_budget():
    images, labels = synthetic.quadrant_images(600)
    config = _config(finetune_epochs=3, finetune_learning_rates=(1.0,), **WHOLE_IMAGE)
    # "Pretrained": the config's small_convnet fine-tuned on 400 labelled quadrant images.
    keras.utils.set_random_seed(5)
    scratch = networks.build_encoder(config.network, 16)
    pretraining = finetune.fine_tune(
        scratch, _dataset(images[:400], labels[:400]), 400, 4, image_size=16,
        view=evaluation.linear_view(config.evaluation), epochs=6, batch_size=64, base_learning_rate=1.0,
        seed=1, shuffle_buffer=400,
    )
    pretrained = pretraining.get_layer(scratch.name)
    # Then both encoders get 5% of another 400 images' labels (20), for 3 epochs.
    arrays = (images[200:], labels[200:], images[:200], labels[:200])
    report = finetune.evaluate(pretrained, config, fractions=[0.05], arrays=arrays, progress=False)
    byol, random_init = report.rows[0.05]["byol"], report.rows[0.05]["random_init"]
    assert byol["num_labelled"] == random_init["num_labelled"] == 20
    assert byol["top1"] >= 0.9 and byol["top1"] >= random_init["top1"] + 0.3, report.format_table()


# ----------------------------------------------------------------------------- report


def _row(top1, val_top1, learning_rate=0.1):
    return {
        "top1": top1, "top5": 1.0, "val_top1": val_top1, "learning_rate": learning_rate,
        "sweep": {learning_rate: val_top1}, "epochs": 30, "batch_size": 64, "label_fraction": 0.1,
        "num_labelled": 400, "num_validation": 400, "num_test": 1000, "seconds": 1.0,
    }


def test_report_table_json_and_metric_values():
    report = finetune.FinetuneReport(
        rows={0.01: {"byol": _row(0.9, 0.8), "random_init": _row(0.5, 0.4)}, 0.1: {"byol": _row(0.97, 0.96, 0.05)}},
        num_classes=10, num_train=4000, num_validation=400, num_test=1000,
    )
    table = report.format_table().splitlines()
    assert "4000 train / 1000 test images" in table[0] and "400-image validation part" in table[0]
    assert [line.split()[:3] for line in table[3:]] == [
        ["1%", "byol", "90.00"], ["1%", "random_init", "50.00"], ["10%", "byol", "97.00"]
    ]
    assert table[5].split()[4:] == ["96.00", "0.05", "30", "400"]  # val, lr, epochs, labelled
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["protocol"] == "finetune" and list(as_dict["rows"]) == ["0.01", "0.1"]
    assert as_dict["rows"]["0.1"]["byol"]["sweep"] == {"0.05": 0.96}
    assert report.metric_values()["finetune_0.01_random_init_val_top1"] == 0.4
    assert len(report.metric_values()) == 3 * 3


# ----------------------------------------------------------------------------- CLI


def test_cli_eval_finetune_prints_the_table_and_writes_json(tmp_path, capsys):
    from byol_tf import cli

    config_path = tmp_path / "digits.yaml"
    config_path.write_text(
        "data: {source: digits, max_examples: 240, holdout_examples: 80}\n"
        "augment: {image_size: 8}\n"
        "network: {encoder: small_convnet, sync_batchnorm: false}\n"
        "evaluation: {finetune_epochs: 1, finetune_learning_rates: [0.5], finetune_label_fractions: [0.5]}\n"
    )
    encoder_path = str(tmp_path / "encoder.keras")
    models.tiny_encoder().save(encoder_path)
    out = str(tmp_path / "report" / "finetune.json")
    base = ["eval", "--encoder", encoder_path, "--config", str(config_path)]
    assert cli.main([*base, "--protocol", "finetune", "--label-fraction", "0.1", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "fine-tuning (finetune protocol): 160 train / 80 test images" in printed
    for name in ("byol", "random_init"):
        assert f"10% {name} " in printed
    with open(out) as stream:
        report = json.load(stream)
    assert list(report["rows"]) == ["0.1"] and list(report["rows"]["0.1"]) == ["byol", "random_init"]
    assert report["rows"]["0.1"]["byol"]["num_labelled"] == 16 and report["num_test"] == 80
    # Bad flags are one clear line naming what is wrong, not a traceback.
    assert cli.main([*base, "--label-fraction", "0.1"]) == 2
    assert "--label-fraction: only with --protocol finetune" in capsys.readouterr().err
    assert cli.main([*base, "--protocol", "finetune", "--label-fraction", "1.5"]) == 2
    assert "evaluation.finetune_label_fractions: 1.5 is outside" in capsys.readouterr().err
