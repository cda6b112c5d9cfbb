"""Tests for byol_tf.neighbours and `byol-tf neighbours`: exact search against numpy, HNSW against exact,
thumbnails for every key kind, the picture, and BYOL's neighbours against random init's on MNIST-5k."""

import os

import numpy as np
import pytest
import tensorflow as tf
from fixtures import exports
from fixtures import images as fx
from PIL import Image

from byol_tf import cli, data, embed, neighbours
from byol_tf import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST5K = os.path.join(ROOT, "configs", "mnist5k.yaml")


def numpy_top_k(queries, collection, k):
    """Reference: cosine similarities of every pair, a stable sort (ties: lower row first)."""
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    collection = collection / np.linalg.norm(collection, axis=1, keepdims=True)
    similarity = queries @ collection.T
    rows = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(similarity, rows, axis=1), rows


def clustered(rng, count=600, dim=16, clusters=12):
    centres = rng.normal(size=(clusters, dim))
    labels = rng.integers(0, clusters, count)
    return (centres[labels] + 0.3 * rng.normal(size=(count, dim))).astype(np.float32), labels


@pytest.mark.parametrize("chunk_rows", [1, 7, 100, 1000])
def test_exact_search_matches_numpy_for_any_chunking(rng, chunk_rows):
    collection, _ = clustered(rng, count=250)
    collection[40] = collection[3] * 2.0  # the same direction twice: a tie, lower row first
    queries = np.concatenate([collection[[3]], rng.normal(size=(4, 16)).astype(np.float32)])
    chunks = [collection[start : start + chunk_rows] for start in range(0, len(collection), chunk_rows)]
    scores, rows = neighbours.exact_search(queries, chunks, k=9)
    expected_scores, expected_rows = numpy_top_k(queries, collection, 9)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    assert rows[0, :2].tolist() == [3, 40]


def test_exact_search_returns_the_whole_collection_when_k_is_larger(rng):
    collection = rng.normal(size=(5, 4)).astype(np.float32)
    scores, rows = neighbours.exact_search(collection[:2], [collection[:3], collection[3:]], k=50)
    assert rows.shape == (2, 5) and sorted(rows[0]) == [0, 1, 2, 3, 4]
    assert np.all(np.diff(scores, axis=1) <= 1e-7)
    with pytest.raises(ValueError, match="k: must be at least 1"):
        neighbours.exact_search(collection, [collection], k=0)


def test_hnsw_agrees_with_exact_search_on_a_small_set(rng):
    pytest.importorskip("faiss")
    collection, _ = clustered(rng, count=2000, dim=32, clusters=20)
    queries = collection[rng.choice(len(collection), 50, replace=False)] + 0.05 * rng.normal(size=(50, 32)).astype(np.float32)
    exact_scores, exact_rows = neighbours.exact_search(queries, [collection], k=10)
    approximate_scores, approximate_rows = neighbours.hnsw_search(neighbours.build_hnsw(collection), queries, k=10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate_rows, exact_rows)])
    assert recall >= 0.95
    np.testing.assert_array_equal(approximate_rows[:, 0], exact_rows[:, 0])
    np.testing.assert_allclose(approximate_scores[:, 0], exact_scores[:, 0], atol=1e-5)


def test_label_agreement():
    assert neighbours.label_agreement([1, 2], [[1, 1, 0], [2, 0, 0]]) == pytest.approx(3 / 6)
    assert neighbours.label_agreement(np.array([4]), np.array([[4, 4]])) == 1.0


def write_folder(directory, embeddings, labels, part_rows, key=embed.KEY_INDEX):
    """An embeddings folder as `byol-tf embed` lays it out, from arrays."""
    parts = []
    for index, start in enumerate(range(0, len(embeddings), part_rows)):
        name = embed.PART_TEMPLATE.format(index)
        rows = slice(start, start + part_rows)
        keys = [str(i) for i in range(start, min(start + part_rows, len(embeddings)))]
        embed.write_table(os.path.join(directory, name), embed.to_table(keys, labels[rows], embeddings[rows]))
        parts.append((name, len(keys)))
    manifest = embed.manifest(
        model="unused", config=config_lib.Config(), split="test", dimension=embeddings.shape[1], image_size=8,
        key=key, parts=parts,
    )
    embed.fileio.write_json(os.path.join(directory, embed.MANIFEST_FILE), manifest)
    return directory


