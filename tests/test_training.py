"""Tests for byol_tf.training and `byol-tf train` end to end on the smoke preset."""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from byol_tf import cli, config, schedules, training
from byol_tf.optimizers import LARS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")


def test_steps_per_epoch_and_batch_checks():
    cfg = config.load(SMOKE, ["train.steps_per_epoch=null", "data.batch_size=32"])
    assert training.steps_per_epoch(cfg, 100) == 3  # full batches only
    with pytest.raises(ValueError, match="larger than the 10 training images"):
        training.steps_per_epoch(cfg, 10)
    assert training.steps_per_epoch(config.load(SMOKE), 100) == 4  # the configured value wins


def test_build_optimizer_scales_the_learning_rate_by_batch():
    cfg = config.load(
        SMOKE,
        ["optimizer.base_learning_rate=0.4", "data.batch_size=64", "optimizer.warmup_epochs=1", "train.epochs=5"],
    )
    optimizer = training.build_optimizer(cfg, steps_per_epoch=10)
    assert isinstance(optimizer, LARS)
    schedule = optimizer._learning_rate
    assert isinstance(schedule, schedules.WarmupCosine)
    peak = 0.4 * 64 / 256
    np.testing.assert_allclose(float(schedule(10)), peak, rtol=1e-6)  # end of the one warm-up epoch
    np.testing.assert_allclose(float(schedule(5)), peak * 5 / 10, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(50)), 0.0, atol=1e-9)


@pytest.mark.slow
def test_cli_train_smoke_writes_config_logs_encoder_and_loss_falls(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    code = cli.main(
        ["train", "--config", SMOKE, "--run-dir", run_dir, "--no-eval", "--set", "train.epochs=3",
         "--set", "train.verbose=0"]
    )
    assert code == 0
    assert "encoder saved to" in capsys.readouterr().out
    saved = config.load(os.path.join(run_dir, "config.yaml"))
    assert saved == config.load(SMOKE, ["train.epochs=3", "train.verbose=0"])

    encoder = keras.models.load_model(os.path.join(run_dir, "encoder.keras"), compile=False)
    images = np.random.default_rng(0).uniform(size=(2, 28, 28, 3)).astype(np.float32)
    assert encoder(images).shape == (2, 256)

    scalars, images_logged, texts = {}, [], {}
    for path in glob.glob(os.path.join(run_dir, "logs", "**", "events.out.tfevents.*"), recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "images" or value.tag == "view_pairs":
                    images_logged.append(value.tag)
                elif value.metadata.plugin_data.plugin_name == "text":
                    texts[value.tag] = tf.make_ndarray(value.tensor).item().decode()
                else:
                    scalars.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
    assert "view_pairs" in images_logged
    # The Embedding Projector run of the held-out split (its event file makes it a run).
    assert texts["embedding_projector"].startswith("128 held-out images")
    assert os.path.isfile(os.path.join(run_dir, "logs", "embeddings", "projector_config.pbtxt"))
    for tag in ("epoch_loss", "epoch_tau", "epoch_learning_rate", "epoch_collapse_std", "epoch_probe_accuracy"):
        assert len(scalars[tag]) == 3, tag
    assert scalars["epoch_loss"][-1] < scalars["epoch_loss"][0]
    taus = scalars["epoch_tau"]
    assert taus == sorted(taus) and 0.99 <= taus[0] < 1.0
    assert all(value > 0.2 / np.sqrt(32) for value in scalars["epoch_collapse_std"])


def test_synchronized_batch_norm_only_with_several_replicas():
    cfg = config.load(SMOKE, ["network.sync_batchnorm=true"])

    class Replicas:
        def __init__(self, count):
            self.num_replicas_in_sync = count

    assert training.model_config(cfg, Replicas(1)).network.sync_batchnorm is False
    assert training.model_config(cfg, Replicas(2)).network.sync_batchnorm is True
    assert training.model_config(cfg, Replicas(1)).data == cfg.data


@pytest.mark.slow
def test_cli_output_is_progress_and_results_not_tensorflow_start_up_chatter(tmp_path):
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    out = subprocess.run(
        [sys.executable, "-m", "byol_tf.cli", "train", "--config", SMOKE, "--run-dir", str(tmp_path / "run"),
         "--no-eval", "--set", "train.verbose=0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = (out.stdout + out.stderr).splitlines()
    chatter = [line for line in lines if line.startswith(("WARNING: All log messages", "I0000", "W0000", "E0000"))]
    assert chatter == []
    assert lines[0].startswith("byol-tf: embedding projector: 128 held-out images in")
    assert lines[1].startswith("byol-tf: encoder saved to")


def test_smoke_fit_on_jpegs_with_augmentation_placed_on_the_device(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        os.makedirs(tmp_path / "images" / name)
        for index in range(20):
            image = rng.integers(0, 256, (int(rng.integers(30, 60)), int(rng.integers(30, 60)), 3), dtype=np.uint8)
            (tmp_path / "images" / name / f"{index}.jpg").write_bytes(tf.io.encode_jpeg(image).numpy())
    cfg = config.load(
        SMOKE,
        [f"data.path={tmp_path / 'images'}", "data.source=folder", "data.max_examples=null", "data.holdout_examples=8",
         "data.batch_size=8", "data.shuffle_buffer=64", "augment.placement=device", "train.steps_per_epoch=2",
         "train.verbose=0", "evaluation.projector_images=0"],
    )
    result = training.train(cfg, run_dir=str(tmp_path / "run"))
    assert len(result.history["loss"]) == 1 and np.isfinite(result.history["loss"][0])
    assert result.model.augment == cfg.augment
    assert glob.glob(str(tmp_path / "run" / "logs" / "views" / "events.out.tfevents.*"))  # views finished by the model


def test_smoke_training_through_a_tf_data_service_with_two_workers(tmp_path):
    from byol_tf import data

    dispatcher = tf.data.experimental.service.DispatchServer(tf.data.experimental.service.DispatcherConfig(port=0))
    address = dispatcher.target.split("://")[1]
    workers = [
        tf.data.experimental.service.WorkerServer(tf.data.experimental.service.WorkerConfig(dispatcher_address=address))
        for _ in range(2)
    ]
    cfg = config.load(
        SMOKE, [f"data.service_address={dispatcher.target}", "train.verbose=0", "evaluation.projector_images=0"]
    )
    batch = next(iter(data.make_pretraining_dataset(cfg)))
    assert batch["view1"].shape == (32, 28, 28, 3)
    result = training.train(cfg, run_dir=str(tmp_path / "run"))
    assert len(result.history["loss"]) == 1 and np.isfinite(result.history["loss"][0])
    for server in (*workers, dispatcher):
        server.stop()
