"""Tests for byol_tf.embedding_projector: sprite layout, cell size, and a run folder TensorBoard can read."""

import os

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorboard.plugins import projector

from byol_tf import embedding_projector


@pytest.mark.parametrize(
    "count, image_size, expected",
    [
        (1000, 28, 28),  # MNIST: cells at full size, 32 x 28 = 896 px
        (1000, 224, 64),  # ImageNet: capped at 64 px
        (10_000, 32, 32),  # 100 columns x 32 px = 3200 px
        (10_000, 224, 64),  # 100 x 64 = 6400 <= 8192
        (200_000, 224, 18),  # 448 columns: 8192 // 448 = 18
        (1, 8, 8),
    ],
)
def test_thumbnail_side_fits_the_sprite_limit(count, image_size, expected):
    side = embedding_projector.thumbnail_side(count, image_size)
    assert side == expected
    columns = int(np.ceil(np.sqrt(count)))
    assert columns * side <= embedding_projector.MAX_SPRITE_SIDE


def test_sprite_is_a_square_row_major_grid_with_black_padding(rng):
    images = rng.integers(0, 256, size=(7, 5, 5, 3), dtype=np.uint8)
    grid = embedding_projector.sprite(images, side=5)  # no resize: cells are the images
    assert grid.shape == (15, 15, 3) and grid.dtype == np.uint8  # ceil(sqrt(7)) = 3 columns
    for index in range(9):
        row, column = divmod(index, 3)
        cell = grid[row * 5 : (row + 1) * 5, column * 5 : (column + 1) * 5]
        expected = images[index] if index < 7 else np.zeros((5, 5, 3), np.uint8)
        np.testing.assert_array_equal(cell, expected, err_msg=f"cell {index}")


def test_sprite_shrinks_by_area_averaging():
    # 2x2 blocks of one value each: halving keeps exactly the block values.
    blocks = np.array([[0, 100], [200, 50]], np.uint8)
    image = np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1)
    image = np.repeat(image[None, ..., None], 3, axis=-1)
    np.testing.assert_array_equal(embedding_projector.sprite(image, side=2)[..., 0], blocks)


def test_sprite_rejects_an_empty_batch():
    with pytest.raises(ValueError, match="N >= 1"):
        embedding_projector.sprite(np.zeros((0, 4, 4, 3), np.uint8), 4)


def test_write_gives_a_consistent_projector_run(tmp_path, rng):
    count, size, dim = 10, 12, 6
    embeddings = rng.normal(size=(count, dim)).astype(np.float32)
    labels = np.arange(count) % 3
    images = rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)
    folder = embedding_projector.write(str(tmp_path / "logs"), embeddings, labels, images)
    assert folder == str(tmp_path / "logs" / embedding_projector.RUN_NAME)
    assert not [name for name in os.listdir(tmp_path / "logs") if name != "embeddings"]  # no staging left
    # An event file makes the folder a run, the only places the projector looks.
    assert any(name.startswith("events.out.tfevents.") for name in os.listdir(folder))

    config = projector.ProjectorConfig()
    with open(os.path.join(folder, embedding_projector.CONFIG_FILE)) as stream:
        text_format.Parse(stream.read(), config)
    (embedding,) = config.embeddings
    # The config points at files that exist in the folder, by relative paths.
    for relative in (embedding.metadata_path, embedding.sprite.image_path):
        assert not os.path.isabs(relative) and os.path.isfile(os.path.join(folder, relative))
    # The tensor the config names, in the checkpoint TensorBoard finds, is the embeddings.
    checkpoint = tf.train.latest_checkpoint(folder)
    assert checkpoint and checkpoint.startswith(folder)
    np.testing.assert_array_equal(tf.train.load_checkpoint(checkpoint).get_tensor(embedding.tensor_name), embeddings)
    # One metadata row per embedding, in order.
    with open(os.path.join(folder, embedding.metadata_path)) as stream:
        assert stream.read().splitlines() == [str(label) for label in labels]
    # The sprite is the grid of thumbnails of the declared size: 4 x 4 cells of 12 px.
    sprite = tf.io.decode_png(open(os.path.join(folder, embedding.sprite.image_path), "rb").read()).numpy()
    side = list(embedding.sprite.single_image_dim)
    assert side == [size, size]
    assert sprite.shape == (4 * size, 4 * size, 3)
    np.testing.assert_array_equal(sprite[size : 2 * size, :size], images[4])

    # Written again (a resumed run ends twice): replaced, still one folder.
    embedding_projector.write(str(tmp_path / "logs"), embeddings[:4], labels[:4], images[:4])
    with open(os.path.join(folder, embedding.metadata_path)) as stream:
        assert len(stream.read().splitlines()) == 4
    assert os.listdir(tmp_path / "logs") == ["embeddings"]


def test_write_rejects_mismatched_lengths(tmp_path):
    with pytest.raises(ValueError, match=r"embeddings \(3\), labels \(2\) and images \(3\)"):
        embedding_projector.write(
            str(tmp_path), np.zeros((3, 2)), np.zeros(2), np.zeros((3, 4, 4, 3), np.uint8)
        )