def test_search_streams_the_parts_and_keeps_keys_and_labels(tmp_path, rng):
    collection, labels = clustered(rng, count=230)
    directory = write_folder(str(tmp_path / "emb"), collection, labels, part_rows=60)
    queries = rng.normal(size=(3, 16)).astype(np.float32)
    found = neighbours.search(directory, queries, k=6, chunk_rows=25)
    _, expected_rows = numpy_top_k(queries, collection, 6)
    np.testing.assert_array_equal(found.rows, expected_rows)
    np.testing.assert_array_equal(found.labels, labels[expected_rows])
    assert found.keys.tolist() == expected_rows.astype(str).tolist()
    with pytest.raises(ValueError, match="index: 'lsh' is not one of"):
        neighbours.search(directory, queries, index="lsh")


def test_the_hnsw_index_is_kept_in_the_folder_and_readers_skip_it(tmp_path, rng):
    pytest.importorskip("faiss")
    import pandas as pd

    collection, labels = clustered(rng, count=300)
    directory = write_folder(str(tmp_path / "emb"), collection, labels, part_rows=100)
    first = neighbours.search(directory, collection[:5], k=4, index="hnsw")
    assert os.path.isfile(os.path.join(directory, neighbours.HNSW_FILE))
    again = neighbours.search(directory, collection[:5], k=4, index="hnsw")  # read back
    np.testing.assert_array_equal(first.rows, again.rows)
    assert first.rows[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert len(pd.read_parquet(directory)) == 300


def test_grid_has_one_row_per_query_and_a_cell_per_neighbour():
    image = np.full((28, 28, 3), 200, np.uint8)
    picture = neighbours.grid(
        [image, image], ["query\na.png", "query\nb.png"], [[image] * 3, [image] * 3], [["1 · 0.9\nx"] * 3] * 2, side=40
    )
    width, height = picture.size
    pixels = np.asarray(picture)
    assert width > 4 * 40 and height > 2 * 40
    # Thumbnails sit where the layout puts them (grey 200), the query framed in red.
    assert (pixels[10:40, width - 30] == 200).all()
    assert tuple(pixels[2, 10]) == (220, 60, 40)


# ------------------------------------------------------------------ thumbnails and the command


@pytest.fixture(scope="module")
def small_mnist(tmp_path_factory):
    """A random-init export and the embeddings of 40 held-out MNIST-5k digits."""
    root = tmp_path_factory.mktemp("neighbours")
    model = exports.export_random_encoder(str(root / "export"))
    config = config_lib.load(MNIST5K, ["data.max_examples=200", "data.holdout_examples=40"])
    out = str(root / "emb")
    embed.embed_split(model, config, "test", out, part_rows=16, progress=False)
    return config, out


def test_thumbnails_of_split_positions_are_the_held_out_images(small_mnist):
    config, directory = small_mnist
    images, _ = data.load_arrays(config.data, "test")
    manifest = embed.read_manifest(directory)
    found = neighbours.thumbnails(manifest, [7, 0, 7], ["7", "0", "7"])
    for row, thumbnail in zip([7, 0, 7], found):
        np.testing.assert_array_equal(thumbnail, images[row])  # 28 px digits: the crop keeps them whole


def test_thumbnails_of_file_paths_and_of_tfrecord_records(tmp_path):
    side = 12
    path = fx.write(str(tmp_path / "a" / "one.png"), fx.png(5, (20, side, 3)))
    manifest = {"image_size": side, "key": embed.KEY_PATH}
    (from_path,) = neighbours.thumbnails(manifest, [0], [path])
    np.testing.assert_array_equal(from_path, neighbours.as_encoder_input(fx.pixels(5, (20, side, 3)), side))

    records = [fx.tf_example(fx.png(index, (side, side, 3)), index) for index in range(4)]
    fx.write_tfrecord(str(tmp_path / "Split-eval" / "data-0.gz"), records, gzip=True)
    manifest = {"image_size": side, "key": embed.KEY_RECORD, "examples": str(tmp_path / "Split-eval")}
    found = neighbours.thumbnails(manifest, [0, 0], ["data-0.gz:2", "data-0.gz:0"])
    np.testing.assert_array_equal(found[0], fx.pixels(2, (side, side, 3)))
    np.testing.assert_array_equal(found[1], fx.pixels(0, (side, side, 3)))


def test_cli_neighbours_finds_an_embedded_image_first_and_draws_the_grid(small_mnist, tmp_path, capsys):
    config, directory = small_mnist
    images, labels = data.load_arrays(config.data, "test")
    query = fx.write(str(tmp_path / "query.png"), fx.encode(images[11]))
    out = str(tmp_path / "grid.png")
    assert cli.main(["neighbours", "--embeddings", directory, "--query", query, "--query", query, "-k", "5", "--out", out]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"{query}:"
    first = printed[1].split()
    assert first[:2] == ["1", "1.0000"] and first[3] == str(labels[11]) and first[4] == "11"
    assert printed[-1] == f"picture written to {out}"
    width, height = Image.open(out).size
    assert width > 6 * neighbours.THUMBNAIL_SIDE and height > 2 * neighbours.THUMBNAIL_SIDE


def test_cli_neighbours_bad_query_is_one_line(small_mnist, tmp_path, capsys):
    _, directory = small_mnist
    code = cli.main(["neighbours", "--embeddings", directory, "--query", str(tmp_path / "no.png"), "--out", "x.png"])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"byol-tf neighbours: error: query: '{tmp_path / 'no.png'}' does not exist"


def test_cli_neighbours_query_that_is_not_an_image_is_one_line(small_mnist, tmp_path, capsys):
    _, directory = small_mnist
    bad = {
        "notes.png": (b"not an image\n", "not_an_image"),
        "empty.png": (b"", "empty_file"),
        "truncated.jpg": (fx.truncated(fx.jpeg(1, (32, 32, 3))), "corrupt_image: JPEG"),
    }
    good = fx.write(str(tmp_path / "good.png"), fx.png(0))
    for name, (contents, reason) in bad.items():
        path = fx.write(str(tmp_path / name), contents)
        code = cli.main(["neighbours", "--embeddings", directory, "--query", good, "--query", path, "--out", "x.png"])
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"byol-tf neighbours: error: query: '{path}' is not usable ({reason}") and "\n" not in err


class _OlderExport(tf.Module):
    """An export from before WebP was served: its serving signature refuses RIFF bytes."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve(self, image_bytes):
        riff = tf.reduce_any(tf.equal(tf.strings.substr(image_bytes, 0, 4), b"RIFF"))
        with tf.control_dependencies([tf.debugging.Assert(tf.logical_not(riff), ["image_bytes[0] is not a JPEG"])]):
            return self.embed(tf.zeros([tf.size(image_bytes), 8, 8, 3]))

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32, name="images")])
    def embed(self, images):
        features = tf.reduce_mean(images, axis=[1, 2]) + 1.0
        return {"embedding": features, "representation": features}


def test_cli_neighbours_query_the_model_refuses_is_one_line(tmp_path, rng, capsys):
    module = _OlderExport()
    model = str(tmp_path / "older")
    tf.saved_model.save(module, model, signatures={"serving_default": module.serve, "embed_images": module.embed})
    directory = write_folder(str(tmp_path / "emb"), rng.normal(size=(5, 3)).astype(np.float32), np.arange(5), 5)
    manifest = embed.read_manifest(directory)
    embed.fileio.write_json(os.path.join(directory, embed.MANIFEST_FILE), {**manifest, "model": model})
    query = str(tmp_path / "query.webp")
    Image.fromarray(fx.pixels(0)).save(query, lossless=True)  # a file our decoder reads
    code = cli.main(["neighbours", "--embeddings", directory, "--query", query, "--out", str(tmp_path / "x.png")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"byol-tf neighbours: error: query: the model '{model}' refused the queries: ") and "\n" not in err
    assert "image_bytes[0] is not a JPEG" in err


# ------------------------------------------------------------------ BYOL against random init

# 8-NN label agreement of held-out digits among the training digits (benchmarks/RESULTS.md,
# "Neighbours"): random init 0.68; the demo preset after 4 epochs 0.71, 6 epochs 0.75,
# 40 epochs 0.89. Six epochs leave a margin well above run-to-run noise.
BYOL_EPOCHS = 6
AGREEMENT_MARGIN = 0.03


def mnist_agreement(model, root, config, k=8):
    """Neighbour label agreement: each held-out digit's k nearest training digits (embedded by `model`)."""
    for split in ("train", "test"):
        embed.embed_split(model, config, split, os.path.join(root, split), progress=False)
    queries = embed.read(os.path.join(root, "test"))
    found = neighbours.search(os.path.join(root, "train"), queries.embeddings, k)
    return neighbours.label_agreement(queries.labels, found.labels)


@pytest.mark.slow
def test_byol_neighbours_agree_on_the_digit_more_than_random_inits(tmp_path):
    from byol_tf import experiment

    # A short run of the demo preset; projector and kNN monitor off.
    config = config_lib.load(
        MNIST5K,
        [f"train.epochs={BYOL_EPOCHS}", "train.verbose=0", "evaluation.knn_every_epochs=0",
         "evaluation.projector_images=0"],
    )
    trained = experiment.run(config, run_dir=str(tmp_path / "run"), evaluate=False).export_dir
    random_init = exports.export_random_encoder(str(tmp_path / "random"), moving_statistics=False)
    byol = mnist_agreement(trained, str(tmp_path / "byol_embeddings"), config)
    baseline = mnist_agreement(random_init, str(tmp_path / "random_embeddings"), config)
    assert byol > baseline + AGREEMENT_MARGIN, (byol, baseline)
