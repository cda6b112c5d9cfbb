"""Tests for byol_tf.experiment (the one train -> evaluate -> export flow), the library's
independence from TFX, and the one I/O policy (every path through tf.io.gfile)."""

import json
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from byol_tf import config as config_lib
from byol_tf import experiment, fileio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")
TINY = ["train.epochs=1", "train.steps_per_epoch=2", "train.verbose=0", "train.log_images=2",
        "evaluation.linear_epochs=1", "evaluation.baselines=false"]

STANDALONE = textwrap.dedent(
    """
    import json, sys
    from byol_tf import config, experiment
    cfg = config.load(sys.argv[1], sys.argv[3:])
    result = experiment.run(cfg, run_dir=sys.argv[2])
    heavy = sorted(name for name in sys.modules
                   if name.split(".")[0] in ("tfx", "ml_metadata", "apache_beam", "tensorflow_data_validation"))
    print(json.dumps({"heavy": heavy, "export": result.export_dir, "evaluated": result.report is not None}))
    """
)


@pytest.mark.slow
def test_the_library_trains_evaluates_and_exports_without_importing_tfx(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", STANDALONE, SMOKE, str(tmp_path / "run"), *TINY],
        cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []  # nor Beam, ML Metadata or TFDV
    assert result["evaluated"] and os.path.isdir(result["export"])


def test_library_sources_never_import_the_pipeline_packages():
    # Dependencies point one way: library <- components <- pipeline.
    forbidden = re.compile(r"^\s*(import|from)\s+(tfx|byol_tfx|pipeline|components|apache_beam|ml_metadata)\b", re.M)
    folder = os.path.join(ROOT, "byol_tf")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            match = forbidden.search(open(os.path.join(folder, name), encoding="utf-8").read())
            assert match is None, f"byol_tf/{name}: {match.group(0).strip()}"


@pytest.mark.slow
def test_every_output_goes_through_tf_io_gfile(tmp_path, monkeypatch):
    # A file:// URL: tf.io.gfile writes it like gs://, while os / open() / shutil given the
    # same string would fail or create a folder named "file:" in the working directory.
    monkeypatch.chdir(tmp_path)
    cfg = config_lib.load(SMOKE, TINY)
    run_dir = f"file://{tmp_path}/run"
    result = experiment.run(cfg, run_dir=run_dir)
    assert sorted(os.listdir(tmp_path)) == ["run"]
    for name in ("config.yaml", "encoder.keras", "evaluation.json", "export/saved_model.pb", "export/metrics.json",
                 "export/encoder.keras", "export/config.yaml"):
        assert fileio.exists(fileio.join(run_dir, name)), name
    assert fileio.glob(fileio.join(run_dir, "logs", "*"))
    assert result.export_dir == fileio.join(run_dir, "export")
    metrics = fileio.read_json(fileio.join(run_dir, "export", "metrics.json"))
    assert set(metrics) == {"training", "steps_per_epoch", "evaluation"}
    assert np.isfinite(metrics["training"]["loss"])
    loaded = tf.saved_model.load(result.export_dir)
    images = np.random.default_rng(0).uniform(size=(2, 28, 28, 3)).astype(np.float32)
    np.testing.assert_allclose(
        loaded.signatures["embed_images"](images=tf.constant(images))["representation"],
        result.encoder(images, training=False),
        atol=1e-5,
    )
    # The config read back from the run folder is the one trained.
    assert config_lib.load(fileio.join(run_dir, "config.yaml")) == cfg


def test_fileio_write_is_atomic_and_replace_dir_swaps_whole_folders(tmp_path):
    path = str(tmp_path / "a" / "b.json")
    fileio.write_json(path, {"x": 1})
    assert fileio.read_json(path) == {"x": 1}
    assert sorted(os.listdir(tmp_path / "a")) == ["b.json"]  # no temporary left behind
    new = fileio.staging_dir(str(tmp_path / "out"))
    fileio.write_text(fileio.join(new, "v"), "1")
    fileio.replace_dir(new, str(tmp_path / "out"))
    newer = fileio.staging_dir(str(tmp_path / "out"))
    fileio.write_text(fileio.join(newer, "v"), "2")
    fileio.replace_dir(newer, str(tmp_path / "out"))
    assert fileio.read_text(str(tmp_path / "out" / "v")) == "2"
    assert sorted(os.listdir(tmp_path)) == ["a", "out"]  # staging and the old copy are gone


def test_a_crash_during_export_resumes_at_the_last_step_without_training_again(tmp_path, monkeypatch, caplog):
    from byol_tf import export

    # (Not train.deterministic: op determinism is process-wide and would outlive this test.)
    config = config_lib.load(SMOKE, [*TINY, "train.epochs=2", "data.batch_size=16"])
    run_dir = str(tmp_path / "run")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while exporting")

    class Record(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.steps, self.epochs = 0, []

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1

        def on_epoch_end(self, epoch, logs=None):
            self.epochs.append({name: float(value) for name, value in logs.items()})

    first = Record()
    with monkeypatch.context() as patch:
        patch.setattr(export, "export_encoder", crash)
        with pytest.raises(KeyboardInterrupt):
            experiment.run(config, run_dir=run_dir, evaluate=False, extra_callbacks=[first])
    # Training finished, and its last backup was kept for the rerun.
    assert tf.train.latest_checkpoint(os.path.join(run_dir, "backup")).endswith("ckpt-4")

    rerun = Record()
    with caplog.at_level("INFO", logger="byol_tf"):
        result = experiment.run(config, run_dir=run_dir, evaluate=False, extra_callbacks=[rerun])
    assert "resumed from backup at step 4 of 4" in caplog.text
    assert first.steps == 4 and rerun.steps == 0  # no step ran again
    # The history (and the exported metrics) still hold both epochs, from the backup.
    assert result.training.history == {name: [epoch[name] for epoch in first.epochs] for name in first.epochs[0]}
    assert result.metrics["training"] == first.epochs[-1] and "loss" in first.epochs[-1]
    assert os.path.isdir(result.export_dir)
    assert not os.path.exists(os.path.join(run_dir, "backup"))  # removed once the export is written
