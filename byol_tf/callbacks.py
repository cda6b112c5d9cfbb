"""Keras callbacks for BYOL runs: augmentation previews and a collapse monitor."""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf
from absl import logging


def view_pair_grid(view1: np.ndarray, view2: np.ndarray) -> np.ndarray:
    """Tiles N view pairs into one image: row i holds view1[i] then view2[i].

    Args:
        view1: [N, S, S, C] floats in [0, 1].
        view2: same shape as view1.

    Returns:
        [1, N*S, 2*S, C] float32, ready for `tf.summary.image`.
    """
    pairs = np.concatenate([view1, view2], axis=2)  # [N, S, 2S, C]
    return np.concatenate(list(pairs), axis=0)[None].astype(np.float32)


class ViewGridLogger(keras.callbacks.Callback):
    """Writes a grid of a few (view1, view2) pairs to TensorBoard when training starts.

    Lets a user see what the two augmentation distributions do to their images.
    """

    def __init__(self, dataset: tf.data.Dataset, log_dir: str, num_images: int = 8):
        super().__init__()
        self.dataset = dataset
        self.log_dir = log_dir
        self.num_images = num_images

    def on_train_begin(self, logs=None):
        if not self.num_images:
            return
        batch = next(iter(self.dataset.take(1)))
        view1 = np.asarray(batch["view1"][: self.num_images])
        view2 = np.asarray(batch["view2"][: self.num_images])
        writer = tf.summary.create_file_writer(self.log_dir + "/views")
        with writer.as_default():
            tf.summary.image("view_pairs", view_pair_grid(view1, view2), step=0)
        writer.close()


class CollapseGuard(keras.callbacks.Callback):
    """Warns (or stops) when the projections collapse.

    `collapse_std` (std over the batch of L2-normalised projections, averaged over
    dimensions) is about 1/sqrt(d) for healthy features and 0 for collapsed ones.

    Args:
        fraction: warn when collapse_std < fraction / sqrt(d).
        stop: also stop training when it happens.
    """

    def __init__(self, fraction: float = 0.1, stop: bool = False):
        super().__init__()
        self.fraction = fraction
        self.stop = stop
        self.collapsed_epochs = []

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get("collapse_std")
        if value is None:
            return
        dim = self.model.online_projector.output.shape[-1]
        threshold = self.fraction / math.sqrt(dim)
        if value < threshold:
            self.collapsed_epochs.append(epoch)
            logging.warning(
                "epoch %d: collapse_std %.4g < %.4g (healthy is about 1/sqrt(%d) = %.4g): "
                "the representation may be collapsing",
                epoch + 1, value, threshold, dim, 1 / math.sqrt(dim),
            )
            if self.stop:
                self.model.stop_training = True
