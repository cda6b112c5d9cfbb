"""Tests for byol_tf.embed and `byol-tf embed`: serving-equal embeddings, keys, the format, kill and resume."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from fixtures import exports
from fixtures import images as fx

from byol_tf import cli, data, embed, fileio
from byol_tf import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST5K = os.path.join(ROOT, "configs", "mnist5k.yaml")
PART_ROWS = 300


@pytest.fixture(scope="module")
def mnist_export(tmp_path_factory):
    return exports.export_random_encoder(str(tmp_path_factory.mktemp("model") / "export"))


@pytest.fixture(scope="module")
def mnist_test_embeddings(mnist_export, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("embeddings") / "mnist_test")
    embed.embed_split(mnist_export, config_lib.load(MNIST5K), "test", out, batch_size=128, part_rows=PART_ROWS, progress=False)
    return out


def test_mnist5k_test_split_equals_serving_default_on_the_png_bytes(mnist_export, mnist_test_embeddings):
    result = embed.read(mnist_test_embeddings)
    images, labels = data.load_arrays(config_lib.load(MNIST5K).data, "test")
    assert len(result.keys) == len(images) == 1000
    assert result.keys.tolist() == [str(index) for index in range(1000)]
    np.testing.assert_array_equal(result.labels, labels)

    serve = tf.saved_model.load(mnist_export).signatures["serving_default"]
    encoded = [fx.encode(image) for image in images]
    expected = np.concatenate(
        [serve(image_bytes=tf.constant(encoded[start : start + 250]))["embedding"].numpy() for start in range(0, 1000, 250)]
    )
    np.testing.assert_allclose(result.embeddings, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, rtol=1e-5)

    manifest = result.manifest
    assert (manifest["count"], manifest["dimension"], manifest["split"], manifest["key"]) == (1000, 256, "test", "index")
    assert manifest["model"] == mnist_export and manifest["image_size"] == 28
    assert config_lib.from_dict(manifest["config"]) == config_lib.load(MNIST5K)
    assert [part["rows"] for part in manifest["parts"]] == [300, 300, 300, 100]
    assert sorted(os.listdir(mnist_test_embeddings)) == ["_manifest.json"] + [f"part-0000{i}.parquet" for i in range(4)]
    assert not os.path.exists(embed.partial_dir(mnist_test_embeddings))


def test_pandas_and_tf_data_read_the_folder(mnist_test_embeddings):
    result = embed.read(mnist_test_embeddings)
    frame = pd.read_parquet(mnist_test_embeddings)  # the whole folder, no byol-tf code
    assert list(frame.columns) == ["key", "label", "embedding"] and len(frame) == 1000
    np.testing.assert_array_equal(np.stack(frame["embedding"].to_numpy()), result.embeddings)
    np.testing.assert_array_equal(frame["label"].to_numpy(), result.labels)

    rows = list(embed.dataset(mnist_test_embeddings).batch(400).as_numpy_iterator())
    assert [len(batch["key"]) for batch in rows] == [400, 400, 200]
    np.testing.assert_array_equal(np.concatenate([batch["embedding"] for batch in rows]), result.embeddings)
    assert rows[0]["key"][3] == b"3" and rows[0]["label"].dtype == np.int64


def test_count_rows_reads_the_parquet_footer(mnist_test_embeddings, tmp_path):
    counts = [embed.count_rows(path) for path in embed.part_paths(mnist_test_embeddings)]
    assert counts == [300, 300, 300, 100]
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_bytes(b"0123456789abcdef")
    with pytest.raises(ValueError, match="is not a Parquet file"):
        embed.count_rows(str(not_parquet))


def test_a_folder_source_is_keyed_by_file_path(tmp_path):
    folder = fx.clean_folder(str(tmp_path / "images"), classes=3, per_class=4)
    model = exports.export_random_encoder(str(tmp_path / "export"), image_size=16)
    cfg = config_lib.from_dict({"data": {"source": "folder", "path": folder, "holdout_examples": 5}})
    out = str(tmp_path / "out")
    manifest = embed.embed_split(model, cfg, "test", out, batch_size=2, part_rows=3, progress=False)
    result = embed.read(out)
    assert manifest["key"] == "path" and manifest["count"] == 5 and manifest["image_size"] == 16
    assert result.keys.tolist() == data.split_paths(cfg.data, "test").tolist()
    serve = tf.saved_model.load(model).signatures["serving_default"]
    for key, label, embedding in zip(result.keys, result.labels, result.embeddings):
        assert label == int(os.path.basename(os.path.dirname(key)).split("_")[1])
        direct = serve(image_bytes=tf.constant([open(key, "rb").read()]))["embedding"].numpy()[0]
        np.testing.assert_allclose(embedding, direct, atol=1e-5)


def test_resolve_export_accepts_export_run_and_tfx_folders(tmp_path, mnist_export):
    assert embed.resolve_export(mnist_export) == mnist_export
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(mnist_export, run / "export")
    assert embed.resolve_export(str(run)) == str(run / "export")
    artifact = tmp_path / "model"
    artifact.mkdir()
    os.symlink(mnist_export, artifact / "Format-Serving")
    assert embed.resolve_export(str(artifact)) == str(artifact / "Format-Serving")
    with pytest.raises(ValueError, match=r"^model: .* is not an encoder export"):
        embed.resolve_export(str(tmp_path))


def test_an_existing_output_is_kept_unless_overwrite(tmp_path, mnist_export):
    out = tmp_path / "out"
    out.mkdir()
    cfg = config_lib.load(MNIST5K, ["data.max_examples=40", "data.holdout_examples=10"])
    with pytest.raises(ValueError, match="already exists"):
        embed.embed_split(mnist_export, cfg, "test", str(out), progress=False)
    assert embed.embed_split(mnist_export, cfg, "test", str(out), overwrite=True, progress=False)["count"] == 10


def test_parts_of_another_request_are_not_reused(tmp_path, mnist_export, caplog):
    cfg = config_lib.load(MNIST5K, ["data.max_examples=60", "data.holdout_examples=20"])
    out = str(tmp_path / "out")
    partial = embed.partial_dir(out)
    os.makedirs(partial)
    fileio.write_json(os.path.join(partial, embed.REQUEST_FILE), {"model": "another"})
    embed.write_table(os.path.join(partial, "part-00000.parquet"), embed.to_table(["x"], [7], np.ones((1, 256))))
    with caplog.at_level("INFO", logger="byol_tf"):
        manifest = embed.embed_split(mnist_export, cfg, "test", out, batch_size=8, part_rows=8, progress=False)
    assert "belongs to another request" in caplog.text
    result = embed.read(out)
    # The stale part (key "x") was dropped, not taken as the first 8 rows.
    assert manifest["count"] == 20 and result.keys.tolist() == [str(i) for i in range(20)]


def test_bad_input_is_one_line_naming_the_flag(tmp_path, capsys):
    code = cli.main(["embed", "--model", str(tmp_path), "--config", MNIST5K, "--out", str(tmp_path / "out")])
    assert code == 2
    assert capsys.readouterr().err.startswith("byol-tf embed: error: model: ")
    with pytest.raises(ValueError, match="no _manifest.json"):
        embed.read(str(tmp_path))


# ------------------------------------------------------------------ kill and resume

KILL_PART_ROWS, KILL_BATCH = 50, 25


def _embed_command(model, out):
    return [
        sys.executable, "-m", "byol_tf.cli", "embed", "--model", model, "--config", MNIST5K, "--split", "test",
        "--out", out, "--batch-size", str(KILL_BATCH), "--part-rows", str(KILL_PART_ROWS),
    ]


@pytest.mark.slow
def test_killed_half_way_then_rerun_leaves_no_partial_output_and_ends_equal(tmp_path, mnist_export, mnist_test_embeddings):
    out = str(tmp_path / "out")
    partial = embed.partial_dir(out)
    total_parts = 1000 // KILL_PART_ROWS
    kill_after = int(np.random.default_rng(12).integers(2, total_parts // 2))  # the seeded moment
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    process = subprocess.Popen(_embed_command(mnist_export, out), cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watchdog = threading.Timer(300, process.kill)
    watchdog.start()
    try:
        while process.poll() is None:
            parts = [name for name in os.listdir(partial) if name.endswith(".parquet")] if os.path.isdir(partial) else []
            if len(parts) >= kill_after:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        status = process.wait(timeout=30)
    finally:
        watchdog.cancel()
    assert status == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    # Nothing where readers look; the finished parts are kept aside.
    assert not os.path.exists(out)
    kept = sorted(name for name in os.listdir(partial) if name.endswith(".parquet"))
    assert kill_after <= len(kept) < total_parts
    assert kept == [f"part-{index:05d}.parquet" for index in range(len(kept))]  # whole files only

    rerun = subprocess.run(_embed_command(mnist_export, out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming after {len(kept)} finished parts ({len(kept) * KILL_PART_ROWS} of 1000 images)" in rerun.stdout
    assert not os.path.exists(partial)

    resumed, uninterrupted = embed.read(out), embed.read(mnist_test_embeddings)
    assert resumed.manifest["count"] == 1000 and len(resumed.manifest["parts"]) == total_parts
    assert resumed.keys.tolist() == uninterrupted.keys.tolist()
    np.testing.assert_array_equal(resumed.labels, uninterrupted.labels)
    np.testing.assert_allclose(resumed.embeddings, uninterrupted.embeddings, atol=1e-6, rtol=0)
