"""Tests for scripts/readme_pictures.py: its pictures from event files laid out as a run writes them."""

import importlib.util
import os

import numpy as np
import tensorflow as tf
from PIL import Image

from byol_tf import monitoring

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("readme_pictures", os.path.join(ROOT, "scripts", "readme_pictures.py"))
readme_pictures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme_pictures)


def fake_run(root, pairs=4, side=6, epochs=5):
    """logs/views and logs/train as `byol-tf train` writes them (Keras logs epoch e at step e - 1)."""
    view1 = np.ones((pairs, side, side, 3), np.float32)  # white
    view2 = np.zeros((pairs, side, side, 3), np.float32)  # black
    with tf.summary.create_file_writer(os.path.join(root, "logs", "views")).as_default():
        tf.summary.image("view_pairs", monitoring.view_pair_grid(view1, view2), step=0)
    with tf.summary.create_file_writer(os.path.join(root, "logs", "train")).as_default():
        for step in range(epochs):
            tf.summary.scalar("epoch_loss", 2.0 / (step + 1), step=step)
            tf.summary.scalar("epoch_collapse_std", 0.07 + 0.002 * step, step=step)
            tf.summary.scalar("epoch_probe_accuracy", 0.1 * step, step=step)
            if step % 2:
                tf.summary.scalar("epoch_knn_accuracy", 0.5 + 0.1 * step, step=step)
    return str(root)


def test_events_are_read_back_by_tag(tmp_path):
    run = fake_run(tmp_path)
    scalars, _ = readme_pictures.read_events(os.path.join(run, "logs", "train"))
    assert [step for step, _ in scalars["epoch_knn_accuracy"]] == [1, 3]
    np.testing.assert_allclose([value for _, value in scalars["epoch_loss"]], [2.0, 1.0, 2 / 3, 0.5, 0.4], rtol=1e-6)


def test_view_pairs_are_laid_out_as_two_rows(tmp_path):
    run = fake_run(tmp_path, pairs=4, side=6)
    out = str(tmp_path / "views.png")
    readme_pictures.view_pairs(run, out)
    picture = np.asarray(Image.open(out).convert("L"))
    # 4 pairs of 6 px, scaled 3x: 72 x 36 px, after a 86 px label margin and a 4 px border.
    assert picture.shape == (36 + 8, 72 + 90)
    assert (picture[4:22, 86:158] == 255).all()  # view 1, white, above
    assert (picture[22:40, 86:158] == 0).all()  # view 2, black, below


def test_training_curves_are_three_charts(tmp_path):
    run = fake_run(tmp_path)
    out = str(tmp_path / "curves.png")
    readme_pictures.training_curves(run, out, projection_dim=128)
    picture = Image.open(out)
    assert picture.size == (3 * 360, 240)
    assert os.path.getsize(out) < 200_000
