"""TensorBoard's Embedding Projector for a BYOL encoder: held-out images placed by their embeddings.

`write(log_dir, embeddings, labels, images)` writes one TensorBoard run folder that the
projector tab reads (`tensorboard --logdir RUN_DIR/logs`, run `embeddings`):

    events.out.tfevents.*    a one-line text summary: TensorBoard lists only folders with
                             event files as runs, and the projector looks in runs
    projector_config.pbtxt   which tensor, metadata and sprite belong together
    embedding.ckpt-1.*       the embeddings as a variable of a TF2 checkpoint (+ `checkpoint`)
    metadata.tsv             one label per embedding, in the same order (no header: one column)
    sprite.png               thumbnails of the images, row-major in a square grid, same order

Nothing here is BYOL's projection head (`networks.build_mlp(name="projector")`); the name
is TensorBoard's. The folder is built under a temporary name and renamed into place, so
TensorBoard never reads a checkpoint without its sprite.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from byol_tf import fileio

RUN_NAME = "embeddings"  # the run folder under logs/, and its name in TensorBoard
CONFIG_FILE = "projector_config.pbtxt"  # tensorboard.plugins.projector's file name
METADATA_FILE = "metadata.tsv"
SPRITE_FILE = "sprite.png"
CHECKPOINT_PREFIX = "embedding.ckpt"
# The checkpoint key of `tf.train.Checkpoint(embedding=variable)`'s variable.
TENSOR_NAME = "embedding/.ATTRIBUTES/VARIABLE_VALUE"
# The projector's WebGL texture holds sprites up to 8192 px a side; thumbnails above
# 64 px add bytes, not legibility, at the size points are drawn.
MAX_SPRITE_SIDE = 8192
MAX_THUMBNAIL_SIDE = 64


def thumbnail_side(count: int, image_size: int) -> int:
    """Side of one sprite cell: the image size, capped so that `count` cells fit the sprite.

    Args:
        count: images in the sprite.
        image_size: side of the (square) images.

    Returns:
        min(image_size, 64, 8192 // ceil(sqrt(count))), at least 1.
    """
    columns = max(1, math.ceil(math.sqrt(count)))
    return max(1, min(image_size, MAX_THUMBNAIL_SIDE, MAX_SPRITE_SIDE // columns))


def sprite(images: np.ndarray, side: int) -> np.ndarray:
    """Thumbnails tiled into the projector's sprite: a square grid, row-major, unused cells black.

    Args:
        images: uint8 [N, H, W, 3] (N >= 1).
        side: thumbnail side; images are resized to side x side (area-averaged when shrunk).

    Returns:
        uint8 [G * side, G * side, 3] with G = ceil(sqrt(N)); image i sits in row i // G,
        column i % G.
    """
    images = np.asarray(images)
    if images.ndim != 4 or not len(images):
        raise ValueError(f"sprite: expected uint8 [N, H, W, 3] with N >= 1, got shape {images.shape}")
    columns = math.ceil(math.sqrt(len(images)))
    thumbnails = tf.image.resize(tf.cast(images, tf.float32), (side, side), method="area")
    thumbnails = np.clip(np.round(thumbnails.numpy()), 0, 255).astype(np.uint8)
    grid = np.zeros((columns * columns, side, side, images.shape[-1]), np.uint8)
    grid[: len(thumbnails)] = thumbnails
    # [G*G, s, s, C] -> [G, G, s, s, C] -> rows of cells -> [G*s, G*s, C]
    grid = grid.reshape(columns, columns, side, side, -1).transpose(0, 2, 1, 3, 4)
    return grid.reshape(columns * side, columns * side, -1)


def write(log_dir: str, embeddings: np.ndarray, labels: np.ndarray, images: np.ndarray) -> str:
    """Writes a projector run of `embeddings` with `labels` and `images` into `log_dir/embeddings`.

    Args:
        log_dir: the TensorBoard log folder (RUN_DIR/logs); any `tf.io.gfile` path.
        embeddings: float [N, d], one row per image.
        labels: int [N] (-1: unknown), shown as the points' metadata.
        images: uint8 [N, S, S, 3], shown as the points' thumbnails.

    Returns:
        The run folder written (replaced if it existed).

    Raises:
        ValueError: the three arrays disagree in length, or are empty.
    """
    from tensorboard.plugins import projector  # deferred: only runs that write one need it

    embeddings = np.asarray(embeddings, np.float32)
    labels = np.asarray(labels).reshape(-1)
    images = np.asarray(images)
    if not len(embeddings) or not len(embeddings) == len(labels) == len(images):
        raise ValueError(
            f"projector: need as many embeddings ({len(embeddings)}), labels ({len(labels)}) "
            f"and images ({len(images)}), at least one"
        )
    destination = fileio.join(log_dir, RUN_NAME)
    side = thumbnail_side(len(images), max(images.shape[1:3]))
    staging = fileio.staging_dir(destination)
    try:
        # save() also writes the `checkpoint` index, relative to the folder, which is how
        # the projector finds the tensor (no absolute path survives the rename).
        tf.train.Checkpoint(embedding=tf.Variable(embeddings)).save(fileio.join(staging, CHECKPOINT_PREFIX))
        fileio.write_text(fileio.join(staging, METADATA_FILE), "".join(f"{int(label)}\n" for label in labels))
        fileio.write_bytes(fileio.join(staging, SPRITE_FILE), tf.io.encode_png(sprite(images, side)).numpy())
        config = projector.ProjectorConfig()
        embedding = config.embeddings.add()
        embedding.tensor_name = TENSOR_NAME
        embedding.metadata_path = METADATA_FILE
        embedding.sprite.image_path = SPRITE_FILE
        embedding.sprite.single_image_dim.extend([side, side])
        projector.visualize_embeddings(staging, config)
        writer = tf.summary.create_file_writer(staging)
        with writer.as_default():
            tf.summary.text(
                "embedding_projector",
                f"{len(embeddings)} held-out images, {embeddings.shape[1]}-d: open the PROJECTOR tab",
                step=0,
            )
        writer.close()
        fileio.replace_dir(staging, destination)
    except BaseException:
        fileio.rmtree(staging)
        raise
    return destination
